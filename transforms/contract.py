"""The dataset contract: loading and checking a module that describes one dataset.

A dataset module defines, at module level:
  RAW_FEATURE_SPEC  name -> tf.io.FixedLenFeature([], dtype[, default_value]) or
                    tf.io.VarLenFeature(dtype)
  LABEL_KEY         the raw column holding the label
  preprocessing_fn  inputs -> transformed features (TF Transform)
  CSV_COLUMNS       optional: every column of the CSV files in order, for files without a header row
  NA_VALUES         optional: cell values that mean "missing" besides the empty cell (e.g. ('?',))
  LABEL_CLASSES     optional: the class names of label ids 0, 1, ... (for predictions)
  TRANSFORMED_LABEL_KEY  optional: the preprocessing_fn output the trainer learns (default
                    `<LABEL_KEY>_xf` if the preprocessing_fn outputs it, else `<LABEL_KEY>`)
  WEIGHTED_FEATURES optional: {ids output: weights output} pairs (tft.tfidf's two SparseTensors)
                    that the model combines as one weighted bag of ids
  inverse_label_fn  optional: y -> the raw label's units (TF ops), for a label transformed for
                    training (a log price): the exported model serves inverse_label_fn(prediction)

It is named either as an importable module (`transforms.census`) or as a path to a `.py` file
anywhere, the way TFX's Transform component takes a module file.
"""

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Callable, Mapping, Optional, Sequence

import tensorflow as tf

from transforms.errors import UserError

_DTYPES = (tf.int64, tf.float32, tf.string)


@dataclasses.dataclass(frozen=True)
class Column:
  """One raw feature as the CSV reader sees it; plain data so it pickles to any worker."""
  name: str
  dtype: str  # 'int64' | 'float32' | 'string'
  varlen: bool  # VarLenFeature: an empty cell is a missing value
  default: Optional[object]  # FixedLenFeature default_value, filled at read time


@dataclasses.dataclass(frozen=True)
class Contract:
  name: str  # what the user passed (module name or file path)
  raw_feature_spec: Mapping[str, object]
  label_key: str
  preprocessing_fn: Callable
  csv_columns: Optional[Sequence[str]]
  na_values: Sequence[str]
  label_classes: Optional[Sequence[str]] = None
  training: 'TrainingHints' = None

  @property
  def columns(self):
    return tuple(
        Column(name, spec.dtype.name, isinstance(spec, tf.io.VarLenFeature),
               _plain_default(getattr(spec, 'default_value', None)))
        for name, spec in self.raw_feature_spec.items())

  @property
  def schema_feature_spec(self):
    """The spec TFT sees (without_defaults of the raw feature spec)."""
    return without_defaults(self.raw_feature_spec)


def without_defaults(feature_spec):
  """A raw feature spec as TFT sees it: defaults removed, because they are filled while reading
  (TFT's schema has no place for a FixedLenFeature default)."""
  return {name: (tf.io.FixedLenFeature(spec.shape, spec.dtype)
                 if isinstance(spec, tf.io.FixedLenFeature) else spec)
          for name, spec in feature_spec.items()}


def _plain_default(value):
  if value is None:
    return None
  if isinstance(value, (list, tuple)):
    value = value[0] if len(value) == 1 else value
  if isinstance(value, bytes):
    return value.decode('utf-8')
  return value


@dataclasses.dataclass(frozen=True)
class TrainingHints:
  """What a dataset module tells the trainer beyond its preprocessing_fn (all optional)."""
  transformed_label_key: Optional[str] = None
  weighted_features: Mapping[str, str] = dataclasses.field(default_factory=dict)
  inverse_label_fn: Optional[Callable] = None

  def manifest_entries(self):
    """The manifest's part of these hints (the inverse function is saved beside it:
    pipelines.job.save_label_inverse)."""
    return {'transformed_label_key': self.transformed_label_key,
            'weighted_features': dict(self.weighted_features)}


