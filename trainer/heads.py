"""The learning task, chosen from the transformed label, and the model's head for it.

  float label                                   -> regression (linear output, MSE loss)
  int label, categorical domain of 2 ids        -> binary (one sigmoid output)
  int label, categorical domain of more ids     -> multiclass (softmax)
  int label, no domain, LABEL_CLASSES declared  -> binary or multiclass by their number
  int label, no domain                          -> refused unless --task says
  string or variable-length label               -> refused

`--task binary|multiclass|regression` overrides the choice; a contradiction (classification of a
float label, any task on strings, --task binary on more than two classes) is refused in one line.
Class ids are checked against the train split's statistics before any training.
"""

import dataclasses
import math
from typing import Optional, Tuple

import tensorflow as tf
import tf_keras as keras  # Keras 2, as TF Transform's transform layer (tf.keras would be Keras 3)

from trainer import features as features_lib
from transforms.errors import UserError

BINARY, MULTICLASS, REGRESSION = 'binary', 'multiclass', 'regression'
TASKS = (BINARY, MULTICLASS, REGRESSION)


@dataclasses.dataclass(frozen=True)
class Task:
  kind: str  # BINARY | MULTICLASS | REGRESSION
  num_classes: int = 0  # classification: the number of classes
  class_names: Tuple[str, ...] = ()
  # Regression: the train split's label mean and standard deviation. The head predicts the
  # standardized label and scales it back, so any label scale trains with the same settings.
  label_mean: float = 0.0
  label_std: float = 1.0

  @property
  def is_classification(self):
    return self.kind != REGRESSION


def resolve(schema, feature_spec, label_key, where, flag=None, label_classes=None,
            label_stats=None):
  """The Task for the label feature; UserError (one line) where it cannot be learned.

  `label_stats`: the label's NumericStatistics in the train split (trainer.statistics), or None.
  """
  spec = feature_spec[label_key]
  described = features_lib.describe(spec)
  told = f'--task {flag}: ' if flag else ''
  if not isinstance(spec, tf.io.FixedLenFeature) or tuple(spec.shape) not in ((), (1,)):
    raise UserError(
        f'{where}: {told}the label {label_key!r} is {described}; a label is one value per row '
        '(a dense scalar): reduce it to one value in the preprocessing_fn')
  if spec.dtype == tf.string:
    if flag == REGRESSION:
      raise UserError(
          f'{where}: --task regression: the label {label_key!r} holds strings; regression needs '
          'numbers: convert it with tf.strings.to_number in the preprocessing_fn')
    raise UserError(
        f'{where}: {told}the label {label_key!r} holds strings; map it to class ids with '
        'tft.compute_and_apply_vocabulary (classification) or to numbers (regression) in the '
        'preprocessing_fn')
  bad = features_lib.non_finite(label_stats)
  if bad:
    raise UserError(
        f'{where}: the label {label_key!r} is NaN or infinite in {bad} rows of the train split '
        '(tf.math.log of values <= 0? a division by zero?); fix the preprocessing_fn so that '
        'every label is a finite number')
  if spec.dtype.is_floating:
    if flag in (BINARY, MULTICLASS):
      raise UserError(
          f'{where}: --task {flag}: the label {label_key!r} is {described}; classification needs '
          'integer class ids: cast it with tf.cast(label, tf.int64) in the preprocessing_fn, or '
          'use --task regression')
    return _regression(label_stats)
  size = features_lib.categorical_size(features_lib.schema_features(schema)[label_key])
  if flag == REGRESSION:
    return _regression(label_stats)
  if size is None and label_classes:
    size = len(label_classes)
  if size is None:
    if flag is None:
      raise UserError(
          f'{where}: the label {label_key!r} is {described} without a categorical domain, so the '
          'task is unclear: give --task binary, --task multiclass or --task regression (or map '
          'it with tft.compute_and_apply_vocabulary, or name its classes in LABEL_CLASSES)')
    if flag == BINARY:
      size = 2
    else:
      largest = int(label_stats.max) if label_stats is not None else None
      if largest is None:
        raise UserError(
            f'{where}: --task multiclass: the label {label_key!r} has no domain and the run has '
            'no statistics to count its classes; map it with tft.compute_and_apply_vocabulary')
      size = largest + 1
  if flag == BINARY and size > 2:
    raise UserError(
        f'{where}: --task binary: the label {label_key!r} has {size} classes (ids 0..{size - 1}); '
        'use --task multiclass')
  kind = MULTICLASS if flag == MULTICLASS or size > 2 else BINARY
  size = max(size, 2)
  if label_stats is not None:
    low, high = label_stats.min, label_stats.max
    if low < 0 or high > size - 1:
      raise UserError(
          f'{where}: {told}the label {label_key!r} takes values {_number(low)}..{_number(high)} '
          f'in the train split, but a {kind} label is a class id in 0..{size - 1}; map it to '
          'class ids in the preprocessing_fn')
  return Task(kind, size)


