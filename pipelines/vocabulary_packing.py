"""All the frequency vocabularies of an analysis phase in one Beam stage: TF Transform's files.

TF Transform 1.21 packs its combiner analyzers (mean, variance, quantiles, ...) into one stage
per phase, but gives every `tft.vocabulary` (and compute_and_apply_vocabulary) its own chain of
Beam stages: VocabularyAccumulate -> VocabularyMerge -> VocabularyPrune -> VocabularyOrderAndWrite,
two VocabularyCounts, a dozen stages in all, each paying the runner's fixed cost per stage and
each holding its state until the job ends; the cost is per vocabulary, hardly per row. Packed,
a 300-column table with 100 vocabularies (benchmarks/wide.py, 20,000 rows, one worker) ran in
186 s and 3.3 GB peak RSS instead of 216 s and 11.2 GB (benchmarks/RESULTS.md).

This module rewrites TF Transform's analysis graph (the `nodes` graph that
analysis_graph_builder.build returns, before it becomes Beam stages) so that the vocabulary
chains reading the same phase's analyzer inputs become one PackedVocabularies operation: one
pass counting each batch's tokens of every vocabulary at once (summed per bundle into tables of
{token: count}, SHARDS per vocabulary, below), one CombinePerKey keyed by (vocabulary, shard),
one GroupByKey by vocabulary, and one DoFn that prunes, orders and writes each vocabulary file
exactly as TF Transform's chain does:
  - counts summed over all rows; frequency_threshold keeps count >= threshold; top_k keeps the
    k largest (count, token) pairs;
  - ordered by count, then token, both descending; numeric tokens written as their decimal text;
  - an empty vocabulary gets TF Transform's dummy entry; store_frequency writes 'count token';
  - the two sizes TF Transform binds into the graph (before and after pruning, at least 1).
The vocabulary files, their paths, the transform graph and everything downstream are unchanged:
tests/test_vocabulary.py compares the files byte for byte with TF Transform's own chain.

Packed: the unweighted frequency vocabularies in the text format, without key_fn coverage,
reserved tokens or fingerprint_shuffle, whose chain is used only as tft.vocabulary uses it.
Every other vocabulary (weighted, mutual information, labels, tfrecord_gzip, ...) keeps TF
Transform's chain. Where the analysis reads or writes an analyzer cache, the cache keeps each
span's counts of each vocabulary under its own key: pack_merges packs the merges of cached and
new counts, the pruning, ordering and writing (PackedVocabularyMerges), the same files; the new
spans' counting, and their cache entries, are packed by pipelines/span_counting.py, and the
cached counts by pipelines/cache_packing.py, each a KEYED input of the merge
(with_keyed_inputs).

It builds on private parts of TF Transform 1.21 (analysis_graph_builder.build and the node
types of analyzer_nodes and beam_nodes); pipelines/analysis_graph.py runs it, switched on by
pipelines/vocabulary.install only where that module's counting is (the TF Transform versions it
was tested with, and not where this project's Beam patches are off:
pipelines/runner/beam_patches.py, ENV).
Could live upstream: TF Transform's combiner_packing_util could pack vocabularies the same way.
"""

import collections
import functools
import os
import uuid
import zlib
from typing import Any, NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows
from tensorflow_transform import analyzer_nodes, nodes
from tensorflow_transform import analyzers as tft_analyzers
from tensorflow_transform.beam import analysis_graph_builder, beam_nodes
from tensorflow_transform.beam import common as tft_beam_common

from pipelines import analysis_graph
from pipelines.analysis_graph import value_key

# TF Transform's ordering type of the frequency vocabularies (private; pipelines/vocabulary.py
# reads it from here too).
FREQUENCY = getattr(getattr(tft_analyzers, '_VocabOrderingType', None), 'FREQUENCY', None)
# The private names of TF Transform's this rewrite reads (vocabulary.unfit_reason checks them).
NEEDS = ((analysis_graph_builder, 'build'), (beam_nodes, 'ExtractFromDict'),
         (analyzer_nodes, 'VocabularyAccumulate'), (analyzer_nodes, 'VocabularyMerge'),
         (analyzer_nodes, 'VocabularyPrune'), (analyzer_nodes, 'VocabularyCount'),
         (analyzer_nodes, 'VocabularyOrderAndWrite'),
         (tft_analyzers, 'get_empy_vocabulary_dummy_value'))


