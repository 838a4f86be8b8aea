"""python -m pipelines.transform: an earlier run's transform graph on new inputs, no analysis."""

import json
import os

import numpy as np
import pytest

from pipelines import tabular
from pipelines import transform as transform_only
from tests.helpers import read_split
from transforms import run_contract
from transforms.errors import UserError


@pytest.fixture(scope='module')
def earlier(adult_sample, tmp_path_factory):
  """A tabular run on the Adult sample: train and eval (the test file, junk line included)."""
  train_csv, test_csv = adult_sample
  root = tmp_path_factory.mktemp('transform_only')
  out = root / 'earlier'
  tabular.run(['--transforms', 'transforms.census', '--train', str(train_csv), '--eval',
               str(test_csv), '--output', str(out)])
  return {'root': root, 'dir': str(out), 'test_csv': test_csv, 'train_csv': train_csv}


def _transform(earlier, inputs, output, *extra):
  return transform_only.run(['--transform-fn', earlier['dir'], '--input', *map(str, inputs),
                             '--output', str(output), *extra])


def test_the_same_rows_transform_as_in_the_earlier_run(earlier, tmp_path):
  manifest = _transform(earlier, [earlier['test_csv']], tmp_path / 'out', '--split', 'today')
  assert manifest.transform_of == earlier['dir']
  assert list(manifest.splits) == ['today']
  before = run_contract.read_manifest(earlier['dir']).splits['eval']
  after = manifest.splits['today']
  assert (after.rows_read, after.rows_written, after.rows_rejected) == (
      before.rows_read, before.rows_written, before.rows_rejected)
  # The junk line is a dead letter, as in the earlier run.
  with open(tmp_path / 'out' / 'errors' / 'today.jsonl') as f:
    assert [json.loads(line)['kind'] for line in f] == ['field_count']
  ours, theirs = read_split(str(tmp_path / 'out'), 'today'), read_split(earlier['dir'], 'eval')
  assert sorted(ours) == sorted(theirs)
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  # A pipeline output of its own: the graph and its vocabularies are in it.
  assert os.path.isdir(tmp_path / 'out' / 'transform_fn' / 'assets')


def test_drift_against_the_earlier_train_statistics(earlier, tmp_path):
  """Ages shifted by 30 years drift; the other features of the same rows do not."""
  lines = earlier['test_csv'].read_text().splitlines()[1:]  # without the junk line
  shifted = tmp_path / 'older.csv'
  shifted.write_text('\n'.join(f'{int(line.split(",", 1)[0]) + 30},{line.split(",", 1)[1]}'
                               for line in lines if line.strip()) + '\n')
  manifest = _transform(earlier, [shifted], tmp_path / 'out')
  drifting = manifest.statistics['drifting_features']
  assert 'age' in drifting and 'education' not in drifting and 'hours_per_week' not in drifting
  summary = json.load(open(tmp_path / 'out' / 'statistics' / 'summary.json'))
  assert summary['drift']['compared'] == 'new'
  assert summary['drift']['reference'] == f'train of {earlier["dir"]}'
  page = open(tmp_path / 'out' / 'report.html').read()
  assert f'Drift: train of {earlier["dir"]} vs new' in page
  assert 'data-drift="age/drifting" data-value="True"' in page
  # The numbers are the new rows': their mean age, as numpy reads the file.
  ages = np.array([int(line.split(',', 1)[0]) for line in shifted.read_text().splitlines()])
  assert abs(summary['features']['raw']['new']['age']['mean'] - ages.mean()) < 1e-6


def test_inputs_that_do_not_fit_the_contract_are_refused(earlier, tmp_path):
  bad = tmp_path / 'bad.csv'
  bad.write_text('1,2,3\n4,5,6\n')
  with pytest.raises(UserError, match=r'bad.csv: rows have 3 fields but 15 columns'):
    _transform(earlier, [bad], tmp_path / 'out')
  assert not os.path.exists(tmp_path / 'out' / 'manifest.json')
  with pytest.raises(UserError, match='--transform-fn .* holds no manifest.json'):
    transform_only.run(['--transform-fn', str(tmp_path), '--input', str(bad), '--output',
                        str(tmp_path / 'out2')])


def test_too_many_bad_rows_publish_nothing(earlier, tmp_path):
  mixed = tmp_path / 'mixed.csv'
  good = earlier['train_csv'].read_text().splitlines()[:20]
  mixed.write_text('\n'.join(good + ['x, y'] * 5) + '\n')
  with pytest.raises(UserError, match='more than --max-bad-rows allows'):
    _transform(earlier, [mixed], tmp_path / 'out', '--max-bad-rows', '2')
  assert not os.path.exists(tmp_path / 'out' / 'manifest.json')


def test_a_train_split_is_a_training_set(earlier, tmp_path):
  from trainer import task
  _transform(earlier, [earlier['train_csv']], tmp_path / 'out', '--split', 'train')
  path, _, _ = task.run(['--transformed', str(tmp_path / 'out'), '--model-dir',
                         str(tmp_path / 'models'), '--max-steps', '2', '--batch-size', '32'])
  assert os.path.exists(os.path.join(path, 'saved_model.pb'))
