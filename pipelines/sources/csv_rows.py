"""CSV records -> Arrow RecordBatches in TFXIO's layout, column by column with Arrow kernels, and
a dead letter for each row that cannot be read (file, line, reason, raw text)."""

import hashlib
import io
from typing import List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipelines.sources import csv_layout

RAW_TEXT_LIMIT = 1000  # characters of a rejected row kept in the dead-letter record

_ARROW_TYPES = {'int64': pa.int64(), 'float32': pa.float32(), 'string': pa.large_binary()}


def arrow_schema(fmt):
  """The Arrow schema of the batches this source emits (tfx_bsl's CSV layout)."""
  return pa.schema([pa.field(c.name, pa.large_list(_ARROW_TYPES[c.dtype])) for c in fmt.columns])


def row_hash_fraction(raw_text):
  """A row's position in [0, 1), from its content alone: the same row always lands in the same
  split, whatever file or line it comes from."""
  digest = hashlib.blake2b(raw_text.encode('utf-8', 'surrogateescape'), digest_size=8).digest()
  return int.from_bytes(digest, 'big') / 2.0**64


def _printable(text):
  text = text.rstrip('\r\n')
  if len(text) > RAW_TEXT_LIMIT:
    text = text[:RAW_TEXT_LIMIT] + '...'
  return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')


def dead_letter(path, line, kind, reason, raw):
  return {'file': path, 'line': line, 'kind': kind, 'reason': reason, 'raw': _printable(raw)}


class LineTap:
  """Feeds lines to csv.reader while remembering those of the current record and counting them."""

  def __init__(self, lines):
    self._lines = lines
    self.record = []
    self.line_no = 0
    # Set when the csv module asks for a line past the end: it only does so inside a quoted
    # field (a complete record never reads ahead), so the record it returns was never closed.
    self.exhausted = False

  def __iter__(self):
    return self

  def __next__(self):
    try:
      line = next(self._lines)
    except StopIteration:
      self.exhausted = True
      raise
    self.line_no += 1
    self.record.append(line)
    return line


def _bad_indices(array, arrow_type):
  """Positions in a string array that do not cast to `arrow_type` (bisection: cheap when rare)."""
  try:
    array.cast(arrow_type)
    return []
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
    if len(array) == 1:
      return [0]
  mid = len(array) // 2
  return _bad_indices(array[:mid], arrow_type) + [
      mid + i for i in _bad_indices(array[mid:], arrow_type)]


class Block:
  """Rows of one file gathered by the csv module for conversion to one RecordBatch."""

  def __init__(self):
    self.rows: List[List[str]] = []
    self.lines: List[int] = []
    self.raws: List[str] = []

  def __len__(self):
    return len(self.rows)

  def line(self, i):
    return self.lines[i]

  def raw(self, i):
    return self.raws[i]

  def columns(self, positions, fmt):
    by_column = list(zip(*self.rows))
    return {c.name: pa.array(by_column[positions[c.name]], pa.string()) for c in fmt.columns}


class _ArrowBlock:
  """Rows of a chunk parsed by Arrow's CSV reader, one physical line each (see fast_block)."""

  def __init__(self, columns, rows, first_line, chunk, parent=None, offset=0, line_of_row=None):
    self._columns = columns
    self._rows = rows
    self._first_line = first_line
    self._chunk = chunk
    self._parent, self._offset = parent, offset
    self._line_of_row = line_of_row  # where blank lines were skipped: row -> line index
    self._lines = None

  def __len__(self):
    return self._rows

  def line(self, i):
    if self._parent is not None:
      return self._parent.line(self._offset + i)
    return self._first_line + int(self._line_of_row[i] if self._line_of_row is not None else i)

  def raw(self, i):
    if self._parent is not None:
      return self._parent.raw(self._offset + i)
    if self._lines is None:  # only for rejected rows and --eval-fraction
      self._lines = self._chunk.split(b'\n')
    if self._line_of_row is not None:
      i = int(self._line_of_row[i])
    return self._lines[i].decode('utf-8', 'surrogateescape') + '\n'

  def columns(self, positions, fmt):
    return self._columns

  def slice(self, start, length):
    rows = min(length, self._rows - start)
    return _ArrowBlock({k: v.slice(start, rows) for k, v in self._columns.items()}, rows,
                       None, None, self, start)