def missing():
  """The names of NEEDS that the installed TF Transform lacks."""
  return analysis_graph.missing(NEEDS)


class VocabularySpec(NamedTuple):
  """What one packed vocabulary needs, as plain data (it travels to the workers)."""
  key: str  # its analyzer input in the phase's batches of analyzer inputs
  input_dtype: str  # 'string' or 'int64'
  frequency_threshold: float
  top_k: Optional[int]
  store_frequency: bool
  vocab_filename: str


class PackedVocabularies(
    collections.namedtuple('PackedVocabularies', ['specs', 'label']), nodes.OperationDef):
  """Batches of one phase's analyzer inputs -> (index of a spec, (path, unpruned size, pruned
  size)) for every spec; writes each vocabulary file."""
  __slots__ = ()


class PackedVocabularyMerges(
    collections.namedtuple('PackedVocabularyMerges', ['specs', 'owners', 'label']),
    nodes.OperationDef):
  """PCollections of (token, count), cached and new counts, input i of spec owners[i] (or, where
  owners[i] is KEYED, of ((spec index, shard), {token: count}) tables of any spec) -> as
  PackedVocabularies; writes each vocabulary file."""
  __slots__ = ()


# An owner of PackedVocabularyMerges: the input's tables are keyed by their vocabulary already.
KEYED = -1


class ExtractPackedVocabulary(
    collections.namedtuple('ExtractPackedVocabulary', ['index', 'label']), nodes.OperationDef):
  """PackedVocabularies' output -> its spec `index`'s file path, unpruned and pruned sizes: the
  three singletons TF Transform's chain gives (VocabularyOrderAndWrite and two VocabularyCount)."""
  __slots__ = ()

  @property
  def num_outputs(self):
    return 3


# ---- the graph rewrite ----------------------------------------------------------------------


def _only(ops, kind):
  return len(ops) == 1 and isinstance(ops[0].operation_def, kind)


def _next_and_counts(consumers, op, kind):
  """(the one consumer of `op`'s output of type `kind`, the VocabularyCounts of it) when those
  are all its consumers; (None, None) otherwise."""
  after = consumers[value_key(op.outputs[0])]
  nexts = [c for c in after if isinstance(c.operation_def, kind)]
  counts = [c for c in after if isinstance(c.operation_def, analyzer_nodes.VocabularyCount)]
  if len(nexts) != 1 or len(nexts) + len(counts) != len(after):
    return None, None
  return nexts[0], counts


def _chain(accumulate, consumers):
  """The packable vocabulary chain that starts at VocabularyAccumulate `accumulate`, as
  (batches ValueNode, spec, {replaced value key: output index}, label); None if it is not one."""
  acc = accumulate.operation_def
  if FREQUENCY is None or acc.vocab_ordering_type != FREQUENCY or len(accumulate.inputs) != 1:
    return None
  batches = batches_of(accumulate)
  if batches is None:
    return None
  merges = consumers[value_key(accumulate.outputs[0])]
  if not _only(merges, analyzer_nodes.VocabularyMerge):
    return None
  found = _merged_chain(merges[0], consumers)
  if found is None:
    return None
  keys = accumulate.inputs[0].parent_operation.operation_def.keys
  spec, replaced, label = found
  return batches, spec._replace(key=keys[0] if isinstance(keys, tuple) else keys), replaced, label


def batches_of(accumulate):
  """The batches of analyzer inputs that VocabularyAccumulate `accumulate` counts one key of
  (through an ExtractFromDict of that one key); None otherwise."""
  extract = accumulate.inputs[0].parent_operation
  if not isinstance(extract.operation_def, beam_nodes.ExtractFromDict):
    return None
  keys = extract.operation_def.keys
  if isinstance(keys, tuple) and len(keys) != 1:
    return None
  return extract.inputs[0]


