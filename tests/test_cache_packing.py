"""The rewrites of an analysis that reads an analyzer cache (pipelines/cache_packing.py and
vocabulary_packing.pack_merges): what TF Transform's own graph builder gives with a cache of
several spans, with and without them. That the results stay TF Transform's is checked by real
runs in tests/test_analysis_cache.py (a warm run against an uncached one, file by file)."""

import collections

import tensorflow as tf
import tensorflow_transform as tft
from tensorflow_transform import impl_helper
from tensorflow_transform.beam import analysis_graph_builder, analyzer_cache

from pipelines import analysis_graph, cache_packing, vocabulary

SPEC = {'s': tf.TensorSpec([None], tf.string), 't': tf.TensorSpec([None], tf.string),
        'x': tf.TensorSpec([None], tf.float32), 'y': tf.TensorSpec([None], tf.float32)}
CACHED = 3  # spans in the cache; one more is new


def _fn(inputs):
  return {'s': tft.compute_and_apply_vocabulary(inputs['s'], num_oov_buckets=1),
          't': tft.compute_and_apply_vocabulary(inputs['t'], top_k=5),
          'x': tft.scale_to_z_score(inputs['x']), 'y': tft.bucketize(inputs['y'], 4)}


def _kinds(cached=CACHED, together=True, extra_span=False):
  """Operation kinds and Flatten labels of the analysis of _fn with `cached` spans cached and
  one new span (and, with `extra_span`, the cache of one more span that is not analyzed)."""
  keys = [analyzer_cache.DatasetKey(f'span{i}') for i in range(cached + 1)]
  entries = analysis_graph_builder.get_analysis_cache_entry_keys(_fn, SPEC, keys, True)
  cache = {k: analyzer_cache.DatasetCache({e: object() for e in entries}, None)
           for k in keys[:cached] + ([analyzer_cache.DatasetKey('other')] if extra_span else [])}
  if together:  # as analysis_cache.read_cache gives it
    cache[cache_packing.TOGETHER] = analyzer_cache.DatasetCache(
        {e: object() for e in entries}, None)
  graph, inputs, outputs = impl_helper.trace_preprocessing_function(
      _fn, SPEC, use_tf_compat_v1=True)
  vocabulary.install()
  root, _, side_effects = analysis_graph_builder.build(graph, inputs, outputs, keys, cache)
  ops, _ = analysis_graph.operations((root, *side_effects))
  kinds = collections.Counter(type(op.operation_def).__name__ for op in ops.values())
  flattens = sorted(op.operation_def.label.split('[')[0] for op in ops.values()
                    if type(op.operation_def).__name__ == 'Flatten')
  return kinds, flattens, len(entries)


def test_cached_spans_are_decoded_together_and_merged_without_a_flatten_per_analyzer():
  assert vocabulary.unfit_reason() is None
  kinds, flattens, entries = _kinds()
  assert kinds['DecodeCache'] == 0
  assert kinds['DecodeCachedSpans'] == entries == 4  # 2 vocabularies, mean and var, quantiles
  assert kinds['PackedVocabularyMerges'] == 1 and kinds['VocabularyMerge'] == 0
  assert kinds['VocabularyOrderAndWrite'] == 0
  assert 'FlattenCache' not in flattens, flattens  # one flatten of the combiners' merges
  assert flattens.count('FlattenInputForPackedCombineMerge') == 1
  # The bindings packed as without a cache: one step binds every analyzer result.
  assert kinds['PackedCreateSavedModel'] == 1 and kinds['CreateTensorBinding'] == 0, kinds


def test_without_the_spans_together_tf_transform_decodes_each_span():
  kinds, flattens, entries = _kinds(together=False)
  assert kinds['DecodeCache'] == CACHED * entries and kinds['DecodeCachedSpans'] == 0
  # The other rewrites apply as before: no flatten per analyzer either way.
  assert 'FlattenCache' not in flattens and kinds['PackedVocabularyMerges'] == 1


def test_spans_together_that_hold_more_than_the_analysis_reads_are_not_used():
  """The spans-together read holds the records of every span of the cache dict; where the
  dict has a span the analysis does not analyze (so TF Transform decodes no entry of it), the
  spans-together records would count that span too: each span is decoded on its own."""
  kinds, _, entries = _kinds(extra_span=True)
  assert kinds['DecodeCachedSpans'] == 0 and kinds['DecodeCache'] == CACHED * entries


def test_a_single_cached_span_is_left_as_it_is():
  kinds, _, entries = _kinds(cached=1)
  assert kinds['DecodeCachedSpans'] == 0 and kinds['DecodeCache'] == entries


def test_the_count_decoder_reads_tensorflow_transforms_own_records():
  """count_decoder against TF Transform's coder: its own encoding of (token, count) pairs read
  back as its decode_cache reads them; any other value, or another coder, is left to it."""
  from tensorflow_transform import analyzer_nodes
  coder = analyzer_nodes._VocabularyAccumulatorCoder()
  count_of = cache_packing.count_decoder(coder)
  pairs = [(b'red', 3), (b'', 1), (b'\xff\xfe not utf-8', 12), (b'x' * 5000, 2 ** 40),
           ('caf\u00e9'.encode(), 0)]
  for pair in pairs:
    record = coder.encode_cache(pair)
    assert count_of(record) == coder.decode_cache(record) == pair
  for other in [(b'w', 0.5), (b'n', -2)]:  # a weight, a negative count: the coder's own read
    assert count_of(coder.encode_cache(other)) is None
  int_tokens = analyzer_nodes._VocabularyAccumulatorCoder(input_dtype=tf.int64.name)
  assert cache_packing.count_decoder(int_tokens) is None
  assert cache_packing.count_decoder(analyzer_nodes.JsonNumpyCacheCoder()) is None
