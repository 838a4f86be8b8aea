"""The tabular pipeline end to end on real Adult rows, checked against pandas/numpy."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_transform as tft

from pipelines import tabular
from tests.conftest import REPO
from tests.helpers import read_adult_csv, read_split, tft_vocabulary_order
from tests.runs import vocabularies
from transforms import census

XF = census.transformed_name


@pytest.fixture(scope='module')
def adult_run(adult_sample, tmp_path_factory):
  train_csv, test_csv = adult_sample
  out = tmp_path_factory.mktemp('adult_out') / 'tft'
  manifest = tabular.run(['--transforms', 'transforms.census', '--train', str(train_csv),
                          '--eval', str(test_csv), '--output', str(out), '--num-shards', '2'])
  return {
      'out': str(out),
      'manifest': manifest,
      'train_raw': read_adult_csv(train_csv),
      'eval_raw': read_adult_csv(test_csv, skiprows=1),  # the junk first line
      'train': read_split(str(out), 'train'),
      'eval': read_split(str(out), 'eval'),
  }


def test_counts_add_up(adult_run):
  m = adult_run['manifest']
  assert m.to_dict() == json.load(open(os.path.join(adult_run['out'], 'manifest.json')))
  train, evaluate = m.splits['train'], m.splits['eval']
  assert train.rows_read == train.rows_written == len(adult_run['train_raw']) == 3000
  assert train.rows_rejected == 0
  # The test file's junk first line is a rejected row, not a lost one.
  assert evaluate.rows_read == 1500
  assert evaluate.rows_written == len(adult_run['eval_raw']) == 1499
  assert evaluate.rejected_by_kind == {'field_count': 1}
  errors = [json.loads(line)
            for line in open(os.path.join(adult_run['out'], 'errors', 'eval.jsonl'))]
  assert [(e['line'], e['kind'], e['raw']) for e in errors] == [
      (1, 'field_count', '|1x3 Cross validator')]
  # The TFRecords hold exactly the rows written.
  assert len(adult_run['train'][XF('age')]) == 3000
  assert len(adult_run['eval'][XF('age')]) == 1499
  assert len([f for f in os.listdir(adult_run['out']) if f.startswith('train-')]) == 2
  assert m.versions['tensorflow-transform'].startswith('1.21')


@pytest.mark.parametrize('key', census.NUMERIC_FEATURE_KEYS)
def test_z_scores_use_train_statistics(adult_run, key):
  train_raw = adult_run['train_raw'][key].to_numpy(np.float64)
  mean, std = train_raw.mean(), train_raw.std()  # population std, as TFT's scale_to_z_score
  got_train = adult_run['train'][XF(key)]
  assert abs(got_train.mean()) < 1e-3
  assert abs(got_train.std() - 1) < 1e-3
  np.testing.assert_allclose(np.sort(got_train), np.sort((train_raw - mean) / std), atol=1e-3)
  # eval is scaled with the *train* mean and std, not its own.
  eval_raw = adult_run['eval_raw'][key].to_numpy(np.float64)
  np.testing.assert_allclose(np.sort(adult_run['eval'][XF(key)]), np.sort((eval_raw - mean) / std),
                             atol=1e-3)


@pytest.mark.parametrize('key', census.CATEGORICAL_FEATURE_KEYS)
def test_vocabularies_match_pandas(adult_run, key):
  output = tft.TFTransformOutput(adult_run['out'])
  expected = tft_vocabulary_order(adult_run['train_raw'][key])
  assert [v.decode() for v in output.vocabulary_by_name(key)] == expected
  ids = adult_run['train'][XF(key)]
  oov = len(expected)
  assert ids.min() >= 0 and ids.max() <= oov
  # On train every present value is in the vocabulary: the OOV bucket holds exactly the `?`s.
  assert (ids == oov).sum() == adult_run['train_raw'][key].isna().sum()
  # The most frequent value gets id 0 on eval too.
  assert ((adult_run['eval'][XF(key)] == 0).sum()
          == (adult_run['eval_raw'][key] == expected[0]).sum())


@pytest.mark.parametrize('key', sorted(census.BUCKET_FEATURE_KEYS))
def test_buckets_follow_train_quantiles(adult_run, key):
  n = census.BUCKET_FEATURE_KEYS[key]
  raw = adult_run['train_raw'][key].to_numpy(np.float64)
  got = adult_run['train'][census.bucket_name(key)]
  assert got.min() >= 0 and got.max() < n
  # Independent bucketing: numpy's exact quantiles as boundaries (repeated ones kept, as TFT
  # does), a value equal to a boundary going to the upper bucket. TFT's quantile sketch is
  # approximate, so bucket sizes may differ by a little.
  boundaries = np.quantile(raw, np.arange(1, n) / n)
  expected_hist = np.bincount(np.digitize(raw, boundaries), minlength=n)
  got_hist = np.bincount(got, minlength=n)
  assert np.abs(got_hist - expected_hist).max() <= 0.01 * len(raw), (got_hist, expected_hist)
  if key == 'age':  # many distinct values: close to equal frequency
    shares = got_hist / len(raw)
    assert shares.max() < 0.16 and shares.min() > 0.05, shares


def test_label(adult_run):
  label = adult_run['train'][XF(census.LABEL_KEY)]
  assert set(np.unique(label)) == {0, 1}
  assert label.sum() == (adult_run['train_raw'][census.LABEL_KEY] == '>50K').sum()
  # The test file writes `>50K.`.
  assert adult_run['eval'][XF(census.LABEL_KEY)].sum() == (
      adult_run['eval_raw'][census.LABEL_KEY] == '>50K.').sum()


def test_refuses_a_complete_output_from_the_command_line(adult_run):
  proc = subprocess.run(
      [sys.executable, '-m', 'pipelines.tabular', '--transforms', 'transforms.census',
       '--train', adult_run['manifest'].inputs['train'][0], '--output', adult_run['out']],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --output')
  assert 'already holds a complete result' in proc.stderr and '--overwrite' in proc.stderr
  assert 'Traceback' not in proc.stderr


@pytest.fixture(scope='module')
def both_tracings(adult_sample, tmp_path_factory):
  """The same command twice: tracing the preprocessing_fn in TF Transform's graph mode (the
  default) and with TF2 behaviours (--tracing tf2)."""
  train_csv, _ = adult_sample
  root = tmp_path_factory.mktemp('tracings')
  runs = {}
  for name, extra in (('tf2', ['--tracing', 'tf2']), ('graph', [])):
    out = str(root / name)
    manifest = tabular.run(['--transforms', 'transforms.census', '--train', str(train_csv),
                            '--eval-fraction', '0.25', '--output', out, *extra])
    runs[name] = (out, manifest, read_split(out, 'eval'), read_split(out, 'train'))
  return train_csv, runs


def test_eval_fraction_is_deterministic_with_tf2_and_in_graph_mode(both_tracings):
  """The same split of the rows, and the same result, whichever the tracing
  (pipelines.job.build)."""
  train_csv, runs = both_tracings
  # Independent split rule: each row's own text, hashed.
  lines = [line.decode().rstrip('\r\n') for line in open(train_csv, 'rb') if line.strip()]
  to_eval = sum(int.from_bytes(hashlib.blake2b(line.encode(), digest_size=8).digest(), 'big')
                / 2**64 < 0.25 for line in lines)
  for _, manifest, _, _ in runs.values():
    assert manifest.splits['eval'].rows_written == to_eval
    assert manifest.splits['train'].rows_written == len(lines) - to_eval
  assert 0.2 < to_eval / len(lines) < 0.3
  for split in (2, 3):
    first, second = runs['tf2'][split], runs['graph'][split]
    assert sorted(first) == sorted(second)
    for key in first:
      a, b = np.sort(first[key], axis=0), np.sort(second[key], axis=0)
      if a.dtype.kind == 'f':  # TF2's tf.function rounds (x - mean) / std in its own way
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
      else:
        np.testing.assert_array_equal(a, b)
  assert vocabularies(runs['tf2'][0]) == vocabularies(runs['graph'][0])


def _raw_features(rows, spec):
  """pandas rows as the tensors TF Transform's reader gives the preprocessing_fn."""
  import tensorflow as tf
  raw = {}
  for name, feature in spec.items():
    if feature.dtype == tf.string:
      values = tf.constant(rows[name].fillna('').astype(str).to_numpy().astype(bytes))
    else:
      values = tf.constant(rows[name].to_numpy(), feature.dtype)
    if isinstance(feature, tf.io.VarLenFeature):
      values = tf.sparse.from_dense(tf.reshape(values, [-1, 1]))
    raw[name] = values
  return raw


