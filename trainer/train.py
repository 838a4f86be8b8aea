"""Training: one typed config, the input pipeline, the model, the fit loop and the export."""

import dataclasses
import logging
import math
import os
import re
from typing import Optional, Tuple

import tensorflow as tf
import tensorflow_transform as tft
import tf_keras as keras  # Keras 2, as TF Transform's transform layer (tf.keras would be Keras 3)

from trainer import export as export_lib
from trainer import features as features_lib
from trainer import heads
from trainer import input as input_lib
from trainer import model as model_lib
from trainer import resume as resume_lib
from trainer import statistics as statistics_lib
from transforms import contract as contract_lib
from transforms import run_contract
from transforms.errors import UserError

_LOG = logging.getLogger('trainer')

COMBINERS = ('mean', 'sqrtn', 'sum')
BUILD_MODEL = 'build_model'  # the function a --model-module defines


@dataclasses.dataclass
class TrainConfig:
  transformed_dir: str
  model_dir: str
  model_name: Optional[str] = None  # default: the dataset module's name (census)
  epochs: int = 5
  batch_size: int = 256
  learning_rate: float = 2e-3
  max_steps: Optional[int] = None  # stop early (smoke runs, tests)
  mixed_precision: bool = False  # float16 compute on GPU; the output layer stays float32
  xla: bool = False
  distribute: str = 'auto'  # auto | mirrored | none
  profile_steps: Optional[Tuple[int, int]] = None  # TensorBoard profile of these batches
  augment: Tuple[str, ...] = ()  # image features of training batches: 'flip', 'crop'
  task: Optional[str] = None  # binary | multiclass | regression; default: from the label
  label: Optional[str] = None  # the transformed feature to learn; default: the contract's
  model_module: Optional[str] = None  # a module or .py file defining build_model(context)
  exclude_features: Tuple[str, ...] = ()  # transformed features the model does not see
  # The default model's hyperparameters (a --model-module reads them from context.hparams).
  hidden_units: Tuple[int, ...] = (128, 64)
  dropout: float = 0.1
  max_embedding_dim: int = 32  # embeddings get 1.6 * ids^0.56 dimensions, at most this
  combiner: str = 'mean'  # of an unweighted bag of ids: mean | sqrtn | sum
  # Resuming a killed run (trainer/resume.py) and early stopping.
  fresh: bool = False  # delete the backup of an interrupted run and start over
  checkpoint_every_steps: int = 500  # backups every N batches and at epoch ends; 0: epoch ends
  early_stopping_patience: Optional[int] = None  # epochs without a better val_loss; needs eval

  seed: int = 42


def _strategy(name):
  gpus = tf.config.list_physical_devices('GPU')
  if name == 'mirrored' or (name == 'auto' and len(gpus) > 1):
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


def model_name(manifest):
  base = re.split(r'[./\\]', manifest.transforms.removesuffix('.py'))[-1]
  return re.sub(r'[^A-Za-z0-9_-]', '_', base) or 'model'


@dataclasses.dataclass
class Plan:
  """Everything decided before training starts: what the label and each feature are."""
  manifest: run_contract.Manifest
  tft_output: object
  feature_spec: dict
  label_key: str
  task: heads.Task
  kinds: dict  # name -> features.Feature
  statistics: dict


