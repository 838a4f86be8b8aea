"""Export: a SavedModel with the transform graph attached, in TensorFlow Serving's layout.

Signatures:
  serving_default(examples)   serialized raw tf.train.Examples (no label) -> probabilities,
                              class_ids, classes (classification) or predictions (regression,
                              in the raw label's units where the dataset module has an
                              inverse_label_fn)
  predict_raw(<one tensor per raw feature>)  the same from raw feature values, for JSON clients;
                              a string '' (or an NA value) is a missing value of a VarLen feature
  transform_features(examples)  the transform alone: raw Examples -> transformed features
  predict_images(image_bytes)   image models only: a batch of encoded JPEG/PNG bytes (what a
                              TensorFlow Serving REST client sends as {"b64": ...}) -> the same

The transform's vocabulary files are assets of this SavedModel: it needs nothing from the
pipeline's output directory once written. A version is written under a staging name in the same
model base (STAGING, never a number, so never a version) and renamed to its number last: a killed
export leaves no version that looks complete, and the next export removes what it left.
"""

import json
import os
import uuid

import tensorflow as tf

from trainer import features as features_lib
from trainer import heads, serving, tflite_graph


def class_names(manifest, tft_output, task):
  """The names of class ids 0..n-1: LABEL_CLASSES, else a vocabulary named after the label."""
  vocabulary = None
  if not manifest.label_classes:
    try:
      vocabulary = [v.decode() for v in tft_output.vocabulary_by_name(manifest.label_key)]
    except (ValueError, KeyError, tf.errors.NotFoundError):
      pass
  return heads.class_names_from(manifest.label_classes, vocabulary, task.num_classes)


STAGING = '.tmp-'  # MODEL_DIR/name/.tmp-<n>-<random>: a version being written


def next_version_dir(model_dir, name):
  """MODEL_DIR/name/<n+1>: a new version next to the existing ones, never one of them."""
  base = os.path.join(model_dir, name)
  return os.path.join(base, str(max(serving.versions(base), default=0) + 1))


class ServingModule(tf.Module):
  """Holds the Keras model and TFT's transform layer, so both are tracked and saved together."""

  def __init__(self, model, tft_layer, raw_spec, na_values, label_key, task, kinds,
               binary=(), label_inverse=None):
    super().__init__()
    self._binary = frozenset(binary)  # bytes features (images): passed on untouched
    self.model = model
    self.tft_layer = tft_layer
    self.label_inverse = label_inverse  # a SavedModel with inverse(y), or None
    self._raw_spec = raw_spec
    self._na_values = list(na_values)
    self._label_xf = label_key
    self._task = task
    self._kinds = dict(kinds)
    self._names = tf.constant(list(task.class_names)) if task.is_classification else None

  def _read_like_pipeline(self, raw):
    """The pipeline's cell rules at serving: strings trimmed; '' and NA values are missing
    (dropped from VarLen features, the default of FixedLen ones)."""
    with tf.name_scope(tflite_graph.CELL_RULES_SCOPE):  # its trims are left out of TFLite
      return self._cleaned(raw)

  def _cleaned(self, raw):
    na = tf.constant([''] + self._na_values)
    cleaned = {}
    for name, spec in self._raw_spec.items():
      value = raw[name]
      if spec.dtype == tf.string and name not in self._binary:
        if isinstance(value, tf.SparseTensor):
          value = tf.SparseTensor(value.indices, tf.strings.strip(value.values), value.dense_shape)
          value = tf.sparse.retain(value, _not_in(value.values, na))
        else:
          value = tf.strings.strip(value)
          if spec.default_value is not None:
            value = tf.where(_not_in(value, na), value, tf.constant(spec.default_value))
      cleaned[name] = value
    return cleaned

  def _transform(self, raw):
    transformed = self.tft_layer(self._read_like_pipeline(raw))
    transformed.pop(self._label_xf, None)
    return transformed

  def _predict(self, raw):
    inputs = features_lib.to_model_inputs(self._transform(raw), self._kinds)
    inverse = self.label_inverse.inverse if self.label_inverse is not None else None
    return heads.outputs(self.model(inputs, training=False), self._task, self._names, inverse)

  def _from_columns(self, columns):
    """Raw feature tensors ([batch] each) -> what parse_example would have produced."""
    raw = {}
    for name, spec in self._raw_spec.items():
      value = columns[name]
      if isinstance(spec, tf.io.VarLenFeature):
        value = tf.sparse.from_dense(tf.expand_dims(value, 1))
        if spec.dtype != tf.string:  # sparse.from_dense drops zeros; a number is always present
          value = tf.SparseTensor(
              tf.stack([tf.range(tf.size(columns[name], tf.int64)),
                        tf.zeros_like(columns[name], tf.int64)], 1),
              columns[name], tf.stack([tf.size(columns[name], tf.int64), 1]))
      raw[name] = value
    return raw