def _from_text(column, original, na, bad_kind, bad_reason):
  """A column of text cells -> (its values in the column's Arrow type, null where missing
  or bad; the missing cells), bad numbers' reasons set in bad_kind / bad_reason."""
  n = len(original)

  def bad_number(rows, what):
    for i in rows:
      if bad_reason[i] is None:
        bad_kind[i] = 'bad_number'
        bad_reason[i] = f'column {column.name!r}: {original[i].as_py()!r} is {what}'

  cells = pc.utf8_trim_whitespace(original)
  missing = pc.is_in(cells, value_set=na)
  values = pc.if_else(missing, pa.scalar(None, pa.string()), cells)
  if column.dtype == 'string':
    typed = values.cast(pa.large_binary())
  else:
    arrow_type = _ARROW_TYPES[column.dtype]
    if column.dtype == 'int64':
      # Arrow's cast reads '0x1F' as 31; Python's int(), TensorFlow's CSV decoding and serving
      # (trainer.serving) refuse it, so it is no int64 here either.
      hexadecimal = pc.fill_null(pc.match_substring_regex(values, r'^0[xX]'), False)
      if pc.any(hexadecimal).as_py():
        bad_number(np.flatnonzero(hexadecimal.to_numpy(zero_copy_only=False)),
                   f'not a valid {column.dtype}')
        values = pc.if_else(hexadecimal, pa.scalar(None, pa.string()), values)
    try:  # the common case: every cell parses (one cast, no search for the bad ones)
      typed = values.cast(arrow_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      bad = _bad_indices(values, arrow_type)
      bad_number(bad, f'not a valid {column.dtype}')
      mask = np.zeros(n, bool)
      mask[bad] = True
      values = pc.if_else(pa.array(mask), pa.scalar(None, pa.string()), values)
      typed = values.cast(arrow_type)
    if column.dtype == 'float32' and not pc.all(pc.is_finite(typed)).as_py():
      nan = pc.fill_null(pc.is_nan(typed), False)
      missing = pc.or_(missing, nan)
      typed = pc.if_else(nan, pa.scalar(None, arrow_type), typed)
      bad_number(np.flatnonzero(
          pc.fill_null(pc.is_inf(typed), False).to_numpy(zero_copy_only=False)),
          'not a finite float32')
  return typed, missing


def block_to_record_batch(block, positions, fmt):
  """Converts the rows of a block column by column.

  Returns (record_batch of good rows, their indices in the block, [(row index, kind, reason)] of
  the rest).
  """
  n = len(block)
  bad_reason = [None] * n
  bad_kind = [None] * n
  columns = block.columns(positions, fmt)
  na = pa.array([''] + list(fmt.na_values), pa.string())
  converted = []
  for column in fmt.columns:
    original = columns[column.name]
    if original.type != pa.string():  # converted by Arrow's CSV reader already (fast_block)
      typed, missing = original, pc.is_null(original)
    else:
      typed, missing = _from_text(column, original, na, bad_kind, bad_reason)
    if not column.varlen and missing.true_count:
      if column.default is not None:
        typed = pc.fill_null(typed, pa.scalar(column.default, typed.type))
      else:
        for i in np.flatnonzero(missing.to_numpy(zero_copy_only=False)):
          if bad_reason[i] is None:
            bad_kind[i] = 'missing_value'
            bad_reason[i] = (f'column {column.name!r} is empty (or an NA value) and has no '
                             'default_value; make it a VarLenFeature or give it a default')
    converted.append((column, typed))

  keep = np.array([r is None for r in bad_reason], bool)
  rejected = [(i, bad_kind[i], bad_reason[i]) for i in np.flatnonzero(~keep)]
  keep_arrow = pa.array(keep) if rejected else None
  arrays = []
  for column, typed in converted:
    if keep_arrow is not None:
      typed = typed.filter(keep_arrow)
    if not typed.null_count:  # one value a row
      arrays.append(pa.LargeListArray.from_arrays(
          pa.array(np.arange(len(typed) + 1, dtype=np.int64)), typed))
      continue
    present = pc.is_valid(typed)
    values = typed.filter(present)
    if column.varlen:
      counts = present.to_numpy(zero_copy_only=False).astype(np.int64)
    else:
      counts = np.ones(len(typed), np.int64)
    offsets = np.zeros(len(typed) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    arrays.append(pa.LargeListArray.from_arrays(pa.array(offsets), values))
  batch = pa.RecordBatch.from_arrays(arrays, [c.name for c in fmt.columns])
  return batch, np.flatnonzero(keep), rejected


def fast_block(chunk, first_line, state, fmt):
  """The chunk's rows parsed by Arrow's CSV reader (C++, no Python object per cell), or None
  where its rows cannot be mapped one to one onto the chunk's lines, so that the exact reader
  must handle the chunk: quoted line breaks, blank lines, lone \r line ends, rows with a wrong
  field count, bytes that are not UTF-8. Dead letters then still name the right line. Blank
  lines are skipped, as the exact reader does. Rows the exact reader rejects and Arrow would
  take send the chunk to the exact reader too: a NUL byte, a line long enough to hold a field
  over csv_layout.FIELD_SIZE_LIMIT, bytes that are not UTF-8 in any column (Arrow only checks
  the columns it converts); and csv_chunks.record_chunks sends it a file's last chunk where a
  quoted field is still open. Each check is one C-speed pass over the bytes (or fewer), nothing
  per row.

  Numeric columns are converted by the reader itself where it gives what block_to_record_batch
  gives from the text (typed_columns): one pass instead of five Arrow calls per column (trim,
  missing values, cast, finiteness), about a third of a 300-column file's read. The reader
  refuses more cells than block_to_record_batch does (a cell of spaces, padding other than
  spaces and tabs, an NA value among spaces or quotes) and takes some that it turns away (NaN
  and infinities, which the finite check finds); either way the chunk is read again with every
  column as text, and the rest of the file too (`state.typed`). A row of the wrong width sends
  its chunk to the exact reader, and the next chunks are still converted."""
  if b'\r' in chunk and chunk.count(b'\r') != chunk.count(b'\r\n'):
    return None
  if b'\0' in chunk or _has_long_line(chunk) or not _is_utf8(chunk):
    return None
  typed = typed_columns(chunk, fmt) if state.typed else {}
  table, conversion_failed = _read_chunk(chunk, state, fmt, typed)
  if conversion_failed:  # this file's numbers are read as text from here on
    state.typed = False
    typed = {}
    table, _ = _read_chunk(chunk, state, fmt, typed)
  if table is None:
    return None
  lines = chunk.count(b'\n') + (0 if chunk.endswith(b'\n') else 1)
  line_of_row = None
  if table.num_rows != lines:  # the reader skipped blank lines, or rows went missing
    line_of_row = _nonblank_lines(chunk) if _has_blank_line(chunk) else None
    if line_of_row is None or table.num_rows != len(line_of_row):
      return None
  # Text columns as Arrow strings without validating them again: the whole chunk is UTF-8, and
  # a cell (cut at an ASCII delimiter or line break, quotes unescaped) is then UTF-8 too.
  columns = {}
  for c in fmt.columns:
    column = table.column(c.name).combine_chunks()
    columns[c.name] = column if c.name in typed else column.view(pa.string())
  return _ArrowBlock(columns, table.num_rows, first_line, chunk, line_of_row=line_of_row)


def typed_columns(chunk, fmt):
  """{column name: Arrow type} of the numeric columns that Arrow's CSV reader can convert for
  block_to_record_batch. Its numbers are Arrow's cast's (the same parser, spaces and tabs
  around them trimmed alike) and a cell it makes null is one of the NA values or empty, which
  block_to_record_batch reads as missing too. Not where an NA value has spaces of its own
  around it (block_to_record_batch compares trimmed cells), nor an int64 column where the
  chunk holds a '0x' (Arrow reads hexadecimal ints, block_to_record_batch refuses them)."""
  if any(value != value.strip() for value in fmt.na_values):
    return {}
  # one byte first: a search for one byte is many times faster than for two
  hexadecimal = (b'x' in chunk and b'0x' in chunk) or (b'X' in chunk and b'0X' in chunk)
  return {c.name: _ARROW_TYPES[c.dtype] for c in fmt.columns
          if c.dtype == 'float32' or (c.dtype == 'int64' and not hexadecimal)}


def _read_chunk(chunk, state, fmt, typed):
  """(the chunk's rows by Arrow's CSV reader, `typed` columns converted, the rest as bytes, or
  None; whether it is None because of the typed columns). None where the reader fails (with
  typed columns, which may be why), finds a row of the wrong width (whatever the columns), or a
  typed float column holds a NaN or an infinity."""
  invalid = []

  def on_invalid(row):
    invalid.append(row)
    return 'skip'

  wanted = [c.name for c in fmt.columns]
  try:
    table = pacsv.read_csv(
        io.BytesIO(chunk),
        read_options=pacsv.ReadOptions(column_names=list(state.layout.names), use_threads=False,
                                       block_size=len(chunk) + 1),
        parse_options=pacsv.ParseOptions(delimiter=fmt.delimiter, newlines_in_values=False,
                                         ignore_empty_lines=True, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={name: typed.get(name, pa.binary()) for name in wanted},
            include_columns=wanted, null_values=[''] + list(fmt.na_values) if typed else [],
            strings_can_be_null=False, quoted_strings_can_be_null=False))
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
    return None, bool(typed)
  if invalid:
    return None, False
  for name, arrow_type in typed.items():
    if pa.types.is_floating(arrow_type) and not pc.all(pc.is_finite(table.column(name))).as_py():
      return None, True
  return table, False


def _is_utf8(chunk):
  """Arrow's UTF-8 validation of the bytes in place (about 1 ms for 16 MiB; decoding them into a
  Python str takes 15)."""
  if chunk.isascii():
    return True
  offsets = pa.py_buffer(np.array([0, len(chunk)], np.int64))
  try:
    pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(chunk)]).validate(
        full=True)
    return True
  except pa.ArrowInvalid:
    return False


def _has_long_line(chunk, limit=csv_layout.FIELD_SIZE_LIMIT):
  """Whether the chunk may hold a line over `limit` bytes (and so a field over the limit), by
  finding the next line break after every limit/2-th byte: a line over `limit` holds such a
  point at least limit/2 bytes before its end. A few bytes.find calls per chunk."""
  step = limit // 2
  for start in range(0, len(chunk), step):
    end = chunk.find(b'\n', start)
    if (len(chunk) if end < 0 else end) - start >= step:
      return True
  return False


def _has_blank_line(chunk):
  return (chunk.startswith((b'\n', b'\r\n')) or b'\n\n' in chunk or b'\n\r\n' in chunk)


def _nonblank_lines(chunk):
  """Indices of the chunk's lines that are not empty (numpy over the bytes: no per-line Python)."""
  data = np.frombuffer(chunk, np.uint8)
  ends = np.flatnonzero(data == 10)
  if not chunk.endswith(b'\n'):
    ends = np.append(ends, len(chunk))
  starts = np.concatenate([[0], ends[:-1] + 1])
  lengths = ends - starts
  crlf = (lengths > 0) & (data[np.maximum(ends - 1, 0)] == 13)
  return np.flatnonzero(lengths - crlf > 0)
