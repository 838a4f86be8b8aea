"""The tabular pipeline on SDK worker processes, as a Flink or Spark cluster runs it: Beam's
portable runner with its embedded Python job server (--job_endpoint=embed, no Java) hands the job
to workers that an external worker pool (apache_beam.runners.worker.worker_pool_main) starts.
Checked against the in-process runner on the same input; a worker killed mid-job; the same input
giving the same result on every run.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from pipelines import tabular
from pipelines.runner import launch
from tests import runs
from tests.helpers import read_adult_csv
from transforms import census


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _children(pid):
  """Live processes whose parent is `pid` (from /proc: psutil is not a dependency)."""
  found = []
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()
      except OSError:  # it ended meanwhile
        continue
      if int(fields[1]) == pid and fields[0] != 'Z':
        found.append(int(entry))
  return found


@pytest.fixture(scope='module')
def worker_pool(tmp_path_factory):
  """A worker pool on a free port, as `python -m apache_beam.runners.worker.worker_pool_main`
  runs on every node of a cluster; yields (port, its process, its log)."""
  port = _free_port()
  log = tmp_path_factory.mktemp('pool') / 'pool.log'
  with open(log, 'wb') as f:
    pool = subprocess.Popen(
        [sys.executable, '-m', 'apache_beam.runners.worker.worker_pool_main',
         f'--service_port={port}'], env=runs.command_env(), stdout=f, stderr=subprocess.STDOUT)
  deadline = time.time() + 120
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      break
    except OSError:
      assert pool.poll() is None and time.time() < deadline, log.read_text()[-2000:]
      time.sleep(0.2)
  yield port, pool, log
  workers = _children(pool.pid)
  pool.terminate()  # the pool stops its workers on exit
  pool.wait(timeout=30)
  for pid in workers:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  return runs.small_adult(tmp_path_factory.mktemp('adult'))


def _portable(port):
  return ['--runner=PortableRunner', '--job_endpoint=embed', '--environment_type=EXTERNAL',
          f'--environment_config=localhost:{port}']


@pytest.fixture(scope='module')
def in_process(inputs, tmp_path_factory):
  out = tmp_path_factory.mktemp('in_process') / 'out'
  tabular.run(runs.tabular_args(inputs, out))
  return str(out)


@pytest.fixture(scope='module')
def portable(inputs, worker_pool, tmp_path_factory):
  port, _, log = worker_pool
  out = tmp_path_factory.mktemp('portable') / 'out'
  tabular.run(runs.tabular_args(inputs, out, *_portable(port)))
  return {'out': str(out), 'pool_log': log.read_text()}


def _same_result(a, b):
  """The same published result: vocabularies and dead letters byte for byte, the same multiset
  of serialized examples per split, the same counts."""
  manifest_a, examples_a = runs.check_complete(a)
  manifest_b, examples_b = runs.check_complete(b)
  assert runs.published_counts(manifest_a) == runs.published_counts(manifest_b)
  assert runs.vocabularies(a) == runs.vocabularies(b)
  for split in runs.SPLITS:
    assert examples_a[split] == examples_b[split], split
    errors = [open(os.path.join(d, 'errors', f'{split}.jsonl'), 'rb').read() for d in (a, b)]
    assert errors[0] == errors[1]


def test_portable_runner_on_a_worker_pool_equals_in_process(inputs, in_process, portable):
  # The job ran on worker processes the pool started, not in this one.
  assert 'Starting worker with command' in portable['pool_log']
  _same_result(in_process, portable['out'])
  manifest, _ = runs.check_complete(portable['out'])
  assert manifest.options['beam'][:2] == ['--runner=PortableRunner', '--job_endpoint=embed']
  assert runs.counts(manifest) == runs.expected_counts(inputs)
  assert manifest.splits['eval'].rejected_by_kind == {'field_count': 1}


@pytest.fixture(scope='module')
def killed_worker(inputs, worker_pool, portable, tmp_path_factory):
  """The portable command run as a user would, its SDK worker SIGKILLed once the job is under way
  (the worker writes the analysis' vocabulary files); then the same command again.

  Not studied: a worker killed after the pool starts it but before it connects to the job. Beam's
  embedded job server then waits for it forever (its instructions have no timeout).
  """
  port, pool, _ = worker_pool
  root = tmp_path_factory.mktemp('killed_worker')
  out = root / 'out'
  args = runs.tabular_args(inputs, out, *_portable(port))
  proc = runs.start_cli(args, root / 'log.txt')
  try:
    runs.wait_for(lambda: runs.staged_files(str(out), 'tmp/tftransform_tmp/*'), proc,
                  240, 'SDK worker at work')
    workers = _children(pool.pid)
    for pid in workers:
      os.kill(pid, signal.SIGKILL)
    status = proc.wait(timeout=240)
  finally:
    if proc.poll() is None:
      runs.sigkill(proc)
  log = (root / 'log.txt').read_text()
  # The same command again: the pool starts a fresh worker.
  tabular.run(args)
  return {'out': str(out), 'status': status, 'log': log, 'killed': workers}


def test_a_killed_worker_fails_the_job_cleanly_or_it_completes(killed_worker, in_process):
  assert killed_worker['killed']
  status, log = killed_worker['status'], killed_worker['log']
  if status == 0:  # the job was done before the kill took effect: then its output is right
    assert 'published' in log
  else:
    # One clear last line, and nothing that looks like a result.
    last = log.strip().splitlines()[-1]
    assert status == 2, log[-3000:]
    assert last.startswith('error: the pipeline failed: ') and last.endswith(
        '; nothing was published'), last
    assert 'full traceback in ' in last
  # The rerun (the fixture ran it) published a complete result equal to the in-process run's.
  _same_result(in_process, killed_worker['out'])


def test_a_worker_lost_while_the_runner_waits_for_its_answer_fails_that_wait():
  """The other ways a killed worker meets the runner, beside a data channel closing early (what
  the test above sees): the runner waits on the worker's answer to an instruction, or sends it
  the next one. Beam alone never fails those waits; pipelines.runner.beam_patches makes the end of
  the worker's control stream fail them."""
  from apache_beam.portability.api import beam_fn_api_pb2
  from apache_beam.runners.portability.fn_api_runner import worker_handlers
  launch.make_pipeline([])
  connection = worker_handlers.ControlConnection()
  waiting = connection.push(beam_fn_api_pb2.InstructionRequest(instruction_id='bundle-1'))

  def responses():  # the worker's stream: no answer, then its process is gone
    time.sleep(0.1)
    raise RuntimeError('Socket closed')
    yield  # (a generator, as gRPC gives)

  connection.set_input(responses())
  with pytest.raises(RuntimeError, match=r'an SDK worker process stopped .*\(Socket closed\)'):
    waiting.get(timeout=60)
  later = connection.push(beam_fn_api_pb2.InstructionRequest(instruction_id='bundle-2'))
  with pytest.raises(RuntimeError, match='an SDK worker process stopped'):
    later.get(timeout=60)


def _fixed_raw_batch(train_csv):
  """Raw rows for the transform graph alone: real rows and rows it never saw (ages and hours
  outside the train range, an unknown country, missing categories)."""
  raw = read_adult_csv(train_csv).head(40)
  unseen = raw.head(3).copy()
  unseen['age'] = [16, 90, 44]
  unseen['hours_per_week'] = [1, 99, 40]
  unseen['native_country'] = ['Atlantis', None, 'Oz']
  unseen['workclass'] = [None, None, 'Never-worked-here']
  rows = pd.concat([raw, unseen], ignore_index=True)
  features = {}
  for key, spec in census.RAW_FEATURE_SPEC.items():
    if isinstance(spec, tf.io.VarLenFeature):
      present = [(i, v) for i, v in enumerate(rows[key]) if isinstance(v, str)]
      features[key] = tf.sparse.SparseTensor(
          [[i, 0] for i, _ in present], [v for _, v in present], [len(rows), 1])
    else:
      features[key] = tf.constant(rows[key].to_numpy(), spec.dtype)
  return rows, features


def test_the_same_input_gives_the_same_result_on_every_run(inputs, in_process, portable,
                                                           killed_worker):
  """Three runs: in process, on the worker pool, and again on it after a killed worker."""
  runs_ = [in_process, portable['out'], killed_worker['out']]
  for other in runs_[1:]:
    _same_result(runs_[0], other)
  # The analyzers' constants (means, variances, quantile boundaries, vocabularies): the
  # transform graphs give identical outputs on the same raw rows.
  rows, features = _fixed_raw_batch(inputs[0])
  results = [tft.TFTransformOutput(d).transform_raw_features(features) for d in runs_]
  for key in results[0]:
    for other in results[1:]:
      np.testing.assert_array_equal(results[0][key].numpy(), other[key].numpy(), err_msg=key)
  # ...and the constants are the train split's (pandas, population std as TFT's).
  train_age = read_adult_csv(inputs[0])['age'].to_numpy(np.float64)
  np.testing.assert_allclose(results[0]['age_xf'].numpy(),
                             (rows['age'] - train_age.mean()) / train_age.std(), atol=1e-5)
  oov = len(runs.vocabularies(in_process)['native_country'].splitlines())
  assert list(results[0]['native_country_xf'].numpy()[-3:]) == [oov] * 3
