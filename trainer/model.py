"""A Keras model built from the transformed schema that TF Transform recorded.

Nothing here lists features: integer features with a categorical domain (vocabulary ids, bucket
ids) get embeddings sized from the domain TFT wrote (vocabulary plus OOV buckets); rank-3 features
are images ([height, width, channels] pixel values 0..255) and go through a small CNN, normalized
with their `<name>_mean_xf` / `<name>_std_xf` companions where the transform provides them; every
other feature is a number fed to the dense layers.
"""

import math

import tensorflow as tf
from tensorflow_metadata.proto.v0 import schema_pb2


def categorical_size(feature):
  """Number of ids of a categorical int feature, or None for a numeric one."""
  if feature.type == schema_pb2.INT and feature.HasField('int_domain'):
    domain = feature.int_domain
    if domain.is_categorical or domain.max > 0:
      return int(domain.max) + 1
  return None


def num_classes(schema, label_key):
  """2 (one sigmoid output) unless the label has a categorical domain of more ids."""
  for feature in schema.feature:
    if feature.name == label_key:
      size = categorical_size(feature)
      return size if size and size > 2 else 2
  raise ValueError(f'the transformed data has no label feature {label_key!r}')


def embedding_dim(size):
  return max(2, min(32, int(round(1.6 * size**0.56))))


def image_features(feature_spec):
  """{image feature: (mean feature, std feature) or None} for every rank-3 feature."""
  images = {}
  for name, spec in feature_spec.items():
    if isinstance(spec, tf.io.FixedLenFeature) and len(spec.shape) == 3:
      base = name[:-len('_xf')] if name.endswith('_xf') else name
      stats = (f'{base}_mean_xf', f'{base}_std_xf')
      images[name] = stats if all(s in feature_spec for s in stats) else None
  return images


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
    x = tf.keras.layers.Conv2D(filters, 3, padding='same', activation='relu',
                               name=f'{name}_conv{block}')(x)
    x = tf.keras.layers.MaxPooling2D(name=f'{name}_pool{block}')(x)
    height, width, filters = height // 2, width // 2, min(2 * filters, 256)
  if height * width * x.shape[-1] <= 4096:
    return tf.keras.layers.Flatten(name=f'{name}_flatten')(x)
  return tf.keras.layers.GlobalAveragePooling2D(name=f'{name}_pool')(x)


def build(schema, feature_spec, label_key, hidden_units=(128, 64), dropout=0.1):
  """Inputs named after the transformed features; outputs class probabilities (float32)."""
  inputs, embedded, numeric = {}, [], []
  images = image_features(feature_spec)
  image_stats = {s for stats in images.values() if stats for s in stats}
  for feature in sorted(schema.feature, key=lambda f: f.name):
    name = feature.name
    if name == label_key:
      continue
    spec = feature_spec[name]
    shape = tuple(spec.shape) if isinstance(spec, tf.io.FixedLenFeature) else ()
    inputs[name] = tf.keras.Input(shape=shape, name=name, dtype=spec.dtype)
  for name in sorted(inputs):
    feature = next(f for f in schema.feature if f.name == name)
    if name in images:
      stats = images[name]
      mean, std = (inputs[stats[0]], inputs[stats[1]]) if stats else (None, None)
      numeric.append(image_tower(inputs[name], mean, std, name=name.removesuffix('_xf')))
      continue
    if name in image_stats:
      continue
    size = categorical_size(feature)
    if size is not None:
      layer = tf.keras.layers.Embedding(size, embedding_dim(size), name=f'{name}_embedding')
      embedded.append(layer(inputs[name]))
    else:
      width = math.prod(inputs[name].shape[1:])  # 1 for a scalar
      numeric.append(tf.keras.layers.Reshape((width,))(tf.cast(inputs[name], tf.float32)))
  features = embedded + numeric
  x = features[0] if len(features) == 1 else tf.keras.layers.Concatenate()(features)
  for units in hidden_units:
    x = tf.keras.layers.Dense(units, activation='relu')(x)
    if dropout:
      x = tf.keras.layers.Dropout(dropout)(x)
  classes = num_classes(schema, label_key)
  # The output layer stays float32 under mixed precision, for numerically sound probabilities.
  if classes == 2:
    outputs = tf.keras.layers.Dense(1, activation='sigmoid', dtype='float32', name='probability')(x)
  else:
    outputs = tf.keras.layers.Dense(classes, activation='softmax', dtype='float32',
                                    name='probabilities')(x)
  return tf.keras.Model(inputs, outputs)


def compile_model(model, classes, learning_rate, jit_compile=False):
  if classes == 2:
    loss = tf.keras.losses.BinaryCrossentropy()
    metrics = [tf.keras.metrics.BinaryAccuracy(name='accuracy'), tf.keras.metrics.AUC(name='auc')]
  else:
    loss = tf.keras.losses.SparseCategoricalCrossentropy()
    metrics = [tf.keras.metrics.SparseCategoricalAccuracy(name='accuracy')]
  model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics,
                jit_compile=jit_compile)
  return model


def probabilities(outputs, classes):
  """[batch, classes] probabilities from the model's output."""
  if classes == 2:
    p = tf.reshape(outputs, [-1])
    return tf.stack([1 - p, p], axis=1)
  return outputs


def steps_for(rows, batch_size):
  return max(1, math.ceil(rows / batch_size))
