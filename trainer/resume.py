"""Resuming an interrupted training run: the backup of a run that has not exported yet.

MODEL_DIR/backup/<name>/ (one per model name, so two models in one model dir do not collide):
  chief/          keras.callbacks.BackupAndRestore's checkpoint: weights, optimizer state, epoch
                  and step (one, overwritten at each save)
  settings.json   what the run was started with; a run that would resume with other settings is
                  refused (--fresh starts over)
  trained/        the weights once training has ended (early stopping's best ones), written
                  before the export: a run killed during its export exports these without
                  training again
The run that exports removes it, so the next run of the same command trains a new version.
"""

import hashlib
import json
import logging
import os

import tensorflow as tf
import tf_keras as keras

from transforms import run_contract
from transforms.errors import UserError

# The private parts of tf_keras's BackupAndRestore used below (where it resumes, for the log
# line; its save, for saves at epoch ends), only on the tf_keras versions they were tested with;
# elsewhere Keras's own behaviour runs, with a plainer log line and saves every N batches only.
TESTED_KERAS = ('2.21',)
try:
  from tf_keras.src.utils import mode_keys
except ImportError:  # another layout of tf_keras
  mode_keys = None
_PRIVATE_OK = (mode_keys is not None and
               '.'.join(keras.__version__.split('.')[:2]) in TESTED_KERAS and
               hasattr(keras.callbacks.BackupAndRestore, '_backup'))

_LOG = logging.getLogger('trainer')

BACKUP = 'backup'
SETTINGS = 'settings.json'
TRAINED = 'trained'
_WEIGHTS = 'weights'  # the checkpoint prefix in trained/

# The settings a checkpoint is only valid for (TrainConfig field -> how the user names it).
# Left out, as they change how training runs but not what it computes: --xla, --distribute,
# --profile-steps, --verbose.
_FIELDS = {
    'epochs': '--epochs', 'batch_size': '--batch-size', 'learning_rate': '--learning-rate',
    'max_steps': '--max-steps', 'mixed_precision': '--mixed-precision', 'augment': '--augment',
    'task': '--task', 'label': '--label', 'model_module': '--model-module',
    'exclude_features': '--exclude-features', 'hidden_units': '--hidden-units',
    'dropout': '--dropout', 'max_embedding_dim': '--max-embedding-dim',
    'combiner': '--combiner', 'checkpoint_every_steps': '--checkpoint-every-steps',
    'early_stopping_patience': '--early-stopping-patience', 'seed': 'seed',
}


def _absolute(path):
  return path if '://' in path else os.path.abspath(path)


