"""Sample images of an image run for the report: raw ones as read and transformed ones as the
model sees them, from the samples pipelines/statistics/ keeps, and the per-channel statistics
the transform computed."""

import numpy as np

from pipelines.sources.image_files import JPEG_SIGNATURE, PNG_SIGNATURE

SAMPLE_IMAGES = 12


def sample_images(samples, tft_output, manifest):
  """For image runs: {'raw': [(caption, png)], 'transformed': [...], 'channels': [...]}."""
  if manifest.pipeline != 'images':
    return None
  import tensorflow as tf
  spec = tft_output.transformed_feature_spec()
  result = {'raw': [], 'transformed': [], 'channels': []}
  raw = samples.get('train', {}).get('raw')
  if raw is not None:
    for row in raw.slice(0, SAMPLE_IMAGES).to_pylist():
      data = (row.get('image') or [None])[0]
      if data and (data.startswith(PNG_SIGNATURE) or data.startswith(JPEG_SIGNATURE)):
        image = tf.io.decode_image(data, expand_animations=False)
        if max(image.shape[:2]) > 128:
          image = tf.cast(tf.image.resize(image, [128, 128], preserve_aspect_ratio=True,
                                          antialias=True), tf.uint8)
        result['raw'].append((_label(row.get('label')), tf.io.encode_png(image).numpy()))
    result['raw'].sort(key=lambda pair: pair[0])
  transformed = samples.get('train', {}).get('transformed')
  images = [k for k, v in spec.items() if len(getattr(v, 'shape', ())) == 3 and
            v.shape[-1] in (1, 3, 4)]
  if transformed is not None and images:
    key = images[0]
    shape = list(spec[key].shape)
    for row in transformed.slice(0, SAMPLE_IMAGES).to_pylist():
      pixels = np.clip(np.asarray(row[key]).reshape(shape), 0, 255).astype(np.uint8)
      label = row.get('label_xf')
      result['transformed'].append((_label(label), tf.io.encode_png(pixels).numpy()))
    result['transformed'].sort(key=lambda pair: int(pair[0]) if pair[0].lstrip('-').isdigit()
                               else 0)
    result['transformed'] = [(f'id {c}', png) for c, png in result['transformed']]
    first = transformed.slice(0, 1).to_pylist()
    prefix = key[:-len('_xf')] if key.endswith('_xf') else key
    if first and f'{prefix}_mean_xf' in first[0] and f'{prefix}_std_xf' in first[0]:
      result['channels'] = list(zip(first[0][f'{prefix}_mean_xf'],
                                    first[0][f'{prefix}_std_xf']))
  return result


def _label(value):
  while isinstance(value, list):
    value = value[0] if value else None
  if isinstance(value, bytes):
    return value.decode('utf-8', 'replace')
  return '' if value is None else str(value)

