"""A trainer.task run killed and run again resumes where it was, --fresh starts over, early
stopping keeps the best epoch, and an export is a version only once it is complete. All on the
`trained` fixture's pipeline output (conftest.py)."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO
from trainer import export as export_lib
from trainer import serving, task
from transforms import run_contract
from transforms.errors import UserError

# 188 steps an epoch on the 3,000 train rows, a backup every 25 of them and at epoch ends.
FLAGS = ['--epochs', '3', '--batch-size', '16', '--checkpoint-every-steps', '25']
STEPS = 188
RESUMING = re.compile(r'resuming from epoch (\d+) step (\d+) of an interrupted run '
                      r'\(--fresh starts over\)')


def _saved(model_dir):
  """(epoch, batch), 0-based, of the backup's checkpoint now; None before the first (or while
  one is being replaced)."""
  try:
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, 'backup', 'census', 'chief'))
    if latest is None:
      return None
    reader = tf.train.load_checkpoint(latest)
    return tuple(int(reader.get_tensor(f'ckpt_saved_{n}/.ATTRIBUTES/VARIABLE_VALUE'))
                 for n in ('epoch', 'batch'))
  except (tf.errors.OpError, ValueError):
    return None


def _resumes_at(saved):
  """The epoch (1-based) and step a run resumes at from a backup saved after `saved`."""
  epoch, batch = saved
  return (epoch + 2, 0) if batch == STEPS - 1 else (epoch + 1, batch + 1)


def _versions(model_dir):
  return serving.versions(os.path.join(model_dir, 'census'))


def _run_and_kill(command, model_dir, when, log_path):
  """Runs the command and SIGKILLs it as soon as when(_saved(model_dir)) holds; its output."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 240
      while not when(_saved(model_dir)):
        assert proc.poll() is None, 'the run ended before it could be killed'
        assert time.monotonic() < deadline
        assert not _versions(model_dir)  # nothing exported while training
        time.sleep(0.01)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  return open(log_path).read()


def _quality(path, test_csv):
  """Accuracy and ROC AUC of an exported model on the test CSV's rows, served raw."""
  lines = open(test_csv).read().splitlines()[1:]
  labels = np.array([line.rsplit(',', 1)[1].strip().rstrip('.') == '>50K' for line in lines])
  p = serving.load_model(path).predict(lines)['probabilities'][:, 1]
  ranks = np.argsort(np.argsort(p)) + 1  # Mann-Whitney U (no ties among float probabilities)
  positives = labels.sum()
  auc = (ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * (~labels).sum())
  return np.mean((p > 0.5) == labels), auc


