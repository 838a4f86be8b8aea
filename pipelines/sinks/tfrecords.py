"""The examples sink: TF Transform's transformed RecordBatches -> sharded TFRecord files of
tf.train.Example, encoded, framed and compressed in batches."""

import collections
import concurrent.futures
import gzip
import random
import struct
import uuid
import zlib

import apache_beam as beam
import google_crc32c
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from tfx_bsl.coders import example_coder

from pipelines.output_dir import join, mkdirs
from pipelines.sinks import example_encoding
from transforms.run_contract import shard_name

GZIP_LEVEL = 1
# Shards are compressed with ISA-L's deflate (python-isal) where it is installed (it is one of
# this package's requirements): standard gzip members that TensorFlow and gzip read, made about
# 4x faster than zlib's level 1 for files about 3% larger (100 MB of encoded Examples: 0.16 s
# against 0.61 s on the 2-core machine of benchmarks/RESULTS.md). The writer threads' work
# (encoding, framing, compression) is about half of the transform pass's CPU time, and that
# pass is CPU-bound on two cores.
try:
  from isal import isal_zlib as _deflate
except ImportError:  # a platform without its wheels: zlib, the same format
  _deflate = zlib


def gzip_member(data):
  """`data` as one gzip member (members concatenate into a valid gzip file)."""
  return _deflate.compress(data, GZIP_LEVEL, wbits=31)


def _masked_crc32c(data):
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_records(records):
  """Serialized records -> the bytes of a TFRecord file holding them (uint64 length, masked
  crc32c of the length, data, masked crc32c of the data, per record).

  This loop holds the GIL in the writer threads while TF Transform works in the main thread, so
  it does as little per record as it can: the 12 bytes before a record depend only on its
  length, which repeats (records of one schema differ by a few bytes), so they are made once per
  length; half the work of packing and checksumming every header (80 ms -> 40 ms per 65,536
  records, measured on the machine of benchmarks/RESULTS.md)."""
  pack_length, pack_crc = struct.Struct('<Q').pack, struct.Struct('<I').pack
  headers = {}
  parts = []
  append = parts.append
  for record in records:
    header = headers.get(len(record))
    if header is None:
      length = pack_length(len(record))
      header = headers[len(record)] = length + pack_crc(_masked_crc32c(length))
    append(header)
    append(record)
    append(pack_crc(_masked_crc32c(record)))
  return b''.join(parts)