def plan(config: TrainConfig):
  """Reads the pipeline output and decides task and feature kinds; raises a one-line UserError
  for anything the model could not make sense of, before any training."""
  where = f'--transformed {config.transformed_dir}'
  manifest = run_contract.read_manifest(config.transformed_dir)
  if config.early_stopping_patience and 'eval' not in manifest.splits:
    raise UserError(f'--early-stopping-patience {config.early_stopping_patience} watches the eval '
                    f'split\'s loss, and {where} has none (it has {", ".join(manifest.splits)}); '
                    'run the pipeline with --eval or --eval-fraction')
  tft_output = tft.TFTransformOutput(config.transformed_dir)
  feature_spec = tft_output.transformed_feature_spec()
  label_key = input_lib.transformed_label_key(manifest, feature_spec, where, config.label)
  if label_key in config.exclude_features:
    raise UserError(f'--exclude-features {label_key}: that is the label')
  schema = tft_output.transformed_metadata.schema
  statistics = statistics_lib.numeric(config.transformed_dir, manifest)
  task = heads.resolve(schema, feature_spec, label_key, where, config.task,
                       manifest.label_classes, statistics.get(label_key))
  kinds = features_lib.classify(schema, feature_spec, label_key, where,
                                manifest.weighted_features, config.exclude_features,
                                statistics)
  if config.augment and not any(k.kind == features_lib.IMAGE for k in kinds.values()):
    raise UserError(f'--augment {" ".join(config.augment)}: the transformed data of '
                    f'{config.transformed_dir} has no image feature to augment')
  if task.is_classification:
    task = heads.with_class_names(task, export_lib.class_names(manifest, tft_output, task))
  return Plan(manifest, tft_output, feature_spec, label_key, task, kinds, statistics)


def build_model(config, p: Plan):
  """The default model, or the --model-module's build_model(context), checked against the task."""
  ctx = model_lib.ModelContext(inputs=model_lib.make_inputs(p.kinds), features=p.kinds,
                               task=p.task, schema=p.tft_output.transformed_metadata.schema,
                               hparams=config, statistics=p.statistics)
  if not config.model_module:
    return model_lib.build_default(ctx)
  where = f'--model-module {config.model_module}'
  module = contract_lib.import_module(config.model_module, flag='--model-module')
  build = getattr(module, BUILD_MODEL, None)
  if not callable(build):
    raise UserError(f'{where} defines no {BUILD_MODEL}(context); add one that returns '
                    'a Keras model (see README, "Your own model")')
  try:
    model = build(ctx)
  except Exception as e:  # the user's code: where and what, not our stack
    raise UserError(f'{where}: {BUILD_MODEL}(context) failed: {type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else ""}') from e
  if not isinstance(model, keras.Model):
    raise UserError(f'{where}: {BUILD_MODEL}(context) returned '
                    f'{type(model).__name__}, not a Keras 2 model: build it with '
                    'tf_keras (import tf_keras as keras), as TF Transform\'s layer is')
  unknown = sorted(set(model.input_names) - set(ctx.inputs))
  if unknown:
    raise UserError(f'{where}: the model takes {unknown[0]!r}, which is not a '
                    f'transformed feature it may use ({", ".join(sorted(ctx.inputs))})')
  width = heads.expected_output_width(p.task)
  shape = model.output_shape
  if isinstance(shape, list) or len(shape) != 2 or shape[-1] != width:
    raise UserError(
        f'{where}: the model outputs shape {shape}; a {p.task.kind} model outputs [batch, '
        f'{width}] ({_OUTPUT_MEANING[p.task.kind]}); heads.head(context.task) builds one')
  return model


_OUTPUT_MEANING = {heads.BINARY: 'the probability of class 1',
                   heads.MULTICLASS: 'class probabilities',
                   heads.REGRESSION: "the transformed label's value"}


