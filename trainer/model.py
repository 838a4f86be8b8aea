"""The Keras model, built from the transformed features' kinds (trainer.features), not from lists.

Each kind is consumed the way a practitioner would:
  NUMBER       standardized with the train split's mean and std (a no-op for z-scores)
  CATEGORICAL  an embedding sized from the domain TF Transform recorded
  IMAGE        a small CNN, normalized with its mean/std companions
  IDS          an embedding bag (--combiner: mean by default; rows without ids give zeros)
  WEIGHTED     an embedding bag weighted by its paired weights (tf-idf): their weighted sum
  NUMBERS      per row: mean, min, max of the standardized values and log(1 + count)

A model of your own (`--model-module`) gets the same ModelContext and may reuse
encode_features() and heads.head(); see the README ("Your own model").
"""

import dataclasses
import math
from typing import Any, Dict, Mapping

import tensorflow as tf
import tf_keras as keras  # Keras 2, as TF Transform's transform layer (tf.keras would be Keras 3)

from trainer import features as features_lib
from trainer import heads


@dataclasses.dataclass
class ModelContext:
  """What a model builder receives: the default model's and a --model-module's build_model."""
  inputs: Dict[str, Any]  # feature name -> keras.Input, one per usable transformed feature
  features: Mapping[str, features_lib.Feature]  # what each input is (its kind, ids, shape)
  task: heads.Task  # binary | multiclass | regression, classes, label scale
  schema: Any  # the transformed schema (tensorflow_metadata Schema proto)
  hparams: Any  # the trainer's TrainConfig: hidden_units, dropout, max_embedding_dim, ...
  statistics: Mapping[str, Any]  # feature -> the train split's NumericStatistics


def make_inputs(kinds):
  """A keras.Input per feature: dense ones with their shape, sparse ones as SparseTensors."""
  inputs = {}
  for name, kind in sorted(kinds.items()):
    if kind.sparse:
      inputs[name] = keras.Input(shape=(None,), sparse=True, dtype=kind.dtype, name=name)
    else:
      inputs[name] = keras.Input(shape=kind.shape, dtype=kind.dtype, name=name)
  return inputs


def embedding_dim(size, cap=32):
  return max(2, min(cap, int(round(1.6 * size**0.56))))


class Standardize(keras.layers.Layer):
  """(x - mean) / std with the train split's numbers, as float32."""

  def __init__(self, mean=0.0, std=1.0, **kwargs):
    super().__init__(**kwargs)
    self.mean, self.std = float(mean), float(std)

  def call(self, inputs):
    return (tf.cast(inputs, tf.float32) - self.mean) / self.std

  def get_config(self):
    return dict(super().get_config(), mean=self.mean, std=self.std)


class SparseEmbedding(keras.layers.Layer):
  """An embedding bag over variable-length ids, optionally weighted: [batch, dim]. Rows without
  ids give zeros; negative ids (a vocabulary's default for unknown values) count as absent; ids
  past the table (possible only for ids sized from statistics) share its last row."""

  def __init__(self, size, dim, combiner='mean', **kwargs):
    super().__init__(**kwargs)
    self.size, self.dim, self.combiner = int(size), int(dim), combiner

  def build(self, input_shape):
    self.embeddings = self.add_weight(
        name='embeddings', shape=(self.size, self.dim), dtype=tf.float32,
        initializer=keras.initializers.RandomUniform(-0.05, 0.05))
    super().build(input_shape)

  def call(self, inputs):
    ids, weights = inputs if isinstance(inputs, (list, tuple)) else (inputs, None)
    ids = tf.SparseTensor(ids.indices, tf.minimum(ids.values, self.size - 1), ids.dense_shape)
    if weights is not None:
      weights = tf.SparseTensor(weights.indices, tf.cast(weights.values, tf.float32),
                                weights.dense_shape)
    embedded = tf.nn.safe_embedding_lookup_sparse(self.embeddings, ids, weights,
                                                  combiner=self.combiner)
    return tf.cast(tf.reshape(embedded, [-1, self.dim]), self.compute_dtype)

  def get_config(self):
    return dict(super().get_config(), size=self.size, dim=self.dim, combiner=self.combiner)


class VarLenSummary(keras.layers.Layer):
  """Variable-length numbers -> [batch, 4]: mean, min, max of the standardized values and
  log(1 + count); zeros for a row without values."""

  def __init__(self, mean=0.0, std=1.0, **kwargs):
    super().__init__(**kwargs)
    self.mean, self.std = float(mean), float(std)

  def call(self, inputs):
    values = (tf.cast(inputs.values, tf.float32) - self.mean) / self.std
    rows = inputs.indices[:, 0]
    n = inputs.dense_shape[0]
    count = tf.math.unsorted_segment_sum(tf.ones_like(values), rows, n)
    present = count > 0
    mean = tf.math.unsorted_segment_sum(values, rows, n) / tf.maximum(count, 1.0)
    low = tf.where(present, tf.math.unsorted_segment_min(values, rows, n), 0.0)
    high = tf.where(present, tf.math.unsorted_segment_max(values, rows, n), 0.0)
    return tf.cast(tf.stack([mean, low, high, tf.math.log1p(count)], axis=1), self.compute_dtype)

  def get_config(self):
    return dict(super().get_config(), mean=self.mean, std=self.std)


