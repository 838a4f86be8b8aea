"""SIGKILL at any point of a run, publication included: --output is then either a complete, valid
result or holds nothing that claims to be one (no manifest.json: the trainer refuses it), and the
same command run again succeeds.

The kill points come from the run's own progress, not from delays: its staging area appearing,
the worker writing the analysis' vocabularies, and single file operations of the publication
(the command's process kills itself just before one, see runs.KILL_DURING_PUBLICATION).
"""

import glob
import os
import shutil

import pytest

from pipelines import output_dir, tabular
from tests import runs
from transforms.errors import UserError


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  return runs.small_adult(tmp_path_factory.mktemp('adult'))


def _runs_in(out):
  staging = os.path.join(out, output_dir.STAGING)
  return set(os.listdir(staging)) if os.path.isdir(staging) else set()


def _kill_when(inputs, out, log, condition, what):
  """Runs the command and SIGKILLs it once `condition(files of its own staging area)` holds."""
  before = _runs_in(out)

  def reached():
    return any(condition(os.path.join(out, output_dir.STAGING, run))
               for run in _runs_in(out) - before)

  proc = runs.start_cli(runs.tabular_args(inputs, out), log)
  try:
    runs.wait_for(reached, proc, 300, what)
  finally:
    runs.sigkill(proc)


def _has(pattern):
  return lambda run_dir: any(os.path.isfile(p) for p in glob.glob(os.path.join(run_dir, pattern),
                                                                   recursive=True))


@pytest.fixture(scope='module')
def killed_three_times(inputs, tmp_path_factory):
  """The command SIGKILLed while its job is built (its staging area exists), while the worker
  analyzes, and during publication; after each, what DIR holds. Then the same command again."""
  root = tmp_path_factory.mktemp('killed')
  out = root / 'out'
  after = []
  _kill_when(inputs, out, root / 'log1', _has('RUNNING'), 'staging area')
  after.append((runs.check_complete_or_nothing(str(out)), sorted(os.listdir(out))))
  _kill_when(inputs, out, root / 'log2', _has('tmp/tftransform_tmp/*'),
             'vocabulary files being written')
  after.append((runs.check_complete_or_nothing(str(out)), sorted(os.listdir(out))))
  # Just before the train shard moves into DIR (the staged entries move in sorted order:
  # errors/ and the eval shard are in by then).
  proc = runs.start_cli(runs.tabular_args(inputs, out), root / 'log3', runs.KILL_DURING_PUBLICATION,
                        env={'KILL_BEFORE': r'^rename \S+/train-\S+ -> '})
  status = proc.wait(timeout=300)
  log = (root / 'log3').read_text()
  after.append((runs.check_complete_or_nothing(str(out)), sorted(os.listdir(out))))
  markers = runs.staged_files(str(out), output_dir.PUBLISHING)
  # The same command, with no --overwrite: a user should not need to know where it was killed.
  manifest = tabular.run(runs.tabular_args(inputs, out))
  return {'out': out, 'after': after, 'status': status, 'log': log, 'markers': markers,
          'manifest': manifest}


def test_sigkill_at_each_stage_then_the_same_command_succeeds(inputs, killed_three_times):
  run = killed_three_times
  # Killed before publication: DIR holds nothing but staging areas.
  assert run['after'][:2] == [('incomplete', [output_dir.STAGING])] * 2
  # Killed while publishing: some entries moved in, no manifest; the marker says whose they are.
  assert run['status'] == -9 and 'killed before rename' in run['log'], run['log'][-3000:]
  state, listing = run['after'][2]
  assert state == 'incomplete' and {'errors', 'eval-00000-of-00001.tfrecord.gz'} <= set(listing)
  assert not [name for name in listing if name.startswith('train-')]
  assert len(run['markers']) == 1
  # The rerun published a complete result, and the killed runs' staging areas are gone.
  assert runs.check_complete_or_nothing(str(run['out'])) == 'complete'
  assert runs.counts(run['manifest']) == runs.expected_counts(inputs)
  assert output_dir.STAGING not in os.listdir(run['out'])


