"""The numpy encoder of tf.train.Example (pipelines/sinks/example_encoding.py) against what
tfx_bsl's encoder writes, parsed by protobuf, and against protobuf's own deterministic
serialization byte for byte where the map orders agree; and its refusals (None: the sink then
uses tfx_bsl)."""

import numpy as np
import pyarrow as pa
import pytest
from tensorflow.core.example import example_pb2
from tfx_bsl.coders import example_coder

from pipelines.sinks import example_encoding


def _lists(values, width, large=True):
  values = np.asarray(values)
  offsets = np.arange(len(values) // width + 1) * width
  if large:
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
  return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))


def _same_examples(ours, batch):
  """Each record parses to tfx_bsl's Example and is as long as protobuf's serialization of it
  (no overlong varints, nothing extra)."""
  theirs = _reference(batch)
  assert len(ours) == len(theirs)
  for mine, reference in zip(ours, theirs):
    assert example_pb2.Example.FromString(mine) == example_pb2.Example.FromString(reference)
    assert len(mine) == len(reference)


def _reference(batch):
  return [example_pb2.Example.FromString(record).SerializeToString(deterministic=True)
          for record in example_coder.RecordBatchToExamplesEncoder().encode(batch)]


def _mixed(rows, seed=0):
  rng = np.random.default_rng(seed)
  ints = np.iinfo(np.int64)
  special = np.array([np.nan, -0.0, np.inf, -np.inf, 3.4e38, 1e-45], np.float32)
  floats = rng.normal(size=rows).astype(np.float32)
  floats[:len(special)] = special[:rows]
  columns = {
      'z': _lists(floats, 1),
      'pair': _lists(rng.normal(size=rows * 2).astype(np.float32), 2, large=False),
      'bucket': _lists(rng.integers(0, 10, rows), 1),
      'id': _lists(rng.integers(-1, 70_000, rows), 1),  # -1 is a 10-byte varint
      'extremes': _lists(rng.choice([ints.min, ints.max, 0, 127, 128, -128], rows), 1),
      'three_ids': _lists(rng.integers(0, 300, rows * 3), 3),
      'a_long_key_' + 'k' * 80: _lists(rng.integers(0, 5, rows), 1),
      'ключ': _lists(rng.normal(size=rows).astype(np.float32), 1),  # keys sort as UTF-8 bytes
      'wide_floats': _lists(rng.normal(size=rows * 40).astype(np.float32), 40),
  }
  return pa.RecordBatch.from_arrays(list(columns.values()), list(columns))


@pytest.mark.parametrize('rows', [1, 7, 5000])
def test_examples_equal_tfx_bsls(rows):
  batch = _mixed(rows, seed=rows)
  _same_examples(example_encoding.encode(batch), batch)


def test_one_kind_is_protobufs_deterministic_serialization_and_slices_work():
  # Map entries go floats first, then ints, each kind in key order: with one kind, that is
  # protobuf's deterministic (key-sorted) serialization exactly.
  batch = _mixed(3000)
  for names in (['z', 'pair', 'wide_floats', 'ключ'], ['bucket', 'id', 'extremes', 'three_ids']):
    part = pa.RecordBatch.from_arrays([batch.column(n) for n in names], names)
    assert example_encoding.encode(part) == _reference(part)
  sliced = batch.slice(1234, 777)  # offsets that do not start at zero
  _same_examples(example_encoding.encode(sliced), sliced)


def test_chunked_rows_give_the_same_bytes(monkeypatch):
  batch = _mixed(2000)
  whole = example_encoding.encode(batch)
  monkeypatch.setattr(example_encoding, '_CHUNK_BYTES', 1000)  # a few rows per numpy pass
  assert example_encoding.encode(batch) == whole
  _same_examples(whole, batch)


def test_declines_what_it_does_not_write():
  rows = 4
  floats = _lists(np.ones(rows, np.float32), 1)
  refused = {
      'strings': pa.array([[b'a'], [b'b'], [b'c'], [b'd']], pa.large_list(pa.large_binary())),
      'ragged': pa.array([[1.0], [2.0, 3.0], [4.0], [5.0]], pa.large_list(pa.float32())),
      'empty lists': pa.array([[], [], [], []], pa.large_list(pa.float32())),
      'null row': pa.array([[1.0], None, [2.0], [3.0]], pa.large_list(pa.float32())),
      'null value': pa.array([[1], [None], [2], [3]], pa.large_list(pa.int64())),
      'float64': pa.array([[1.0]] * rows, pa.large_list(pa.float64())),
      'int32': pa.array([[1]] * rows, pa.large_list(pa.int32())),
      'not a list': pa.array([1.0] * rows, pa.float32()),
  }
  for name, column in refused.items():
    batch = pa.RecordBatch.from_arrays([floats, column], ['ok', 'bad'])
    assert example_encoding.encode(batch) is None, name
  # An int item whose length field would take two bytes (entry >= 128 bytes).
  batch = pa.RecordBatch.from_arrays([_lists(-np.ones(rows * 12, np.int64), 12)], ['k'])
  assert example_encoding.encode(batch) is None
  assert example_encoding.encode(pa.RecordBatch.from_arrays([], [])) is None
