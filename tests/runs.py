"""Running the tabular command the way a user does (as a subprocess, killed if need be) and
checking what it left in --output, with TensorFlow reading the files, not the pipeline's code."""

import collections
import dataclasses
import glob
import os
import signal
import subprocess
import sys
import time

import tensorflow as tf

from tests.conftest import ADULT_TEST, ADULT_TRAIN, REPO, head_lines
from transforms import run_contract
from transforms.errors import UserError

SPLITS = ('train', 'eval')


def small_adult(root, train_rows=300, test_lines=150):
  """Real Adult rows: `train_rows` of the train file and the test file's first `test_lines`
  lines (its junk first line, a dead letter, included). Returns (train, test) paths."""
  train, test = os.path.join(root, 'train.csv'), os.path.join(root, 'test.csv')
  with open(train, 'wb') as f:
    f.write(b''.join(head_lines(ADULT_TRAIN, train_rows)))
  with open(test, 'wb') as f:
    f.write(b''.join(head_lines(ADULT_TEST, test_lines)))
  return train, test


def tabular_args(inputs, output, *extra):
  """The tabular command's arguments on small_adult's (train, test) files."""
  train, test = inputs
  return ['--transforms', 'transforms.census', '--train', train, '--eval', test,
          '--output', str(output), *extra]


def expected_counts(inputs):
  """{split: (rows read, written, rejected)} from pandas: every train row written, the test
  file's junk first line rejected."""
  from tests.helpers import read_adult_csv  # pandas: only the tests that count need it
  train_rows, eval_rows = len(read_adult_csv(inputs[0])), len(read_adult_csv(inputs[1], 1))
  return {'train': (train_rows, train_rows, 0), 'eval': (eval_rows + 1, eval_rows, 1)}


def counts(manifest):
  return {split: (c.rows_read, c.rows_written, c.rows_rejected)
          for split, c in manifest.splits.items()}


def command_env():
  """The environment of a command run as a user would: this venv's `python` first on PATH (Beam's
  worker pool starts SDK workers with whatever `python` PATH finds)."""
  path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')
  return dict(os.environ, PATH=path, TF_CPP_MIN_LOG_LEVEL='2')


def start_cli(args, log_path, prelude=None, env=None):
  """Starts `python -m pipelines.tabular ARGS` (or, with `prelude`, the same entry point after
  that Python code has run in the process), stdout and stderr to `log_path`; `env`: variables
  to add."""
  if prelude is None:
    command = [sys.executable, '-m', 'pipelines.tabular', *args]
  else:
    command = [sys.executable, '-c',
               f'{prelude}\nfrom pipelines import tabular\nfrom transforms import command\n'
               'command.main(tabular.run)', *args]
  log = open(log_path, 'wb')
  try:
    return subprocess.Popen(command, cwd=REPO, env=dict(command_env(), **(env or {})),
                            stdout=log, stderr=subprocess.STDOUT)
  finally:
    log.close()  # the child has its own copy


def wait_for(condition, proc, timeout, what):
  """Polls `condition()` until it is true; fails if `proc` ended first or on timeout."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if proc.poll() is not None:
      raise AssertionError(f'the command ended (status {proc.returncode}) before {what}')
    time.sleep(0.05)
  raise AssertionError(f'no {what} after {timeout}s')


def sigkill(proc):
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)


def staged_files(directory, pattern):
  """Files of any run's staging area matching `pattern` (relative to the run's directory)."""
  return [p for p in glob.glob(os.path.join(directory, '.staging', '*', pattern), recursive=True)
          if os.path.isfile(p)]


def examples_of(directory, pattern, compression='GZIP'):
  """The tf.train.Examples of the TFRecord files matching `pattern` in `directory`, as a multiset
  of their deterministic serializations. Record order is not part of a result (shards, bundles
  and workers vary), and neither is the order of an Example's features: tfx_bsl's encoder writes
  the feature map in its hash order, which varies from process to process."""
  files = sorted(glob.glob(os.path.join(directory, pattern)))
  return collections.Counter(
      tf.train.Example.FromString(r.numpy()).SerializeToString(deterministic=True)
      for r in tf.data.TFRecordDataset(files, compression_type=compression))


def vocabularies(directory):
  """{file name: bytes} of the transform graph's vocabulary files."""
  assets = os.path.join(directory, 'transform_fn', 'assets')
  return {name: open(os.path.join(assets, name), 'rb').read() for name in os.listdir(assets)}