def _merged_chain(merge, consumers):
  """The packable chain that starts at VocabularyMerge `merge` (of frequencies), as (spec without
  its key, {replaced value key: output index}, label); None if it is not one."""
  if FREQUENCY is None or merge.operation_def.vocab_ordering_type != FREQUENCY:
    return None
  prune, merge_counts = _next_and_counts(consumers, merge, analyzer_nodes.VocabularyPrune)
  if prune is None:
    return None
  p = prune.operation_def
  if (p.key_fn is not None or (p.top_k is not None and p.top_k < 0) or
      p.frequency_threshold is None or p.frequency_threshold < 0):
    return None  # TF Transform's own chain, and its own errors for negative values
  write, prune_counts = _next_and_counts(consumers, prune,
                                         analyzer_nodes.VocabularyOrderAndWrite)
  if write is None:
    return None
  w = write.operation_def
  if len(write.inputs) != 1 or w.fingerprint_shuffle or w.file_format != 'text':
    return None
  spec = VocabularySpec(None, str(w.input_dtype), p.frequency_threshold, p.top_k,
                        bool(w.store_frequency), w.vocab_filename)
  replaced = {value_key(write.outputs[0]): 0}
  replaced.update({value_key(op.outputs[0]): 1 for op in merge_counts})
  replaced.update({value_key(op.outputs[0]): 2 for op in prune_counts})
  return spec, replaced, w.label


def pack(leaves, graph_mode=True):
  """The graph under `leaves` (ValueNodes) with its packable vocabulary chains packed, one
  PackedVocabularies per phase's batches (either tracing); returns the new leaves, in order."""
  del graph_mode
  ops, consumers = analysis_graph.operations(leaves)
  groups = collections.defaultdict(list)  # batches key -> [(spec, replaced, label, batches)]
  for op in ops.values():
    if isinstance(op.operation_def, analyzer_nodes.VocabularyAccumulate):
      chain = _chain(op, consumers)
      if chain is not None:
        batches, spec, replaced, label = chain
        groups[value_key(batches)].append((spec, replaced, label, batches))

  def packed_op(value, chains):
    batches = chains[0][3]
    return nodes.apply_operation(
        PackedVocabularies, value(batches), specs=tuple(chain[0] for chain in chains),
        label=f'PackedVocabularies[{batches.parent_operation.operation_def.label}]')

  return _substitute_packed(leaves, groups, packed_op)


def pack_merges(leaves, graph_mode=True, cache_dict=None):
  """Where the analysis reads an analyzer cache: the graph under `leaves` with the vocabulary
  chains that start at a merge of cached and new counts (VocabularyMerge of a FlattenCache)
  packed, one PackedVocabularyMerges for the merges whose new counts come from the same
  phase's batches (or from none: every span cached). Returns the new leaves, in order."""
  del graph_mode, cache_dict
  ops, consumers = analysis_graph.operations(leaves)
  groups = collections.defaultdict(list)  # the phases' batches -> [(spec, replaced, label, in)]
  for op in ops.values():
    if not isinstance(op.operation_def, analyzer_nodes.VocabularyMerge) or len(op.inputs) != 1:
      continue
    flatten = op.inputs[0].parent_operation
    if (not isinstance(flatten.operation_def, beam_nodes.Flatten) or
        len(consumers[value_key(op.inputs[0])]) != 1):
      continue
    phases = _phases_of(flatten)
    found = _merged_chain(op, consumers)
    if phases is not None and found is not None:
      groups[phases].append((*found, op.inputs[0]))

  def packed_op(value, chains):
    # The FlattenCaches' inputs, not the FlattenCaches: each would be a stage of its own.
    parts = [(index, part) for index, chain in enumerate(chains)
             for part in chain[3].parent_operation.inputs]
    return nodes.apply_operation(
        PackedVocabularyMerges, *(value(part) for _, part in parts),
        specs=tuple(chain[0] for chain in chains), owners=tuple(i for i, _ in parts),
        label=f'PackedVocabularyMerges[{chains[0][2]}]')

  return _substitute_packed(leaves, groups, packed_op)


