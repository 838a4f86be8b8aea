"""pipelines/vocabulary.py and vocabulary_packing.py: the per-batch token counting, and every
frequency vocabulary of a phase packed into one Beam stage, give TF Transform's own results on a
small wide table.

The same rows are analyzed and transformed twice with TF Transform on Beam's in-process runner:
once as TF Transform runs by itself (pipelines.vocabulary.tft_implementation: its counting, one
chain of stages per vocabulary), once as the pipelines run it (packed where it can be, counted
per batch where it cannot). Compared: every vocabulary file byte for byte, the vocabulary sizes
TF Transform binds into the graph, the transformed values (ids, z-scores with TFT's means and
variances, quantile buckets), and the number of Beam transforms; the files are also checked
against collections.Counter over the raw values.
"""

import collections
import zlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from pipelines import analysis_graph, vocabulary, vocabulary_packing
from tests import helpers

ROWS = 2000
STRINGS = [f's{i}' for i in range(8)]
FLOATS = ['f0']

SPEC = {
    **{s: tf.io.FixedLenFeature([], tf.string) for s in STRINGS},
    **{f: tf.io.FixedLenFeature([], tf.float32) for f in FLOATS},
    'n': tf.io.FixedLenFeature([], tf.int64),
    'tags': tf.io.VarLenFeature(tf.string),
}


def _rows():
  rng = np.random.default_rng(11)
  rows = []
  for _ in range(ROWS):
    row = {s: f'{s}_{(int(rng.zipf(1.4)) * 31) % (20 + 40 * i)}'.encode()
           for i, s in enumerate(STRINGS)}
    row.update({f: float(rng.normal(3 * i, 1 + i)) for i, f in enumerate(FLOATS)})
    row['n'] = int(rng.zipf(1.6)) % 300
    row['tags'] = [f't{int(t)}'.encode() for t in rng.integers(0, 40, int(rng.integers(0, 4)))]
    rows.append(row)
  return rows


def preprocessing_fn(inputs):
  out = {}
  for s in STRINGS[:2]:  # the common case: ids with an OOV bucket
    out[f'{s}_id'] = tft.compute_and_apply_vocabulary(inputs[s], num_oov_buckets=1,
                                                      vocab_filename=s)
  out['top'] = tft.compute_and_apply_vocabulary(inputs['s4'], top_k=7, vocab_filename='top')
  out['min'] = tft.compute_and_apply_vocabulary(inputs['s5'], frequency_threshold=15,
                                                vocab_filename='min')
  # No token reaches the threshold: TF Transform's dummy entry, sizes of 1.
  out['none'] = tft.compute_and_apply_vocabulary(inputs['s6'], frequency_threshold=10**6,
                                                 vocab_filename='none')
  _ = tft.vocabulary(inputs['s7'], store_frequency=True, vocab_filename='freq')
  out['n_id'] = tft.compute_and_apply_vocabulary(inputs['n'], top_k=50, vocab_filename='n')
  out['tags'] = tft.compute_and_apply_vocabulary(inputs['tags'], vocab_filename='tags')
  # Not packed, in the same phase: weighted, key_fn coverage, TFRecord format.
  out['weighted'] = tft.compute_and_apply_vocabulary(inputs['s0'], weights=inputs['f0'],
                                                     vocab_filename='weighted')
  out['coverage'] = tft.compute_and_apply_vocabulary(
      inputs['s1'], top_k=3, key_fn=lambda token: token.split(b'_')[0], coverage_top_k=1,
      vocab_filename='coverage')
  out['record'] = tft.compute_and_apply_vocabulary(inputs['s2'], file_format='tfrecord_gzip',
                                                   vocab_filename='record')
  # A second phase: a vocabulary of strings made from an analyzer's result.
  side = tf.where(inputs['f0'] > tft.mean(inputs['f0']), 'high', 'low')
  out['side'] = tft.compute_and_apply_vocabulary(side, vocab_filename='side')
  for f in FLOATS:
    out[f'{f}_z'] = tft.scale_to_z_score(inputs[f])
    out[f'{f}_q'] = tft.bucketize(inputs[f], 8)
  for name in ('s1', 'none', 'side'):
    out[f'{name}_size'] = tf.fill(tf.shape(inputs['n']),
                                  tft.experimental.get_vocabulary_size_by_name(name))
  return out