def _not_in(values, excluded):
  return tf.reduce_all(tf.not_equal(tf.expand_dims(values, -1), excluded), axis=-1)


def load_label_inverse(transformed_dir, manifest):
  """The inverse_label_fn the pipeline saved (DIR/label_inverse), or None."""
  if not manifest.label_inverse:
    return None
  return tf.saved_model.load(os.path.join(transformed_dir, manifest.label_inverse))


def export(model, tft_output, manifest, label_key_xf, task, kinds, model_dir, name,
           transformed_dir):
  """Saves the serving SavedModel as a new version; returns its path. `kinds`: the
  features.Feature of each model input."""
  raw_spec = manifest.raw_feature_spec(with_label=False)  # as the pipeline parsed raw rows
  binary = [c.name for c in manifest.raw_columns if c.binary]
  inverse = load_label_inverse(transformed_dir, manifest) if task.kind == heads.REGRESSION \
      else None
  module = ServingModule(model, tft_output.transform_features_layer(), raw_spec,
                         manifest.na_values, label_key_xf, task, kinds, binary,
                         inverse)

  examples = tf.TensorSpec([None], tf.string, name='examples')

  @tf.function(input_signature=[examples])
  def serving_default(serialized):
    return module._predict(tf.io.parse_example(serialized, raw_spec))

  @tf.function(input_signature=[examples])
  def transform_features(serialized):
    return module._transform(tf.io.parse_example(serialized, raw_spec))

  column_specs = {n: tf.TensorSpec([None], s.dtype, name=n) for n, s in raw_spec.items()}

  @tf.function(input_signature=[column_specs])
  def predict_raw(columns):
    return module._predict(module._from_columns(columns))

  signatures = {
      'serving_default': serving_default,
      'transform_features': transform_features,
      'predict_raw': predict_raw.get_concrete_function(column_specs),
  }
  if manifest.image and len(raw_spec) == 1 and binary:
    image_key = binary[0]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')])
    def predict_images(image_bytes):
      return module._predict({image_key: image_bytes})

    signatures['predict_images'] = predict_images

  path = next_version_dir(model_dir, name)
  base = os.path.dirname(path)
  _remove_staging(base)
  staging = os.path.join(base, f'{STAGING}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}')
  tf.saved_model.save(module, staging, signatures=signatures)
  # How raw CSV rows map to features, for serving helpers (TensorFlow Serving ignores assets.extra).
  tf.io.gfile.makedirs(os.path.dirname(os.path.join(staging, serving.RAW_FORMAT)))
  with tf.io.gfile.GFile(os.path.join(staging, serving.RAW_FORMAT), 'w') as f:
    json.dump({'csv_columns': manifest.csv_columns, 'na_values': manifest.na_values,
               'label_key': manifest.label_key, 'binary': binary, 'task': task.kind,
               'classes': list(task.class_names),
               'required': sorted(n for n, spec in raw_spec.items()
                                  if isinstance(spec, tf.io.FixedLenFeature)
                                  and spec.default_value is None)}, f)
  # The last step. A local rename is atomic, and fails rather than replace a version written
  # meanwhile. On an object store (gs://) TensorFlow renames a directory object by object (copy,
  # then delete), which is not atomic: the number appears with the first object copied, so a
  # reader of the base may see an incomplete version for the seconds the copy takes, and a run
  # killed during them leaves one. The rename is kept there for what it still gives: a SavedModel
  # that failed or was killed while being written is never under a number.
  tf.io.gfile.rename(staging, path)
  return path


def _remove_staging(base):
  """What killed exports left in a model base (two exports of one model at once, which would
  also share one backup, are not supported)."""
  if not tf.io.gfile.isdir(base):
    return
  for entry in tf.io.gfile.listdir(base):
    if entry.startswith(STAGING):
      tf.io.gfile.rmtree(os.path.join(base, entry.rstrip('/')))
