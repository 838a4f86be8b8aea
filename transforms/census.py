"""UCI Adult census income: the dataset contract and its preprocessing_fn.

Files have no header row (CSV_COLUMNS names the columns), pad every cell with a space, write `?`
for unknown values, and the test file ends labels with a dot (`>50K.`).
"""

import tensorflow as tf
import tensorflow_transform as tft

LABEL_KEY = 'income_bracket'
POSITIVE_LABEL = '>50K'
LABEL_CLASSES = ('<=50K', POSITIVE_LABEL)  # label ids 0 and 1

NUMERIC_FEATURE_KEYS = ('age', 'fnlwgt', 'education_num', 'capital_gain', 'capital_loss',
                        'hours_per_week')
CATEGORICAL_FEATURE_KEYS = ('workclass', 'education', 'marital_status', 'occupation',
                            'relationship', 'race', 'sex', 'native_country')
# Quantile buckets, besides the z-score, for the numbers whose effect is far from linear.
BUCKET_FEATURE_KEYS = {'age': 10, 'hours_per_week': 10}
# Values seen too rarely to learn from share the out-of-vocabulary bucket.
NUM_OOV_BUCKETS = 1

CSV_COLUMNS = ('age', 'workclass', 'fnlwgt', 'education', 'education_num', 'marital_status',
               'occupation', 'relationship', 'race', 'sex', 'capital_gain', 'capital_loss',
               'hours_per_week', 'native_country', LABEL_KEY)
NA_VALUES = ('?',)

RAW_FEATURE_SPEC = {
    **{key: tf.io.FixedLenFeature([], tf.int64) for key in NUMERIC_FEATURE_KEYS},
    # Any categorical cell may be unknown (`?`), so these are VarLen: an absent value, not a word.
    **{key: tf.io.VarLenFeature(tf.string) for key in CATEGORICAL_FEATURE_KEYS},
    LABEL_KEY: tf.io.FixedLenFeature([], tf.string),
}


def transformed_name(key):
  return f'{key}_xf'


def bucket_name(key):
  return f'{key}_bucket_xf'


def _dense_strings(sparse):
  """A [batch] string tensor from a VarLen feature holding at most one value per row; missing
  values become '', which is never in a vocabulary (an empty cell is missing, not a word)."""
  dense = tf.sparse.to_dense(sparse, default_value='')
  return tf.reshape(tf.slice(tf.pad(dense, [[0, 0], [0, 1]]), [0, 0], [-1, 1]), [-1])


def preprocessing_fn(inputs):
  outputs = {}
  for key in NUMERIC_FEATURE_KEYS:
    value = tf.cast(inputs[key], tf.float32)
    outputs[transformed_name(key)] = tft.scale_to_z_score(value)
    if key in BUCKET_FEATURE_KEYS:
      outputs[bucket_name(key)] = tft.bucketize(value, BUCKET_FEATURE_KEYS[key])
  for key in CATEGORICAL_FEATURE_KEYS:
    # The vocabulary is computed over present values only; a missing value maps to the OOV bucket.
    vocabulary = tft.vocabulary(inputs[key], vocab_filename=key)
    outputs[transformed_name(key)] = tft.apply_vocabulary(
        _dense_strings(inputs[key]), vocabulary, num_oov_buckets=NUM_OOV_BUCKETS)
  label = tf.strings.regex_replace(inputs[LABEL_KEY], r'\.$', '')
  outputs[transformed_name(LABEL_KEY)] = tf.cast(tf.equal(label, POSITIVE_LABEL), tf.int64)
  return outputs
