"""Every kind of preprocessing_fn output, through the real pipeline, trainer, export and serving.

One run on real data (the USGS earthquakes, tests/contracts/quakes_scaled.py) holds them all: a
float label transformed for training (TRANSFORMED_LABEL_KEY, inverse_label_fn), z-scores, a [2]
vector, vocabulary ids, multivalent ids, TF-IDF weighted ids, variable-length floats. A second
(tests/contracts/odd_outputs.py) holds what the trainer must refuse, and several candidate labels.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from pipelines import tabular
from tests.conftest import REPO
from tests.helpers import TENSORFLOW_ONLY, read_rows
from trainer import serving, task, train
from transforms.errors import UserError

QUAKES = REPO / 'data' / 'usgs_earthquakes' / 'usgs_earthquakes.csv'
CONTRACTS = REPO / 'tests' / 'contracts'
SHIFT, SCALE = 1.5, 1.25  # tests/contracts/quakes_scaled.py's label scaling
TRAIN_ROWS = 1400


def write_rows(path, header, rows):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


@pytest.fixture(scope='session')
def quakes(tmp_path_factory):
  """The earthquakes split by position (the eval file keeps its order in the eval shards), the
  pipeline, and the default model trained for 30 epochs and exported."""
  root = tmp_path_factory.mktemp('quakes')
  with open(QUAKES, newline='') as f:
    reader = csv.reader(f)
    header, rows = next(reader), list(reader)
  train_csv = write_rows(root / 'train.csv', header, rows[:TRAIN_ROWS])
  eval_csv = write_rows(root / 'eval.csv', header, rows[TRAIN_ROWS:])
  out = str(root / 'tft')
  tabular.run(['--transforms', str(CONTRACTS / 'quakes_scaled.py'), '--train', train_csv,
               '--eval', eval_csv, '--output', out])
  path, metrics, model = task.run(['--transformed', out, '--model-dir', str(root / 'models'),
                                   '--epochs', '15', '--batch-size', '64'])
  eval_rows = [dict(zip(header, r)) for r in rows[TRAIN_ROWS:]]
  return {'root': root, 'out': out, 'path': path, 'metrics': metrics, 'model': model,
          'eval_rows': eval_rows, 'header': header, 'eval_csv': eval_csv}


def raw_requests(rows):
  """Rows as a serving client has them: every raw feature, without the id and the label."""
  return [{k: v for k, v in row.items() if k not in ('id', 'mag')} for row in rows]


def design_matrix(rows, sizes):
  """The transformed features as least squares takes them: numbers as they are, categorical ids
  one-hot, bags of ids as shares, TF-IDF weights at their ids, variable-length floats as
  (value or 0, present); an intercept."""
  n = len(rows['latitude_xf'])
  columns = [np.ones((n, 1))]
  for name in ('latitude_xf', 'longitude_xf', 'depth_xf', 'tsunami_xf'):
    columns.append(np.asarray(rows[name], np.float64).reshape(n, 1))
  columns.append(np.asarray(rows['hour_xf'], np.float64).reshape(n, 2))
  for name in ('magType_xf', 'net_xf', 'type_xf', 'status_xf', 'region_xf'):
    columns.append(np.eye(sizes[name])[np.asarray(rows[name])])
  for name in ('sources_xf', 'types_xf'):
    bag = np.zeros((n, sizes[name]))
    for i, ids in enumerate(rows[name]):
      np.add.at(bag[i], ids, 1.0 / max(len(ids), 1))
    columns.append(bag)
  weights = np.zeros((n, sizes['place_ids_xf']))
  for i, (ids, w) in enumerate(zip(rows['place_ids_xf'], rows['place_weights_xf'])):
    weights[i, np.minimum(ids, sizes['place_ids_xf'] - 1)] = w
  columns.append(weights)
  for name in ('nst_xf', 'gap_xf', 'dmin_xf', 'rms_xf'):
    values = [v[0] if len(v) else 0.0 for v in rows[name]]
    present = [float(len(v) > 0) for v in rows[name]]
    columns.append(np.stack([values, present], axis=1))
  return np.concatenate(columns, axis=1)


def test_kinds_are_read_from_the_schema(quakes):
  p = train.plan(train.TrainConfig(quakes['out'], str(quakes['root'] / 'unused')))
  kinds = {name: (k.kind, k.shape) for name, k in p.kinds.items()}
  assert p.label_key == 'magnitude_scaled' and p.task.kind == 'regression'
  assert kinds['hour_xf'] == ('number', (2,))
  assert kinds['latitude_xf'] == ('number', ())
  assert kinds['region_xf'][0] == kinds['magType_xf'][0] == 'categorical'
  assert kinds['sources_xf'][0] == kinds['types_xf'][0] == 'ids'
  assert kinds['place_ids_xf'][0] == 'weighted_ids' and kinds['place_weights_xf'][0] == 'weights'
  assert {kinds[n][0] for n in ('nst_xf', 'gap_xf', 'dmin_xf', 'rms_xf')} == {'numbers'}
  assert p.kinds['place_ids_xf'].weights == 'place_weights_xf'
  # The ids' domain: the vocabulary plus its OOV bucket, as TF Transform recorded it.
  sources = open(os.path.join(quakes['out'], 'transform_fn', 'assets', 'sources')).read().split()
  assert p.kinds['sources_xf'].size == len(sources) + 1
  # The label's scale comes from the run's statistics: numpy on the train rows agrees.
  with open(os.path.join(quakes['root'], 'train.csv'), newline='') as f:
    labels = (np.array([float(r['mag']) for r in csv.DictReader(f)]) - SHIFT) / SCALE
  assert p.task.label_mean == pytest.approx(labels.mean(), rel=1e-4)
  assert p.task.label_std == pytest.approx(labels.std(), rel=1e-3)


def test_regression_is_no_worse_than_least_squares(quakes):
  """The default model's eval error (raw magnitudes, as served) against numpy least squares on
  the same transformed features, fitted on the train split. Columns nonzero in fewer than 1% of
  the train rows are left out of the least squares (words and categories seen a few times make
  the system rank-deficient: numpy's minimum-norm solution then reaches an eval RMSE in the
  thousands, no baseline at all). Not worse: the mean squared error is at most the baseline's
  plus twice the standard error of the paired difference over the eval rows."""
  train_rows, eval_rows = read_rows(quakes['out'], 'train'), read_rows(quakes['out'], 'eval')
  sizes = {}
  for name in ('magType_xf', 'net_xf', 'type_xf', 'status_xf', 'region_xf', 'sources_xf',
               'types_xf'):
    vocab = os.path.join(quakes['out'], 'transform_fn', 'assets', name.removesuffix('_xf'))
    sizes[name] = len(open(vocab, encoding='utf-8').read().splitlines()) + 1
  sizes['place_ids_xf'] = 1 + max(int(ids.max()) for ids in train_rows['place_ids_xf'] if len(ids))
  x_train, x_eval = design_matrix(train_rows, sizes), design_matrix(eval_rows, sizes)
  keep = np.count_nonzero(x_train, axis=0) >= 0.01 * len(x_train)
  coef, *_ = np.linalg.lstsq(x_train[:, keep], np.asarray(train_rows['magnitude_scaled']),
                             rcond=None)
  truth = np.array([float(r['mag']) for r in quakes['eval_rows']])
  baseline_errors = (x_eval[:, keep] @ coef * SCALE + SHIFT - truth) ** 2
  served = serving.load_model(quakes['path']).predict(raw_requests(quakes['eval_rows']))
  errors = (served['predictions'] - truth) ** 2
  difference = errors - baseline_errors
  margin = 2 * difference.std(ddof=1) / np.sqrt(len(difference))
  print(f'eval RMSE: model {np.sqrt(errors.mean()):.4f}, least squares '
        f'{np.sqrt(baseline_errors.mean()):.4f} ({keep.sum()} of {len(keep)} columns)')
  assert errors.mean() <= baseline_errors.mean() + margin
  rmse = np.sqrt(errors.mean())
  assert rmse < truth.std() / 2  # and far better than predicting the mean
  # The trainer's own eval metrics are in the transformed label's units.
  assert quakes['metrics']['rmse'] == pytest.approx(rmse / SCALE, rel=2e-3)
  assert 0.5 < quakes['metrics']['r2'] <= 1


def test_served_raw_rows_equal_in_training_predictions(quakes):
  """No skew: serving_default and predict_raw on raw rows == the trained Keras model on the eval
  shards (the inverse_label_fn applied), and predictions are magnitudes."""
  from trainer import features as features_lib
  from trainer import input as input_lib
  p = train.plan(train.TrainConfig(quakes['out'], str(quakes['root'] / 'unused')))
  model = quakes['model']
  used = {n: p.kinds[n] for n in model.input_names}
  spec = {n: p.feature_spec[n] for n in list(used) + [p.label_key]}
  files = input_lib.split_files(quakes['out'], p.manifest, 'eval')
  ds = input_lib.make_dataset(files, spec, p.label_key, 128, 'gzip', shuffle=False,
                              prepare=lambda f, y: (features_lib.to_model_inputs(f, used), y))
  in_training = np.concatenate([model(f, training=False).numpy()[:, 0] for f, _ in ds])
  in_training = in_training * SCALE + SHIFT
  served = serving.load_model(quakes['path'])
  requests = raw_requests(quakes['eval_rows'])
  by_examples = served.predict(requests)['predictions']
  assert by_examples.shape == (len(requests),)
  np.testing.assert_allclose(by_examples, in_training, atol=1e-5)
  # predict_raw: one [batch] tensor per raw feature (rows with every value: a number cannot be
  # missing there).
  types = served.raw_types
  full = [i for i, r in enumerate(requests) if all(r[k] for k in types)][:40]
  assert len(full) >= 20
  columns = {k: tf.constant([types[k].as_numpy_dtype(requests[i][k]) if types[k] != tf.string
                             else requests[i][k] for i in full], types[k]) for k in types}
  by_columns = served.signatures['predict_raw'](**columns)['predictions'].numpy()
  np.testing.assert_allclose(by_columns, in_training[full], atol=1e-5)


def tensorflow_only_predictions(model_base, csv_path, n):
  """(predictions of the first n rows of csv_path, the model's task) from a process that cannot
  import TF Transform, tfx-bsl or Beam, as a serving machine would be."""
  script = TENSORFLOW_ONLY + f'''
import csv, json
from trainer import serving
m = serving.load_model({model_base!r})
rows = [{{k: v for k, v in r.items() if k not in ('id', 'mag')}}
        for r in csv.DictReader(open({csv_path!r}))][:{n}]
print('RESULT', json.dumps([float(v) for v in m.predict(rows)['predictions']]), m.task)
'''
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(out_line for out_line in proc.stdout.splitlines() if out_line.startswith('RESULT'))
  return json.loads(line.split(' ', 1)[1].rsplit(' ', 1)[0]), line.rsplit(' ', 1)[1]


def test_batch_prediction_of_a_regression_model(quakes, tmp_path):
  """The batch prediction CSV has one prediction column, in magnitudes. (TensorFlow-only
  serving of this model: test_regression_over_http; of a model module's: below.)"""
  expected = serving.load_model(quakes['path']).predict(raw_requests(quakes['eval_rows'][:5]))
  out = tmp_path / 'predictions.csv'
  proc = subprocess.run(
      [sys.executable, '-m', 'trainer.predict', '--model', quakes['path'], '--input',
       quakes['eval_csv'], '--output', str(out), '--show', '2'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = list(csv.reader(open(out)))
  assert rows[0] == ['row', 'prediction'] and len(rows) == len(quakes['eval_rows']) + 1
  np.testing.assert_allclose([float(r[1]) for r in rows[1:6]], expected['predictions'],
                             rtol=1e-5)


def test_regression_over_http(quakes, tmp_path):
  """trainer.serve, in a process that cannot import TF Transform, tfx-bsl or Beam, answers a
  regression model in TensorFlow Serving's shape: one value a row."""
  from tests.test_serve import ServerProcess, call
  server = ServerProcess(['--model', os.path.dirname(quakes['path'])], tmp_path / 'serve.log',
                         tensorflow_only=True)
  try:
    requests = raw_requests(quakes['eval_rows'][:8])
    status, reply = call(f'{server.url}/v1/models/{server.name}:predict',
                         {'instances': requests})
    assert status == 200, reply
    expected = serving.load_model(quakes['path']).predict(requests)['predictions']
    assert isinstance(reply['predictions'][0], float)
    np.testing.assert_allclose(reply['predictions'], expected, atol=1e-5)
    status, reply = call(f'{server.url}/v1/models/{server.name}/metadata')
    outputs = reply['metadata']['signature_def']['signature_def']['serving_default']['outputs']
    assert list(outputs) == ['predictions']
    server.stop()
  finally:
    server.kill()


USER_MODEL = '''
import tf_keras as keras
from trainer import heads, model as model_lib


def build_model(context):
  """Wider layers over the default encoding of every feature, and the task's own head."""
  x = model_lib.encode_features(context)
  for units in context.hparams.hidden_units:
    x = keras.layers.Dense(units, activation='gelu')(x)
  return keras.Model(context.inputs, heads.head(context.task)(x))
'''


def test_a_model_module_of_your_own(quakes, tmp_path):
  """--model-module FILE: its build_model(context) is trained and exported; serving, signatures
  and skew are the project's."""
  module = tmp_path / 'my_model.py'
  module.write_text(USER_MODEL)
  path, metrics, model = task.run(
      ['--transformed', quakes['out'], '--model-dir', str(tmp_path / 'models'), '--model-module',
       str(module), '--hidden-units', '32', '16', '--max-steps', '40', '--batch-size', '64'])
  assert [layer.name for layer in model.layers
          if layer.name.startswith('dense')]  # the module's layers
  assert {'rmse', 'mae', 'r2'} <= set(metrics)
  served = serving.load_model(path)
  assert set(served.signatures) >= {'serving_default', 'predict_raw', 'transform_features'}
  requests = raw_requests(quakes['eval_rows'][:30])
  transformed = served.transform(requests)  # variable-length features: one array per row
  p = train.plan(train.TrainConfig(quakes['out'], str(tmp_path)))
  direct = model({n: _model_input(transformed[n], p.kinds[n]) for n in model.input_names},
                 training=False).numpy()[:, 0] * SCALE + SHIFT
  np.testing.assert_allclose(served.predict(requests)['predictions'], direct, atol=1e-5)
  values, _ = tensorflow_only_predictions(os.path.dirname(path), quakes['eval_csv'], 30)
  np.testing.assert_allclose(values, direct, atol=1e-5)


def _model_input(value, kind):
  if kind.sparse:
    return tf.RaggedTensor.from_row_lengths(
        np.concatenate(list(value)).astype(kind.dtype.as_numpy_dtype),
        [len(v) for v in value]).to_sparse()
  return tf.constant(value)


def test_bad_model_modules_are_one_line(quakes, tmp_path):
  cases = {
      'no_function.py': ('x = 1\n', 'defines no build_model(context)'),
      'wrong_output.py': ('import tf_keras as keras\nfrom trainer import model as m\n'
                          'def build_model(c):\n  x = m.encode_features(c)\n'
                          '  return keras.Model(c.inputs, keras.layers.Dense(3)(x))\n',
                          'outputs shape (None, 3); a regression model outputs [batch, 1]'),
      'raises.py': ('def build_model(c):\n  raise RuntimeError("boom")\n',
                    'build_model(context) failed: RuntimeError: boom'),
      'not_keras.py': ('def build_model(c):\n  return 42\n', 'returned int, not a Keras 2 model'),
  }
  for name, (code, message) in cases.items():
    (tmp_path / name).write_text(code)
    with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)').replace(
        '[', r'\[').replace(']', r'\]')):
      task.run(['--transformed', quakes['out'], '--model-dir', str(tmp_path / 'm'),
                '--model-module', str(tmp_path / name), '--max-steps', '1'])


def test_report_reads_sparse_outputs(quakes):
  """The report's statistics and analyzer constants cover sparse and variable-length outputs."""
  summary = json.load(open(os.path.join(quakes['out'], 'statistics', 'summary.json')))
  constants = summary['analyzer_constants']
  assert 'latitude_xf' in constants and 'place_weights_xf' in constants
  transformed = summary['features']['transformed']['train']
  for name in ('sources_xf', 'place_weights_xf', 'nst_xf'):
    assert transformed[name]['count'] > 0
  nst = [float(r['nst']) for r in csv.DictReader(open(os.path.join(quakes['root'],
                                                                   'train.csv'))) if r['nst']]
  assert transformed['nst_xf']['mean'] == pytest.approx(np.mean(nst), rel=1e-5)


# ---- what the trainer refuses ------------------------------------------------------------------


@pytest.fixture(scope='session')
def odd(tmp_path_factory):
  root = tmp_path_factory.mktemp('odd')
  with open(QUAKES, newline='') as f:
    reader = csv.reader(f)
    header = next(reader)
    rows = [next(reader) for _ in range(150)]
  train_csv = write_rows(root / 'train.csv', header, rows)
  out = str(root / 'tft')
  tabular.run(['--transforms', str(CONTRACTS / 'odd_outputs.py'), '--train', train_csv,
               '--output', out])
  return {'root': root, 'out': out, 'rows': [dict(zip(header, r)) for r in rows]}


KNOWN_BAD = ('--exclude-features', 'net_xf', 'hashed_sources_xf', 'types_nested_xf')
USABLE = KNOWN_BAD + ('log_depth_xf',)
REFUSED = [
    (KNOWN_BAD, "feature 'log_depth_xf' (dense float32) is NaN or infinite {shallow} times in the "
     'train split'),
    (KNOWN_BAD + ('--label', 'log_depth_xf'),
     "the label 'log_depth_xf' is NaN or infinite in {shallow} rows of the train split"),
    ((), "feature 'hashed_sources_xf' (variable-length int64) has no categorical domain"),
    (('--exclude-features', 'hashed_sources_xf'), "feature 'net_xf' (dense string) holds strings"),
    (('--exclude-features', 'hashed_sources_xf', 'net_xf'),
     "feature 'types_nested_xf' (ragged float32 with 2 variable-length dimensions) has more "
     'than one variable-length dimension'),
    (USABLE + ('--label', 'tsunami_xf'),
     "the label 'tsunami_xf' is dense int64 without a categorical domain, so the task is "
     'unclear: give --task binary'),
    (USABLE + ('--label', 'net_ids_xf', '--task', 'binary'),
     "--task binary: the label 'net_ids_xf' has {nets} classes (ids 0..{last_net})"),
    (USABLE + ('--task', 'multiclass'),
     "--task multiclass: the label 'mag_xf' is dense float32; classification needs integer "
     'class ids'),
    (USABLE + ('--task', 'binary'), "--task binary: the label 'mag_xf' is dense float32"),
    (('--exclude-features', 'hashed_sources_xf', 'types_nested_xf', '--label', 'net_xf',
      '--task', 'regression'), "--task regression: the label 'net_xf' holds strings"),
    (('--exclude-features', 'hashed_sources_xf', 'types_nested_xf', '--label', 'net_xf'),
     "the label 'net_xf' holds strings; map it to class ids"),
    (USABLE + ('--label', 'tsunami_minus_one_xf', '--task', 'binary'),
     "the label 'tsunami_minus_one_xf' takes values {low}..{high} in the train split, but a binary "
     'label is a class id in 0..1'),
    (USABLE + ('--label', 'sources_xf'),
     "the label 'sources_xf' is variable-length int64 (ragged); a label is one value per row"),
    (USABLE + ('--label', 'nothing_xf'), "--label 'nothing_xf' is not an output"),
    (USABLE + ('--exclude-features', 'unknown_xf'),
     '--exclude-features unknown_xf: the preprocessing_fn outputs no such feature'),
]


@pytest.mark.parametrize('flags,message', REFUSED, ids=[m[:40] for _, m in REFUSED])
def test_refused_at_start_in_one_line(odd, flags, message):
  with pytest.raises(UserError) as caught:
    task.run(['--transformed', odd['out'], '--model-dir', str(odd['root'] / 'never'),
              *flags])
  text = str(caught.value)
  # The numbers in the messages, from the rows themselves.
  nets, tsunami = {r['net'] for r in odd['rows']}, [int(r['tsunami']) - 1 for r in odd['rows']]
  shallow = sum(float(r['depth']) <= 0 for r in odd['rows'])  # log(depth): NaN or -inf
  message = message.format(nets=len(nets), last_net=len(nets) - 1, low=min(tsunami),
                           high=max(tsunami), shallow=shallow)
  assert message in text and '\n' not in text
  assert not os.path.exists(odd['root'] / 'never')  # nothing trained, nothing written


def test_refusal_from_the_command_line(odd):
  proc = subprocess.run([sys.executable, '-m', 'trainer.task', '--transformed', odd['out'],
                         '--model-dir', str(odd['root'] / 'never')],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'hashed_sources_xf' in errors[0] and 'Traceback' not in proc.stderr


def test_overrides_that_agree_train(odd, tmp_path):
  """--task binary on 0/1 ints without a domain; ragged ids (sources_xf) as an embedding bag;
  served class names are the ids as text."""
  path, metrics, model = task.run(
      ['--transformed', odd['out'], '--model-dir', str(tmp_path), *USABLE, 'mag_xf',
       'tsunami_minus_one_xf', '--label', 'tsunami_xf', '--task', 'binary', '--max-steps', '3'])
  assert set(model.input_names) == {'depth_xf', 'net_ids_xf', 'sources_xf'}
  served = serving.load_model(path)
  result = served.predict(raw_requests(odd['rows'][:10]))
  assert result['probabilities'].shape == (10, 2) and set(result['classes']) <= {'0', '1'}
  assert served.task == 'binary' and served.class_names == ('0', '1')
