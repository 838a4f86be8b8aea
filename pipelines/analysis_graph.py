"""Rewrites of TF Transform's analysis graph that pack per-analyzer Beam stages: the hook and the
graph walk they share.

TF Transform 1.21 turns its traced preprocessing_fn into a graph of `nodes` operations
(analysis_graph_builder.build) and then each operation into Beam transforms. Many of those
operations exist once per analyzer or once per analyzer output, so a table of hundreds of
columns pays Beam's fixed costs (building and pickling each DoFn, the runner's fusion, one side
input per output) hundreds of times over, whatever the number of rows. Rewrites pack them,
between the two steps (pipelines/vocabulary.REWRITES, in this order):
  - pipelines/vocabulary_packing.py: the frequency vocabularies of a phase in one stage;
  - pipelines/merge_packing.py: the merges of a phase's combines in one, and the hand-over of
    their accumulators in one transform;
  - pipelines/binding_packing.py: the analyzer results of a phase bound into its SavedModel in
    one step, instead of a chain of stages and a side input per result.
Each leaves what it does not recognize as TF Transform built it; all are off where the analysis
reads or writes an analyzer cache (the cache keys each analyzer's accumulator on its own).
Where it reads one, vocabulary.CACHE_REWRITES apply instead: pipelines/cache_packing.py decodes
all the combiners' cached accumulators of all spans in one step keyed for their merge (not one
per span and analyzer), merge_packing packs the new span's hand-over to that merge,
vocabulary_packing.pack_merges packs the vocabularies' merges of cached and new counts, into
which cache_packing counts every vocabulary's cached entries in one step and
pipelines/span_counting.py each new span's vocabularies in one, and the bindings are packed as
without a cache. Where the analysis writes a cache, and only within rewriting_output_cache
(stages.AnalyzeTrain, whose analysis_cache.write_cache reads what it makes),
vocabulary.OUTPUT_CACHE_REWRITES pack the output cache's encodes too (the combiners',
cache_packing; the vocabularies', span_counting, which is why the new spans' counting is packed
only there).

This builds on private parts of TF Transform 1.21 (analysis_graph_builder.build, the node types
of analyzer_nodes and beam_nodes), so pipelines/vocabulary.install switches it on only on the TF
Transform versions it was tested with, and not where this project's Beam patches are off
(pipelines/runner/beam_patches.py, ENV).
"""

import collections
import contextlib
import functools

from tensorflow_transform import nodes
from tensorflow_transform.beam import analysis_graph_builder

_ORIGINAL_BUILD = getattr(analysis_graph_builder, 'build', None)
# 'rewrites': functions (leaves, graph_mode) -> new leaves, applied in order where no analyzer
# cache is read or written; 'cache_rewrites': functions (leaves, graph_mode, cache_dict) -> new
# leaves, applied in order where a cache is read; 'output_cache_rewrites': functions (the output
# cache's value nodes, the rewritten graph's leaves) -> new value nodes, applied in order where a
# cache is written, within rewriting_output_cache only. Empty when off.
_STATE = {'rewrites': (), 'cache_rewrites': (), 'output_cache_rewrites': ()}


def set_enabled(on, rewrites=(), cache_rewrites=()):
  """Applies `rewrites` and `cache_rewrites` to the analyses built after this call (on), or
  none; the first call that turns it on puts the rewriting into analysis_graph_builder.build."""
  _STATE['rewrites'] = tuple(rewrites) if on else ()
  _STATE['cache_rewrites'] = tuple(cache_rewrites) if on else ()
  if on and analysis_graph_builder.build is _ORIGINAL_BUILD:
    analysis_graph_builder.build = _build_and_rewrite


@contextlib.contextmanager
def rewriting_output_cache(rewrites):
  """Within the block, where the other rewrites are on, `rewrites` apply to the output cache of
  the analyses built: for a caller that reads that cache knowing what they make of it (they
  change its layout, not only its Beam stages)."""
  previous = _STATE['output_cache_rewrites']
  _STATE['output_cache_rewrites'] = tuple(rewrites) if enabled() else ()
  try:
    yield
  finally:
    _STATE['output_cache_rewrites'] = previous