def _number(value):
  return str(int(value)) if float(value).is_integer() else f'{value:g}'


def _regression(label_stats):
  if label_stats is None:
    return Task(REGRESSION)
  std = label_stats.std_dev if math.isfinite(label_stats.std_dev) and label_stats.std_dev > 0 \
      else 1.0
  return Task(REGRESSION, label_mean=float(label_stats.mean), label_std=float(std))


def with_class_names(task, names):
  return dataclasses.replace(task, class_names=tuple(names)) if task.is_classification else task


class Rescale(keras.layers.Layer):
  """y * scale + shift: a standardized regression output back in the label's units."""

  def __init__(self, scale=1.0, shift=0.0, **kwargs):
    super().__init__(**kwargs)
    self.scale, self.shift = float(scale), float(shift)

  def call(self, inputs):
    return inputs * self.scale + self.shift

  def get_config(self):
    return dict(super().get_config(), scale=self.scale, shift=self.shift)


def head(task: Task):
  """A function x -> the model's output for `task`, in float32 under mixed precision too:
  [batch, 1] probability (binary), [batch, classes] probabilities (multiclass), [batch, 1] value
  in the transformed label's units (regression)."""
  def apply(x):
    if task.kind == BINARY:
      return keras.layers.Dense(1, activation='sigmoid', dtype='float32',
                                   name='probability')(x)
    if task.kind == MULTICLASS:
      return keras.layers.Dense(task.num_classes, activation='softmax', dtype='float32',
                                   name='probabilities')(x)
    standardized = keras.layers.Dense(1, dtype='float32', name='standardized_prediction')(x)
    return Rescale(task.label_std, task.label_mean, dtype='float32', name='prediction')(
        standardized)
  return apply


def expected_output_width(task):
  return task.num_classes if task.kind == MULTICLASS else 1


def compile_model(model, task, learning_rate, jit_compile=False):
  if task.kind == BINARY:
    loss = keras.losses.BinaryCrossentropy()
    metrics = [keras.metrics.BinaryAccuracy(name='accuracy'), keras.metrics.AUC(name='auc')]
  elif task.kind == MULTICLASS:
    loss = keras.losses.SparseCategoricalCrossentropy()
    metrics = [keras.metrics.SparseCategoricalAccuracy(name='accuracy')]
  else:
    loss = keras.losses.MeanSquaredError()
    metrics = [keras.metrics.RootMeanSquaredError(name='rmse'),
               keras.metrics.MeanAbsoluteError(name='mae'),
               keras.metrics.R2Score(name='r2')]
  model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics,
                jit_compile=jit_compile)
  return model


def prepare_label(label, task):
  """The label as the loss takes it: [batch, 1] float32 for regression (R2Score needs the
  output's shape), as parsed otherwise."""
  if task.kind == REGRESSION:
    return tf.reshape(tf.cast(label, tf.float32), [-1, 1])
  return label


def outputs(model_output, task, names=None, inverse=None):
  """The serving outputs from the model's output.

  Classification: probabilities [batch, classes], class_ids, classes (names). Regression:
  predictions [batch], in the raw label's units when the dataset module has an inverse_label_fn
  (`inverse`), else in the transformed label's."""
  if task.kind == REGRESSION:
    y = tf.reshape(tf.cast(model_output, tf.float32), [-1])
    return {'predictions': inverse(y) if inverse is not None else y}
  if task.kind == BINARY:
    p = tf.reshape(model_output, [-1])
    probs = tf.stack([1 - p, p], axis=1)
  else:
    probs = model_output
  class_ids = tf.argmax(probs, axis=1)
  result = {'probabilities': probs, 'class_ids': class_ids}
  if names is not None:
    result['classes'] = tf.gather(names, class_ids)
  return result


def describe(task: Task) -> str:
  if task.kind == REGRESSION:
    return f'regression (label mean {task.label_mean:.4g}, std {task.label_std:.4g})'
  return f'{task.kind} classification, {task.num_classes} classes'


def class_names_from(label_classes: Optional[Tuple[str, ...]], vocabulary, num_classes):
  """Class names: the dataset module's LABEL_CLASSES, else a vocabulary named after the label,
  else the ids as text (also for ids past the names given)."""
  names = [str(c) for c in (label_classes or vocabulary or ())][:num_classes]
  return names + [str(i) for i in range(len(names), num_classes)]