def training_hints(module, where):
  """Reads and checks TRANSFORMED_LABEL_KEY, WEIGHTED_FEATURES and inverse_label_fn."""
  key = getattr(module, 'TRANSFORMED_LABEL_KEY', None)
  if key is not None and (not isinstance(key, str) or not key):
    raise UserError(f'{where}: TRANSFORMED_LABEL_KEY must be the name of a preprocessing_fn '
                    f'output (a string), not {key!r}')
  pairs = getattr(module, 'WEIGHTED_FEATURES', None) or {}
  if not isinstance(pairs, Mapping) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in pairs.items()):
    raise UserError(f'{where}: WEIGHTED_FEATURES must be a dict of ids output -> weights output '
                    "names, e.g. {'title_ids_xf': 'title_weights_xf'}")
  clash = sorted(set(pairs) & set(pairs.values()))
  if clash or len(set(pairs.values())) != len(pairs):
    raise UserError(f'{where}: WEIGHTED_FEATURES pairs each ids output with weights of its own '
                    f'({clash[0] if clash else "a weights output"!r} is used twice)')
  inverse = getattr(module, 'inverse_label_fn', None)
  if inverse is not None and not callable(inverse):
    raise UserError(f'{where}: inverse_label_fn must be a function y -> raw label units')
  return TrainingHints(key, dict(pairs), inverse)


def import_module(module_or_file, flag='--transforms', pickle_by_value=False):
  """Imports a module by name or from a .py file anywhere. `pickle_by_value`: the pipelines'
  remote workers cannot import a file on this machine, so its functions travel by value
  (this imports Beam; the trainer leaves it off)."""
  looks_like_file = module_or_file.endswith('.py') or os.sep in module_or_file
  if looks_like_file:
    path = os.path.abspath(module_or_file)
    if not os.path.isfile(path):
      raise UserError(f'{flag} {module_or_file}: no such file; give a module name '
                      '(e.g. transforms.census) or a path to a .py file')
    # A stable, unique module name per file, so two module files named alike do not collide.
    digest = hashlib.sha1(path.encode()).hexdigest()[:10]
    name = f'_user_transforms_{os.path.splitext(os.path.basename(path))[0]}_{digest}'
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
      spec.loader.exec_module(module)
    except Exception as e:  # the user's code: report where, not our stack
      del sys.modules[name]
      raise UserError(f'{flag} {module_or_file}: importing it failed: '
                      f'{type(e).__name__}: {e}') from e
    if pickle_by_value:
      # Workers in other processes (multi-process runner, portable runner, Dataflow) cannot
      # import a module that lives at a path on this machine: pickle its functions by value.
      from apache_beam.internal.cloudpickle import cloudpickle
      cloudpickle.register_pickle_by_value(module)
    return module
  try:
    return importlib.import_module(module_or_file)
  except ModuleNotFoundError as e:
    raise UserError(f'{flag} {module_or_file}: no module named {e.name!r}; give an importable '
                    'module or a path to a .py file') from e
  except Exception as e:  # the user's code: report where, not our stack
    raise UserError(f'{flag} {module_or_file}: importing it failed: '
                    f'{type(e).__name__}: {e}') from e


