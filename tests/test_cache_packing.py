"""The rewrites of an analysis that reads an analyzer cache (pipelines/cache_packing.py,
merge_packing and vocabulary_packing.pack_merges) and of the cache it writes: what TF
Transform's own graph builder gives with a cache of several spans, with and without them. That
the results stay TF Transform's is checked by real runs in tests/test_analysis_cache.py (a warm
run against an uncached one, file by file)."""

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
        {**{e: object() for e in entries}, cache_packing.EVERY_ENTRY: object()}, None)
  kinds, flattens, _, _ = _built(_fn, keys, cache)
  return kinds, flattens, len(entries)


def _built(fn, keys, cache):
  """(operation kinds, Flatten labels, the output cache, the kinds of the operations only the
  output cache needs) of the analysis of `fn` with `cache`, as stages.AnalyzeTrain builds it."""
  graph, inputs, outputs = impl_helper.trace_preprocessing_function(
      fn, SPEC, use_tf_compat_v1=True)
  vocabulary.install()
  with analysis_graph.rewriting_output_cache(vocabulary.OUTPUT_CACHE_REWRITES):
    root, output_cache, side_effects = analysis_graph_builder.build(
        graph, inputs, outputs, keys, cache)
  ops, _ = analysis_graph.operations((root, *side_effects))
  kinds = collections.Counter(type(op.operation_def).__name__ for op in ops.values())
  flattens = sorted(op.operation_def.label.split('[')[0] for op in ops.values()
                    if type(op.operation_def).__name__ == 'Flatten')
  with_cache, _ = analysis_graph.operations(
      (root, *side_effects, *(n for entries in output_cache.values() for n in entries.values())))
  only_cache = collections.Counter(type(op.operation_def).__name__ for key, op in
                                   with_cache.items() if key not in ops)
  return kinds, flattens, output_cache, only_cache


def test_cached_spans_are_decoded_together_and_merged_without_a_flatten_per_analyzer():
  assert vocabulary.unfit_reason() is None
  kinds, flattens, entries = _kinds()
  assert kinds['DecodeCache'] == kinds['DecodeCachedSpan'] == 0
  assert entries == 4  # 2 vocabularies, mean and var, quantiles
  # The vocabularies' entries counted together into their merge's tables; the combiners'
  # decoded together and keyed for their merge in the same step.
  assert kinds['DecodeCachedSpans'] == 0 and kinds['CountCachedVocabularies'] == 1
  assert kinds['DecodeCachedByKey'] == 1
  assert kinds['AddKey'] == 0 and kinds['AccumulatorsByKey'] == 1  # the new span's hand-over
  assert kinds['PackedVocabularyMerges'] == 1 and kinds['VocabularyMerge'] == 0
  assert kinds['VocabularyOrderAndWrite'] == 0
  assert 'FlattenCache' not in flattens, flattens  # one flatten of the combiners' merges
  assert flattens.count('FlattenInputForPackedCombineMerge') == 1
  # The bindings packed as without a cache: one step binds every analyzer result.
  assert kinds['PackedCreateSavedModel'] == 1 and kinds['CreateTensorBinding'] == 0, kinds


def test_without_the_spans_together_tf_transform_decodes_each_span():
  kinds, flattens, entries = _kinds(together=False)
  assert kinds['DecodeCache'] == CACHED * entries and kinds['DecodeCachedSpans'] == 0
  assert kinds['DecodeCachedSpan'] == kinds['DecodeCachedByKey'] == 0
  # The other rewrites apply as before: no flatten per analyzer either way.
  assert 'FlattenCache' not in flattens and kinds['PackedVocabularyMerges'] == 1


def test_spans_together_that_hold_more_than_the_analysis_reads_are_not_used():
  """The spans-together read holds the records of every span of the cache dict; where the
  dict has a span the analysis does not analyze (so TF Transform decodes no entry of it), the
  spans-together records would count that span too: each span is decoded on its own."""
  kinds, _, entries = _kinds(extra_span=True)
  assert kinds['DecodeCachedSpans'] == kinds['DecodeCachedByKey'] == kinds['DecodeCache'] == 0
  assert kinds['DecodeCachedSpan'] == CACHED * entries  # each span's entries, as a list a file


def test_a_single_cached_span_is_read_as_several_are():
  """One cached span beside the new one (the second day): its entries are every cached span's,
  so they are decoded and counted as several spans' are, not one step per entry."""
  kinds, _, entries = _kinds(cached=1)
  assert kinds['DecodeCache'] == kinds['DecodeCachedSpan'] == kinds['DecodeCachedSpans'] == 0
  assert kinds['DecodeCachedByKey'] == kinds['CountCachedVocabularies'] == 1


def _two_phases(inputs):
  z = tft.scale_to_z_score(inputs['x'])
  return {'s': tft.compute_and_apply_vocabulary(inputs['s']), 'z': z,
          'zz': tft.scale_to_z_score(z), 'y': tft.bucketize(inputs['y'], 4),
          'm': inputs['y'] - tft.mean(z)}


def test_the_new_spans_combiner_entries_are_encoded_in_one_step():
  """Each new span's cache entries of one packed accumulate: one EncodeAccumulators under an
  EncodedTogether key naming them, instead of an ExtractFromDict and an EncodeCache each (the
  vocabularies' entries: one EncodeVocabularyCounts, tests/test_span_counting.py). The output
  cache's nodes hang on the rewritten graph (nothing but the encodes is built for them alone),
  with one phase or two."""
  for fn, combiners in ((_fn, 2), (_two_phases, 2)):
    keys = [analyzer_cache.DatasetKey(f'span{i}') for i in range(3)]
    entries = analysis_graph_builder.get_analysis_cache_entry_keys(fn, SPEC, keys, True)
    _, _, output_cache, only_cache = _built(fn, keys, {})
    assert set(output_cache) == set(keys)
    for dataset_cache in output_cache.values():
      together = {type(dataset_cache[k].parent_operation.operation_def).__name__: k
                  for k in dataset_cache if isinstance(k, cache_packing.EncodedTogether)}
      assert len(together['EncodeAccumulators'].entries) == combiners
      assert len(together['EncodeVocabularyCounts'].entries) == len(entries) - combiners
      assert set(dataset_cache) == set(together.values())
      assert {e for k in together.values() for e in k.entries} == set(entries)
    assert only_cache == {'EncodeAccumulators': len(keys), 'EncodeVocabularyCounts': len(keys)}


def test_the_output_cache_is_tf_transforms_own_outside_the_block():
  keys = [analyzer_cache.DatasetKey(f'span{i}') for i in range(3)]
  graph, inputs, outputs = impl_helper.trace_preprocessing_function(
      _fn, SPEC, use_tf_compat_v1=True)
  vocabulary.install()
  _, output_cache, _ = analysis_graph_builder.build(graph, inputs, outputs, keys, {})
  for dataset_cache in output_cache.values():
    assert all(isinstance(k, bytes) for k in dataset_cache) and len(dataset_cache) == 4


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