def test_killed_twice_then_resumed_equals_an_uninterrupted_run(trained, tmp_path):
  model_dir = str(tmp_path / 'models')
  command = [sys.executable, '-m', 'trainer.task', '--transformed', trained['transformed'],
             '--model-dir', model_dir, *FLAGS]
  # Killed once a backup of epoch 1 exists, then, resumed, once one of epoch 2 exists.
  first = _run_and_kill(command, model_dir, lambda s: s is not None, tmp_path / 'first.log')
  at_kill_1 = _saved(model_dir)
  assert at_kill_1[0] == 0 and not RESUMING.search(first)
  second = _run_and_kill(command, model_dir, lambda s: s is not None and s[0] >= 1,
                         tmp_path / 'second.log')
  at_kill_2 = _saved(model_dir)
  assert at_kill_2[0] >= 1
  resumed_1 = tuple(map(int, RESUMING.search(second).groups()))
  assert resumed_1 == _resumes_at(at_kill_1)  # within epoch 1 (after step 25, unless slow)
  assert not os.path.exists(os.path.join(model_dir, 'census'))  # no export begun

  proc = subprocess.run(command, cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed_2 = tuple(map(int, RESUMING.search(proc.stderr + proc.stdout).groups()))
  assert resumed_2 == _resumes_at(at_kill_2) and resumed_2 > resumed_1 and resumed_2[0] >= 2
  path = os.path.join(model_dir, 'census', '1')
  assert f'exported {path}' in proc.stdout
  assert _versions(model_dir) == [1] and os.listdir(os.path.join(model_dir, 'census')) == ['1']
  assert not os.path.exists(os.path.join(model_dir, 'backup'))  # removed once exported

  reference, _, _ = task.run(['--transformed', trained['transformed'], '--model-dir',
                              str(tmp_path / 'uninterrupted'), *FLAGS])
  accuracy, auc = _quality(path, trained['test_csv'])
  accuracy_ref, auc_ref = _quality(reference, trained['test_csv'])
  assert accuracy > 0.8 and abs(accuracy - accuracy_ref) < 0.03, (accuracy, accuracy_ref)
  assert auc > 0.85 and abs(auc - auc_ref) < 0.03, (auc, auc_ref)


def test_fresh_and_a_backup_of_other_settings(trained, tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.INFO, logger='trainer')
  argv = ['--transformed', trained['transformed'], '--model-dir', str(tmp_path), '--max-steps',
          '20', '--batch-size', '32', '--checkpoint-every-steps', '5']
  backup = tmp_path / 'backup' / 'census'

  def killed_in_export(*args, **kwargs):
    raise RuntimeError('killed during the export')

  with monkeypatch.context() as m:  # a run that trained, then died exporting
    m.setattr(export_lib, 'export', killed_in_export)
    with pytest.raises(RuntimeError, match='killed'):
      task.run(argv)
  assert (backup / 'trained').is_dir() and (backup / 'chief').is_dir()
  settings = json.loads((backup / 'settings.json').read_text())
  assert settings['--batch-size'] == 32 and settings['--max-steps'] == 20

  with pytest.raises(UserError) as refused:  # before any training
    task.run(argv + ['--learning-rate', '0.01'])
  assert str(refused.value) == (
      f'{backup}: a checkpoint of an interrupted run with other settings (--learning-rate: '
      '0.002 vs 0.01); rerun with --fresh to start over')

  caplog.clear()
  with monkeypatch.context() as m:  # --fresh: trains again from nothing (and dies again)
    m.setattr(export_lib, 'export', killed_in_export)
    with pytest.raises(RuntimeError, match='killed'):
      task.run(argv + ['--learning-rate', '0.01', '--fresh'])
  assert 'resuming' not in caplog.text and 'training on' in caplog.text
  assert json.loads((backup / 'settings.json').read_text())['--learning-rate'] == 0.01

  caplog.clear()  # the same command again: exports the trained weights, without training
  path, _, _ = task.run(argv + ['--learning-rate', '0.01'])
  assert 'resuming after the training of an interrupted run' in caplog.text
  assert 'training on' not in caplog.text
  assert path == str(tmp_path / 'census' / '1') and not (tmp_path / 'backup').exists()


def _logged(logs, tag):
  """{epoch: value} of a TensorBoard scalar the trainer logged (MODEL_DIR/logs/<run>)."""
  found = {}
  for events in tf.io.gfile.glob(os.path.join(logs, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(events):
      for value in event.summary.value:
        if value.tag == tag:
          found[event.step] = float(tf.make_ndarray(value.tensor))
  return [found[epoch] for epoch in sorted(found)]


def test_early_stopping_keeps_the_best_epoch(trained, tmp_path, caplog):
  caplog.set_level(logging.INFO, logger='trainer')
  _, metrics, _ = task.run(['--transformed', trained['transformed'], '--model-dir',
                            str(tmp_path), '--epochs', '8', '--batch-size', '32',
                            '--learning-rate', '0.05', '--early-stopping-patience', '1'])
  val_loss = _logged(tmp_path / 'logs' / 'validation', 'epoch_loss')  # each epoch's
  best = int(np.argmin(val_loss))
  assert len(val_loss) < 8 and best == len(val_loss) - 2  # stopped one epoch after the best
  # The exported model's eval loss is the best epoch's, not the last one's.
  assert abs(metrics['loss'] - val_loss[best]) < 1e-5
  assert abs(metrics['loss'] - val_loss[-1]) > 1e-4
  assert f'kept the weights of epoch {best + 1} (val_loss {val_loss[best]:.4f})' in caplog.text


def test_early_stopping_needs_an_eval_split(trained, tmp_path):
  # The pipeline output without its eval split: what a run with --train alone publishes.
  out = tmp_path / 'train_only'
  shutil.copytree(trained['transformed'], out, ignore=shutil.ignore_patterns('eval-*'))
  manifest = run_contract.read_manifest(str(out))
  (out / run_contract.MANIFEST).write_text(
      manifest.replace(splits={'train': manifest.splits['train']}).to_json())
  with pytest.raises(UserError) as refused:
    task.run(['--transformed', str(out), '--model-dir', str(tmp_path / 'm'),
              '--early-stopping-patience', '2'])
  assert str(refused.value) == (
      f"--early-stopping-patience 2 watches the eval split's loss, and --transformed {out} has "
      'none (it has train); run the pipeline with --eval or --eval-fraction')
  with pytest.raises(UserError, match='--early-stopping-patience must be at least 1'):
    task.parse_args(['--transformed', str(out), '--model-dir', 'm',
                     '--early-stopping-patience', '0'])


def test_a_killed_export_leaves_no_version(trained, tmp_path):
  """What a killed export leaves (its staging directory) is no version, and the next export
  removes it and takes the next number."""
  base = tmp_path / 'census'
  shutil.copytree(trained['path'], base / '1')
  leftover = base / f'{export_lib.STAGING}2-0123abcd'
  shutil.copytree(trained['path'], leftover, ignore=shutil.ignore_patterns('variables'))
  assert serving.versions(str(base)) == [1]
  assert serving.newest_version(str(base)) == str(base / '1')
  path, _, _ = task.run(['--transformed', trained['transformed'], '--model-dir', str(tmp_path),
                         '--max-steps', '2'])
  assert path == str(base / '2') and sorted(os.listdir(base)) == ['1', '2']
  assert serving.load_model(str(base)).path == path