def train_and_export(config: TrainConfig):
  """Trains on the train split, evaluates on eval, exports; returns (export path, eval metrics,
  the trained Keras model). A run killed before its export resumes where it was when the same
  command runs again (trainer/resume.py); --fresh starts over."""
  keras.utils.set_random_seed(config.seed)
  p = plan(config)
  manifest = p.manifest
  export_name = config.model_name or model_name(manifest)
  backup = resume_lib.Backup(config.model_dir, export_name)
  if config.fresh:
    backup.remove()
  backup.start(resume_lib.settings(config))  # refuses another run's checkpoint, before training

  if config.mixed_precision:
    keras.mixed_precision.set_global_policy('mixed_float16')
  try:
    with _strategy(config.distribute).scope():
      model = build_model(config, p)
      heads.compile_model(model, p.task, config.learning_rate, jit_compile=config.xla)
  finally:
    keras.mixed_precision.set_global_policy('float32')

  used = {name: p.kinds[name] for name in model.input_names}
  parse_spec = {name: p.feature_spec[name] for name in list(used) + [p.label_key]}
  image_keys = tuple(n for n, k in used.items() if k.kind == features_lib.IMAGE)

  def prepare(features, label):
    return features_lib.to_model_inputs(features, used), heads.prepare_label(label, p.task)

  def dataset(split, shuffle):
    files = input_lib.split_files(config.transformed_dir, manifest, split)
    return input_lib.make_dataset(files, parse_spec, p.label_key, config.batch_size,
                                  manifest.compression, shuffle=shuffle, seed=config.seed,
                                  augment=config.augment, image_keys=image_keys, prepare=prepare)

  train_ds = dataset('train', shuffle=True)
  eval_ds = dataset('eval', shuffle=False) if 'eval' in manifest.splits else None
  if config.max_steps:
    train_ds = train_ds.repeat().take(config.max_steps)
  else:
    # Batches per epoch, from the manifest's row count (tf.data cannot know a TFRecord file's):
    # Keras needs it to resume within an epoch, and its progress lines show it.
    train_ds = train_ds.apply(tf.data.experimental.assert_cardinality(
        math.ceil(manifest.splits['train'].rows_written / config.batch_size)))

  if backup.load_trained(model):
    _LOG.info('resuming after the training of an interrupted run: exporting its trained weights '
              '(--fresh starts over)')
  else:
    _fit(config, model, manifest, p, used, train_ds, eval_ds, backup)
    backup.save_trained(model)
  metrics = model.evaluate(eval_ds, return_dict=True, verbose=0) if eval_ds is not None else {}
  path = export_lib.export(model, p.tft_output, manifest, p.label_key, p.task, used,
                           config.model_dir, export_name, config.transformed_dir)
  backup.remove()  # exported: the next run of this command trains a new version
  _LOG.info('exported %s; eval %s', path, metrics)
  return path, metrics, model


def _fit(config, model, manifest, p, used, train_ds, eval_ds, backup):
  logs = os.path.join(config.model_dir, 'logs')
  callbacks = [
      # Restores an interrupted run's state as training begins (see resume.py). Its one
      # checkpoint is overwritten at each save and removed once the run has exported.
      backup.callback(config.checkpoint_every_steps),
      keras.callbacks.TensorBoard(logs, profile_batch=config.profile_steps or 0),
      # Kept beside the backup: the weights of every epoch stay for the user (to pick or compare
      # an epoch after the run), which the backup, one rolling checkpoint, does not keep.
      keras.callbacks.ModelCheckpoint(
          os.path.join(config.model_dir, 'checkpoints', 'epoch-{epoch:03d}.weights.h5'),
          save_weights_only=True),
  ]
  stopping = None
  if config.early_stopping_patience:
    # Its state (best val_loss, best weights, patience count) lives in this process only: after
    # a resume it starts again from the first resumed epoch (Keras keeps none of it in the
    # backup), and restore_best_weights restores the best epoch since then.
    stopping = keras.callbacks.EarlyStopping(
        monitor='val_loss', patience=config.early_stopping_patience, restore_best_weights=True)
    callbacks.insert(1, stopping)
  _LOG.info('training on %s (%d examples): %s; features: %s', config.transformed_dir,
            manifest.splits['train'].rows_written, heads.describe(p.task),
            ', '.join(f'{n} ({k.kind})' for n, k in sorted(used.items())))
  epochs = 1 if config.max_steps else config.epochs
  model.fit(train_ds, epochs=epochs, validation_data=eval_ds, callbacks=callbacks, verbose=2)
  if stopping is not None and stopping.best_weights is not None:
    ran = (f'stopped after epoch {stopping.stopped_epoch + 1}, {stopping.patience} without a '
           'lower val_loss') if stopping.stopped_epoch else 'ran every epoch'
    _LOG.info('early stopping: %s; kept the weights of epoch %d (val_loss %.4f)', ran,
              stopping.best_epoch + 1, stopping.best)