def with_keyed_inputs(leaves, found_in, keyed_inputs):
  """The graph under `leaves` with each PackedVocabularyMerges' inputs that `found_in(value,
  owner, consumers)` finds (giving an entry; None: kept) replaced by KEYED inputs,
  `keyed_inputs(value, {input position: entry}, the merges' label)` (ValueNodes of the rebuilt
  graph: `value` maps an old ValueNode to its rebuilt one). Returns the new leaves, in order."""
  ops, consumers = analysis_graph.operations(leaves)
  replacements = {}
  for op in ops.values():
    if not isinstance(op.operation_def, PackedVocabularyMerges):
      continue
    found = {}
    for at, (value, owner) in enumerate(zip(op.inputs, op.operation_def.owners)):
      entry = None if owner == KEYED else found_in(value, owner, consumers)
      if entry is not None:
        found[at] = entry
    if found:
      replacements[value_key(op.outputs[0])] = functools.partial(
          _rebuilt_merges, op, found, keyed_inputs)
  if not replacements:
    return tuple(leaves)
  return analysis_graph.substitute(leaves, replacements)


def _rebuilt_merges(merges, found, keyed_inputs, value):
  kept = [at for at in range(len(merges.inputs)) if at not in found]
  keyed = list(keyed_inputs(value, found, merges.operation_def.label))
  owners = (*(merges.operation_def.owners[at] for at in kept), *[KEYED] * len(keyed))
  inputs = (*(value(merges.inputs[at]) for at in kept), *keyed)
  (output,) = nodes.OperationNode(merges.operation_def._replace(owners=owners), inputs).outputs
  return output


def _phases_of(flatten):
  """The batches (as value keys) whose counts a FlattenCache merges with cached ones, or None
  where one of its inputs is neither cached counts nor a frequency count of batches."""
  found = set()
  for value in flatten.inputs:
    op = value.parent_operation
    if not op.inputs:  # counts read from the cache (DecodeCache, DecodeCachedSpans)
      continue
    if (not isinstance(op.operation_def, analyzer_nodes.VocabularyAccumulate) or
        op.operation_def.vocab_ordering_type != FREQUENCY or len(op.inputs) != 1):
      return None
    batches = batches_of(op)
    if batches is None:
      return None
    found.add(value_key(batches))
  return frozenset(found)


def _substitute_packed(leaves, groups, packed_op):
  """The graph under `leaves` with each group's chains (group -> [(spec, {replaced value key:
  output index}, label, ...)]) replaced by the outputs of one packed operation,
  `packed_op(value, chains)`, through an ExtractPackedVocabulary per chain."""
  if not groups:
    return tuple(leaves)
  for chains in groups.values():  # a deterministic order: the graph walk's is not
    chains.sort(key=lambda chain: chain[2])
  packed, extracted = {}, {}

  def extracted_outputs(value, group, index):
    if (group, index) not in extracted:
      if group not in packed:
        packed[group] = packed_op(value, groups[group])
      name = groups[group][index][2].replace('VocabularyOrderAndWrite', 'PackedVocabulary', 1)
      extracted[group, index] = nodes.apply_multi_output_operation(
          ExtractPackedVocabulary, packed[group], index=index, label=name)
    return extracted[group, index]

  replacements = {}  # replaced value key -> its new value
  for group, chains in groups.items():
    for index, chain in enumerate(chains):
      for key, output in chain[1].items():
        replacements[key] = functools.partial(
            lambda value, group, index, output: extracted_outputs(value, group, index)[output],
            group=group, index=index, output=output)
  return analysis_graph.substitute(leaves, replacements)


# ---- the Beam stages ------------------------------------------------------------------------


def token_counts(tokens):
  """(token, count) for each distinct token of an array of them, counted at once by the
  C-implemented collections.Counter."""
  return collections.Counter(np.asarray(tokens).ravel().tolist()).items()


def count_tokens(batch, keys):
  """(vocabulary index, its (token, count) pairs) for each vocabulary of one batch of analyzer
  inputs (a dict of arrays, as TF Transform's ApplySavedModel gives), each distinct token once."""
  for index, key in enumerate(keys):
    yield index, token_counts(batch[key])


# Each vocabulary's counts cross the runner as tables of (token: count), SHARDS per vocabulary
# and bundle, not one element per distinct token: on one machine, Beam's per-element coding and
# grouping cost more than summing the counts (the cache benchmark's 97,000 cached counts crossed
# the runner twice each); on a distributed runner, a vocabulary's shards are still summed on as
# many workers. A token's shard is a function of the token alone, the same in every process.
SHARDS = 16
# A bundle's table of one vocabulary is handed on once it holds this many tokens, so that a
# long bundle of a huge vocabulary does not keep every token in memory.
MAX_TABLE = 1 << 20


