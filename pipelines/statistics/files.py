"""Where a run's statistics go (DIR/statistics/<split>_<stage>.pb, the sample in the staging
area), the PTransform that computes and writes them, and reading them back."""

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from tensorflow_metadata.proto.v0 import statistics_pb2

from pipelines.statistics.accumulators import StatisticsFn

STAGES = ('raw', 'transformed')

def statistics_path(directory, split, stage):
  return FileSystems.join(directory, 'statistics', f'{split}_{stage}.pb')


def sample_path(staging, split, stage):
  return FileSystems.join(staging, 'samples', f'{split}_{stage}.arrow')


# ---- in the pipeline -------------------------------------------------------------------------


def _write(result, stats_file, sample_file):
  proto, sample = result
  with FileSystems.create(stats_file, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(proto)
  if sample is not None:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, sample.schema) as writer:
      writer.write_table(sample)
    with FileSystems.create(sample_file, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      f.write(sink.getvalue().to_pybytes())


class WriteStatistics(beam.PTransform):
  """RecordBatches (or TF Transform's (RecordBatch, passthrough) pairs) -> their statistics in
  `stats_file`, and a few sample rows in `sample_file`."""

  def __init__(self, name, stats_file, sample_file):
    super().__init__()
    self._name = name
    self._stats_file = stats_file
    self._sample_file = sample_file

  def expand(self, batches):
    return (batches
            | 'Combine' >> beam.CombineGlobally(StatisticsFn(self._name))
            | 'Write' >> beam.Map(_write, self._stats_file, self._sample_file))


def read_statistics(path):
  """A statistics file -> its DatasetFeatureStatistics (the one dataset it holds)."""
  result = statistics_pb2.DatasetFeatureStatisticsList()
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    result.ParseFromString(f.read())
  return result.datasets[0]


def read_sample(path):
  """The sample rows staged by a run, or None."""
  if not FileSystems.exists(path):
    return None
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return pa.ipc.open_file(pa.BufferReader(f.read())).read_all()

