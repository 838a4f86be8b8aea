"""The contract between a pipeline run and everything that reads its output directory.

A run (python -m pipelines.tabular or pipelines.images) publishes DIR:

  train-SSSSS-of-NNNNN.tfrecord.gz, eval-...   tf.train.Example shards of the transformed splits
  transform_fn/, transformed_metadata/         TF Transform's transform graph and output schema
  label_inverse/                               the dataset module's inverse_label_fn (optional)
  errors/<split>.jsonl                         the dead letters: records that could not be read
  statistics/<split>_<stage>.pb, summary.json  statistics of the raw and transformed splits
  report.html                                  the run's report
  manifest.json                                written last: its presence means "complete"

This module owns those names and the manifest, as a typed `Manifest` with one writer
(`Manifest.to_json`, called by the pipelines' publication) and one reader (`read_manifest`, used
by the trainer, serving and the tests). It imports neither Beam nor TensorFlow (TensorFlow only
inside the two functions that need its file system and feature specs), so both halves use it.
"""

import dataclasses
import json
from typing import Any, Dict, List, Optional

from transforms.errors import UserError

MANIFEST = 'manifest.json'
TRANSFORM_FN = 'transform_fn'
TRANSFORMED_METADATA = 'transformed_metadata'
LABEL_INVERSE = 'label_inverse'  # the dataset module's inverse_label_fn, a SavedModel
ERRORS = 'errors'
STATISTICS = 'statistics'
SUMMARY = f'{STATISTICS}/summary.json'
REPORT = 'report.html'
STAGING = '.staging'  # where a run works until it publishes
SPLITS = ('train', 'eval')
# Entries of DIR that a run owns and --overwrite replaces; anything else in DIR is left alone.
OWNED = tuple(f'{split}-*-of-*.tfrecord*' for split in SPLITS) + (
    TRANSFORM_FN, TRANSFORMED_METADATA, ERRORS, STATISTICS, REPORT, LABEL_INVERSE, MANIFEST)


def shard_suffix(compression):
  return '.tfrecord.gz' if compression == 'gzip' else '.tfrecord'


def shard_name(prefix, index, num_shards, compression):
  """`prefix` (a split's name, or a path ending in it) and the shard's place among its split's."""
  return f'{prefix}-{index:05d}-of-{num_shards:05d}{shard_suffix(compression)}'


def shard_pattern(split, num_shards, compression):
  """The glob of a split's shards, relative to DIR (the manifest's `files`)."""
  return f'{split}-*-of-{num_shards:05d}{shard_suffix(compression)}'


def errors_file(split):
  return f'{ERRORS}/{split}.jsonl'


def statistics_file(split, stage):
  """`stage`: 'raw' or 'transformed'."""
  return f'{STATISTICS}/{split}_{stage}.pb'


@dataclasses.dataclass(frozen=True)
class RawColumn:
  """A raw feature as the run read it, so that serving parses raw inputs exactly the same way."""
  name: str
  dtype: str  # 'int64', 'float32' or 'string'
  varlen: bool = False
  default: Any = None  # what a missing value became (None: no default, the value is required)
  binary: bool = False  # encoded bytes (an image), not text


@dataclasses.dataclass(frozen=True)
class SplitEntry:
  """What the run did with one split, and where its shards are."""
  rows_read: int
  rows_written: int
  rows_rejected: int
  rejected_by_kind: Dict[str, int]
  files: str  # shard_pattern(), relative to DIR
  num_shards: int
  bytes_written: Optional[int] = None  # image runs
  bytes_per_image: Optional[float] = None  # image runs


@dataclasses.dataclass(frozen=True)
class Manifest:
  """DIR/manifest.json as a typed object. Fields a reader does not know are kept in `extra`, so a
  manifest read and written again loses nothing."""
  pipeline: str  # 'tabular' or 'images'
  transforms: str  # the dataset module as given
  label_key: str
  raw_columns: List[RawColumn]
  splits: Dict[str, SplitEntry]
  inputs: Dict[str, List[str]]
  label_classes: Optional[List[str]] = None
  csv_columns: Optional[List[str]] = None
  na_values: List[str] = dataclasses.field(default_factory=list)
  image: Optional[Dict[str, Any]] = None  # image runs: size, channels, limits, input features
  transformed_label_key: Optional[str] = None
  weighted_features: Optional[Dict[str, str]] = None
  label_inverse: Optional[str] = None  # LABEL_INVERSE where the module has an inverse_label_fn
  eval_fraction: float = 0.0
  compression: str = 'gzip'
  options: Optional[Dict[str, Any]] = None  # the command line: argv and Beam's flags
  versions: Optional[Dict[str, str]] = None  # of TensorFlow, TF Transform, Beam, ...
  run_id: Optional[str] = None
  elapsed_seconds: Optional[float] = None
  statistics: Optional[Dict[str, Any]] = None  # files, summary, drifting_features (the report)
  # --analysis-cache: its directory, and each train span: input, key, from_cache, read
  analysis_cache: Optional[Dict[str, Any]] = None
  transform_of: Optional[str] = None  # a transform-only run: the run whose graph it applied
  report: Optional[str] = None
  complete: bool = False
  published: Optional[str] = None
  extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def to_dict(self):
    d = dataclasses.asdict(self)
    extra = d.pop('extra')
    return {**extra, **d}

  def to_json(self):
    return json.dumps(self.to_dict(), indent=2, sort_keys=True) + '\n'

  @classmethod
  def from_dict(cls, d):
    fields = {f.name for f in dataclasses.fields(cls)} - {'extra'}
    known = {k: v for k, v in d.items() if k in fields}
    known['raw_columns'] = [RawColumn(**c) for c in d.get('raw_columns', [])]
    known['splits'] = {s: SplitEntry(**e) for s, e in d.get('splits', {}).items()}
    return cls(**known, extra={k: v for k, v in d.items() if k not in fields})

  def raw_feature_spec(self, with_label=True):
    """The tf.io parse spec of raw Examples: missing values as the pipeline filled them."""
    import tensorflow as tf  # only this method needs it
    spec = {}
    for c in self.raw_columns:
      if c.name == self.label_key and not with_label:
        continue
      dtype = tf.as_dtype(c.dtype)
      spec[c.name] = (tf.io.VarLenFeature(dtype) if c.varlen else
                      tf.io.FixedLenFeature([], dtype, default_value=c.default))
    return spec



def read_manifest(directory, flag='--transformed'):
  """The Manifest of a complete pipeline output in `directory` (local, gs://, ... : TensorFlow's
  file systems); a UserError naming `flag` where it is not one."""
  import tensorflow as tf  # its file systems
  path = f'{directory.rstrip("/")}/{MANIFEST}'
  if not tf.io.gfile.exists(path):
    raise UserError(
        f'{flag} {directory} holds no {MANIFEST}: it is not a complete pipeline output; run '
        'python -m pipelines.tabular (or pipelines.images) first, or wait for it to finish')
  try:
    with tf.io.gfile.GFile(path) as f:
      manifest = Manifest.from_dict(json.load(f))
  except (ValueError, TypeError) as e:
    raise UserError(f'{flag} {directory}: {MANIFEST} is not a manifest this version '
                    f'reads ({e}); run the pipeline again') from None
  if not tf.io.gfile.exists(f'{directory.rstrip("/")}/{TRANSFORM_FN}'):
    raise UserError(f'{flag} {directory} has a manifest but no {TRANSFORM_FN}/')
  return manifest
