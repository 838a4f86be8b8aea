"""The new spans of a cached analysis: each span's frequency vocabularies counted in one step,
and their cache entries encoded in one.

Where the analysis reads or writes an analyzer cache, TF Transform 1.21 counts every vocabulary
of every new span on its own: an ExtractFromDict and a VocabularyAccumulate per (span,
vocabulary), whose (token, count) pairs go to the vocabulary's merge and, through an EncodeCache
per (span, vocabulary), to the span's cache entry. vocabulary_packing packs the merges
(pack_merges) but not this side: a 300-column table's 100 vocabularies made hundreds of Beam
transforms per new span, each built, pickled and set up (the stage reading one new span of
50,000 rows: 419 transforms; 22 packed), and a cached run of that table cost more than an
uncached one (benchmarks/RESULTS.md). Here:
  - count_together (a rewrite of the analysis graph, after pack_merges): the
    VocabularyAccumulates of one span's batches that a PackedVocabularyMerges reads become one
    SpanVocabularyCounts: each batch's tokens of every vocabulary counted at once, summed per
    (vocabulary, shard) over the span (vocabulary_packing's tables), one KEYED input of the
    merge;
  - encode_together (a rewrite of the output cache, after the graph's): the span's EncodeCaches
    of those accumulates become one EncodeVocabularyCounts of the SpanVocabularyCounts, which
    gives each entry's records as TF Transform's EncodeCache encodes them (one (token, count)
    record per distinct token of the span), a list per (entry, shard), under a
    cache_packing.EncodedTogether key that analysis_cache.write_cache reads.
The vocabulary files, the cache entries' keys and their records are TF Transform's
(tests/test_span_counting.py encodes with TF Transform's coder; tests/test_analysis_cache.py
compares cached and uncached runs file by file). Anything else stays as TF Transform built it.
It builds on private parts of TF Transform 1.21 (the VocabularyAccumulate and EncodeCache nodes,
the vocabulary cache coder's format), switched on where pipelines/vocabulary.install switches on
the other rewrites.
"""

import collections
import struct
from typing import Any

import apache_beam as beam
from tensorflow_transform import analyzer_nodes, nodes
from tensorflow_transform.beam import common as tft_beam_common

from pipelines import analysis_graph, cache_packing, vocabulary_packing
from pipelines.analysis_graph import is_a, value_key

NEEDS = ((analyzer_nodes, 'VocabularyAccumulate'), (analyzer_nodes, 'EncodeCache'),
         (analyzer_nodes, '_VocabularyAccumulatorCoder'))


def missing():
  """The names of NEEDS that the installed TF Transform lacks."""
  return analysis_graph.missing(NEEDS)


class SpanVocabularyCounts(
    collections.namedtuple('SpanVocabularyCounts', ['keys', 'owners', 'label']),
    nodes.OperationDef):
  """One span's batches of analyzer inputs -> ((owners[i], shard), {token: count}) tables of
  the tokens of keys[i], each summed over the span: what that span's VocabularyAccumulate of
  keys[i] counts, as a PackedVocabularyMerges takes a KEYED input."""
  __slots__ = ()


class EncodeVocabularyCounts(
    cache_packing.Shown,
    collections.namedtuple('EncodeVocabularyCounts', ['entries', 'label']), nodes.OperationDef):
  """A SpanVocabularyCounts' tables -> (cache entry key, its encoded records) for each
  (owner, cache entry key, coder) of `entries`, a list of records per shard."""
  __slots__ = ()


@tft_beam_common.register_ptransform(SpanVocabularyCounts)
class _SpanVocabularyCountsImpl(beam.PTransform):

  def __init__(self, operation, extra_args):
    super().__init__()
    self._keys = operation.keys
    self._owners = operation.owners

  def expand(self, inputs):
    (batches,) = inputs
    return (batches
            | 'CountTokensPerBundle' >> beam.ParDo(
                vocabulary_packing.CountBatches(self._keys, self._owners)).with_output_types(Any)
            | 'SumPerShard' >> beam.CombinePerKey(vocabulary_packing.SumTables())
            .with_input_types(Any).with_output_types(Any))


def count_encoder(coder):
  """For TF Transform's vocabulary coder of string tokens, an encoder of (token, count) that
  gives the coder's own encode_cache bytes where count is an int (two native int64 lengths, the
  token, the count's JSON: its digits), and None for any other coder. The coder's encode_cache
  formats a struct and dumps JSON for each record; here it is one pack and one join (the
  inverse of cache_packing.count_decoder)."""
  if cache_packing.count_decoder(coder) is None:
    return None
  pack = struct.Struct('qq').pack
  encode = coder.encode_cache

  def encoded(token, count):
    if type(count) is not int or count < 0:
      return encode((token, count))
    value = b'%d' % count
    return b''.join((pack(len(token), len(value)), token, value))
  return encoded


