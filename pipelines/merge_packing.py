"""Between a phase's packed accumulate and its merge: one transform, not two per analyzer, and
the merges of a multi-phase analysis packed too.

TF Transform 1.21 packs the accumulate of a phase's combiner analyzers (mean, variance,
quantiles, min and max, ...) into one CombineGlobally, and then:
  - with one phase, packs their merges into one as well, but hands each analyzer's accumulator
    from the one to the other through an ExtractFromDict and an AddKey of its own, flattened;
  - with more than one phase (any analyzer of something an analyzer computed), does not pack the
    merges at all (its combiner_packing_util packs every merge of the graph into one, which
    cannot span phases): each analyzer keeps its own ExtractFromDict and CombineGlobally.
On a wide table that is hundreds of Beam transforms per phase, paid in the Beam graph's
construction, the runner's fusion and its bundles, whatever the number of rows.

This rewrite of TF Transform's analysis graph (pipelines/analysis_graph.py):
  - turns each packed accumulate's ExtractFromDict -> AddKey pairs feeding a Flatten into one
    AccumulatorsByKey, which emits the same (key, accumulator) pairs;
  - packs the unpacked merges reading the same packed accumulate (so of one phase) into one
    PackedCombineMerge, exactly as TF Transform packs a one-phase analysis: the same combiners,
    keyed by each merge's label, each analyzer's outputs taken from the packed merge's dict by
    ExtractFromDict and ExtractPackedCombineMergeOutputs (whose bindings
    pipelines/binding_packing.py then packs).
The combiners, their accumulators and outputs are TF Transform's own: tests/test_binding_packing.py
compares one- and two-phase analyses with TF Transform's unpacked ones.

It builds on private parts of TF Transform 1.21 (the node types named in NEEDS and
combiner_packing_util._CombinerOpWrapper), checked with the vocabulary packing's
(pipelines/vocabulary.unfit_reason).
"""

import collections
from typing import Any, Tuple

import apache_beam as beam
from tensorflow_transform import analyzer_nodes, nodes
from tensorflow_transform.beam import beam_nodes, combiner_packing_util
from tensorflow_transform.beam import common as tft_beam_common

from pipelines import analysis_graph
from pipelines.analysis_graph import is_a as _is
from pipelines.analysis_graph import value_key

NEEDS = ((analyzer_nodes, 'PackedCombineAccumulate'), (analyzer_nodes, 'PackedCombineMerge'),
         (analyzer_nodes, 'CacheableCombineMerge'), (analyzer_nodes, 'ExtractCombineMergeOutputs'),
         (analyzer_nodes, 'ExtractPackedCombineMergeOutputs'), (analyzer_nodes, 'AddKey'),
         (beam_nodes, 'Flatten'), (beam_nodes, 'ExtractFromDict'),
         (combiner_packing_util, '_CombinerOpWrapper'))


def missing():
  """The names of NEEDS that the installed TF Transform lacks."""
  return analysis_graph.missing(NEEDS)


class AccumulatorsByKey(
    collections.namedtuple('AccumulatorsByKey', ['pairs', 'label']), nodes.OperationDef):
  """A packed accumulate's dict -> (key, dict[name]) for each (name, key) of `pairs`."""
  __slots__ = ()


def from_packed_accumulate(value):
  """(the packed accumulate's ValueNode, the dict key) when `value` is an ExtractFromDict of one
  key from a PackedCombineAccumulate; None otherwise."""
  from_dict = value.parent_operation
  if not _is(from_dict, beam_nodes.ExtractFromDict) or isinstance(
      from_dict.operation_def.keys, tuple):
    return None
  (accumulated,) = from_dict.inputs
  if not _is(accumulated.parent_operation, analyzer_nodes.PackedCombineAccumulate):
    return None
  return accumulated, from_dict.operation_def.keys


