"""Serialized tf.train.Example for RecordBatches whose every column holds a fixed number of
float32 or int64 values per row (the dense outputs of a preprocessing_fn), made with whole-batch
numpy operations instead of one protobuf message per row.

Why it exists: tfx_bsl's RecordBatchToExamplesEncoder builds a protobuf map per row and
serializes it. On a 351-feature table that is the largest single cost of the writer threads:
8.9 s of their CPU for 100,000 rows, against 2.6 s here (benchmarks/RESULTS.md); on two cores
that CPU is taken from everything else. Every row of such a batch has the same layout, except for
the varint bytes of its int64 values and the lengths that depend on them. So the float items of
all rows are one byte matrix (a template row broadcast, the values written through strided
views), the int items another, compacted with a boolean mask where varints are shorter than
their slot, and each row is joined from its pieces.

The bytes are protobuf's canonical encoding of the Example (minimal varints, packed repeated
values), its map entries the float features', then the int64 features', each in key order (with
one kind, that is protobuf's deterministic serialization exactly): tests/test_example_encoding.py
checks them against what tfx_bsl's encoder writes. A batch with any other column (strings,
ragged or sparse values, nulls, other types) gets None from `encode`, and the caller encodes it
with tfx_bsl.
"""

import numpy as np
import pyarrow as pa

# Rows per numpy pass: about this many bytes of byte matrix (and as many of mask) at a time.
_CHUNK_BYTES = 16 << 20
_LITTLE = np.dtype('<f4')


def varint(value):
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


class _Column:
  __slots__ = ('key', 'is_float', 'width', 'values')

  def __init__(self, key, is_float, width, values):
    self.key, self.is_float, self.width, self.values = key, is_float, width, values


def _fixed_columns(batch):
  """The batch's columns as _Column (values: a (rows, width) array), or None if any column is
  not a list of float32 / int64 with the same number (>= 1) of values in every row, no nulls."""
  rows = batch.num_rows
  columns = []
  for name, array in zip(batch.schema.names, batch.columns):
    kind = array.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or array.null_count:
      return None
    value_type = kind.value_type
    if value_type == pa.float32():
      is_float = True
    elif value_type == pa.int64():
      is_float = False
    else:
      return None
    offsets = np.asarray(array.offsets)
    total = int(offsets[-1] - offsets[0])
    if total == 0 or total % rows:
      return None
    width = total // rows
    if not (np.diff(offsets) == width).all():
      return None
    values = array.values
    if values.null_count:
      return None
    values = values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]].reshape(rows, width)
    columns.append(_Column(name.encode('utf-8'), is_float, width, values))
  if not columns:
    return None
  columns.sort(key=lambda column: column.key)  # map entries in key order, within each kind
  return columns


def _float_item(key, width):
  """One float feature's bytes in Features (zeros where the values go), and the values' offset."""
  float_list = b'\x0a' + varint(4 * width) + bytes(4 * width)
  feature = b'\x12' + varint(len(float_list)) + float_list
  entry = b'\x0a' + varint(len(key)) + key + b'\x12' + varint(len(feature)) + feature
  item = b'\x0a' + varint(len(entry)) + entry
  return item, len(item) - 4 * width


def _varint_lengths(values):
  """Bytes of each value's varint (values: uint64 array)."""
  lengths = np.ones(values.shape, np.uint8)
  top = int(values.max()) if values.size else 0
  shift = 7
  while shift < 64 and top >> shift:
    lengths += values >= np.uint64(1 << shift)
    shift += 7
  return lengths


def encode(batch):
  """`batch`'s rows as serialized tf.train.Example (a list of bytes, in row order), or None if a
  column does not qualify (then tfx_bsl's encoder is the one to use).

  A row is 0x0a, the varint of its Features' length, its float items (the same length in every
  row: one block of rows x width bytes, no compaction) and its int items (compacted)."""
  columns = _fixed_columns(batch)
  if columns is None:
    return None
  rows = batch.num_rows
  floats = _float_block([column for column in columns if column.is_float], rows)
  ints = _int_block([column for column in columns if not column.is_float], rows)
  if ints is None:
    return None
  float_data, float_width = floats
  int_data, int_lengths = ints
  features_length = float_width + int_lengths
  heads = {}
  for length in np.unique(features_length).tolist():
    heads[length] = b'\x0a' + varint(length)
  float_view, int_view = memoryview(float_data), memoryview(int_data)
  ends = np.cumsum(int_lengths).tolist()
  join = b''.join
  records = []
  append = records.append
  start = 0
  float_start = 0
  for length, end in zip(features_length.tolist(), ends):
    append(join((heads[length], float_view[float_start:float_start + float_width],
                 int_view[start:end])))
    start = end
    float_start += float_width
  return records


