"""The real trainer for a few steps on a real pipeline output, and the real export served back."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from pipelines import tabular
from tests.conftest import REPO
from tests.helpers import TENSORFLOW_ONLY, read_split
from trainer import serving, task
from transforms.errors import UserError

# `trained` (the pipeline on the Adult sample, 30 training steps, the export) is in conftest.py.


def test_export_layout_and_new_versions(trained):
  assert trained['path'] == str(trained['root'] / 'models' / 'census' / '1')
  assert 0 <= trained['metrics']['accuracy'] <= 1
  # A second run adds version 2; version 1 is untouched.
  before = os.path.getmtime(os.path.join(trained['path'], 'saved_model.pb'))
  path2, _, _ = task.run(['--transformed', trained['transformed'], '--model-dir',
                          str(trained['root'] / 'models'), '--max-steps', '2'])
  assert path2.endswith(os.path.join('census', '2'))
  assert os.path.getmtime(os.path.join(trained['path'], 'saved_model.pb')) == before


def test_no_training_serving_skew(trained):
  """serving_default on raw Examples == the trained model on the pipeline's transformed rows."""
  transformed = read_split(trained['transformed'], 'eval')
  label = transformed.pop('income_bracket_xf')
  model = trained['model']
  in_training = model.predict({k: transformed[k][:300] for k in model.input_names}, verbose=0)
  # The same rows, raw: the eval TFRecords keep file order, which is the CSV's order.
  lines = open(trained['test_csv']).read().splitlines()[1:301]
  served = serving.load_model(trained['path']).predict(lines)
  np.testing.assert_allclose(served['probabilities'][:, 1], in_training[:, 0], atol=1e-5)
  assert set(served['classes']) <= {'<=50K', '>50K'}
  assert len(label) == 1499


def test_self_contained_and_tensorflow_only(trained, tmp_path):
  """Serves after the pipeline output is deleted, in a process that cannot import
  TFT/tfx-bsl/Beam."""
  shutil.copytree(trained['transformed'], tmp_path / 'backup')
  shutil.rmtree(os.path.join(trained['transformed'], 'transform_fn'))
  try:
    script = TENSORFLOW_ONLY + f'''
from trainer import serving
m = serving.load_model({str(os.path.dirname(trained["path"]))!r})
line = open({str(trained["test_csv"])!r}).read().splitlines()[1]
r = m.predict([line])
print('CLASS', r['classes'][0], r['probabilities'].shape)
print('TRANSFORMED', sorted(m.transform([line]))[:2])
'''
    proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'CLASS' in proc.stdout and '(1, 2)' in proc.stdout
    assert "TRANSFORMED ['age_bucket_xf', 'age_xf']" in proc.stdout
  finally:
    shutil.copytree(tmp_path / 'backup' / 'transform_fn',
                    os.path.join(trained['transformed'], 'transform_fn'))