def published_counts(manifest):
  return {split: dataclasses.replace(entry, files=None) for split, entry in manifest.splits.items()}


def check_complete(directory):
  """Asserts DIR holds a complete, valid result: its manifest's counts match the files beside it.
  Returns the manifest and {split: multiset of its Examples}."""
  manifest = run_contract.read_manifest(directory)
  assert manifest.complete is True
  assert os.path.isfile(os.path.join(directory, 'transform_fn', 'saved_model.pb'))
  assert os.path.isfile(os.path.join(directory, 'transformed_metadata', 'schema.pbtxt'))
  compression = 'GZIP' if manifest.compression == 'gzip' else ''
  found = {}
  for split, entry in manifest.splits.items():
    shards = glob.glob(os.path.join(directory, entry.files))
    assert len(shards) == entry.num_shards, (split, shards)
    # No shard of another run beside them.
    assert len(glob.glob(os.path.join(directory, f'{split}-*-of-*'))) == entry.num_shards
    found[split] = examples_of(directory, entry.files, compression)
    assert sum(found[split].values()) == entry.rows_written
    errors = os.path.join(directory, 'errors', f'{split}.jsonl')
    rejected = len(open(errors).readlines()) if os.path.exists(errors) else 0
    assert rejected == entry.rows_rejected == sum(entry.rejected_by_kind.values())
    assert entry.rows_read == entry.rows_written + entry.rows_rejected
  return manifest, found


def check_incomplete(directory):
  """Asserts DIR does not claim to be a result: no manifest, and the trainer refuses it."""
  assert not os.path.exists(os.path.join(directory, 'manifest.json'))
  try:
    run_contract.read_manifest(directory)  # what the trainer and serving read
  except UserError as e:
    assert 'not a complete pipeline output' in str(e)
  else:
    raise AssertionError(f'the trainer accepted {directory}')


def check_complete_or_nothing(directory):
  """What a stopped run may leave: 'complete' (a valid result) or 'incomplete' (nothing that
  claims to be one). Returns which."""
  if os.path.exists(os.path.join(directory, 'manifest.json')):
    check_complete(directory)
    return 'complete'
  check_incomplete(directory)
  return 'incomplete'


# Python run in a command's process before the pipeline (see start_cli): SIGKILLs the process
# just before the first file operation of the output's publication that matches the regular
# expression KILL_BEFORE ('create PATH', 'delete PATH' or 'rename SOURCE -> DESTINATION').
KILL_DURING_PUBLICATION = '''
import os, re, signal
from tests import runs
def _kill(n, op, path):
  if re.search(os.environ['KILL_BEFORE'], f'{op} {path}'):
    print(f'killed before {op} {path}', flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
runs.watch_publication(_kill)
'''


def watch_publication(before_op, patch=setattr):
  """Calls `before_op(n, op, path)` before each file operation of OutputDir.publish, n counting
  from 1. Lists of paths are deleted and renamed one path at a time, as Beam's file systems do
  them, so that a stop between two paths of a list can be studied too. `patch`: setattr, or a
  pytest MonkeyPatch's setattr to undo it all afterwards."""
  from apache_beam.io.filesystems import FileSystems

  from pipelines import output_dir

  create, delete, rename = FileSystems.create, FileSystems.delete, FileSystems.rename
  publish = output_dir.OutputDir.publish
  state = {'on': False, 'n': 0}

  def step(op, path):
    if state['on']:
      state['n'] += 1
      before_op(state['n'], op, path)

  def watched_create(path, *args, **kwargs):
    step('create', path)
    return create(path, *args, **kwargs)

  def watched_delete(paths):
    if not state['on']:
      return delete(paths)
    for path in paths:
      step('delete', path)
      delete([path])

  def watched_rename(sources, destinations):
    if not state['on']:
      return rename(sources, destinations)
    for source, destination in zip(sources, destinations):
      step('rename', f'{source} -> {destination}')
      rename([source], [destination])

  def watched_publish(self, manifest):
    state['on'] = True
    try:
      return publish(self, manifest)
    finally:
      state['on'] = False

  patch(FileSystems, 'create', staticmethod(watched_create))
  patch(FileSystems, 'delete', staticmethod(watched_delete))
  patch(FileSystems, 'rename', staticmethod(watched_rename))
  patch(output_dir.OutputDir, 'publish', watched_publish)
