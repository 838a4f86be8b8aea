"""USGS earthquakes (data/usgs_earthquakes): regress an event's magnitude from how it was
recorded. Every kind of feature the trainer understands, on real data:

  python -m pipelines.tabular --transforms transforms.earthquakes \\
      --train data/usgs_earthquakes/usgs_earthquakes.csv --eval-fraction 0.2 --output out/quakes
  python -m trainer.task --transformed out/quakes --model-dir out/models   # float label: regression

  numbers           latitude, longitude, depth: z-scores; the hour of day as a [2] vector
                    (sine and cosine, so 23h and 0h are neighbours)
  categories        magType, net, type, status, region: vocabulary ids
  multivalent ids   sources, types (`ak|us`): split on '|', one vocabulary each; the model
                    averages their embeddings
  weighted ids      the words of `place` ("9km NNE of Indio, CA"): TF-IDF (transforms/text.py)
  variable-length   nst, gap, dmin, rms may be missing: kept as variable-length floats (0 or 1
  floats            value per row), which the model summarizes (mean, min, max, count)
"""

import math

import tensorflow as tf
import tensorflow_transform as tft

from transforms import text

LABEL_KEY = 'mag'
CATEGORICAL_KEYS = ('magType', 'net', 'type', 'status', 'region')
MULTIVALENT_KEYS = ('sources', 'types')
NUMERIC_KEYS = ('latitude', 'longitude', 'depth')
OPTIONAL_KEYS = ('nst', 'gap', 'dmin', 'rms')  # empty where the network reports none

RAW_FEATURE_SPEC = {
    'time': tf.io.FixedLenFeature([], tf.string),
    **{key: tf.io.FixedLenFeature([], tf.float32) for key in NUMERIC_KEYS},
    **{key: tf.io.VarLenFeature(tf.float32) for key in OPTIONAL_KEYS},
    **{key: tf.io.FixedLenFeature([], tf.string) for key in CATEGORICAL_KEYS + MULTIVALENT_KEYS},
    'tsunami': tf.io.FixedLenFeature([], tf.int64, default_value=0),
    'place': tf.io.FixedLenFeature([], tf.string, default_value=''),
    LABEL_KEY: tf.io.FixedLenFeature([], tf.float32),
}
WEIGHTED_FEATURES = {'place_ids_xf': 'place_weights_xf'}


def hour_of_day(iso_time):
  """'2018-02-05T18:06:09.270Z' -> [batch, 2]: sine and cosine of the hour (UTC)."""
  hours = tf.strings.to_number(tf.strings.substr(iso_time, 11, 2), tf.float32)
  minutes = tf.strings.to_number(tf.strings.substr(iso_time, 14, 2), tf.float32)
  angle = 2 * math.pi * (hours + minutes / 60) / 24
  return tf.stack([tf.sin(angle), tf.cos(angle)], axis=1)


def preprocessing_fn(inputs):
  outputs = {'hour_xf': hour_of_day(inputs['time']),
             'tsunami_xf': tf.cast(inputs['tsunami'], tf.float32)}
  for key in NUMERIC_KEYS:
    outputs[f'{key}_xf'] = tft.scale_to_z_score(inputs[key])
  for key in OPTIONAL_KEYS:
    outputs[f'{key}_xf'] = inputs[key]  # a SparseTensor: a row without a value has none
  for key in CATEGORICAL_KEYS:
    outputs[f'{key}_xf'] = tft.compute_and_apply_vocabulary(inputs[key], num_oov_buckets=1,
                                                            vocab_filename=key)
  for key in MULTIVALENT_KEYS:
    values = tf.strings.split(inputs[key], '|').to_sparse()
    outputs[f'{key}_xf'] = tft.compute_and_apply_vocabulary(values, num_oov_buckets=1,
                                                            vocab_filename=key)
  outputs['place_ids_xf'], outputs['place_weights_xf'] = text.tfidf_features(
      inputs['place'], 'place', top_k=500)
  outputs[f'{LABEL_KEY}_xf'] = inputs[LABEL_KEY]
  return outputs
