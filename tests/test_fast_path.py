"""The components written for speed, against what they replace.

* the Arrow CSV fast path against the exact (Python csv) reader, on messy CSVs cut into many
  chunks;
* the batched TFRecord shard writer against TensorFlow's own TFRecord reader;
* the whole pipeline (c) against TF Transform's recommended TFXIO pipeline (b) from
  benchmarks/tabular_pipeline.py, on the benchmark's data: identical vocabularies and counts,
  the same means and variances, quantile boundaries within the sketch's epsilon.
"""

import glob
import gzip
import os
import sys

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
import tensorflow_transform as tft
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from pipelines import tabular, vocabulary
from pipelines.sinks import tfrecords
from pipelines.sources import csv_chunks, csv_files, csv_layout, csv_rows
from tests.conftest import REPO
from transforms import contract as contract_lib

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import synthetic
import tabular_pipeline as bench

MODULE = '''
import tensorflow as tf
RAW_FEATURE_SPEC = {
    'n': tf.io.FixedLenFeature([], tf.int64),
    'x': tf.io.FixedLenFeature([], tf.float32, default_value=-1.0),
    'city': tf.io.VarLenFeature(tf.string),
    'label': tf.io.FixedLenFeature([], tf.int64),
}
LABEL_KEY = 'label'
NA_VALUES = ('?',)
def preprocessing_fn(inputs):
  return {'n_xf': inputs['n']}
'''

MESSY_ROWS = [
    'n,x,city,label',
    '1,0.5,Paris,0',
    '2,"1.5","New York, NY",1',
    '3,2.5,"He said ""hi""",0',
    '',  # a blank line
    '4,3.5,"two\nlines",1',  # a quoted line break
    '5,not-a-number,Rome,0',  # bad number
    '6,4.5,Rome',  # too few fields
    '7,,?,1',  # default for x, missing city
    '8, 5.5 , Oslo ,0',
    'x9,6.5,Lima,1',  # bad int
    '10,7.5,Kyiv\r',  # CRLF line ending, too few fields
    '11,8.5,Nice,0\r',
    '12,inf,Bern,1',  # not finite
]


def _read(path, fmt, fast, chunk, eval_fraction=0.0):
  """(rows as Python dicts, dead letters) from ReadCsvFileFn, with or without the fast path."""
  saved = (csv_rows.fast_block, csv_chunks._FIRST_CHUNK, csv_chunks._CHUNK)
  try:
    if not fast:
      csv_rows.fast_block = lambda *args: None
    csv_chunks._FIRST_CHUNK = csv_chunks._CHUNK = chunk
    out = list(csv_files.ReadCsvFileFn(fmt, 'train', eval_fraction, 7).process(path))
  finally:
    csv_rows.fast_block, csv_chunks._FIRST_CHUNK, csv_chunks._CHUNK = saved
  rows, errors = [], []
  for item in out:
    if isinstance(item, pa.RecordBatch):
      rows += [('train', r) for r in item.to_pylist()]
    elif item.tag == csv_files.EVAL_TAG:
      rows += [('eval', r) for r in item.value.to_pylist()]
    else:
      errors.append(item.value)
  return rows, errors


def _messy_format(tmp_path):
  """(CsvFormat of MODULE, path for the messy CSV) in tmp_path."""
  module = tmp_path / 'messy.py'
  module.write_text(MODULE)
  contract = contract_lib.load(str(module))
  fmt = csv_layout.CsvFormat(columns=contract.columns, column_names=None,
                             na_values=contract.na_values)
  return fmt, tmp_path / 'messy.csv'


@pytest.mark.parametrize('chunk', [40, 97, 256, 1 << 16])
@pytest.mark.parametrize('eval_fraction', [0.0, 0.5])
def test_fast_csv_path_equals_the_exact_reader(tmp_path, chunk, eval_fraction):
  fmt, path = _messy_format(tmp_path)
  body = '\n'.join(MESSY_ROWS * 30).encode() + b'\n13,9.5,M\xfcnchen,1\n'  # and bad UTF-8
  path.write_bytes(body)
  fast = _read(str(path), fmt, True, chunk, eval_fraction)
  exact = _read(str(path), fmt, False, chunk, eval_fraction)
  assert fast == exact
  rows, errors = exact
  # Per copy: 7 good rows and 5 bad ones; the header repeated in 29 copies is a bad number; one
  # row of bad UTF-8.
  assert len(rows) == 30 * 7 and len(errors) == 30 * 5 + 29 + 1
  kinds = sorted({e['kind'] for e in errors})
  assert kinds == ['bad_encoding', 'bad_number', 'field_count']
  # Line numbers are the file's own: the quoted line break takes two lines.
  lines = body.decode('utf-8', 'replace').split('\n')
  for e in errors[:6]:
    assert lines[e['line'] - 1].rstrip('\r') == e['raw'].split('\n')[0].rstrip('\r')