def test_every_step_of_publication_over_a_result_leaves_one_result_or_none(
    inputs, killed_three_times, tmp_path, monkeypatch):
  """--overwrite over a complete result, DIR copied before each file operation of the
  publication (what a SIGKILL there would leave). The new run has 2 shards a split, the old one
  1, so a manifest beside the other run's shards would not add up."""
  out = tmp_path / 'out'
  shutil.copytree(killed_three_times['out'], out)
  (out / 'train-notes.txt').write_text('not the pipeline\'s')  # a user's file in DIR
  snapshots = []

  def snapshot(n, op, path):
    target = tmp_path / f'before_{n:02d}'
    shutil.copytree(out, target, symlinks=True)
    snapshots.append((target, f'{op} {path}'))

  with monkeypatch.context() as patch:
    runs.watch_publication(snapshot, patch.setattr)
    manifest = tabular.run(runs.tabular_args(inputs, out, '--num-shards', '2', '--overwrite'))
  snapshots.append((out, 'done'))
  assert len(snapshots) > 8

  states = []
  for directory, step in snapshots:
    state = runs.check_complete_or_nothing(str(directory))
    if state == 'complete':
      shards = runs.check_complete(str(directory))[0].splits['train'].num_shards
      state = 'old' if shards == 1 else 'new'
    else:
      # A rerun without --overwrite may replace what this publication left.
      rerun = output_dir.OutputDir(str(directory))
      rerun.prepare()
      rerun.discard()
    states.append(state)
    assert (directory / 'train-notes.txt').read_text() == 'not the pipeline\'s', step
  # The old result stays whole until its manifest goes; the new one is whole once its manifest
  # is in; in between DIR claims nothing.
  phases = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
  assert phases == ['old', 'incomplete', 'new'], list(zip(states, [s for _, s in snapshots]))
  assert runs.counts(manifest) == runs.expected_counts(inputs)


def test_files_in_output_that_no_run_left_are_replaced_only_with_overwrite(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'train-00000-of-00001.tfrecord.gz').write_bytes(b'someone else\'s')
  with pytest.raises(UserError) as e:
    output_dir.OutputDir(str(out)).prepare()
  assert 'train-00000-of-00001.tfrecord.gz' in str(e.value) and '--overwrite' in str(e.value)
  assert os.listdir(out) == ['train-00000-of-00001.tfrecord.gz']  # nothing created
  output_dir.OutputDir(str(out), overwrite=True).prepare()


def test_a_failure_of_the_projects_own_code_is_an_internal_error(inputs, tmp_path, monkeypatch):
  """A bug in the project's code (here: the CSV source handed a broken converter, so the job
  fails at its first read) is an InternalError naming the file and line, not the user's fault;
  nothing is published."""
  from pipelines.sources import csv_rows
  from transforms.errors import InternalError
  monkeypatch.setattr(csv_rows, 'block_to_record_batch', None)
  out = tmp_path / 'out'
  with pytest.raises(InternalError) as e:
    tabular.run(runs.tabular_args(inputs, str(out)))
  message = str(e.value)
  assert message.startswith('the pipeline failed in pipelines/sources/csv_files.py:'), message
  assert 'TypeError' in message or 'not callable' in message, message
  assert '\n' not in message and message.endswith('nothing was published')
  assert os.path.isfile(message.split('full traceback in ')[1].split(';')[0])
  runs.check_incomplete(str(out))


def test_a_failure_in_the_users_function_or_a_library_is_not_internal():
  from pipelines import job
  try:
    {}['x']
  except KeyError as e:  # raised here, in a test file: not the project's code
    assert job.internal_failure(e) is None
  remote = RuntimeError('Traceback (most recent call last):\n'
                        f'  File "{job.__file__}", line 10, in f\n'
                        '    x()\n'
                        '  File "/usr/lib/python3/site-packages/tensorflow/ops.py", line 5, in x\n'
                        'tensorflow.python.framework.errors_impl.InvalidArgumentError: bad')
  assert job.internal_failure(remote) is None  # a TensorFlow error: the user's function or data
  bug = RuntimeError('Traceback (most recent call last):\n'
                     f'  File "{job.__file__}", line 10, in f\n'
                     "KeyError: 'rows'")
  assert job.internal_failure(bug) == 'pipelines/job.py:10'