def shard_of(token):
  if isinstance(token, str):
    token = token.encode()
  return (zlib.crc32(token) if isinstance(token, bytes) else int(token)) % SHARDS


def sharded(index, table):
  """((index, shard), {token: count}) for each shard of `table` that holds a token."""
  shards = collections.defaultdict(dict)
  for token, count in table.items():
    shards[shard_of(token)][token] = count
  return [((index, shard), part) for shard, part in sorted(shards.items())]


def _sum_into(table, pairs):
  """Adds the (token, count) `pairs` to the counts of `table` (a dict) and returns it."""
  if not table:
    table.update(pairs)
    return table
  get = table.get
  for token, count in pairs:
    table[token] = get(token, 0) + count
  return table


class BundleTables(beam.DoFn):
  """Counts summed per vocabulary and token over a bundle, handed on as sharded tables."""

  def start_bundle(self):
    self._tables = collections.defaultdict(dict)

  def _add(self, index, pairs):
    table = _sum_into(self._tables[index], pairs)
    if len(table) >= MAX_TABLE:
      return sharded(index, self._tables.pop(index))
    return None

  def finish_bundle(self):
    for index, table in sorted(self._tables.items()):
      for element in sharded(index, table):
        yield GlobalWindows.windowed_value(element)
    self._tables = None


class CountBatches(BundleTables):
  """Batches of analyzer inputs -> ((vocabulary index, shard), {token: count}) of `keys`, the
  index of keys[i] being i, or `indices[i]` where given."""

  def __init__(self, keys, indices=None):
    self._keys = keys
    self._indices = list(range(len(keys))) if indices is None else list(indices)

  def process(self, batch):
    indices = self._indices
    for index, counts in count_tokens(batch, self._keys):
      yield from self._add(indices[index], counts) or ()


class CountBatchValues(BundleTables):
  """TF Transform's batches of one vocabulary's analyzer input, (tokens,) -> ((0, shard),
  {token: count})."""

  def process(self, batch_values):
    (tokens,) = batch_values
    yield from self._add(0, token_counts(tokens)) or ()


class _CountPairs(BundleTables):
  """(token, count) pairs of vocabulary `index` -> as CountBatches."""

  def __init__(self, index):
    self._index = index

  def process(self, pair):
    yield from self._add(self._index, (pair,)) or ()


class SumTables(beam.CombineFn):
  """{token: count} tables -> one, counts summed (an input table is never changed)."""

  def create_accumulator(self):
    return {}

  def add_input(self, accumulator, table):
    return _sum_into(accumulator, table.items())

  def merge_accumulators(self, accumulators):
    accumulators = sorted(accumulators, key=len, reverse=True)  # the smaller ones into the largest
    merged = accumulators[0]
    for table in accumulators[1:]:
      _sum_into(merged, table.items())
    return merged

  def extract_output(self, accumulator):
    return accumulator


def order_and_prune(spec, counts):
  """One vocabulary's (count, token) pairs -> (entries in file order, unpruned size, pruned
  size), as TF Transform's VocabularyMerge, VocabularyPrune and VocabularyOrderAndWrite."""
  unpruned = max(len(counts), 1)
  if spec.frequency_threshold > 0:
    counts = [pair for pair in counts if pair[0] >= spec.frequency_threshold]
  if spec.input_dtype != 'string':  # numeric tokens: their text (tf.compat.as_str_any)
    counts = [(count, str(token).encode()) for count, token in counts]
  counts.sort(reverse=True)
  if spec.top_k is not None:
    counts = counts[:spec.top_k]
  if not counts:
    counts = [tft_analyzers.get_empy_vocabulary_dummy_value(spec.input_dtype)]
  return counts, unpruned, len(counts)


def vocabulary_lines(spec, counts):
  if spec.store_frequency:
    return b''.join(b'%d %s\n' % (count, token) for count, token in counts)
  return b''.join(token + b'\n' for _, token in counts)