def settings(config):
  """What a checkpoint of `config`'s run is valid for: the pipeline output (its path and the
  digest of its manifest.json, which a new pipeline run rewrites) and the settings of _FIELDS;
  as JSON values, keyed by how the user names them."""
  with tf.io.gfile.GFile(f'{config.transformed_dir.rstrip("/")}/{run_contract.MANIFEST}',
                         'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:16]
  found = {'--transformed': _absolute(config.transformed_dir),
           f'the {run_contract.MANIFEST} of --transformed (sha256)': digest}
  found.update({flag: getattr(config, field) for field, flag in _FIELDS.items()})
  return json.loads(json.dumps(found))  # tuples as lists, as read back


class Backup:
  """MODEL_DIR/backup/<name>: the state of this model's run that has not exported yet."""

  def __init__(self, model_dir, name):
    self.path = os.path.join(model_dir, BACKUP, name)
    self._checkpoints = os.path.join(self.path, 'chief')  # BackupAndRestore's own name
    self._trained = os.path.join(self.path, TRAINED)

  def exists(self):
    """Whether an interrupted run left anything to resume from."""
    return (tf.train.latest_checkpoint(self._checkpoints) is not None
            or tf.io.gfile.exists(self._trained))

  def remove(self):
    if tf.io.gfile.exists(self.path):
      tf.io.gfile.rmtree(self.path)
    parent = os.path.dirname(self.path)  # MODEL_DIR/backup, once no model has a backup there
    if tf.io.gfile.isdir(parent) and not tf.io.gfile.listdir(parent):
      tf.io.gfile.rmtree(parent)

  def start(self, wanted):
    """Records `wanted` (settings()) for this run; a one-line UserError where a checkpoint of an
    interrupted run with other settings is there."""
    where = os.path.join(self.path, SETTINGS)
    if self.exists():
      try:
        with tf.io.gfile.GFile(where) as f:
          old = json.load(f)
      except (tf.errors.NotFoundError, ValueError):
        raise UserError(f'{self.path}: a checkpoint of an interrupted run without a readable '
                        f'{SETTINGS}; rerun with --fresh to start over') from None
      for key in sorted(set(old) | set(wanted)):
        if old.get(key) != wanted.get(key):
          raise UserError(
              f'{self.path}: a checkpoint of an interrupted run with other settings ({key}: '
              f'{_show(old.get(key))} vs {_show(wanted.get(key))}); rerun with --fresh to '
              'start over')
      return
    tf.io.gfile.makedirs(self.path)
    with tf.io.gfile.GFile(where, 'w') as f:  # before any checkpoint exists
      json.dump(wanted, f, indent=2, sort_keys=True)

  def callback(self, every_steps):
    return BackupAndRestore(self.path, save_freq=every_steps or 'epoch',
                            delete_checkpoint=False)  # removed after the export, by remove()

  def save_trained(self, model):
    """The weights training ended with, written to a staging name and renamed."""
    staging = self._trained + '.tmp'
    if tf.io.gfile.exists(staging):
      tf.io.gfile.rmtree(staging)
    model.save_weights(os.path.join(staging, _WEIGHTS))  # TF's format: any of its file systems
    tf.io.gfile.rename(staging, self._trained, overwrite=True)

  def load_trained(self, model):
    """Loads the weights of an interrupted run whose training had ended; whether there were."""
    if not tf.io.gfile.exists(self._trained):
      return False
    model.load_weights(os.path.join(self._trained, _WEIGHTS)).expect_partial()
    return True


def _show(value):
  return 'unset' if value is None else json.dumps(value) if isinstance(value, list) else value


class BackupAndRestore(keras.callbacks.BackupAndRestore):
  """Keras's BackupAndRestore, which saves either at epoch ends or every `save_freq` batches;
  this one, given a number, saves at every epoch's end too (a run killed during validation or
  between epochs resumes at the next epoch), and logs where it resumes.

  How Keras resumes (tf_keras 2.21): the weights, the optimizer's state and the epoch and step of
  the last save are restored in on_train_begin; fit() then starts at that epoch, and within it at
  the step after the saved one, running only the epoch's remaining steps. The dataset is not
  fast-forwarded: the resumed epoch reads a freshly shuffled pass from its start (the train
  split's cardinality must be known for a step-level resume: train.py asserts it)."""

  def on_train_begin(self, logs=None):
    super().on_train_begin(logs)
    if not _PRIVATE_OK:
      if tf.train.latest_checkpoint(self.backup_dir + '/chief') is not None:
        _LOG.info('resuming an interrupted run (--fresh starts over)')
      return
    state = self._training_state
    if int(state._ckpt_saved_epoch.numpy()) < 0:
      return  # nothing restored: a new run
    epoch, step = state.maybe_load_initial_counters_from_ckpt(
        self.params.get('steps'), 0, mode_keys.ModeKeys.TRAIN)  # what fit() will start at
    if epoch >= self.params.get('epochs', epoch + 1):
      _LOG.info('resuming after the last epoch of an interrupted run (--fresh starts over)')
    else:
      _LOG.info('resuming from epoch %d step %d of an interrupted run (--fresh starts over)',
                epoch + 1, step)

  def on_epoch_end(self, epoch, logs=None):
    super().on_epoch_end(epoch, logs)
    if self.save_freq != 'epoch' and _PRIVATE_OK:
      self._backup(epoch=epoch)