def pack(leaves, graph_mode=True, cache_dict=None):
  """The graph under `leaves` with its accumulate-to-merge hand-overs packed (either
  tracing); returns the new leaves. The same with an analyzer cache (`cache_dict`, unused):
  what it packs hands a packed accumulate's dict to merges, whatever else (the cache's
  encodes) reads that dict too; a merge that also takes cached accumulators reads a flatten,
  which it leaves as it is."""
  del graph_mode, cache_dict
  ops, consumers = analysis_graph.operations(leaves)
  replacements = {}
  merges = collections.defaultdict(list)  # packed accumulate key -> [(ValueNode, name, merge)]
  for op in ops.values():
    if _is(op, beam_nodes.Flatten):
      groups, others = {}, []
      for value in op.inputs:
        add_key = value.parent_operation
        source = _is(add_key, analyzer_nodes.AddKey) and from_packed_accumulate(
            add_key.inputs[0])
        if source:
          accumulated, name = source
          group = groups.setdefault(value_key(accumulated), (accumulated, []))
          group[1].append((name, add_key.operation_def.key))
        else:
          others.append(value)
      if groups:
        replacements[value_key(op.outputs[0])] = _new_flatten(op, groups, others)
    elif _is(op, analyzer_nodes.CacheableCombineMerge) and len(op.inputs) == 1:
      source = from_packed_accumulate(op.inputs[0])
      users = consumers[value_key(op.outputs[0])]
      if source and users and all(_is(u, analyzer_nodes.ExtractCombineMergeOutputs)
                                  for u in users):
        accumulated, name = source
        merges[value_key(accumulated)].append((accumulated, name, op))
  for group in merges.values():
    if len(group) > 1:
      group.sort(key=lambda member: member[2].operation_def.label)  # a deterministic order
      _pack_merges(group, consumers, replacements)
  if not replacements:
    return tuple(leaves)
  return analysis_graph.substitute(leaves, replacements)


def _new_flatten(flatten, groups, others):
  label = flatten.operation_def.label

  def build(value):
    inputs = [nodes.apply_operation(AccumulatorsByKey, value(accumulated), pairs=tuple(pairs),
                                    label=f'AccumulatorsByKey[{label}][{i}]')
              for i, (accumulated, pairs) in enumerate(groups.values())]
    inputs.extend(value(v) for v in others)
    return nodes.apply_operation(beam_nodes.Flatten, *inputs, label=label)
  return build


def _pack_merges(group, consumers, replacements):
  """Replacements of the outputs of the ExtractCombineMergeOutputs of `group`'s merges (of one
  packed accumulate) by those of one PackedCombineMerge."""
  accumulated = group[0][0]
  first = group[0][2].operation_def.label
  built = {}

  def packed(value):
    if 'merge' not in built:
      keyed = nodes.apply_operation(
          AccumulatorsByKey, value(accumulated),
          pairs=tuple((name, merge.operation_def.label) for _, name, merge in group),
          label=f'AccumulatorsByKey[{first}]')
      built['merge'] = nodes.apply_operation(
          analyzer_nodes.PackedCombineMerge, keyed,
          combiners=[combiner_packing_util._CombinerOpWrapper(
              combiner=merge.operation_def.combiner, keys=(merge.operation_def.label,),
              label=merge.operation_def.label) for _, _, merge in group],
          label=f'PackedCombineMerge[{first}]')
    return built['merge']

  def outputs(value, merge, extract):
    if id(extract) not in built:
      label = merge.operation_def.label
      from_dict = nodes.apply_operation(beam_nodes.ExtractFromDict, packed(value), keys=label,
                                        label=f'ExtractFromDict[{extract.operation_def.label}]')
      built[id(extract)] = nodes.apply_multi_output_operation(
          analyzer_nodes.ExtractPackedCombineMergeOutputs, from_dict,
          output_tensor_info_list=extract.operation_def.output_tensor_infos,
          label=f'ExtractPackedCombineMergeOutputs[{extract.operation_def.label}]')
    return built[id(extract)]

  for _, _, merge in group:
    for extract in consumers[value_key(merge.outputs[0])]:
      for i, out in enumerate(extract.outputs):
        replacements[value_key(out)] = (
            lambda value, merge=merge, extract=extract, i=i: outputs(value, merge, extract)[i])


# ---- the Beam stages ------------------------------------------------------------------------


def accumulators_by_key(accumulated, pairs):
  return [(key, accumulated[name]) for name, key in pairs]


class _AccumulatorsByKeyImpl(beam.PTransform):

  def __init__(self, operation, extra_args):
    super().__init__()
    self._pairs = operation.pairs

  def expand(self, inputs):
    (accumulated,) = inputs
    return accumulated | 'ByKey' >> beam.FlatMap(
        accumulators_by_key, self._pairs).with_output_types(Tuple[str, Any])


tft_beam_common.register_ptransform(AccumulatorsByKey)(_AccumulatorsByKeyImpl)