def test_graph_mode_writes_the_tf2_transform_graph_that_tf2_behaviours_write(both_tracings):
  """Graph mode's TF1 graph is rewritten as a TF2 one (pipelines/transform_graph): TF Transform
  applies it eagerly, as it applies TF2 behaviours' graph, to the same values; and without the
  label (as serving has it), it gives every output that does not need the label."""
  import tensorflow as tf

  from pipelines import transform_graph
  train_csv, runs = both_tracings
  outputs = {name: tft.TFTransformOutput(run[0]) for name, run in runs.items()}
  for output in outputs.values():
    assert transform_graph.tf1_meta_graph(output.transform_savedmodel_dir) is None
  rows = read_adult_csv(train_csv).head(300)
  spec = runs['tf2'][1].raw_feature_spec()
  for drop in ((), (census.LABEL_KEY,)):
    raw = _raw_features(rows, {k: v for k, v in spec.items() if k not in drop})
    got = {name: output.transform_raw_features(raw) for name, output in outputs.items()}
    assert sorted(got['graph']) == sorted(got['tf2'])
    assert (XF(census.LABEL_KEY) in got['graph']) == (not drop)
    assert len(got['graph']) >= 10
    for key, expected in got['tf2'].items():
      actual = got['graph'][key]
      if isinstance(expected, tf.SparseTensor):
        expected, actual = tf.sparse.to_dense(expected), tf.sparse.to_dense(actual)
      expected, actual = expected.numpy(), actual.numpy()
      assert expected.dtype == actual.dtype and expected.shape == actual.shape, key
      if expected.dtype.kind == 'f':
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
      else:
        np.testing.assert_array_equal(actual, expected)


