"""The benchmark's dataset: a seeded CSV generator and its dataset module (the contract).

8 float columns, 4 string columns with 1,000-4,000 distinct values each, an int label. The same
preprocessing_fn serves every contender of benchmarks/tabular_pipeline.py: a z-score and 10
quantile buckets per float column, a vocabulary with 1 OOV bucket per string column.
"""

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

FLOATS = [f'f{i}' for i in range(8)]
STRINGS = [f's{i}' for i in range(4)]
CARDINALITY = {'s0': 1000, 's1': 2000, 's2': 3000, 's3': 4000}
LABEL_KEY = 'label'
CSV_COLUMNS = FLOATS + STRINGS + [LABEL_KEY]
NUM_BUCKETS = 10



def raw_feature_spec(floats, strings, label):
  """float32 and string columns and an int64 label, one value each."""
  return {
      **{f: tf.io.FixedLenFeature([], tf.float32) for f in floats},
      **{s: tf.io.FixedLenFeature([], tf.string) for s in strings},
      label: tf.io.FixedLenFeature([], tf.int64),
  }


RAW_FEATURE_SPEC = raw_feature_spec(FLOATS, STRINGS, LABEL_KEY)


def preprocess(inputs, floats, bucketized, strings, label):
  """The benchmarks' preprocessing: a z-score of each of `floats`, NUM_BUCKETS quantile buckets
  of each of `bucketized`, a vocabulary with one OOV bucket of each of `strings`, the label."""
  outputs = {f'{name}_z': tft.scale_to_z_score(inputs[name]) for name in floats}
  for name in bucketized:
    outputs[f'{name}_bucket'] = tft.bucketize(inputs[name], NUM_BUCKETS)
  for name in strings:
    outputs[f'{name}_id'] = tft.compute_and_apply_vocabulary(
        inputs[name], num_oov_buckets=1, vocab_filename=name)
  outputs[label] = inputs[label]
  return outputs


def preprocessing_fn(inputs):
  return preprocess(inputs, FLOATS, FLOATS, STRINGS, LABEL_KEY)


def write_csv(path, rows, seed=0, chunk=250_000):
  """Writes `rows` rows with a header line, deterministically for a given seed."""
  import pyarrow as pa
  import pyarrow.csv as pacsv
  rng = np.random.default_rng(seed)
  scales = rng.uniform(0.5, 50, len(FLOATS))
  offsets = rng.uniform(-100, 100, len(FLOATS))
  with pacsv.CSVWriter(path, pa.schema(
      [(f, pa.float64()) for f in FLOATS] + [(s, pa.string()) for s in STRINGS] +
      [(LABEL_KEY, pa.int64())])) as writer:
    for start in range(0, rows, chunk):
      n = min(chunk, rows - start)
      columns = [np.round(offsets[i] + scales[i] * rng.standard_normal(n), 4)
                 for i in range(len(FLOATS))]
      for s in STRINGS:  # Zipf-like: a few frequent values, a long tail
        ids = np.minimum(rng.zipf(1.3, n), CARDINALITY[s]) - 1
        ids = (ids * 7919 + rng.integers(0, 2, n) * (ids >= 50)) % CARDINALITY[s]
        columns.append(np.char.add(f'{s}_', ids.astype(str)))
      columns.append((columns[0] + columns[1] > offsets[0] + offsets[1]).astype(np.int64))
      writer.write_batch(pa.record_batch(columns, names=CSV_COLUMNS))