class _WriteVocabularies(beam.DoFn):
  """(index, its shards' {token: count} tables and None markers) -> (index, (path, unpruned,
  pruned));
  writes the file under a temporary name, then renames it, so a retried bundle rewrites it."""

  def __init__(self, specs, temp_dir):
    self._specs = specs
    self._temp_dir = temp_dir

  def process(self, element):
    index, tables = element
    spec = self._specs[index]
    # The shards hold disjoint tokens (shard_of), each summed over the whole split.
    counts = [(count, token) for table in tables if table is not None
              for token, count in table.items()]
    counts, unpruned, pruned = order_and_prune(spec, counts)
    path = os.path.join(self._temp_dir, spec.vocab_filename)
    partial = f'{path}.incomplete-{uuid.uuid4().hex}'
    with FileSystems.create(partial) as f:
      f.write(vocabulary_lines(spec, counts))
    if FileSystems.exists(path):
      FileSystems.delete([path])
    FileSystems.rename([partial], [path])
    yield index, (np.array(path), np.int64(unpruned), np.int64(pruned))


class _PackedVocabulariesImpl(beam.PTransform):

  def __init__(self, operation, extra_args):
    super().__init__()
    self._specs = operation.specs
    self._temp_dir = extra_args.base_temp_dir

  def expand(self, inputs):
    (batches,) = inputs
    keys = [spec.key for spec in self._specs]
    counted = (batches
               | 'CountTokensPerBundle' >> beam.ParDo(CountBatches(keys)).with_output_types(Any))
    return _sum_and_write(counted, self._specs, self._temp_dir)


class _PackedVocabularyMergesImpl(beam.PTransform):

  def __init__(self, operation, extra_args):
    super().__init__()
    self._specs = operation.specs
    self._owners = operation.owners
    self._temp_dir = extra_args.base_temp_dir

  def expand(self, inputs):
    keyed = [counts if i == KEYED else
             counts | f'TablesOfVocabulary{n}' >> beam.ParDo(_CountPairs(i)).with_output_types(Any)
             for n, (i, counts) in enumerate(zip(self._owners, inputs))]
    counted = keyed | 'AllCounts' >> beam.Flatten().with_output_types(Any)
    return _sum_and_write(counted, self._specs, self._temp_dir)


def _sum_and_write(counted, specs, temp_dir):
  """((vocabulary index, shard), {token: count}) tables of every vocabulary of `specs` ->
  (index, (path, unpruned size, pruned size)) of each; writes the files."""
  by_vocabulary = (counted
                   | 'SumPerShard' >> beam.CombinePerKey(SumTables()).with_input_types(Any)
                   .with_output_types(Any)
                   | 'ByVocabulary' >> beam.MapTuple(
                       lambda key, table: (key[0], table)).with_output_types(Any))
  # One None per vocabulary, so that a vocabulary without a single token is written too.
  every = (counted.pipeline
           | 'EveryVocabulary' >> beam.Create([(i, None) for i in range(len(specs))])
           .with_output_types(Any))
  return ((by_vocabulary, every)
          | 'Together' >> beam.Flatten().with_output_types(Any)
          | 'GroupByVocabulary' >> beam.GroupByKey().with_input_types(Any)
          .with_output_types(Any)
          | 'OrderPruneAndWrite' >> beam.ParDo(_WriteVocabularies(specs, temp_dir))
          .with_output_types(Any))


class _ExtractPackedVocabularyImpl(beam.PTransform):

  def __init__(self, operation, extra_args):
    super().__init__()
    self._index = operation.index

  def expand(self, inputs):
    (packed,) = inputs
    index = self._index
    mine = (packed
            | 'Select' >> beam.FlatMap(
                lambda kv: [kv[1]] if kv[0] == index else []).with_output_types(Any))
    return tuple(mine | name >> beam.Map(lambda outputs, i=i: outputs[i]).with_output_types(Any)
                 for i, name in enumerate(('Path', 'UnprunedSize', 'PrunedSize')))


tft_beam_common.register_ptransform(PackedVocabularies)(_PackedVocabulariesImpl)
tft_beam_common.register_ptransform(PackedVocabularyMerges)(_PackedVocabularyMergesImpl)
tft_beam_common.register_ptransform(ExtractPackedVocabulary)(_ExtractPackedVocabularyImpl)