def enabled():
  return bool(_STATE['rewrites'])


def rewrites_output_cache_with(rewrite):
  """Whether the output cache of the analyses built now is rewritten by `rewrite` (within
  rewriting_output_cache, where the other rewrites are on)."""
  return rewrite in _STATE['output_cache_rewrites']


def cache_rewrites_enabled():
  return bool(_STATE['cache_rewrites'])


def _build_and_rewrite(graph, *args, **kwargs):
  root, cache, side_effects = _ORIGINAL_BUILD(graph, *args, **kwargs)
  # An analyzer cache (read: a cache_dict, even an empty one; or written) keys each analyzer's
  # accumulator on its own: only the cache rewrites apply.
  cache_dict = kwargs.get('cache_dict', args[3] if len(args) > 3 else None)
  if cache_dict is not None:
    rewrites = [functools.partial(r, cache_dict=cache_dict) for r in _STATE['cache_rewrites']]
  else:
    rewrites = () if cache else _STATE['rewrites']
  if rewrites:
    leaves = (root, *side_effects)
    for rewrite in rewrites:
      # TF Transform's graph mode traces into a tf.Graph, its TF2 behaviours into a FuncGraph.
      leaves = rewrite(leaves, graph_mode=not graph.building_function)
    root, *side_effects = leaves
  # The output cache holds accumulates of the first phase (of the raw inputs alone): their value
  # nodes are those of the rewritten graph, or (span_counting) what replaced them in it, which
  # its rewrite finds under the leaves.
  if cache is not None:
    for rewrite in _STATE['output_cache_rewrites']:
      cache = rewrite(cache, (root, *side_effects))
  return root, cache, side_effects


def missing(needs):
  """The (module, name) pairs of `needs` that the installed TF Transform lacks, as text."""
  return [f'{module.__name__}.{name}' for module, name in needs if not hasattr(module, name)]


def is_a(op, kind):
  """Whether OperationNode `op` is an operation of type `kind`."""
  return isinstance(op.operation_def, kind)


def value_key(value_node):
  """A ValueNode's identity: its operation and which of the operation's outputs it is."""
  return id(value_node.parent_operation), value_node.value_index


def operations(leaves):
  """Every operation the leaves depend on, and who consumes each value: (ops, consumers), ops
  keyed by id, consumers by value_key."""
  ops, consumers = {}, collections.defaultdict(list)
  stack = [leaf.parent_operation for leaf in leaves]
  while stack:
    op = stack.pop()
    if id(op) in ops:
      continue
    ops[id(op)] = op
    for value in op.inputs:
      consumers[value_key(value)].append(op)
      stack.append(value.parent_operation)
  return ops, consumers


def substitute(leaves, replacements):
  """The graph under `leaves` with the values of `replacements` (value_key -> function of
  `value`, the rebuilt graph's ValueNode for an old one, returning the new ValueNode) replaced;
  every operation downstream of a replaced value is rebuilt, the rest is kept as it is.
  Returns the new leaves, in order."""
  rebuilt_ops, new_values = {}, {}

  def value(node):
    key = value_key(node)
    if key in replacements:
      if key not in new_values:
        new_values[key] = replacements[key](value)
      return new_values[key]
    op = rebuild(node.parent_operation)
    return node if op is node.parent_operation else op.outputs[node.value_index]

  def rebuild(op):
    if id(op) not in rebuilt_ops:
      inputs = tuple(value(node) for node in op.inputs)
      same = all(a is b for a, b in zip(inputs, op.inputs))
      rebuilt_ops[id(op)] = op if same else nodes.OperationNode(op.operation_def, inputs)
    return rebuilt_ops[id(op)]

  return tuple(value(leaf) for leaf in leaves)