def test_saved_model_cli_lists_signatures(trained):
  cli = os.path.join(os.path.dirname(sys.executable), 'saved_model_cli')
  proc = subprocess.run([cli, 'show', '--dir', trained['path'], '--all'], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in ("signature_def['serving_default']", "signature_def['transform_features']",
               "signature_def['predict_raw']"):
    assert name in proc.stdout


def test_predict_raw_signature_matches_serving_default(trained):
  loaded = tf.saved_model.load(trained['path'])
  columns = {'age': [39, 50], 'workclass': ['State-gov', '?'], 'fnlwgt': [77516, 83311],
             'education': ['Bachelors', 'Bachelors'], 'education_num': [13, 13],
             'marital_status': ['Never-married', 'Married-civ-spouse'],
             'occupation': ['Adm-clerical', ''], 'relationship': ['Not-in-family', 'Husband'],
             'race': ['White', 'White'], 'sex': ['Male', 'Male'], 'capital_gain': [2174, 0],
             'capital_loss': [0, 0], 'hours_per_week': [40, 13],
             'native_country': ['United-States', 'United-States']}
  signature = loaded.signatures['predict_raw']
  specs = signature.structured_input_signature[1]
  raw = signature(**{k: tf.constant(v, specs[k].dtype) for k, v in columns.items()})
  rows = [{k: v[i] for k, v in columns.items()} for i in range(2)]
  served = serving.load_model(trained['path']).predict(rows)
  np.testing.assert_allclose(raw['probabilities'].numpy(), served['probabilities'], atol=1e-6)


def test_bad_requests_and_inputs(trained, tmp_path):
  model = serving.load_model(trained['path'])
  with pytest.raises(UserError, match="'age'"):
    model.predict([{'age': 'old'}])
  with pytest.raises(UserError, match='unknown feature'):
    model.predict([{'agee': 39}])
  with pytest.raises(UserError, match='age'):  # a FixedLen feature missing
    model.predict([{'workclass': 'Private'}])
  with pytest.raises(UserError, match='not a complete pipeline output'):
    task.run(['--transformed', str(tmp_path), '--model-dir', str(tmp_path / 'm')])


def test_pipeline_transform_alone_matches_the_tfrecords(trained):
  """load_transform on the pipeline output reproduces the transformed eval rows exactly."""
  expected = read_split(trained['transformed'], 'eval')
  lines = open(trained['test_csv']).read().splitlines()[1:201]
  got = serving.load_transform(trained['transformed']).transform(lines)
  for key, value in got.items():
    np.testing.assert_allclose(value, expected[key][:200], atol=1e-6, err_msg=key)
  assert 'income_bracket_xf' in got  # CSV lines carry the label
  exported = serving.load_transform(trained['path']).transform(lines)
  for key, value in exported.items():
    np.testing.assert_allclose(value, expected[key][:200], atol=1e-6, err_msg=key)


def test_batch_prediction_cli(trained, tmp_path):
  out = tmp_path / 'predictions.csv'
  proc = subprocess.run(
      [sys.executable, '-m', 'trainer.predict', '--model', trained['path'], '--input',
       str(trained['test_csv']), '--output', str(out), '--show', '2'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'predicted 1499 rows' in proc.stdout
  assert 'row 1: 1 fields, expected 15; skipped' in proc.stderr  # the junk line, named
  rows = out.read_text().splitlines()
  assert rows[0] == 'row,class,p_<=50K,p_>50K' and len(rows) == 1500  # named after the classes
  line, cls, p0, p1 = rows[1].split(',')
  assert line == '2' and cls in ('<=50K', '>50K')
  assert abs(float(p0) + float(p1) - 1) < 1e-5


def test_mixed_precision_profile_and_logs(trained, tmp_path):
  path, _, model = task.run(['--transformed', trained['transformed'], '--model-dir',
                             str(tmp_path), '--max-steps', '6', '--mixed-precision',
                             '--profile-steps', '2', '3'])
  assert model.layers[-1].dtype_policy.name == 'float32'  # float32 output layer
  assert any(layer.dtype_policy.name == 'mixed_float16' for layer in model.layers)
  out = tf.saved_model.load(path).signatures['serving_default'](
      examples=tf.constant(serving.to_examples(
          open(trained['test_csv']).read().splitlines()[1:3],
          serving.load_model(path).raw_types, serving.load_model(path).csv_columns)))
  assert out['probabilities'].dtype == tf.float32
  logs = tmp_path / 'logs'
  events = [f for _, _, files in os.walk(logs) for f in files if 'tfevents' in f]
  assert events
  assert list((logs / 'plugins' / 'profile').glob('*/*.xplane.pb'))  # the profiled steps
  assert list((tmp_path / 'checkpoints').glob('*.weights.h5'))


def test_demo_defaults_reach_the_quality_bar(tmp_path):
  """The README's defaults on the full Adult data: accuracy >= 0.845 and ROC AUC >= 0.90 on
  adult.test."""
  from tests.conftest import ADULT_TEST, ADULT_TRAIN
  tabular.run(['--transforms', 'transforms.census', '--train', str(ADULT_TRAIN), '--eval',
               str(ADULT_TEST), '--output', str(tmp_path / 'tft')])
  _, metrics, _ = task.run(['--transformed', str(tmp_path / 'tft'), '--model-dir',
                            str(tmp_path / 'models')])
  assert metrics['accuracy'] >= 0.845, metrics
  assert metrics['auc'] >= 0.90, metrics
