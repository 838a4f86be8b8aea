"""Serving helpers that need TensorFlow alone (no TF Transform, tfx-bsl or Beam) for exported
models.

  from trainer import serving
  model = serving.load_model('out/models/census')            # newest version, or a version dir
  model.predict([{'age': 39, 'workclass': 'State-gov', ...}])  # dicts, CSV lines or Examples
  model.transform([{'age': 39, ...}])                         # the transform alone -> features
  serving.load_model('out/models/images').predict_images([open('x.png', 'rb').read()])
  serving.load_transform('out/adult').transform(rows)        # a pipeline's transform_fn (needs TFT)

Raw rows are encoded as tf.train.Examples with the model's own raw feature types, then go through
the same signatures a TensorFlow Serving client would call.
"""

import csv
import io
import json
import os
import re

import numpy as np
import tensorflow as tf

from transforms import run_contract
from transforms.errors import UserError


def versions(model_base):
  """The version numbers of a TF Serving model base path: its numbered directories (object
  stores list them with a trailing '/')."""
  if not tf.io.gfile.isdir(model_base):
    return []
  return sorted(int(v.rstrip('/')) for v in tf.io.gfile.listdir(model_base)
                if re.fullmatch(r'\d+/?', v))


def newest_version(model_base):
  """A version directory, or the highest-numbered version under a TF Serving model base path."""
  if tf.io.gfile.exists(os.path.join(model_base, 'saved_model.pb')):
    return model_base
  found = versions(model_base)
  if not found:
    raise UserError(f'{model_base} holds no SavedModel and no numbered version directory')
  return os.path.join(model_base, str(found[-1]))


RAW_FORMAT = os.path.join('assets.extra', 'raw_format.json')  # in a version: trainer/export.py


def raw_format(version_dir):
  """How raw rows map to a version's features (its RAW_FORMAT, written by the export), or {}
  for a SavedModel without one."""
  path = os.path.join(version_dir, RAW_FORMAT)
  if not tf.io.gfile.exists(path):
    return {}
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def tf_error_detail(error):
  """The sentence of a TensorFlow error that says what is wrong, without graph node names."""
  boilerplate = ('[[', 'Graph execution error', 'Detected at node', '<stack traces')
  lines = [line.strip() for line in error.message.splitlines()
           if line.strip() and not line.strip().startswith(boilerplate)]
  text = lines[-1] if lines else error.message.strip()
  text = re.sub(r'\s*\[Op:[^\]]*\]', '', text)  # eager calls name the op at the end
  return re.sub(r'\{\{function_node [^}]*\}\}\s*', '', text)


def to_numpy(value):
  """A signature's output as numpy: a dense tensor as its array; a sparse or ragged one (a
  variable-length transformed feature) as an object array of one numpy array per row."""
  if isinstance(value, tf.SparseTensor):
    value = tf.RaggedTensor.from_sparse(value)
  if isinstance(value, tf.RaggedTensor):
    rows = np.empty(int(value.nrows()), dtype=object)
    for i, row in enumerate(value):
      rows[i] = row.numpy()
    return rows
  return value.numpy()


def _raw_types(signature):
  return {name: spec.dtype for name, spec in signature.structured_input_signature[1].items()}


def _feature(value, dtype, name):
  values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
  values = [v for v in values if v is not None and not (isinstance(v, str) and v == '' and
                                                         dtype != tf.string)]
  try:
    if dtype == tf.string:
      return tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[v if isinstance(v, bytes) else str(v).strip().encode() for v in values]))
    if dtype == tf.int64:
      return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(str(v).strip())
                                                                   for v in values]))
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
  except (TypeError, ValueError):
    raise UserError(f'feature {name!r}: {value!r} is not a valid {dtype.name}') from None