TF2_ONLY = """
import tensorflow as tf
import tensorflow_transform as tft

RAW_FEATURE_SPEC = {'x': tf.io.FixedLenFeature([], tf.int64),
                    'label': tf.io.FixedLenFeature([], tf.int64)}
LABEL_KEY = 'label'


def preprocessing_fn(inputs):
  # TF2-only: TF Transform's graph mode refuses make_and_track_object.
  dataset = tft.make_and_track_object(lambda: tf.data.Dataset.from_tensor_slices([10, 20]))
  with tf.init_scope():
    offset = list(dataset.as_numpy_iterator())[1]
  return {'x_xf': inputs['x'] + offset - tft.min(inputs['x']), 'label': inputs['label']}
"""


def test_graph_mode_traces_a_function_that_needs_tf2_with_tf2(tmp_path):
  """The default, graph mode, cannot trace a TF2-only function: it is traced with TF2."""
  module = tmp_path / 'tf2_only.py'
  module.write_text(TF2_ONLY)
  data = tmp_path / 'rows.csv'
  data.write_text('x,label\n' + ''.join(f'{x},{x % 2}\n' for x in range(5, 25)))
  manifest = tabular.run(['--transforms', str(module), '--train', str(data),
                          '--output', str(tmp_path / 'out')])
  assert manifest.splits['train'].rows_written == 20
  values = read_split(str(tmp_path / 'out'), 'train')['x_xf'].ravel()
  assert sorted(values.tolist()) == [x + 20 - 5 for x in range(5, 25)]