def _float_block(columns, rows):
  """The float items of every row: (a uint8 array of rows x width, width).

  Items of the same length next to each other (keys of one length, values of one width) are
  written through one (rows, items, item length) view of the matrix: a strided copy, about 2x
  faster than an indexed one."""
  if not columns:
    return b'', 0
  runs = []  # (first byte, items, item length, values' offset in the item, [columns])
  template = bytearray()
  for column in columns:
    item, offset = _float_item(column.key, column.width)
    if runs and runs[-1][2] == len(item) and runs[-1][3] == offset:
      runs[-1][1] += 1
      runs[-1][4].append(column)
    else:
      runs.append([len(template), 1, len(item), offset, [column]])
    template += item
  width = len(template)
  template = np.frombuffer(bytes(template), np.uint8)
  matrix = np.empty((rows, width), np.uint8)
  chunk = max(1, _CHUNK_BYTES // width)
  for begin in range(0, rows, chunk):
    end = min(rows, begin + chunk)
    part = matrix[begin:end]
    part[:] = template
    for first, items, length, offset, run in runs:
      values = np.stack([c.values[begin:end] for c in run], axis=1).astype(_LITTLE, copy=False)
      view = part[:, first:first + items * length].reshape(end - begin, items, length)
      view[:, :, offset:] = values.view(np.uint8).reshape(end - begin, items, -1)
  return matrix.reshape(-1), width


def _int_block(columns, rows):
  """The int items of every row, compacted: (a uint8 array, each row's length); None if an item's
  length fields would need more than one byte."""
  if not columns:
    return b'', np.zeros(rows, np.int64)
  values = np.concatenate([c.values for c in columns], axis=1).view(np.uint64)
  lengths = _varint_lengths(values)  # (rows, values)
  starts = np.cumsum([0] + [c.width for c in columns[:-1]])
  payload = np.add.reduceat(lengths, starts, axis=1, dtype=np.int64)  # (rows, columns)
  key_lengths = np.array([len(c.key) for c in columns], np.int64)
  # One-byte length fields only: an entry (8 + key + payload bytes) stays below 128.
  if int((key_lengths + 8 + payload.max(axis=0)).max()) >= 128:
    return None
  slot_widths = lengths.max(axis=0).astype(np.int64).tolist()  # per value, the widest varint

  # Per item: 0a L 0a lk key 12 L 1a L 0a L, then a slot per value of its widest varint. Items
  # laid out alike next to each other are one run, written through a (rows, items, item length)
  # view (strided copies, as in _float_block).
  runs = []  # [first byte, first column, items, prefix length, slot widths]
  template = bytearray()
  keep_row = []
  slot = 0
  for j, column in enumerate(columns):
    prefix = b'\x0a\x00\x0a' + varint(len(column.key)) + column.key + b'\x12\x00\x1a\x00\x0a\x00'
    slots = tuple(slot_widths[slot:slot + column.width])
    slot += column.width
    if runs and runs[-1][3] == len(prefix) and runs[-1][4] == slots:
      runs[-1][2] += 1
    else:
      runs.append([len(template), j, 1, len(prefix), slots])
    template += prefix + bytes(sum(slots))
    keep_row += [True] * len(prefix) + [False] * sum(slots)
  width = len(template)
  template, keep_row = np.frombuffer(bytes(template), np.uint8), np.array(keep_row)
  value_starts = np.cumsum([0] + [c.width for c in columns])

  chunk = max(1, _CHUNK_BYTES // width)
  pieces = []
  for begin in range(0, rows, chunk):
    end = min(rows, begin + chunk)
    count = end - begin
    matrix = np.empty((count, width), np.uint8)
    matrix[:] = template
    keep = np.empty((count, width), bool)
    keep[:] = keep_row
    for first, column, items, prefix, slots in runs:
      length = prefix + sum(slots)
      view = matrix[:, first:first + items * length].reshape(count, items, length)
      kept = keep[:, first:first + items * length].reshape(count, items, length)
      part = payload[begin:end, column:column + items]
      view[:, :, 1] = 8 + key_lengths[column:column + items] + part
      view[:, :, prefix - 5] = 4 + part
      view[:, :, prefix - 3] = 2 + part
      view[:, :, prefix - 1] = part
      first_value = value_starts[column]
      run_values = values[begin:end, first_value:first_value + items * len(slots)].reshape(
          count, items, len(slots))
      run_lengths = lengths[begin:end, first_value:first_value + items * len(slots)].reshape(
          count, items, len(slots))
      at = prefix
      for m, slot_width in enumerate(slots):
        value, value_length = run_values[:, :, m], run_lengths[:, :, m]
        for byte in range(slot_width):
          view[:, :, at + byte] = (((value >> np.uint64(7 * byte)) & np.uint64(0x7F))
                                   .astype(np.uint8) | ((value_length > byte + 1) << 7))
          kept[:, :, at + byte] = value_length > byte
        at += slot_width
    pieces.append(matrix[keep])
  data = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
  return data, (10 + key_lengths + payload).sum(axis=1)