def _run(rows, root):
  files, collected, transforms = helpers.analyze_in_graph_mode(preprocessing_fn, SPEC, rows,
                                                              root, batch_size=256)
  columns = {key: np.array([np.asarray(row[key]).tolist() for row in collected], dtype=object)
             for key in collected[0]}
  return {'files': files, 'columns': columns, 'transforms': transforms}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  rows = _rows()
  with vocabulary.tft_implementation():
    theirs = _run(rows, str(tmp_path_factory.mktemp('tft')))
  vocabulary.install()
  ours = _run(rows, str(tmp_path_factory.mktemp('packed')))
  return rows, theirs, ours


def test_vocabulary_files_are_identical(runs):
  _, theirs, ours = runs
  assert sorted(ours['files']) == sorted(theirs['files'])
  for name in theirs['files']:
    assert ours['files'][name] == theirs['files'][name], name
  assert ours['files']['none'] == b'49d0cd50-04bb-48c0-bc6f-5b575dce351a\n'


def test_files_are_the_counts_of_the_raw_values(runs):
  rows, _, ours = runs
  counts = collections.Counter(row['s1'] for row in rows)
  expected = sorted(((c, t) for t, c in counts.items()), reverse=True)
  assert ours['files']['s1'] == b''.join(t + b'\n' for _, t in expected)
  freq = collections.Counter(row['s7'] for row in rows)
  lines = ours['files']['freq'].splitlines()
  assert {line.split(b' ', 1)[1]: int(line.split(b' ')[0]) for line in lines} == freq
  numbers = collections.Counter(row['n'] for row in rows)
  top = sorted(((c, str(n).encode()) for n, c in numbers.items()), reverse=True)[:50]
  assert ours['files']['n'] == b''.join(t + b'\n' for _, t in top)
  assert ours['columns']['s1_size'][0] == len(counts)
  assert ours['columns']['none_size'][0] == 1


def test_transformed_values_are_identical(runs):
  _, theirs, ours = runs
  assert sorted(ours['columns']) == sorted(theirs['columns'])
  for key, values in theirs['columns'].items():
    mine = ours['columns'][key]
    if key.endswith('_z'):  # TFT's own means and variances, either way
      np.testing.assert_allclose(mine.astype(float), values.astype(float), rtol=1e-6)
    else:
      assert mine.tolist() == values.tolist(), key


def test_the_chains_are_packed(runs):
  _, theirs, ours = runs
  # 8 vocabularies packed in two phases; each TF Transform chain is a dozen transforms or more.
  assert ours['transforms'] < theirs['transforms'] - 8 * 12, (
      ours['transforms'], theirs['transforms'])


def test_the_graph_rewrite_packs_what_it_can_and_leaves_the_rest():
  spec = {'a': tf.TensorSpec([None], tf.string), 'b': tf.TensorSpec([None], tf.string)}

  def fn(inputs):
    return {'a': tft.compute_and_apply_vocabulary(inputs['a']),
            'b': tft.compute_and_apply_vocabulary(inputs['b'], weights=tf.ones_like(
                tf.strings.length(inputs['b']), tf.float32))}

  from tensorflow_transform import impl_helper
  from tensorflow_transform.beam import analysis_graph_builder
  graph, structured_inputs, structured_outputs = impl_helper.trace_preprocessing_function(
      fn, spec, use_tf_compat_v1=False)
  analysis_graph.set_enabled(True, vocabulary.REWRITES)
  root, _, _ = analysis_graph_builder.build(graph, structured_inputs, structured_outputs)
  kinds = collections.Counter()
  stack, seen = [root.parent_operation], set()
  while stack:
    op = stack.pop()
    if id(op) not in seen:
      seen.add(id(op))
      kinds[type(op.operation_def).__name__] += 1
      stack.extend(v.parent_operation for v in op.inputs)
  assert kinds['PackedVocabularies'] == 1 and kinds['ExtractPackedVocabulary'] == 1
  assert kinds['VocabularyAccumulate'] == 1  # the weighted one, TF Transform's own
  assert kinds['VocabularyOrderAndWrite'] == 1


