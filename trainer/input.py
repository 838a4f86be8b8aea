"""tf.data input over the TFRecord shards a pipeline published."""

import json
import os

import tensorflow as tf

MANIFEST = 'manifest.json'
LABEL_SUFFIX = '_xf'


class InputError(ValueError):
  """The --transformed directory is not a usable pipeline output (one line, for the user)."""


def read_manifest(transformed_dir):
  path = os.path.join(transformed_dir, MANIFEST)
  if not tf.io.gfile.exists(path):
    raise InputError(f'--transformed {transformed_dir} holds no {MANIFEST}: it is not a complete '
                     'pipeline output; run python -m pipelines.tabular first (or wait for it)')
  with tf.io.gfile.GFile(path) as f:
    manifest = json.load(f)
  if not tf.io.gfile.exists(os.path.join(transformed_dir, 'transform_fn')):
    raise InputError(f'--transformed {transformed_dir} has a manifest but no transform_fn/')
  return manifest


def transformed_label_key(manifest):
  return manifest['label_key'] + LABEL_SUFFIX


def split_files(transformed_dir, manifest, split):
  if split not in manifest['splits']:
    raise InputError(f'--transformed {transformed_dir} has no {split} split '
                     f'(it has {", ".join(manifest["splits"])})')
  files = tf.io.gfile.glob(os.path.join(transformed_dir, manifest['splits'][split]['files']))
  if len(files) != manifest['splits'][split]['num_shards']:
    raise InputError(f'--transformed {transformed_dir}: {split} should have '
                     f'{manifest["splits"][split]["num_shards"]} shards, found {len(files)}')
  return sorted(files)


def make_dataset(files, feature_spec, label_key, batch_size, compression, shuffle=True,
                 repeat=False, seed=None):
  """Batches of (features, label).

  Shards are read in parallel and interleaved; records are batched *before* parsing so that one
  vectorized parse_example handles a whole batch (parsing one record at a time costs several
  times more CPU).
  """
  compression_type = 'GZIP' if compression == 'gzip' else ''
  ds = tf.data.Dataset.from_tensor_slices(files)
  if shuffle:
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  ds = ds.interleave(
      lambda f: tf.data.TFRecordDataset(f, compression_type=compression_type),
      cycle_length=min(len(files), 8), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=not shuffle)
  if shuffle:
    ds = ds.shuffle(max(10 * batch_size, 10000), seed=seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  ds = ds.batch(batch_size, drop_remainder=False)
  ds = ds.map(lambda records: _split_label(tf.io.parse_example(records, feature_spec), label_key),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
  return ds.prefetch(tf.data.AUTOTUNE)


def _split_label(features, label_key):
  label = features.pop(label_key)
  return features, label