@pytest.mark.parametrize('short_row', [False, True])
def test_the_fast_path_is_taken_on_clean_chunks(tmp_path, monkeypatch, short_row):
  path = tmp_path / 'clean.csv'
  synthetic.write_csv(str(path), 5000)
  if short_row:  # one row of the wrong width: its chunk goes to the exact reader, no other
    lines = path.read_text().split('\n')
    lines[1000] = lines[1000].rsplit(',', 1)[0]
    path.write_text('\n'.join(lines))
  contract = contract_lib.load(os.path.join(REPO, 'benchmarks', 'synthetic.py'))
  fmt = csv_layout.CsvFormat(columns=contract.columns, column_names=None)
  taken, reads = [], []
  real, read = csv_rows.fast_block, csv_rows._read_chunk
  monkeypatch.setattr(csv_rows, 'fast_block',
                      lambda *a: taken.append(real(*a)) or taken[-1])
  monkeypatch.setattr(csv_rows, '_read_chunk',
                      lambda *a: reads.append((sorted(a[3]), read(*a))) or reads[-1][1])
  monkeypatch.setattr(csv_chunks, '_FIRST_CHUNK', 4096)
  monkeypatch.setattr(csv_chunks, '_CHUNK', 64 << 10)
  out = list(csv_files.ReadCsvFileFn(fmt, 'train').process(str(path)))
  rows = [r for r in out if isinstance(r, pa.RecordBatch)]
  assert sum(r.num_rows for r in rows) == 5000 - short_row and len(out) - len(rows) == short_row
  assert len(taken) > 3 and [block is None for block in taken].count(True) == short_row
  # Arrow's reader converted every numeric column of every chunk itself (but the one with the
  # short row, where no columns help, and which the exact reader then read)
  numeric = sorted(c.name for c in fmt.columns if c.dtype != 'string')
  assert [(typed, table is not None) for typed, (table, _) in reads] == [
      (numeric, block is not None) for block in taken]
  # the same rows as with every column read as text and converted by block_to_record_batch
  monkeypatch.setattr(csv_rows, 'typed_columns', lambda chunk, fmt: {})
  text = [r for r in csv_files.ReadCsvFileFn(fmt, 'train').process(str(path))
          if isinstance(r, pa.RecordBatch)]
  assert [b.to_pylist() for b in rows] == [b.to_pylist() for b in text]
  assert all(a.schema == b.schema for a, b in zip(rows, text))


# Numeric cells at the edges of what Arrow's CSV reader converts itself (csv_rows.typed_columns):
# padding, quotes, NA values, NaN and infinities, hexadecimal, out of range.
EDGE_CELLS = [' 1.5', '1.5 ', '\t2', '"1.5"', '" 1.5"', '1e5', '.5', '+3', '-0', '007', '1.',
              'nan', 'NaN', 'inf', '-inf', '1e400', '4e-46', '', '?', ' ?', '"?"', '""', ' ',
              '\u00a01.5', '1.5\u00a0', '\v1', '0x1F', '0X1f', '1_000', 'True']


@pytest.mark.parametrize('column', [0, 1])  # n: an int64 without a default; x: a float32 with
def test_numbers_converted_by_arrows_reader_equal_the_exact_reader(tmp_path, column):
  fmt, path = _messy_format(tmp_path)
  clean = [f'{i},{i / 4},c{i % 3},{i % 2}' for i in range(40)]
  for cell in EDGE_CELLS:
    fields = ['5', '2.25', 'Oslo', '1']
    fields[column] = cell
    path.write_text('\n'.join(['n,x,city,label'] + clean[:20] + [','.join(fields)] + clean[20:])
                    + '\n')
    fast = _read(str(path), fmt, True, 1 << 16)
    assert fast == _read(str(path), fmt, False, 1 << 16), cell
    assert len(fast[0]) + len(fast[1]) == 41, cell


