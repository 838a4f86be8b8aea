"""tf.data input over the TFRecord shards a pipeline published."""

import os

import tensorflow as tf

from transforms.errors import UserError

LABEL_SUFFIX = '_xf'



def transformed_label_key(manifest, feature_spec, where, flag=None):
  """The preprocessing_fn output that is the label: --label, else the dataset module's
  TRANSFORMED_LABEL_KEY, else `<LABEL_KEY>_xf`, else `<LABEL_KEY>` itself (a label passed
  through unchanged)."""
  for declared, what in ((flag, '--label'), (manifest.transformed_label_key,
                                             'TRANSFORMED_LABEL_KEY')):
    if declared:
      if declared not in feature_spec:
        raise UserError(f'{where}: {what} {declared!r} is not an output of the preprocessing_fn '
                        f'(it outputs {", ".join(sorted(feature_spec))})')
      return declared
  raw = manifest.label_key
  for candidate in (raw + LABEL_SUFFIX, raw):
    if candidate in feature_spec:
      return candidate
  raise UserError(f'{where}: the preprocessing_fn outputs no label: neither {raw + LABEL_SUFFIX!r} '
                  f'nor {raw!r} (it outputs {", ".join(sorted(feature_spec))}); output one of '
                  'them, or name the label output in TRANSFORMED_LABEL_KEY')


def split_files(transformed_dir, manifest, split):
  if split not in manifest.splits:
    raise UserError(f'--transformed {transformed_dir} has no {split} split '
                    f'(it has {", ".join(manifest.splits)})')
  entry = manifest.splits[split]
  files = tf.io.gfile.glob(os.path.join(transformed_dir, entry.files))
  if len(files) != entry.num_shards:
    raise UserError(f'--transformed {transformed_dir}: {split} should have '
                    f'{entry.num_shards} shards, found {len(files)}')
  return sorted(files)


def make_dataset(files, feature_spec, label_key, batch_size, compression, shuffle=True,
                 seed=None, shuffle_window=8192, augment=(), image_keys=(),
                 prepare=lambda features, label: (features, label)):
  """Batches of (features, label); `prepare(features, label)` makes them what the model takes.

  Every per-record tf.data step costs about a microsecond of Python-free but per-element work,
  which on a small machine is a fifth of the whole read (measured by benchmarks/input_pipeline.py).
  So records are handled a window at a time and shuffled in the graph:
    * the file order is reshuffled every epoch;
    * records are read with a 1 MiB buffer (faster than the default here), in parallel across
      files only where there are cores to spare (parallel reads were slower on 2 cores);
    * training reads take `shuffle_window` serialized records at once, permute them, parse
      them with one vectorized parse_example (only the features in `feature_spec`, which holds
      the label) and cut the window into batches: each batch is a uniform sample of its
      window, as a record shuffle buffer of that size would give. Records are permuted before
      parsing, so every kind of feature (dense, sparse, ragged) is shuffled alike;
    * evaluation reads batch then parse, in file order;
    * `augment` ('flip', 'crop') randomly alters the `image_keys` features of training batches
      only (never evaluation or serving).
  """
  compression_type = 'GZIP' if compression == 'gzip' else ''
  names = tf.data.Dataset.from_tensor_slices(files)
  if shuffle:
    names = names.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  spare_cores = (os.cpu_count() or 1) // 4
  parallel = min(len(files), spare_cores) if spare_cores > 1 else None
  records = tf.data.TFRecordDataset(names, compression_type=compression_type,
                                    buffer_size=1 << 20, num_parallel_reads=parallel)
  parse = lambda r: tf.io.parse_example(r, feature_spec)  # noqa: E731
  if shuffle:
    window = max(batch_size, shuffle_window)
    ds = records.batch(window).map(lambda r: parse(tf.random.shuffle(r, seed=seed))).rebatch(
        batch_size)
  else:
    ds = records.batch(batch_size).map(parse)
  if augment and shuffle:
    ds = ds.map(lambda features: _augment(features, image_keys, augment, seed),
                num_parallel_calls=tf.data.AUTOTUNE)
  return ds.map(lambda features: prepare(*_split_label(features, label_key))).prefetch(
      tf.data.AUTOTUNE)


AUGMENTATIONS = ('flip', 'crop')


def _augment(features, image_keys, augment, seed):
  """Per-image random left-right flips and/or random crops of the image padded by ~10% on each
  side (mirrored edges), back to its own size. Off by default: flips break digits and text."""
  features = dict(features)
  for key in image_keys:
    images = features[key]
    if 'flip' in augment:
      images = tf.image.random_flip_left_right(images, seed=seed)
    if 'crop' in augment:
      height, width, channels = images.shape[1:]
      pad = max(1, round(0.1 * min(height, width)))
      padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode='SYMMETRIC')
      images = tf.map_fn(
          lambda image, h=height, w=width, c=channels: tf.image.random_crop(image, [h, w, c]),
          padded)
    features[key] = images
  return features


def _split_label(features, label_key):
  label = features.pop(label_key)
  return features, label
