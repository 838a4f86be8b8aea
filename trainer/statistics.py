"""The statistics a pipeline run computed (DIR/statistics/*.pb, tensorflow_metadata's
DatasetFeatureStatisticsList), read with TensorFlow alone: the trainer sizes and checks its label
and standardizes its numeric inputs with the train split's numbers, never a pass over the data."""

import os

import tensorflow as tf
from tensorflow_metadata.proto.v0 import statistics_pb2


def numeric(transformed_dir, manifest, split='train', stage='transformed'):
  """{feature: NumericStatistics} of one split's raw or transformed features; {} where the run
  recorded none (an output written before statistics existed)."""
  files = (manifest.statistics or {}).get('files', {}).get(split, {})
  if stage not in files:
    return {}
  path = os.path.join(transformed_dir, files[stage])
  if not tf.io.gfile.exists(path):
    return {}
  proto = statistics_pb2.DatasetFeatureStatisticsList()
  with tf.io.gfile.GFile(path, 'rb') as f:
    proto.ParseFromString(f.read())
  found = {}
  for dataset in proto.datasets:
    for feature in dataset.features:
      if feature.WhichOneof('stats') == 'num_stats':
        name = feature.path.step[0] if feature.path.step else feature.name
        found[name] = feature.num_stats
  return found