def _write(tmp_path, batches, num_shards, compression):
  schema = schema_utils.schema_from_feature_spec({'v': tf.io.FixedLenFeature([], tf.int64)})
  metadata = dataset_metadata.DatasetMetadata(schema)

  class Deferred:  # what TF Transform hands over: metadata known once the analysis is done
    def __init__(self, pipeline):
      self.deferred_metadata = pipeline | 'Metadata' >> beam.Create([metadata])

  prefix = str(tmp_path / 'out' / 'train')
  with beam.Pipeline(runner=FnApiRunner()) as p:
    count = (p | beam.Create(batches, reshuffle=False)
             | tfrecords.WriteExamples(prefix, num_shards, compression, str(tmp_path / 'parts'),
                                     Deferred(p)))
    _ = count | beam.Map(lambda n: (tmp_path / 'count').write_text(str(n)))
  return sorted(glob.glob(prefix + '-*')), int((tmp_path / 'count').read_text())


@pytest.mark.parametrize('compression', ['gzip', 'none'])
def test_shard_writer_output_reads_back_with_tensorflow(tmp_path, compression):
  def batch(start, n):
    values = pa.array(np.arange(start, start + n, dtype=np.int64))
    return pa.RecordBatch.from_arrays(
        [pa.LargeListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int64)), values)], ['v'])

  batches = [batch(0, 1000), batch(1000, 1), batch(1001, 0), batch(1001, 2499)]
  files, count = _write(tmp_path, batches, 5, compression)
  assert [os.path.basename(f) for f in files] == [
      f'train-0000{i}-of-00005.tfrecord{".gz" if compression == "gzip" else ""}' for i in range(5)]
  assert count == 3500
  spec = {'v': tf.io.FixedLenFeature([], tf.int64)}
  values = []
  for f in files:  # every shard, empty ones too, is a valid file; TF checks the CRCs
    ds = tf.data.TFRecordDataset(f, compression_type='GZIP' if compression == 'gzip' else '')
    values += [int(tf.io.parse_single_example(r, spec)['v']) for r in ds]
  assert sorted(values) == list(range(3500))
  assert not os.path.exists(tmp_path / 'parts') or not os.listdir(tmp_path / 'parts')


def test_framing_matches_tensorflows_writer(tmp_path):
  records = [b'', b'a', b'x' * 70000, bytes(range(256)), b'b', b'', bytes(range(255, -1, -1))]
  path = tmp_path / 'ours.tfrecord'
  path.write_bytes(tfrecords.frame_records(records))
  with tf.io.TFRecordWriter(str(tmp_path / 'tf.tfrecord')) as writer:
    for r in records:
      writer.write(r)
  assert path.read_bytes() == (tmp_path / 'tf.tfrecord').read_bytes()
  # Concatenated gzip members, one per batch, read as one file.
  joined = tmp_path / 'joined.tfrecord.gz'
  joined.write_bytes(gzip.compress(tfrecords.frame_records(records[:2])) +
                     gzip.compress(tfrecords.frame_records(records[2:])))
  assert [r.numpy() for r in tf.data.TFRecordDataset(str(joined), 'GZIP')] == records


# ---- (c) against (b) --------------------------------------------------------------------------


@pytest.fixture(scope='module')
def both(tmp_path_factory):
  root = tmp_path_factory.mktemp('c_vs_b')
  csv_path = str(root / 'data.csv')
  synthetic.write_csv(csv_path, 20000, seed=3)
  b_out, c_out = root / 'b', root / 'c'
  b_out.mkdir()
  with vocabulary.tft_implementation():  # (b) is TFT's own path, whatever ran before here
    bench.tfxio_path(csv_path, str(b_out))
  tabular.run(['--transforms', os.path.join(REPO, 'benchmarks', 'synthetic.py'),
               '--train', csv_path, '--output', str(c_out), '--num-shards', '3'])
  return {'b': str(b_out), 'c': str(c_out), 'csv': csv_path}


def _count(pattern):
  return sum(1 for f in glob.glob(pattern)
             for _ in tf.data.TFRecordDataset(f, compression_type='GZIP'))


def _probe(out, column, values):
  """The transform of rows whose `column` takes `values` (the other columns fixed)."""
  n = len(values)
  raw = {f: tf.constant(np.zeros(n, np.float32)) for f in synthetic.FLOATS}
  raw.update({s: tf.constant([b's0_0'] * n) for s in synthetic.STRINGS})
  raw[column] = tf.constant(np.asarray(values, np.float32))
  raw[synthetic.LABEL_KEY] = tf.constant(np.zeros(n, np.int64))
  result = tft.TFTransformOutput(out).transform_raw_features(raw)
  return {k: v.numpy() for k, v in result.items()}