class _WriteShardPartsFn(beam.DoFn):
  """RecordBatches -> part files of the shards (main output: (shard, (part path, examples))).

  Each RecordBatch is encoded by example_encoding (batches of fixed-length numeric columns) or
  else by tfx_bsl's RecordBatchToExamplesEncoder (what TF Transform's EncodeTransformedDataset
  uses), framed as TFRecords in one buffer and compressed as one gzip
  member (gzip members concatenate), then appended to this bundle's part file of one shard
  (batches go round the shards). Encoding and compression release the GIL, so they run on two
  threads beside the bundle's other work (TF Transform, reading), a few batches in flight.
  """

  _THREADS = 2
  _IN_FLIGHT = 4

  def __init__(self, parts_dir, num_shards, compression):
    self._parts_dir = parts_dir
    self._num_shards = num_shards
    self._compression = compression
    self._encoder = None
    self._pool = None

  def setup(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(self._THREADS)

  def teardown(self):
    if self._pool:
      self._pool.shutdown(wait=True)

  def start_bundle(self):
    self._parts = {}  # shard -> [file, path, examples]
    self._next = random.randrange(self._num_shards)
    self._pending = collections.deque()

  def process(self, element, schema):
    if self._encoder is None:
      self._encoder = example_coder.RecordBatchToExamplesEncoder(schema)
    batch = element[0] if isinstance(element, tuple) else element  # (batch, passthrough)
    if not batch.num_rows:
      return
    self._pending.append((batch.num_rows, self._pool.submit(self._encode, batch)))
    while len(self._pending) > self._IN_FLIGHT:
      self._write_oldest()

  def _encode(self, batch):
    records = example_encoding.encode(batch)  # None unless every column is fixed-length numeric
    if records is None:
      records = self._encoder.encode(batch)
    data = frame_records(records)
    if self._compression == 'gzip':
      return gzip_member(data)
    return data

  def _write_oldest(self):
    rows, future = self._pending.popleft()
    data = future.result()
    shard = self._next
    self._next = (self._next + 1) % self._num_shards
    if shard not in self._parts:
      path = join(self._parts_dir, f'{shard:05d}-{uuid.uuid4().hex}')
      self._parts[shard] = [FileSystems.create(
          path, compression_type=CompressionTypes.UNCOMPRESSED), path, 0]
    part = self._parts[shard]
    part[0].write(data)
    part[2] += rows

  def finish_bundle(self):
    while self._pending:
      self._write_oldest()
    for shard, (handle, path, examples) in sorted(self._parts.items()):
      handle.close()
      yield beam.transforms.window.GlobalWindows.windowed_value((shard, (path, examples)))
    self._parts = {}


def _finish_shard(shard_and_parts, prefix, num_shards, compression):
  """Joins one shard's parts into its final file (gzip members and TFRecord files both
  concatenate); a shard without parts becomes a valid empty file. Returns its example count."""
  shard, parts = shard_and_parts
  parts = sorted(p for p in parts if p is not None)
  target = shard_name(prefix, shard, num_shards, compression)
  directory = target[:target.rindex('/')] if '/' in target else '.'
  if FileSystems.get_filesystem(target).has_dirs() and not FileSystems.exists(directory):
    mkdirs(directory)
  if len(parts) == 1:
    FileSystems.rename([parts[0][0]], [target])
  else:
    with FileSystems.create(target, compression_type=CompressionTypes.UNCOMPRESSED) as out:
      if not parts and compression == 'gzip':
        out.write(gzip.compress(b''))
      for path, _ in parts:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
          while True:
            chunk = f.read(16 << 20)
            if not chunk:
              break
            out.write(chunk)
    if parts:
      FileSystems.delete([path for path, _ in parts])
  return sum(examples for _, examples in parts)


class WriteExamples(beam.PTransform):
  """TF Transform's transformed RecordBatches -> `num_shards` TFRecord shards of tf.train.Example;
  returns a PCollection of the example count.

  Replaces EncodeTransformedDataset + WriteToTFRecord, which make every example a Beam element,
  compress every record in its own zlib call and group all records by shard in memory (per-record
  work was about half of the tabular pipeline's time, and the grouping made memory grow with the
  data: benchmarks/tabular_pipeline.py). Here a RecordBatch stays one element from TF Transform to
  the file, and only part-file names are grouped.
  """

  def __init__(self, prefix, num_shards, compression, parts_dir, transformed_metadata):
    super().__init__()
    self._prefix = prefix
    self._num_shards = num_shards
    self._compression = compression
    self._parts_dir = parts_dir
    self._metadata = transformed_metadata

  def expand(self, batches):
    deferred = getattr(self._metadata, 'deferred_metadata', None)
    if deferred is None:  # a transform graph read back from disk: its metadata is complete
      deferred = batches.pipeline | 'Metadata' >> beam.Create([self._metadata])
    schema = deferred | 'Schema' >> beam.Map(lambda metadata: metadata.schema)
    parts = batches | 'EncodeAndWriteParts' >> beam.ParDo(
        _WriteShardPartsFn(self._parts_dir, self._num_shards, self._compression),
        schema=beam.pvalue.AsSingleton(schema))
    every_shard = (batches.pipeline
                   | 'ShardIndices' >> beam.Create([(i, None) for i in range(self._num_shards)]))
    return ((parts, every_shard)
            | 'AllShards' >> beam.Flatten()
            | 'PartsByShard' >> beam.GroupByKey()
            | 'FinishShards' >> beam.Map(_finish_shard, self._prefix, self._num_shards,
                                         self._compression)
            | 'CountExamples' >> beam.CombineGlobally(sum))