def image_tower(pixels, mean=None, std=None, name='image'):
  """A small CNN (no pretrained weights: nothing is downloaded): conv + max-pool blocks, filters
  doubling from 32 (at most 256), until the feature map is at most 7 pixels on a side."""
  x = tf.cast(pixels, tf.float32) / 255.0
  if mean is not None:
    channels = pixels.shape[-1]
    x = (x - tf.reshape(mean, [-1, 1, 1, channels])) / tf.reshape(std, [-1, 1, 1, channels])
  height, width = pixels.shape[1], pixels.shape[2]
  filters, block = 32, 0
  while block < 2 or min(height, width) > 7:
    if min(height, width) < 2:
      break
    block += 1
    x = keras.layers.Conv2D(filters, 3, padding='same', activation='relu',
                               name=f'{name}_conv{block}')(x)
    x = keras.layers.MaxPooling2D(name=f'{name}_pool{block}')(x)
    height, width, filters = height // 2, width // 2, min(2 * filters, 256)
  if height * width * x.shape[-1] <= 4096:
    return keras.layers.Flatten(name=f'{name}_flatten')(x)
  return keras.layers.GlobalAveragePooling2D(name=f'{name}_pool')(x)


def _mean_std(statistics, name):
  stats = statistics.get(name)
  if stats is None:
    return 0.0, 1.0
  std = stats.std_dev if math.isfinite(stats.std_dev) and stats.std_dev > 0 else 1.0
  return float(stats.mean), float(std)


def encode_features(ctx: ModelContext, names=None):
  """Every input (or those `names`) encoded by its kind and concatenated: [batch, width]."""
  cap = getattr(ctx.hparams, 'max_embedding_dim', 32)
  combiner = getattr(ctx.hparams, 'combiner', 'mean')
  parts = []
  for name in sorted(names or ctx.inputs):
    kind, x = ctx.features[name], ctx.inputs[name]
    base = name.removesuffix('_xf')
    if kind.kind == features_lib.IMAGE:
      mean, std = ((ctx.inputs[kind.images[0]], ctx.inputs[kind.images[1]]) if kind.images
                   else (None, None))
      parts.append(image_tower(x, mean, std, name=base))
    elif kind.kind == features_lib.CATEGORICAL:
      embedded = keras.layers.Embedding(kind.size, embedding_dim(kind.size, cap),
                                           name=f'{name}_embedding')(x)
      parts.append(keras.layers.Flatten(name=f'{name}_flat')(embedded))
    elif kind.kind == features_lib.NUMBER:
      mean, std = _mean_std(ctx.statistics, name)
      width = math.prod(kind.shape)  # 1 for a scalar
      x = Standardize(mean, std, name=f'{name}_standardized')(x)
      parts.append(keras.layers.Reshape((width,), name=f'{name}_flat')(x))
    elif kind.kind == features_lib.IDS:
      parts.append(SparseEmbedding(kind.size, embedding_dim(kind.size, cap), combiner,
                                   name=f'{name}_embedding')(x))
    elif kind.kind == features_lib.WEIGHTED:
      parts.append(SparseEmbedding(kind.size, embedding_dim(kind.size, cap), 'sum',
                                   name=f'{name}_embedding')([x, ctx.inputs[kind.weights]]))
    elif kind.kind == features_lib.NUMBERS:
      mean, std = _mean_std(ctx.statistics, name)
      parts.append(VarLenSummary(mean, std, name=f'{name}_summary')(x))
    # IMAGE_STATS and WEIGHTS are read by the features they belong to.
  if not parts:
    raise ValueError('no feature to encode')
  return parts[0] if len(parts) == 1 else keras.layers.Concatenate(name='features')(parts)


def build_default(ctx: ModelContext):
  """Encoded features, --hidden-units ReLU layers with --dropout, and the task's head over both
  the last hidden layer and the encoded features themselves (wide and deep: the head's direct
  view of the features is a linear model of them, which small tables learn first)."""
  encoded = encode_features(ctx)
  x = encoded
  for i, units in enumerate(ctx.hparams.hidden_units):
    x = keras.layers.Dense(units, activation='relu', name=f'hidden{i + 1}')(x)
    if ctx.hparams.dropout:
      x = keras.layers.Dropout(ctx.hparams.dropout, name=f'dropout{i + 1}')(x)
  if ctx.hparams.hidden_units:
    x = keras.layers.Concatenate(name='wide_and_deep')([x, encoded])
  return keras.Model(ctx.inputs, heads.head(ctx.task)(x))