def test_vocabularies_and_counts_are_identical(both):
  for s in synthetic.STRINGS:
    b = open(os.path.join(both['b'], 'transform_fn', 'assets', s), 'rb').read()
    c = open(os.path.join(both['c'], 'transform_fn', 'assets', s), 'rb').read()
    assert b == c and len(b.splitlines()) > 500
  assert _count(os.path.join(both['b'], 'train-*')) == 20000
  assert _count(os.path.join(both['c'], 'train-*')) == 20000


def test_means_variances_and_quantile_boundaries_agree(both):
  import pandas as pd
  raw = pd.read_csv(both['csv'])
  for f in synthetic.FLOATS:
    x = raw[f].to_numpy(np.float32)
    grid = np.unique(x)
    found = {}
    # Probes near the mean and 10,000 standard deviations away: float32 z-scores then pin the
    # analyzers' mean and standard deviation to about 1e-7.
    probes = np.array([x.mean(dtype=np.float64), x.mean(dtype=np.float64) + 1e4 * x.std()],
                      np.float32).astype(np.float64)
    for name, out in (('b', both['b']), ('c', both['c'])):
      z = _probe(out, f, probes)[f'{f}_z'].astype(np.float64)
      std = (probes[1] - probes[0]) / (z[1] - z[0])
      found[name] = {'mean': probes[0] - z[0] * std, 'var': std**2,
                     'buckets': _probe(out, f, grid)[f'{f}_bucket']}
    b, c = found['b'], found['c']
    assert abs(c['mean'] - b['mean']) <= 1e-6 * max(1.0, abs(b['mean']))
    assert abs(c['var'] - b['var']) <= 1e-6 * b['var']
    assert abs(c['mean'] - x.mean(dtype=np.float64)) <= 1e-4 * max(1.0, abs(x.mean()))
    # Boundaries: where the bucket id steps up along the sorted values; as ranks, within the
    # quantile sketch's epsilon (0.01 for fewer than 100 buckets) of each other.
    steps_b = np.searchsorted(grid, grid[np.flatnonzero(np.diff(b['buckets']))])
    steps_c = np.searchsorted(grid, grid[np.flatnonzero(np.diff(c['buckets']))])
    def ranks(positions, x=x, grid=grid):
      return np.searchsorted(np.sort(x), grid[positions]) / len(x)
    assert len(steps_b) == len(steps_c) == synthetic.NUM_BUCKETS - 1
    assert np.abs(ranks(steps_b) - ranks(steps_c)).max() <= 0.01


@pytest.mark.parametrize('range_bytes', [300, 1000, 4096])
def test_ranges_read_like_the_whole_file(tmp_path, range_bytes):
  """A file cut at record boundaries (quoted line breaks, CRLF, blank lines near the cuts) reads
  as the same rows and dead letters, with the same line numbers, as the whole file."""
  fmt, path = _messy_format(tmp_path)
  path.write_bytes('\n'.join(MESSY_ROWS * 40).encode() + b'\n')
  layout = csv_layout.inspect_file(str(path), fmt)
  ranges = csv_layout.plan_ranges(str(path), path.stat().st_size, layout, range_bytes)
  assert len(ranges) >= min(8, path.stat().st_size // range_bytes)
  assert ranges[0].start == 0 and ranges[-1].end is None
  assert all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
  whole = _read(str(path), fmt, True, 1 << 16)
  rows, errors = [], []
  for unit in ranges:
    fn = csv_files.ReadCsvFileFn(fmt, 'train', 0.0, 7)
    for item in fn.process(unit):
      if isinstance(item, pa.RecordBatch):
        rows += [('train', r) for r in item.to_pylist()]
      else:
        errors.append(item.value)
  assert sorted(map(repr, rows)) == sorted(map(repr, whole[0]))
  assert sorted(map(repr, errors)) == sorted(map(repr, whole[1]))


def test_small_and_compressed_files_are_one_range(tmp_path):
  path = tmp_path / 'small.csv.gz'
  path.write_bytes(gzip.compress(b'a,b\n1,2\n' * 1000))
  ranges = csv_layout.plan_ranges(str(path), 10 << 30, None, 100)
  assert [(r.start, r.end) for r in ranges] == [(0, None)]