def to_examples(rows, raw_types, csv_columns=None, na_values=(), required=(), label_key=None):
  """dicts, CSV lines (with csv_columns) or serialized Examples -> serialized Examples."""
  out = []
  for i, row in enumerate(rows):
    if isinstance(row, bytes):
      out.append(row)
      continue
    if isinstance(row, str):
      if not csv_columns:
        raise UserError('CSV lines need the column names (csv_columns)')
      cells = next(csv.reader(io.StringIO(row)))
      if len(cells) != len(csv_columns):
        raise UserError(f'row {i}: {len(cells)} fields, expected {len(csv_columns)}')
      row = {k: v for k, v in zip(csv_columns, cells) if k in raw_types}
    if not isinstance(row, dict):
      raise UserError(f'row {i}: expected a dict, a CSV line or serialized Example bytes')
    unknown = sorted(set(row) - set(raw_types) - {label_key})
    if unknown:
      raise UserError(f'row {i}: unknown feature(s) {unknown}; the model takes '
                      f'{sorted(raw_types)}')
    features = {}
    for name, dtype in raw_types.items():
      value = row.get(name)
      if isinstance(value, str) and value.strip() in na_values:
        value = None
      if value is None or (isinstance(value, str) and not value.strip()):
        continue  # missing: the model's parse spec applies the default or reports it
      try:
        features[name] = _feature(value, dtype, name)
      except UserError as e:
        raise UserError(f'row {i}: {e}') from None
    lacking = [name for name in required if name not in features]
    if lacking:
      raise UserError(f'row {i}: missing required feature(s) {lacking}')
    out.append(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
  return out


class Model:
  """An exported model: predictions from raw rows through its serving_default signature."""

  def __init__(self, path):
    self.path = newest_version(path)
    self._loaded = tf.saved_model.load(self.path)
    self.signatures = self._loaded.signatures  # by name, for callers of other signatures
    self._serve = self.signatures['serving_default']
    self.raw_types = _raw_types(self._loaded.signatures['predict_raw'])
    fmt = raw_format(self.path)
    self.csv_columns = fmt.get('csv_columns')
    self.na_values = tuple(fmt.get('na_values') or ())
    self.required = tuple(fmt.get('required') or ())
    self.label_key = fmt.get('label_key')
    # What the model predicts: 'binary', 'multiclass' or 'regression', and the class names.
    self.task = fmt.get('task') or 'binary'
    self.class_names = tuple(fmt.get('classes') or ())

  def _examples(self, rows):
    return to_examples(rows, self.raw_types, self.csv_columns, self.na_values, self.required,
                       self.label_key)

  def predict(self, rows, batch_size=1024):
    """Classification: {'probabilities': [n, classes], 'class_ids': [n], 'classes': [n] (str)};
    regression: {'predictions': [n]} (in the raw label's units where the dataset module has an
    inverse_label_fn)."""
    return self._batched(self._serve, 'examples', self._examples(rows), batch_size, 'rows')

  @property
  def is_image_model(self):
    return 'predict_images' in self._loaded.signatures

  def predict_images(self, images, batch_size=256):
    """Encoded JPEG/PNG images (bytes) -> predictions, through the predict_images signature."""
    if 'predict_images' not in self._loaded.signatures:
      raise UserError(f'{self.path} is not an image model (it has no predict_images signature)')
    if not all(isinstance(i, bytes) for i in images):
      raise UserError('images must be the encoded JPEG or PNG file contents, as bytes')
    return self._batched(self._loaded.signatures['predict_images'], 'image_bytes', list(images),
                         batch_size, 'images')

  @staticmethod
  def _batched(signature, argument, values, batch_size, what):
    parts = []
    for start in range(0, len(values), batch_size):
      batch = tf.constant(values[start:start + batch_size])
      try:
        parts.append({k: v.numpy() for k, v in signature(**{argument: batch}).items()})
      except tf.errors.InvalidArgumentError as e:
        raise UserError(f'{what} {start}..{start + len(batch) - 1}: {tf_error_detail(e)}') \
            from None
    result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    if 'classes' in result:
      result['classes'] = np.array([c.decode() for c in result['classes']])
    return result

  def transform(self, rows):
    """Raw rows -> {transformed feature: numpy array}, through the transform_features signature
    (a variable-length feature: an object array of one array per row)."""
    examples = self._examples(rows)
    outputs = self._loaded.signatures['transform_features'](examples=tf.constant(examples))
    return {k: to_numpy(v) for k, v in outputs.items()}


def load_model(path):
  return Model(path)


class PipelineTransform:
  """The transform graph of a pipeline output (DIR/transform_fn), applied to raw rows.

  Reads the graph with TF Transform's TFTransformOutput (TF Transform, not Beam, is needed here);
  serving code with TensorFlow alone uses an exported model's transform() instead.
  """

  def __init__(self, transformed_dir):
    import tensorflow_transform as tft
    manifest = run_contract.read_manifest(transformed_dir, flag='the pipeline output')
    # TF Transform's Keras layer reads a TF2 transform graph and a TF1 one alike, eagerly (the
    # pipelines write TF2 ones; transform_raw_features reads a TF1 one only in a v1 graph).
    self._layer = tft.TFTransformOutput(transformed_dir).transform_features_layer()
    self._spec = manifest.raw_feature_spec()
    self.raw_types = {n: s.dtype for n, s in self._spec.items()}
    self.csv_columns = manifest.csv_columns
    self.na_values = tuple(manifest.na_values)
    self.label_key = manifest.label_key

  def transform(self, rows):
    """Raw rows -> {transformed feature: numpy array}. Rows carry the label or none do."""
    examples = to_examples(rows, self.raw_types, self.csv_columns, self.na_values,
                           label_key=self.label_key)
    spec = dict(self._spec)
    if not all(self.label_key in tf.train.Example.FromString(e).features.feature
               for e in examples):
      spec.pop(self.label_key)
    raw = tf.io.parse_example(tf.constant(examples), spec)
    outputs = self._layer(raw)
    return {k: to_numpy(v) for k, v in outputs.items()}


def load_transform(path):
  """The transform graph alone: from a pipeline output directory (needs TF Transform) or from an
  exported model (TensorFlow alone). Both give .transform(rows) -> transformed features."""
  if tf.io.gfile.exists(os.path.join(path, 'transform_fn')):
    return PipelineTransform(path)
  return Model(path)
