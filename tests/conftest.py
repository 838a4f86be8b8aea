"""Shared fixtures: small samples of the real Adult data, and running the real pipeline."""

import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ADULT_TRAIN = REPO / 'data' / 'adult' / 'adult.data'
ADULT_TEST = REPO / 'data' / 'adult' / 'adult.test'


def head_lines(path, n):
  with open(path, 'rb') as f:
    return [next(f) for _ in range(n)]


@pytest.fixture(scope='session')
def adult_sample(tmp_path_factory):
  """The first 3,000 train rows and the first 1,500 lines of the test file (junk line included)."""
  root = tmp_path_factory.mktemp('adult')
  train, test = root / 'train.csv', root / 'test.csv'
  train.write_bytes(b''.join(head_lines(ADULT_TRAIN, 3000)))
  test.write_bytes(b''.join(head_lines(ADULT_TEST, 1500)))
  return train, test


@pytest.fixture(scope='session')
def trained(adult_sample, tmp_path_factory):
  """The tabular pipeline on the Adult sample, 30 training steps, the export (census/1).
  Tests may add versions beside it but must leave census/1 and the pipeline output as they are."""
  from pipelines import tabular
  from trainer import task
  train_csv, test_csv = adult_sample
  root = tmp_path_factory.mktemp('trained')
  transformed = str(root / 'tft')
  tabular.run(['--transforms', 'transforms.census', '--train', str(train_csv), '--eval',
               str(test_csv), '--output', transformed])
  path, metrics, model = task.run(['--transformed', transformed, '--model-dir',
                                   str(root / 'models'), '--max-steps', '30', '--batch-size', '64'])
  return {'root': root, 'transformed': transformed, 'path': path, 'metrics': metrics,
          'model': model, 'test_csv': test_csv}