def load(module_or_file):
  """Imports and checks a dataset module; every problem is a UserError naming what to fix."""
  module = import_module(module_or_file, pickle_by_value=True)
  where = f'--transforms {module_or_file}'

  fn = getattr(module, 'preprocessing_fn', None)
  if not callable(fn):
    raise UserError(f'{where} defines no preprocessing_fn(inputs); add one (see README, '
                    '"The dataset contract")')
  spec = getattr(module, 'RAW_FEATURE_SPEC', None)
  if not isinstance(spec, Mapping) or not spec:
    raise UserError(f'{where} defines no RAW_FEATURE_SPEC dict of name -> tf.io feature')
  for name, feature in spec.items():
    if isinstance(feature, tf.io.FixedLenFeature):
      if tuple(feature.shape) not in ((), (1,)):
        raise UserError(f'{where}: RAW_FEATURE_SPEC[{name!r}] has shape {list(feature.shape)}; '
                        'a CSV cell holds one value, use shape []')
    elif not isinstance(feature, tf.io.VarLenFeature):
      raise UserError(f'{where}: RAW_FEATURE_SPEC[{name!r}] is {type(feature).__name__}; use '
                      'tf.io.FixedLenFeature or tf.io.VarLenFeature')
    if feature.dtype not in _DTYPES:
      raise UserError(f'{where}: RAW_FEATURE_SPEC[{name!r}] has dtype {feature.dtype.name}; use '
                      'tf.int64, tf.float32 or tf.string')
  label = getattr(module, 'LABEL_KEY', None)
  if label not in spec:
    raise UserError(f'{where}: LABEL_KEY {label!r} is not a key of RAW_FEATURE_SPEC')
  columns = getattr(module, 'CSV_COLUMNS', None)
  if columns is not None:
    columns = tuple(columns)
    missing = [k for k in spec if k not in columns]
    if missing:
      raise UserError(f'{where}: CSV_COLUMNS lacks {missing}, which RAW_FEATURE_SPEC declares')
    if len(set(columns)) != len(columns):
      raise UserError(f'{where}: CSV_COLUMNS names a column twice')
  na_values = tuple(getattr(module, 'NA_VALUES', ()))
  classes = getattr(module, 'LABEL_CLASSES', None)
  classes = [str(c) for c in classes] if classes is not None else None
  return Contract(module_or_file, dict(spec), label, fn, columns, na_values, classes,
                  training_hints(module, where))


@dataclasses.dataclass(frozen=True)
class ImageContract:
  """An image dataset module, loaded for the size and channels a run asks for."""
  name: str  # what the user passed (module name or file path)
  raw_feature_spec: Mapping[str, object]  # exactly 'image' and 'label', as the image reader gives
  preprocessing_fn: Callable
  size: tuple  # (height, width), or (None, None) for a fixed preprocessing_fn without DEFAULT_SIZE
  channels: int
  training: 'TrainingHints' = None


def load_images(module_or_file, image_size=None, channels=None):
  """Imports and checks an image dataset module (pipelines.images --transforms): either
  make_preprocessing_fn(height, width, channels), called with `image_size` and `channels` (else the
  module's DEFAULT_SIZE and DEFAULT_CHANNELS), or a fixed preprocessing_fn. Every problem is a
  UserError naming what to fix."""
  module = import_module(module_or_file, pickle_by_value=True)
  where = f'--transforms {module_or_file}'
  hints = training_hints(module, where)
  spec = getattr(module, 'RAW_FEATURE_SPEC', None)
  if not isinstance(spec, dict) or set(spec) != {'image', 'label'}:
    raise UserError(f'{where}: an image module\'s RAW_FEATURE_SPEC must have exactly the '
                    "features 'image' and 'label' (tf.string), which the image reader produces")
  height, width = image_size or getattr(module, 'DEFAULT_SIZE', (None, None))
  chosen_channels = channels or getattr(module, 'DEFAULT_CHANNELS', 3)
  make = getattr(module, 'make_preprocessing_fn', None)
  if callable(make):
    if height is None:
      raise UserError(f'{where} has no DEFAULT_SIZE: pass --image-size HEIGHT WIDTH')
    fn = make(height, width, chosen_channels)
  else:
    fn = getattr(module, 'preprocessing_fn', None)
    if not callable(fn):
      raise UserError(f'{where} defines neither make_preprocessing_fn(height, width, '
                      'channels) nor preprocessing_fn(inputs)')
    if image_size or channels:
      raise UserError(f'{where} has a fixed preprocessing_fn: --image-size and --channels '
                      'need make_preprocessing_fn(height, width, channels)')
  return ImageContract(module_or_file, dict(spec), fn, (height, width), chosen_channels, hints)
