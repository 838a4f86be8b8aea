"""pipelines/vocabulary.py: the per-batch token counting gives TFT's own vocabularies, byte for
byte.

Each case analyzes the same rows twice with TF Transform on Beam's in-process runner: once with
TFT's registered VocabularyAccumulate implementation, once with ours, and compares every
vocabulary file; the counts are also checked against collections.Counter over the raw values.
"""

import collections
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from pipelines import vocabulary

ROWS = 3000


def _rows():
  rng = np.random.default_rng(7)
  # Zipf-like tokens, so counts tie and differ; some rows have several tokens, some none.
  words = [f'w{i}'.encode() for i in range(300)]
  p = 1.0 / np.arange(1, 301)
  p /= p.sum()
  rows = []
  for _ in range(ROWS):
    k = int(rng.integers(0, 4))
    rows.append({
        'word': [words[j] for j in rng.choice(300, size=k, p=p)],
        'city': words[int(rng.choice(300, p=p))],
        'n': int(rng.integers(0, 50)),
        'w': float(rng.random()),
    })
  return rows


SPEC = {
    'word': tf.io.VarLenFeature(tf.string),
    'city': tf.io.FixedLenFeature([], tf.string),
    'n': tf.io.FixedLenFeature([], tf.int64),
    'w': tf.io.FixedLenFeature([], tf.float32),
}


def preprocessing_fn(inputs):
  return {
      'word': tft.compute_and_apply_vocabulary(inputs['word'], vocab_filename='word'),
      'city': tft.compute_and_apply_vocabulary(inputs['city'], vocab_filename='city',
                                               num_oov_buckets=1),
      'city_top': tft.compute_and_apply_vocabulary(inputs['city'], top_k=20,
                                                   vocab_filename='city_top'),
      'city_min5': tft.compute_and_apply_vocabulary(inputs['city'], frequency_threshold=5,
                                                    vocab_filename='city_min5'),
      'n': tft.compute_and_apply_vocabulary(inputs['n'], vocab_filename='n'),
      'city_freq': tft.compute_and_apply_vocabulary(
          inputs['city'], vocab_filename='city_freq', store_frequency=False),
      'city_weighted': tft.compute_and_apply_vocabulary(
          inputs['city'], weights=inputs['w'], vocab_filename='city_weighted'),
  }


def _analyze(rows, root):
  metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(SPEC))
  with beam.Pipeline(runner=FnApiRunner()) as p, tft_beam.Context(
      temp_dir=os.path.join(root, 'tmp'), desired_batch_size=256):
    transform_fn = ((p | beam.Create(rows, reshuffle=False), metadata)
                    | tft_beam.AnalyzeDataset(preprocessing_fn))
    _ = transform_fn | tft_beam.WriteTransformFn(root)
  assets = os.path.join(root, 'transform_fn', 'assets')
  return {name: open(os.path.join(assets, name), 'rb').read() for name in os.listdir(assets)}


@pytest.fixture(scope='module')
def vocabularies(tmp_path_factory):
  rows = _rows()
  with vocabulary.tft_implementation():
    tft_files = _analyze(rows, str(tmp_path_factory.mktemp('tft')))
  vocabulary.install()
  ours = _analyze(rows, str(tmp_path_factory.mktemp('ours')))
  return rows, tft_files, ours


def test_the_same_vocabulary_files_as_tft(vocabularies):
  _, tft_files, ours = vocabularies
  assert sorted(ours) == sorted(tft_files) == sorted(
      ['word', 'city', 'city_top', 'city_min5', 'n', 'city_freq', 'city_weighted'])
  for name in tft_files:
    assert ours[name] == tft_files[name], name


def test_the_files_are_the_counts_of_the_rows(vocabularies):
  rows, _, ours = vocabularies
  words = collections.Counter(w for r in rows for w in r['word'])
  cities = collections.Counter(r['city'] for r in rows)
  def by_count(c):
    return [k for k, _ in sorted(c.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]
  assert ours['word'].splitlines() == by_count(words)
  assert ours['city'].splitlines() == by_count(cities)
  assert ours['city_top'].splitlines() == by_count(cities)[:20]
  assert ours['city_min5'].splitlines() == [k for k in by_count(cities) if cities[k] >= 5]
  numbers = collections.Counter(str(r['n']).encode() for r in rows)
  assert ours['n'].splitlines() == by_count(numbers)


def test_count_batch_counts_each_distinct_token_once():
  tokens = np.array([b'a', b'b', b'a', b'c', b'a'], dtype=object)
  assert dict(vocabulary.count_batch((tokens,))) == {b'a': 3, b'b': 1, b'c': 1}
  assert dict(vocabulary.count_batch((np.array([3, 3, 1]),))) == {3: 2, 1: 1}
  assert dict(vocabulary.count_batch((np.array([], dtype=object),))) == {}
