"""The text recipe (transforms/text.py) on real messages (data/sms_spam, transforms.sms_spam):
tokens, vocabulary and TF-IDF weights against plain Python on the same rows; a model trained on
them; the export serving raw text everywhere, with no skew."""

import collections
import csv
import math
import os
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from pipelines import tabular
from tests.conftest import REPO
from tests.helpers import read_rows
from trainer import serving, task

SMS = REPO / 'data' / 'sms_spam' / 'sms_spam.csv'
TRAIN_ROWS, EVAL_ROWS = 1500, 400


def tokens(text):
  """The recipe's tokens, computed without TensorFlow: lower case, anything but letters and
  digits splits."""
  return ''.join(c if unicodedata.category(c)[0] in 'LN' else ' ' for c in text.lower()).split()


@pytest.fixture(scope='session')
def sms(tmp_path_factory):
  root = tmp_path_factory.mktemp('sms')
  with open(SMS, newline='', encoding='utf-8') as f:
    reader = csv.reader(f)
    header, rows = next(reader), list(reader)
  parts = {'train': rows[:TRAIN_ROWS], 'eval': rows[TRAIN_ROWS:TRAIN_ROWS + EVAL_ROWS]}
  files = {}
  for split, part in parts.items():
    files[split] = str(root / f'{split}.csv')
    with open(files[split], 'w', newline='', encoding='utf-8') as f:
      csv.writer(f).writerows([header] + part)
  out = str(root / 'tft')
  tabular.run(['--transforms', 'transforms.sms_spam', '--train', files['train'], '--eval',
               files['eval'], '--output', out])
  path, metrics, model = task.run(['--transformed', out, '--model-dir', str(root / 'models'),
                                   '--epochs', '4', '--batch-size', '64'])
  records = {split: [dict(zip(header, r)) for r in part] for split, part in parts.items()}
  return {'root': root, 'out': out, 'path': path, 'metrics': metrics, 'model': model,
          'rows': records, 'files': files}


def test_vocabulary_and_tfidf_match_plain_python(sms):
  from transforms import sms_spam
  docs = [tokens(r['text']) for r in sms['rows']['train']]
  counts = collections.Counter(t for d in docs for t in d)
  # TF Transform's order: by count, ties by the token's bytes, both descending; the top_k kept.
  expected = [t for t, _ in sorted(counts.items(), key=lambda kv: (kv[1], kv[0].encode()),
                                   reverse=True)][:sms_spam.TOP_K]
  with open(os.path.join(sms['out'], 'transform_fn', 'assets', 'text'), encoding='utf-8') as f:
    assert f.read().splitlines() == expected
  ids = {t: i for i, t in enumerate(expected)}
  oov = len(expected)
  df = collections.Counter(i for d in docs for i in {ids.get(t, oov) for t in d})
  n = len(docs)
  transformed = read_rows(sms['out'], 'eval')
  for row in range(30):  # the eval file's order is kept in its shard
    doc = [ids.get(t, oov) for t in tokens(sms['rows']['eval'][row]['text'])]
    tf_counts = collections.Counter(doc)
    want = {i: c / len(doc) * (math.log((1 + n) / (1 + df[i])) + 1) for i, c in tf_counts.items()}
    got_ids = transformed['text_ids_xf'][row]
    got_weights = transformed['text_weights_xf'][row]
    assert sorted(got_ids.tolist()) == sorted(want)
    for i, w in zip(got_ids, got_weights):
      assert w == pytest.approx(want[int(i)], rel=1e-5)


def test_the_model_learns_from_text(sms):
  labels = [r['label'] for r in sms['rows']['eval']]
  majority = collections.Counter(labels).most_common(1)[0][1] / len(labels)
  assert sms['metrics']['accuracy'] > majority + 0.05, (sms['metrics'], majority)
  assert sms['metrics']['auc'] > 0.95
  served = serving.load_model(sms['path'])
  result = served.predict([{'text': r['text']} for r in sms['rows']['eval']])
  assert served.class_names == ('ham', 'spam')  # the label vocabulary names the classes
  accuracy = np.mean([c == label for c, label in zip(result['classes'], labels)])
  assert accuracy == pytest.approx(sms['metrics']['accuracy'], abs=1e-6)


def test_raw_text_serves_without_skew(sms):
  """serving_default and predict_raw on the raw messages == the trained model on the eval
  shards' TF-IDF features."""
  from trainer import features as features_lib
  from trainer import input as input_lib
  from trainer import train
  p = train.plan(train.TrainConfig(sms['out'], str(sms['root'] / 'unused')))
  model = sms['model']
  used = {n: p.kinds[n] for n in model.input_names}
  assert {k.kind for k in used.values()} == {'weighted_ids', 'weights', 'number'}
  spec = {n: p.feature_spec[n] for n in list(used) + [p.label_key]}
  files = input_lib.split_files(sms['out'], p.manifest, 'eval')
  ds = input_lib.make_dataset(files, spec, p.label_key, 100, 'gzip', shuffle=False,
                              prepare=lambda f, y: (features_lib.to_model_inputs(f, used), y))
  in_training = np.concatenate([model(f, training=False).numpy()[:, 0] for f, _ in ds])
  texts = [r['text'] for r in sms['rows']['eval']]
  served = serving.load_model(sms['path'])
  np.testing.assert_allclose(served.predict([{'text': t} for t in texts])['probabilities'][:, 1],
                             in_training, atol=1e-5)
  import tensorflow as tf
  raw = served.signatures['predict_raw'](text=tf.constant(texts[:50]))
  np.testing.assert_allclose(raw['probabilities'].numpy()[:, 1], in_training[:50], atol=1e-5)


def test_text_over_http_tensorflow_only_and_batch_prediction(sms, tmp_path):
  from tests.test_serve import ServerProcess, call
  base = os.path.dirname(sms['path'])
  server = ServerProcess(['--model', base], tmp_path / 'serve.log', tensorflow_only=True)
  try:
    texts = ['WINNER!! You have won a 1000 prize. Call 09061701461 to claim now',
             'ok see you at home later']
    status, reply = call(f'{server.url}/v1/models/{server.name}:predict',
                         {'instances': [{'text': t} for t in texts]})
    assert status == 200, reply
    expected = serving.load_model(base).predict([{'text': t} for t in texts])
    assert [p['classes'] for p in reply['predictions']] == expected['classes'].tolist()
    np.testing.assert_allclose([p['probabilities'] for p in reply['predictions']],
                               expected['probabilities'], atol=1e-6)
    server.stop()
  finally:
    server.kill()
  out = tmp_path / 'predictions.csv'
  proc = subprocess.run([sys.executable, '-m', 'trainer.predict', '--model', base, '--input',
                         sms['files']['eval'], '--output', str(out)],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = list(csv.reader(open(out, encoding='utf-8')))
  assert rows[0] == ['row', 'class', 'p_ham', 'p_spam'] and len(rows) == EVAL_ROWS + 1
  # A file with a header and no row: the header alone, named after the classes.
  empty = tmp_path / 'empty.csv'
  empty.write_text('text,label,source_line\n')
  proc = subprocess.run([sys.executable, '-m', 'trainer.predict', '--model', base, '--input',
                         str(empty), '--output', str(out)],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert list(csv.reader(open(out))) == [['row', 'class', 'p_ham', 'p_spam']]
