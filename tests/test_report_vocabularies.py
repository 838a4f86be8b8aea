"""The report's eval OOV share of vocabularies over tokens derived from the cells (a '|'-separated
column split in the preprocessing_fn, words of a text), from one real run on a small CSV, against
shares counted in plain Python over the eval file's tokens; and the share read off aligned
histograms without a pipeline."""

import csv
import json
import os
import random
import textwrap

import pytest
import tensorflow_transform as tft

from pipelines import report, statistics, tabular
from pipelines.report import summary as report_summary
from tests.test_report import (
  assert_not_blank,
  needs_chromium,
  page_numbers,
  screenshot,
  shown_matches,
)

MODULE = '''
import tensorflow as tf
import tensorflow_transform as tft

RAW_FEATURE_SPEC = {
    'tags': tf.io.FixedLenFeature([], tf.string),
    'words': tf.io.FixedLenFeature([], tf.string),
    'shade': tf.io.FixedLenFeature([], tf.string),
    'label': tf.io.FixedLenFeature([], tf.int64),
}
LABEL_KEY = 'label'


def preprocessing_fn(inputs):
  tokens = tf.strings.split(inputs['tags'], '|')
  words = tft.vocabulary(tf.strings.split(inputs['words'], ' '), vocab_filename='words')
  return {
      # Multivalent ids, sparse and ragged: counted on the transformed feature.
      'tags_xf': tft.compute_and_apply_vocabulary(tokens.to_sparse(), num_oov_buckets=1,
                                                  vocab_filename='tags'),
      'tags_ragged_xf': tft.compute_and_apply_vocabulary(tokens, num_oov_buckets=1,
                                                         vocab_filename='tags_ragged'),
      # No <vocabulary>_xf feature: only the raw cells could be compared, and they are not
      # the vocabulary's tokens (words), or they are (shade).
      'word_ids': tft.apply_vocabulary(tf.strings.split(inputs['words'], ' '), words,
                                       num_oov_buckets=1).to_sparse(),
      'shade_id': tft.compute_and_apply_vocabulary(inputs['shade'], num_oov_buckets=1,
                                                   vocab_filename='shade'),
      'label_xf': inputs['label'],
  }
'''
TRAIN_ROWS, EVAL_ROWS = 200, 120


def _rows(rng, n, tags, words, shades):
  return [{'tags': '|'.join(rng.choice(tags) for _ in range(rng.randint(1, 4))),
           'words': ' '.join(rng.choice(words) for _ in range(rng.randint(2, 5))),
           'shade': rng.choice(shades), 'label': rng.randint(0, 1)} for _ in range(n)]


def _write(path, rows):
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, ['label', 'tags', 'words', 'shade'])
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


@pytest.fixture(scope='module')
def tags_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('vocab_report')
  rng = random.Random(11)
  tags = [f't{i}' for i in range(25)]
  words = [f'w{i}' for i in range(40)]
  shades = ['light', 'dark', 'pale']
  train = _rows(rng, TRAIN_ROWS, tags, words, shades)
  # The eval split also holds tokens and a shade the train split never has.
  evaluate = _rows(rng, EVAL_ROWS, tags + ['new0', 'new1', 'new2', 'new3'],
                   words + ['unseen'], shades + ['neon'])
  module = root / 'tags_module.py'
  module.write_text(textwrap.dedent(MODULE))
  out = str(root / 'out')
  tabular.run(['--transforms', str(module), '--train', _write(root / 'train.csv', train),
               '--eval', _write(root / 'eval.csv', evaluate), '--output', out])
  summary = json.load(open(os.path.join(out, report.SUMMARY)))
  return {'out': out, 'train': train, 'eval': evaluate, 'vocabs': summary['vocabularies'],
          'page': page_numbers(out)}


def _oov_share(train, evaluate, split):
  known = {token for row in train for token in split(row)}
  tokens = [token for row in evaluate for token in split(row)]
  return sum(token not in known for token in tokens) / len(tokens), known


@pytest.mark.parametrize('name', ['tags', 'tags_ragged'])
def test_oov_share_of_split_tokens_is_counted_on_the_ids(tags_run, name):
  expected, known = _oov_share(tags_run['train'], tags_run['eval'],
                               lambda row: row['tags'].split('|'))
  assert 0.03 < expected < 0.3
  vocabulary = {v.decode() for v in tft.TFTransformOutput(tags_run['out']).vocabulary_by_name(
      name)}
  assert vocabulary == known
  entry = tags_run['vocabs'][name]
  assert entry['oov_share_eval'] == expected
  assert (entry['oov_exact'], entry['oov_feature'], entry['oov_note']) == (True, f'{name}_xf',
                                                                           None)
  value, text = tags_run['page'].found[('vocab', f'{name}/oov_share_eval')]
  assert float(value) == expected and shown_matches(text, expected)
  # The top tokens' train counts are token counts, not counts of whole cells.
  counts = {}
  for row in tags_run['train']:
    for token in row['tags'].split('|'):
      counts[token] = counts.get(token, 0) + 1
  assert entry['top_train_counts'] == [counts[t] for t in entry['top']]


def test_raw_cells_of_derived_tokens_give_no_share(tags_run):
  entry = tags_run['vocabs']['words']
  assert entry['oov_share_eval'] is None and entry['oov_exact'] is None
  assert entry['oov_note'] == 'vocabulary of derived tokens'
  assert ('vocab', 'words/oov_share_eval') not in tags_run['page'].found
  with open(os.path.join(tags_run['out'], report.REPORT), encoding='utf-8') as f:
    assert 'vocabulary of derived tokens' in f.read()


def test_raw_values_that_are_the_tokens_still_give_the_share(tags_run):
  expected, _ = _oov_share(tags_run['train'], tags_run['eval'], lambda row: [row['shade']])
  assert expected > 0
  entry = tags_run['vocabs']['shade']
  assert (entry['oov_share_eval'], entry['oov_exact'], entry['oov_feature']) == (
      expected, True, 'shade')
  assert float(tags_run['page'].found[('vocab', 'shade/oov_share_eval')][0]) == expected


# ---- the share from aligned histograms, without a pipeline --------------------------------


def _ids_summary(ids):
  histogram = None
  for value in ids:
    single = statistics.AlignedHistogram(0, value, [1])
    histogram = single if histogram is None else histogram.merge(single)
  buckets = list(zip(histogram.edges(), histogram.edges()[1:], histogram.counts.tolist()))
  return {'type': 'INT', 'num_values': len(ids), 'min': float(min(ids)), 'max': float(max(ids)),
          'histogram': buckets}


@pytest.mark.parametrize('size, ids, expected', [
    (100, list(range(101)) * 2 + [100] * 6, 8 / 208),  # bins of 2 (101 ids): 100 is an edge
    (99, list(range(100)) + [99] * 5, None),  # bins of 2: [98, 100) holds ids 98 and 99
    (99, list(range(99)) * 2, 0.0),  # no id reaches the vocabulary's size
    (5, [-1, -1, 0, 1, 4, 4], 2 / 6),  # no OOV buckets, a default of -1
])
def test_oov_share_of_ids(size, ids, expected):
  summary = _ids_summary(ids)
  assert report_summary._oov_share_of_ids(summary, size) == expected


@needs_chromium
def test_vocabulary_table_renders_in_chromium(tags_run, tmp_path):
  assert_not_blank(screenshot(os.path.join(tags_run['out'], report.REPORT), tmp_path / 'shot.png'))
