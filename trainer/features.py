"""What each transformed feature is to a model, read from the schema TF Transform recorded.

A preprocessing_fn may output anything TensorFlow can hold; the model understands these kinds,
and every other output is refused before training starts, in one line naming the feature, its
kind and what to do (never a model trained on something it cannot make sense of):

  NUMBER      a dense float or int without a categorical domain, any fixed shape ([], [k], [h, w])
  CATEGORICAL a dense int with a categorical domain (vocabulary or bucket ids), [] or [k]
  IMAGE       a dense rank-3 [height, width, channels] feature of pixel values 0..255; its
              `<base>_mean_xf` / `<base>_std_xf` companions (IMAGE_STATS) normalize it
  IDS         variable-length ids with a categorical domain (a multivalent category, a bag of
              words): VarLen or one-level Ragged (a SparseFeature's ids have no domain in the
              schema and are refused)
  WEIGHTED    ids paired with a weights output (tft.tfidf), declared in the dataset module's
              WEIGHTED_FEATURES = {ids: weights}; the weights feature is WEIGHTS
  NUMBERS     variable-length floats (VarLen, one-level Ragged or SparseFeature values),
              summarized per row (mean, min, max, count)

Ragged outputs are read as sparse ones (the model sees SparseTensors only).
"""

import dataclasses
from typing import Mapping, Optional, Tuple

import tensorflow as tf
from tensorflow_metadata.proto.v0 import schema_pb2

from transforms.errors import UserError

NUMBER, CATEGORICAL, IMAGE, IMAGE_STATS = 'number', 'categorical', 'image', 'image_stats'
IDS, WEIGHTED, WEIGHTS, NUMBERS = 'ids', 'weighted_ids', 'weights', 'numbers'
SPARSE_KINDS = (IDS, WEIGHTED, WEIGHTS, NUMBERS)

_WHAT_TO_DO = {
    'string': 'map strings to ids in the preprocessing_fn (tft.compute_and_apply_vocabulary, '
              'or the text recipe in transforms/text.py) or to numbers (tf.strings.to_number)',
    'int_ids': 'give the ids a domain (tft.compute_and_apply_vocabulary or tft.apply_buckets '
               'record one), pair them with weights in WEIGHTED_FEATURES, or cast them to '
               'tf.float32 if they are numbers',
}


@dataclasses.dataclass(frozen=True)
class Feature:
  """One transformed feature as the model consumes it."""
  name: str
  kind: str
  dtype: tf.DType
  shape: Tuple[int, ...] = ()  # dense features: the shape of one row; () for sparse ones
  size: Optional[int] = None  # CATEGORICAL, IDS, WEIGHTED: the number of ids
  weights: Optional[str] = None  # WEIGHTED: its weights feature
  images: Optional[Tuple[str, str]] = None  # IMAGE: its (mean, std) features, if any

  @property
  def sparse(self):
    return self.kind in SPARSE_KINDS



def categorical_size(feature):
  """Number of ids of a categorical int schema feature, or None for a numeric one."""
  if feature.type == schema_pb2.INT and feature.HasField('int_domain'):
    domain = feature.int_domain
    if domain.is_categorical or domain.max > 0:
      return int(domain.max) + 1
  return None


def schema_features(schema):
  """{feature name: schema feature}, ragged features under their own name (TF Transform records
  a ragged output `x` as the schema feature `x$ragged_values`)."""
  found = {}
  for feature in schema.feature:
    found[feature.name.split('$')[0]] = feature
  return found


def describe(spec):
  """A feature spec in a user's words: 'variable-length int64', 'dense float32 [28, 28]'."""
  if isinstance(spec, tf.io.FixedLenFeature):
    shape = f' {list(spec.shape)}' if spec.shape else ''
    return f'dense {spec.dtype.name}{shape}'
  if isinstance(spec, tf.io.VarLenFeature):
    return f'variable-length {spec.dtype.name}'
  if isinstance(spec, tf.io.RaggedFeature):
    if not spec.partitions:
      return f'variable-length {spec.dtype.name} (ragged)'
    return f'ragged {spec.dtype.name} with {len(spec.partitions) + 1} variable-length dimensions'
  if isinstance(spec, tf.io.SparseFeature):
    return (f'sparse {spec.dtype.name} '
            f'{list(spec.size) if isinstance(spec.size, (list, tuple)) else [spec.size]}')
  return type(spec).__name__


def _refuse(where, name, spec, why, what_to_do):
  raise UserError(f'{where}: feature {name!r} ({describe(spec)}) {why}; {what_to_do}, or '
                  f'leave it out with --exclude-features {name}')


def non_finite(stats):
  """How many NaN or infinite values the run's statistics counted for a feature (the pipeline's
  statistics keep them out of every bin and of the mean); 0 without statistics."""
  if stats is None:
    return 0
  return sum(h.num_nan + h.num_undefined for h in stats.histograms[:1])


