"""Training: one typed config, the input pipeline, the model, the fit loop and the export."""

import dataclasses
import logging
import os
import re
from typing import Optional, Tuple

import tensorflow as tf
import tensorflow_transform as tft

from trainer import export as export_lib
from trainer import input as input_lib
from trainer import model as model_lib

_LOG = logging.getLogger('trainer')


@dataclasses.dataclass
class TrainConfig:
  transformed_dir: str
  model_dir: str
  model_name: Optional[str] = None  # default: the dataset module's name (census)
  epochs: int = 5
  batch_size: int = 256
  learning_rate: float = 2e-3
  hidden_units: Tuple[int, ...] = (128, 64)
  dropout: float = 0.1
  max_steps: Optional[int] = None  # stop early (smoke runs, tests)
  mixed_precision: bool = False  # float16 compute on GPU; the output layer stays float32
  xla: bool = False
  distribute: str = 'auto'  # auto | mirrored | none
  profile_steps: Optional[Tuple[int, int]] = None  # TensorBoard profile of these batches
  augment: Tuple[str, ...] = ()  # image features of training batches: 'flip', 'crop'

  seed: int = 42


def _strategy(name):
  gpus = tf.config.list_physical_devices('GPU')
  if name == 'mirrored' or (name == 'auto' and len(gpus) > 1):
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


def model_name(manifest):
  base = re.split(r'[./\\]', manifest['transforms'].removesuffix('.py'))[-1]
  return re.sub(r'[^A-Za-z0-9_-]', '_', base) or 'model'


def train_and_export(config: TrainConfig):
  """Trains on the train split, evaluates on eval, exports; returns (export path, eval metrics)."""
  tf.keras.utils.set_random_seed(config.seed)
  manifest = input_lib.read_manifest(config.transformed_dir)
  tft_output = tft.TFTransformOutput(config.transformed_dir)
  label_key = input_lib.transformed_label_key(manifest)
  feature_spec = tft_output.transformed_feature_spec()
  if label_key not in feature_spec:
    raise input_lib.InputError(f'--transformed {config.transformed_dir}: preprocessing_fn '
                               f'outputs no label feature {label_key!r}')
  schema = tft_output.transformed_metadata.schema
  if config.augment and not model_lib.image_features(feature_spec):
    raise input_lib.InputError(f'--augment {" ".join(config.augment)}: the transformed data of '
                               f'{config.transformed_dir} has no image feature to augment')
  classes = model_lib.num_classes(schema, label_key)

  def dataset(split, shuffle):
    files = input_lib.split_files(config.transformed_dir, manifest, split)
    return input_lib.make_dataset(files, feature_spec, label_key, config.batch_size,
                                  manifest['compression'], shuffle=shuffle, seed=config.seed,
                                  augment=config.augment,
                                  image_keys=tuple(model_lib.image_features(feature_spec)))

  train_ds = dataset('train', shuffle=True)
  eval_ds = dataset('eval', shuffle=False) if 'eval' in manifest['splits'] else None
  if config.max_steps:
    train_ds = train_ds.repeat().take(config.max_steps)

  if config.mixed_precision:
    tf.keras.mixed_precision.set_global_policy('mixed_float16')
  try:
    with _strategy(config.distribute).scope():
      model = model_lib.build(schema, feature_spec, label_key, config.hidden_units, config.dropout)
      model_lib.compile_model(model, classes, config.learning_rate, jit_compile=config.xla)
  finally:
    tf.keras.mixed_precision.set_global_policy('float32')

  logs = os.path.join(config.model_dir, 'logs')
  callbacks = [
      tf.keras.callbacks.TensorBoard(logs, profile_batch=config.profile_steps or 0),
      tf.keras.callbacks.ModelCheckpoint(
          os.path.join(config.model_dir, 'checkpoints', 'epoch-{epoch:03d}.weights.h5'),
          save_weights_only=True),
  ]
  _LOG.info('training on %s (%d examples), %d classes', config.transformed_dir,
            manifest['splits']['train']['rows_written'], classes)
  epochs = 1 if config.max_steps else config.epochs
  model.fit(train_ds, epochs=epochs, validation_data=eval_ds, callbacks=callbacks, verbose=2)
  metrics = model.evaluate(eval_ds, return_dict=True, verbose=0) if eval_ds is not None else {}
  path = export_lib.export(model, tft_output, manifest, label_key, config.model_dir,
                           config.model_name or model_name(manifest))
  _LOG.info('exported %s; eval %s', path, metrics)
  return path, metrics, model
