"""A Keras model built from the transformed schema that TF Transform recorded.

Nothing here lists features: integer features with a categorical domain (vocabulary ids, bucket
ids) get embeddings sized from the domain TFT wrote (vocabulary plus OOV buckets); every other
feature is a number fed to the dense layers.
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


def build(schema, feature_spec, label_key, hidden_units=(128, 64), dropout=0.1):
  """Inputs named after the transformed features; outputs class probabilities (float32)."""
  inputs, embedded, numeric = {}, [], []
  for feature in sorted(schema.feature, key=lambda f: f.name):
    name = feature.name
    if name == label_key:
      continue
    spec = feature_spec[name]
    inputs[name] = tf.keras.Input(shape=(), name=name, dtype=spec.dtype)
    size = categorical_size(feature)
    if size is not None:
      layer = tf.keras.layers.Embedding(size, embedding_dim(size), name=f'{name}_embedding')
      embedded.append(layer(inputs[name]))
    else:
      numeric.append(tf.keras.layers.Reshape((1,))(tf.cast(inputs[name], tf.float32)))
  x = tf.keras.layers.Concatenate()(embedded + numeric)
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