def classify(schema, feature_spec, label_key, where, weighted=None, exclude=(),
             statistics=None):
  """{name: Feature} for every transformed feature but the label and `exclude`d ones.

  `weighted`: {ids feature: weights feature} (the dataset module's WEIGHTED_FEATURES).
  `statistics`: {feature: NumericStatistics of the train split}: features with NaN or infinite
  values are refused, and WEIGHTED ids whose schema has no domain (tft.tfidf records none) get
  the largest id + 1 as their size. Raises UserError for what cannot be used.
  """
  statistics = statistics or {}
  weighted = dict(weighted or {})
  unknown = sorted(set(exclude) - set(feature_spec))
  if unknown:
    raise UserError(f'--exclude-features {unknown[0]}: the preprocessing_fn outputs no such '
                    f'feature (it outputs {", ".join(sorted(feature_spec))})')
  for ids, weights in sorted(weighted.items()):
    for name in (ids, weights):
      if name not in feature_spec:
        raise UserError(f'{where}: WEIGHTED_FEATURES names {name!r}, which the '
                        'preprocessing_fn does not output')
  by_name = schema_features(schema)
  weights_of = {w: i for i, w in weighted.items()}
  specs = {n: s for n, s in feature_spec.items() if n != label_key and n not in exclude}
  images = _image_companions(specs)
  stats_of = {s for pair in images.values() if pair for s in pair}
  result = {}
  for name, spec in sorted(specs.items()):
    dtype = spec.dtype
    schema_feature = by_name.get(name)
    size = categorical_size(schema_feature) if schema_feature is not None else None
    if dtype == tf.string:
      _refuse(where, name, spec, 'holds strings, which a model cannot learn from',
              _WHAT_TO_DO['string'])
    if isinstance(spec, tf.io.FixedLenFeature):
      shape = tuple(spec.shape)
      if name in images:
        result[name] = Feature(name, IMAGE, dtype, shape, images=images[name])
      elif name in stats_of:
        result[name] = Feature(name, IMAGE_STATS, dtype, shape)
      elif len(shape) > 3:
        _refuse(where, name, spec, f'has rank {len(shape)}', 'reshape it to at most 3 '
                'dimensions (an image is [height, width, channels])')
      elif size is not None and dtype == tf.int64 and len(shape) <= 1:
        result[name] = Feature(name, CATEGORICAL, dtype, shape, size=size)
      else:
        result[name] = Feature(name, NUMBER, dtype, shape)
      if name in weighted or name in weights_of:
        raise UserError(f'{where}: WEIGHTED_FEATURES pairs {name!r}, a dense feature; pairs '
                        'are of variable-length ids and weights (tft.tfidf outputs)')
      continue
    if isinstance(spec, tf.io.RaggedFeature) and spec.partitions:
      _refuse(where, name, spec, 'has more than one variable-length dimension', 'flatten it to '
              'one level (RaggedTensor.merge_dims) or pad it to a dense shape (.to_tensor())')
    if isinstance(spec, tf.io.SparseFeature) and len(
        spec.index_key if isinstance(spec.index_key, (list, tuple)) else [spec.index_key]) > 1:
      _refuse(where, name, spec, 'is sparse in more than one dimension', 'reshape it to one '
              'variable-length dimension')
    if name in weights_of:
      if dtype != tf.float32:
        raise UserError(f'{where}: WEIGHTED_FEATURES pairs {weights_of[name]!r} with '
                        f'{name!r}, which is {describe(spec)}; weights must be float32')
      result[name] = Feature(name, WEIGHTS, dtype)
    elif name in weighted:
      if dtype != tf.int64:
        raise UserError(f'{where}: WEIGHTED_FEATURES pairs {name!r} ({describe(spec)}) with '
                        'weights; the ids must be int64')
      if size is None:  # tft.tfidf records no domain: the train split's largest id + 1, plus
        if name not in statistics:  # one row for any larger id seen later
          _refuse(where, name, spec, 'has no domain and no statistics', _WHAT_TO_DO['int_ids'])
        size = int(statistics[name].max) + 2
      result[name] = Feature(name, WEIGHTED, dtype, size=size, weights=weighted[name])
    elif dtype == tf.int64 and size is not None:
      result[name] = Feature(name, IDS, dtype, size=size)
    elif dtype == tf.int64:
      _refuse(where, name, spec, 'has no categorical domain, so the model cannot tell ids from '
              'numbers or know how many ids there are', _WHAT_TO_DO['int_ids'])
    else:
      result[name] = Feature(name, NUMBERS, dtype)
  for name in sorted(result):
    bad = non_finite(statistics.get(name))
    if bad:
      _refuse(where, name, specs[name], f'is NaN or infinite {bad} times in the train split',
              'fix the preprocessing_fn (tf.math.log of values <= 0? a division by zero?)')
  if not any(f.kind not in (IMAGE_STATS, WEIGHTS) for f in result.values()):
    raise UserError(f'{where}: no feature is left to learn from besides the label '
                    f'{label_key!r}; the preprocessing_fn must output at least one feature')
  return result


def _image_companions(specs):
  """{image feature: (mean feature, std feature) or None} for every dense rank-3 feature."""
  images = {}
  for name, spec in specs.items():
    if isinstance(spec, tf.io.FixedLenFeature) and len(spec.shape) == 3:
      base = name[:-len('_xf')] if name.endswith('_xf') else name
      stats = (f'{base}_mean_xf', f'{base}_std_xf')
      images[name] = stats if all(s in specs for s in stats) else None
  return images


def to_model_inputs(features, kinds: Mapping[str, Feature]):
  """What the model takes, from parsed (training) or transformed (serving) features: only the
  features in `kinds`, ragged ones as SparseTensors, SparseFeature values as they are."""
  inputs = {}
  for name in kinds:
    value = features[name]
    inputs[name] = value.to_sparse() if isinstance(value, tf.RaggedTensor) else value
  return inputs