def test_count_batch_counts_each_distinct_token_once():
  tokens = np.array([b'a', b'b', b'a', b'c', b'a'], dtype=object)
  assert dict(vocabulary_packing.token_counts(tokens)) == {b'a': 3, b'b': 1, b'c': 1}
  assert dict(vocabulary_packing.token_counts(np.array([3, 3, 1]))) == {3: 2, 1: 1}
  assert dict(vocabulary_packing.token_counts(np.array([], dtype=object))) == {}
  fn = vocabulary_packing.CountBatchValues()  # TF Transform's VocabularyAccumulate's batches
  fn.start_bundle()
  for batch in [tokens, np.array([b'c', b'd'], dtype=object), np.array([], dtype=object)]:
    assert not list(fn.process((batch,)))
  assert _summed(w.value for w in fn.finish_bundle()) == {
      (0, b'a'): 3, (0, b'b'): 1, (0, b'c'): 2, (0, b'd'): 1}
  batch = {'x': np.array([b'a', b'a', b'b'], dtype=object), 'y': np.array([[1, 2], [2, 2]])}
  assert [(i, dict(pairs)) for i, pairs in vocabulary_packing.count_tokens(batch, ['x', 'y'])] \
      == [(0, {b'a': 2, b'b': 1}), (1, {1: 1, 2: 3})]


def _summed(elements):
  """The {(vocabulary index, token): count} that a bundle's tables hold, checking that each
  token is in its own shard."""
  total = collections.Counter()
  for (index, shard), table in elements:
    for token, count in table.items():
      assert vocabulary_packing.shard_of(token) == shard
      total[index, token] += count
  return total


def test_counts_cross_the_runner_as_sharded_tables(monkeypatch):
  rng = np.random.default_rng(0)
  batches = [{'x': rng.integers(0, 50, 300).astype(str).astype(object).astype(bytes),
              'y': rng.integers(-5, 500, (40, 3))} for _ in range(4)]
  expected = collections.Counter()
  for batch in batches:
    for index, key in enumerate(['x', 'y']):
      expected.update((index, t) for t in np.asarray(batch[key]).ravel().tolist())
  for limit in (vocabulary_packing.MAX_TABLE, 7):  # 7: tables handed on within the bundle
    monkeypatch.setattr(vocabulary_packing, 'MAX_TABLE', limit)
    fn = vocabulary_packing.CountBatches(['x', 'y'])
    fn.start_bundle()
    early = [e for batch in batches for e in fn.process(batch)]
    last = [w.value for w in fn.finish_bundle()]
    assert bool(early) == (limit == 7)
    assert _summed(early + last) == expected
  pairs = vocabulary_packing._CountPairs(3)
  pairs.start_bundle()
  for pair in [(b'a', 2), (b'b', 1), (b'a', 5)]:
    assert not list(pairs.process(pair))
  assert _summed(w.value for w in pairs.finish_bundle()) == {(3, b'a'): 7, (3, b'b'): 1}
  # The shard of a token is the same in every process (no per-process hash seed).
  assert vocabulary_packing.shard_of(b'token') == zlib.crc32(b'token') % vocabulary_packing.SHARDS
  assert vocabulary_packing.shard_of(-3) == -3 % vocabulary_packing.SHARDS


def test_summing_tables_leaves_its_inputs_as_they_were():
  fn = vocabulary_packing.SumTables()
  a, b, c = {b'x': 1, b'y': 2}, {b'x': 3}, {b'z': 4}
  accumulators = [fn.add_input(fn.add_input(fn.create_accumulator(), a), b),
                  fn.add_input(fn.create_accumulator(), c)]
  assert fn.extract_output(fn.merge_accumulators(accumulators)) == {b'x': 4, b'y': 2, b'z': 4}
  assert a == {b'x': 1, b'y': 2} and b == {b'x': 3} and c == {b'z': 4}