def encoded_tables(keyed_table, entries):
  """((owner, shard), {token: count}) -> [(cache entry key, the table's records)] where the
  owner has an entry in `entries` ({owner: (cache entry key, coder)})."""
  (owner, _), table = keyed_table
  found = entries.get(owner)
  if found is None:
    return []
  cache_key, coder = found
  fast = count_encoder(coder)
  if fast is not None:
    return [(cache_key, [fast(token, count) for token, count in table.items()])]
  return [(cache_key, [coder.encode_cache(pair) for pair in table.items()])]


@tft_beam_common.register_ptransform(EncodeVocabularyCounts)
class _EncodeVocabularyCountsImpl(beam.PTransform):

  def __init__(self, operation, extra_args):
    super().__init__()
    self._entries = {owner: (cache_key, coder) for owner, cache_key, coder in operation.entries}

  def expand(self, inputs):
    (tables,) = inputs
    return tables | 'EncodeAndKey' >> beam.FlatMap(encoded_tables, self._entries)


def _counted_key(accumulate):
  """(the batches ValueNode, the analyzer input key) that a frequency VocabularyAccumulate
  counts (an ExtractFromDict of one key of a phase's batches); None otherwise."""
  d = accumulate.operation_def
  if d.vocab_ordering_type != vocabulary_packing.FREQUENCY or len(accumulate.inputs) != 1:
    return None
  batches = vocabulary_packing.batches_of(accumulate)
  if batches is None:
    return None
  keys = accumulate.inputs[0].parent_operation.operation_def.keys
  return batches, keys[0] if isinstance(keys, tuple) else keys


def count_together(leaves, graph_mode, cache_dict):
  """The analysis graph under `leaves` with each PackedVocabularyMerges' inputs that are
  frequency VocabularyAccumulates (each read by it alone in the graph; the output cache's
  EncodeCache of it is rewritten by encode_together) replaced by one KEYED
  SpanVocabularyCounts per span's batches. Only where encode_together rewrites the output
  cache (else its EncodeCaches would count each span again, TF Transform's way). (`graph_mode`,
  `cache_dict`: as the other cache rewrites are called; unused.)"""
  del graph_mode, cache_dict
  if not analysis_graph.rewrites_output_cache_with(encode_together):
    return leaves

  def found_in(value, owner, consumers):  # -> (batches, analyzer input key, owner)
    accumulate = value.parent_operation
    if (is_a(accumulate, analyzer_nodes.VocabularyAccumulate) and
        len(consumers[value_key(value)]) == 1):
      counted = _counted_key(accumulate)
      return None if counted is None else (*counted, owner)
    return None

  def counts(value, found, label):
    spans = collections.defaultdict(list)  # batches' value key -> [(batches, key, owner)]
    for at in sorted(found):
      spans[value_key(found[at][0])].append(found[at])
    for members in spans.values():
      batches = members[0][0]
      yield nodes.apply_operation(
          SpanVocabularyCounts, value(batches), keys=tuple(m[1] for m in members),
          owners=tuple(m[2] for m in members),
          label=f'SpanVocabularyCounts[{batches.parent_operation.operation_def.label}][{label}]')

  return vocabulary_packing.with_keyed_inputs(leaves, found_in, counts)


def encode_together(cache, leaves):
  """TF Transform's output cache value nodes ({dataset key: {cache entry key: ValueNode}}) with,
  per span, the entries that are an EncodeCache of a VocabularyAccumulate that count_together
  replaced (a SpanVocabularyCounts under `leaves` counts its key of the same batches) replaced
  by one EncodeVocabularyCounts of that SpanVocabularyCounts, under an EncodedTogether key;
  the other entries as they were. None stays None."""
  if cache is None:
    return None
  ops, _ = analysis_graph.operations(leaves)
  counted = {}  # (batches' value key, analyzer input key) -> (SpanVocabularyCounts' value, owner)
  for op in ops.values():
    if is_a(op, SpanVocabularyCounts):
      (batches,) = op.inputs
      for key, owner in zip(op.operation_def.keys, op.operation_def.owners):
        counted[value_key(batches), key] = (op.outputs[0], owner)

  def source_of(value):  # -> (the SpanVocabularyCounts' value, the owner of value's counts)
    if not counted or not is_a(value.parent_operation, analyzer_nodes.VocabularyAccumulate):
      return None
    found = _counted_key(value.parent_operation)
    return found and counted.get((value_key(found[0]), found[1]))

  return cache_packing.encoded_in_groups(cache, source_of, EncodeVocabularyCounts)
