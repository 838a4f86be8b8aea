"""Earthquake rows through a preprocessing_fn that outputs every kind the trainer must refuse or
treat with care: strings, ids without a domain, two-level ragged values, NaNs, and several candidate
labels (a float, ids with a domain of 12, 0/1 ints without one, negative ints, a bag of ids,
strings)."""

import tensorflow as tf
import tensorflow_transform as tft

from transforms.earthquakes import RAW_FEATURE_SPEC  # noqa: F401

LABEL_KEY = 'mag'


def preprocessing_fn(inputs):
  sources = tf.strings.split(inputs['sources'], '|')
  return {
      'mag_xf': inputs['mag'],
      'depth_xf': tft.scale_to_z_score(inputs['depth']),
      'log_depth_xf': tf.math.log(inputs['depth']),  # NaN or -inf where depth <= 0
      'net_ids_xf': tft.compute_and_apply_vocabulary(inputs['net'], vocab_filename='net'),
      'tsunami_xf': inputs['tsunami'],
      'tsunami_minus_one_xf': inputs['tsunami'] - 1,
      'sources_xf': tft.compute_and_apply_vocabulary(sources, vocab_filename='sources'),
      'net_xf': inputs['net'],
      'hashed_sources_xf': tf.strings.to_hash_bucket_fast(sources, 100).to_sparse(),
      'types_nested_xf': tf.cast(tf.strings.length(
          tf.strings.split(tf.strings.split(inputs['types'], '|'), '-')), tf.float32),
  }
