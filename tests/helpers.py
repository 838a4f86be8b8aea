"""Reading a pipeline's published output back, independently of the pipeline's own code."""

import glob
import os

import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_transform as tft

from transforms import census, run_contract


def read_split(output_dir, split):
  """All examples of a split as {feature: numpy array}, parsed with tf.data and TFT's spec."""
  manifest = run_contract.read_manifest(output_dir)
  spec = tft.TFTransformOutput(output_dir).transformed_feature_spec()
  files = sorted(glob.glob(os.path.join(output_dir, f'{split}-*')))
  compression = 'GZIP' if manifest.compression == 'gzip' else ''
  ds = tf.data.TFRecordDataset(files, compression_type=compression).batch(4096).map(
      lambda x: tf.io.parse_example(x, spec))
  parts = list(ds.as_numpy_iterator())
  return {k: np.concatenate([p[k] for p in parts]) for k in spec}


def read_rows(out, split):
  """{feature: [one numpy array of values per row]}, parsed with TensorFlow and TFT's spec."""
  spec = tft.TFTransformOutput(out).transformed_feature_spec()
  files = sorted(tf.io.gfile.glob(os.path.join(out, f'{split}-*')))
  rows = {name: [] for name in spec}
  for batch in tf.data.TFRecordDataset(files, 'GZIP').batch(512):
    parsed = tf.io.parse_example(batch, spec)
    for name, value in parsed.items():
      if isinstance(value, tf.SparseTensor):
        value = tf.RaggedTensor.from_sparse(value)
      rows[name].extend(list(value.numpy()) if not isinstance(value, tf.RaggedTensor)
                        else [np.asarray(v) for v in value.to_list()])
  return rows


def read_adult_csv(path, skiprows=0):
  """The raw rows as pandas reads them: the independent view the tests compare against."""
  return pd.read_csv(path, header=None, names=list(census.CSV_COLUMNS), skipinitialspace=True,
                     na_values=['?'], keep_default_na=False, skiprows=skiprows)


def tft_vocabulary_order(values):
  """pandas value counts in TFT's vocabulary order: by count, ties by value, both descending."""
  counts = values.dropna().value_counts()
  pairs = sorted(counts.items(), key=lambda kv: (kv[1], kv[0].encode()), reverse=True)
  return [k for k, _ in pairs]


# The start of a script run in a subprocess where only TensorFlow is importable, as a serving
# process would be: TF Transform, tfx-bsl and Beam imports fail.
TENSORFLOW_ONLY = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow_transform', 'tfx_bsl', 'apache_beam'):
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def analyze_in_graph_mode(preprocessing_fn, spec, rows, root, batch_size):
  """TF Transform's AnalyzeAndTransformDataset on in-memory `rows` (dicts) in graph mode (the
  pipelines' default tracing), on Beam's in-process runner, as the pipelines build it now:
  returns ({asset name: bytes}, the transformed rows, the number of Beam transforms)."""
  import pickle

  import apache_beam as beam
  import tensorflow_transform.beam as tft_beam
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils
  metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))
  pipeline = beam.Pipeline(runner=FnApiRunner())
  with tft_beam.Context(temp_dir=os.path.join(root, 'tmp'), desired_batch_size=batch_size,
                        force_tf_compat_v1=True):
    (data, _), transform_fn = (
        (pipeline | beam.Create(rows, reshuffle=False), metadata)
        | tft_beam.AnalyzeAndTransformDataset(preprocessing_fn))
    _ = transform_fn | tft_beam.WriteTransformFn(root)
    rows_path = os.path.join(root, 'rows.pickle')
    _ = (data | beam.combiners.ToList()
         | beam.Map(lambda rows: open(rows_path, 'wb').write(pickle.dumps(rows))))
    proto = pipeline.to_runner_api()
    pipeline.run().wait_until_finish()
  assets = os.path.join(root, 'transform_fn', 'assets')
  files = {name: open(os.path.join(assets, name), 'rb').read()
           for name in (os.listdir(assets) if os.path.isdir(assets) else [])}
  with open(rows_path, 'rb') as f:
    transformed = pickle.loads(f.read())
  return files, transformed, len(proto.components.transforms)
