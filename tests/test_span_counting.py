"""The new spans' side of a cached analysis (pipelines/span_counting.py): each span's frequency
vocabularies counted in one step and their cache entries encoded in one, with TF Transform's
records. That a cache written this way gives an uncached run's results, read by this project's
rewrites or by TF Transform's own DecodeCache, is checked by the real runs of
tests/test_analysis_cache.py."""

import collections

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.testing.util import assert_that
from tensorflow_transform import analyzer_nodes
from tensorflow_transform.beam import analysis_graph_builder, analyzer_cache

from pipelines import analysis_graph, cache_packing, span_counting, vocabulary
from tests import test_cache_packing as packing


def _keys(n):
  return [analyzer_cache.DatasetKey(f'span{i}') for i in range(n)]


def test_each_new_spans_vocabularies_are_counted_and_encoded_in_one_step():
  """The first run (three new spans, nothing cached) and a warm one (three cached, one new):
  per new span one SpanVocabularyCounts for both vocabularies, read by their packed merge, and
  one EncodeVocabularyCounts of it for both cache entries; no VocabularyAccumulate is left."""
  for cached, new in ((0, 3), (packing.CACHED, 1)):
    keys = _keys(cached + new)
    entries = analysis_graph_builder.get_analysis_cache_entry_keys(packing._fn, packing.SPEC,
                                                                   keys, True)
    cache = {k: analyzer_cache.DatasetCache({e: object() for e in entries}, None)
             for k in keys[:cached]}
    if cached:
      cache[cache_packing.TOGETHER] = analyzer_cache.DatasetCache(
          {**{e: object() for e in entries}, cache_packing.EVERY_ENTRY: object()}, None)
    kinds, _, output_cache, only_cache = packing._built(packing._fn, keys, cache)
    assert kinds['SpanVocabularyCounts'] == new and kinds['VocabularyAccumulate'] == 0, kinds
    assert kinds['PackedVocabularyMerges'] == 1
    assert only_cache == {'EncodeAccumulators': new, 'EncodeVocabularyCounts': new}
    vocabularies = {e for e in entries if b'VocabularyAccumulate' in e}
    assert len(vocabularies) == 2
    for dataset_cache in output_cache.values():
      (together,) = [k for k in dataset_cache if isinstance(k, cache_packing.EncodedTogether)
                     and set(k.entries) == vocabularies]
      encode = dataset_cache[together].parent_operation
      assert isinstance(encode.operation_def, span_counting.EncodeVocabularyCounts)
      (tables,) = encode.inputs
      assert isinstance(tables.parent_operation.operation_def, span_counting.SpanVocabularyCounts)


def test_outside_the_output_cache_rewrite_the_counting_is_tf_transforms():
  """Where the output cache keeps TF Transform's EncodeCaches, the spans' accumulates stay
  TF Transform's too (packed, they would be counted twice)."""
  from tensorflow_transform import impl_helper
  keys = _keys(3)
  graph, inputs, outputs = impl_helper.trace_preprocessing_function(
      packing._fn, packing.SPEC, use_tf_compat_v1=True)
  vocabulary.install()
  root, _, side_effects = analysis_graph_builder.build(graph, inputs, outputs, keys, {})
  ops, _ = analysis_graph.operations((root, *side_effects))
  kinds = collections.Counter(type(op.operation_def).__name__ for op in ops.values())
  assert kinds['SpanVocabularyCounts'] == 0 and kinds['VocabularyAccumulate'] == 2 * len(keys)


def test_the_records_are_tensorflow_transforms_own():
  """The count encoder against TF Transform's coder, byte for byte; any other value (a weight)
  and any other coder (int64 tokens) encoded by the coder itself."""
  coder = analyzer_nodes._VocabularyAccumulatorCoder()
  encode = span_counting.count_encoder(coder)
  for pair in [(b'red', 3), (b'', 1), (b'\xff\xfe not utf-8', 12), (b'x' * 5000, 2 ** 40),
               ('caf\u00e9'.encode(), 0), (b'w', 0.5)]:
    assert encode(*pair) == coder.encode_cache(pair)
  int_tokens = analyzer_nodes._VocabularyAccumulatorCoder(input_dtype=tf.int64.name)
  assert span_counting.count_encoder(int_tokens) is None
  table = {7: 2, -1: 5}
  for c in (coder, int_tokens):
    tokens = {str(k).encode(): v for k, v in table.items()} if c is coder else table
    (key, records), = span_counting.encoded_tables(((4, 0), tokens), {4: (b'entry', c)})
    assert key == b'entry' and records == [c.encode_cache(p) for p in tokens.items()]
  assert span_counting.encoded_tables(((5, 0), table), {4: (b'entry', coder)}) == []


def test_the_span_counts_are_the_spans_token_counts():
  """SpanVocabularyCounts on a real Beam pipeline: per vocabulary, the shards' tables hold
  every distinct token of the span once, with its count over all batches (collections.Counter
  over the same tokens)."""
  rng = np.random.default_rng(0)
  batches = [{'s': rng.choice([b'a', b'b', b'c', b'd'], size=50), 'n': rng.integers(0, 9, 30),
              'x': rng.normal(size=50)} for _ in range(7)]
  expected = {3: collections.Counter(t for b in batches for t in b['s'].tolist()),
              8: collections.Counter(t for b in batches for t in b['n'].tolist())}
  op = span_counting.SpanVocabularyCounts(keys=('s', 'n'), owners=(3, 8), label='span')

  def check(tables):
    counts = collections.defaultdict(dict)
    for (owner, _), table in tables:
      assert not set(counts[owner]) & set(table)  # the shards hold disjoint tokens
      counts[owner].update(table)
    assert dict(counts) == {k: dict(v) for k, v in expected.items()}

  with beam.Pipeline() as p:
    batches = p | beam.Create(batches, reshuffle=False)
    tables = (batches,) | span_counting._SpanVocabularyCountsImpl(op, None)
    assert_that(tables, check)
