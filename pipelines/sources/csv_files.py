"""CSV files -> Arrow RecordBatches in TFXIO's layout, with malformed rows sent to a dead-letter
output.

Why not tfx_bsl's CsvTFXIO: it reads line by line, cannot report the file and line of a bad row,
and fails the whole job on the first one. Users' CSVs are messy, so this reader keeps the TFXIO
contract (same Arrow schema, same TensorAdapterConfig, built by tfx_bsl from the same schema) but
decodes each file itself:
  * records come from Python's C `csv` reader, which handles quoted fields with embedded newlines
    and reports the physical line where each record starts;
  * rows are gathered into blocks and converted column by column with Arrow kernels (trim, missing
    values, number parsing), so per-row Python work is a few list appends;
  * a row that cannot be read (wrong field count, a number that does not parse, a missing value
    where the contract allows none, bytes that are not UTF-8, broken quoting) becomes a dead-letter
    record with file, line, reason and the raw text; it never stops the job.
"""

import csv
import dataclasses
import hashlib
import io
from typing import List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.sources.reading import ERRORS_TAG, EVAL_TAG, read_units
from transforms.errors import UserError

RAW_TEXT_LIMIT = 1000  # characters of a rejected row kept in the dead-letter record
# Python's csv default (128 KiB) is smaller than some real cells; larger fields are rejected rows.
FIELD_SIZE_LIMIT = 1 << 20
_SAMPLE_RECORDS = 100  # records looked at when checking a file's layout at launch

_ARROW_TYPES = {'int64': pa.int64(), 'float32': pa.float32(), 'string': pa.large_binary()}


@dataclasses.dataclass(frozen=True)
class CsvFormat:
  """How to read the CSV files of one dataset (plain data: it travels to workers)."""
  columns: tuple  # transforms.contract.Column, in RAW_FEATURE_SPEC order
  column_names: Optional[Tuple[str, ...]]  # every column in file order, for headerless files
  na_values: Tuple[str, ...] = ()
  delimiter: str = ','
  label_key: Optional[str] = None  # named as the label in messages


@dataclasses.dataclass(frozen=True)
class FileLayout:
  has_header: bool
  names: Tuple[str, ...]  # every column of the file, in order


class _RawReader(io.RawIOBase):
  """Any Beam FileSystems stream (a decompressing one too) as the raw stream `io` expects."""

  def __init__(self, stream):
    super().__init__()
    self._stream = stream

  def readable(self):
    return True

  def readinto(self, buffer):
    data = self._stream.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def close(self):
    if not self.closed:
      self._stream.close()
    super().close()


def _open_text(path):
  raw = FileSystems.open(path, mime_type='application/octet-stream',
                         compression_type=CompressionTypes.AUTO)
  # surrogateescape keeps undecodable bytes visible to us (as lone surrogates) instead of failing
  # the whole file; rows holding them are rejected one by one.
  return io.TextIOWrapper(io.BufferedReader(_RawReader(raw), buffer_size=1 << 20),
                          encoding='utf-8', errors='surrogateescape', newline='')


def _reader(lines, fmt):
  csv.field_size_limit(FIELD_SIZE_LIMIT)
  return csv.reader(lines, delimiter=fmt.delimiter)


def detect_layout(path, fmt, first_record):
  """Header or not, and the file's column names, from its first record."""
  wanted = [c.name for c in fmt.columns]
  fields = [f.strip() for f in first_record]
  if all(name in fields for name in wanted):
    if len(set(fields)) != len(fields):
      raise UserError(f'{path}: the header row names a column twice: {fields}')
    return FileLayout(True, tuple(fields))
  known = set(wanted) | set(fmt.column_names or ())
  named = sum(f in known for f in fields)
  looks_like_header = not any(_is_number(f) for f in fields) and (
      fmt.column_names is None or 2 * named >= len(fields))
  if looks_like_header:
    lacking = [n for n in wanted if n not in fields]
    label = ' (the label column among them)' if fmt.label_key in lacking else ''
    raise UserError(f'{path}: the header row lacks column(s) {lacking}{label} that the contract '
                    f'declares; add them to the file or fix RAW_FEATURE_SPEC; header is {fields}')
  if fmt.column_names is None:
    raise UserError(f'{path} has no header row; name its columns with --column-names or '
                    'CSV_COLUMNS in the transforms module')
  return FileLayout(False, tuple(fmt.column_names))


def _is_number(text):
  try:
    float(text)
    return True
  except ValueError:
    return False


def inspect_file(path, fmt):
  """Checks at launch that a file can be read and fits the contract; returns its layout, or None
  for a file with no data rows (empty, or a header row alone). Raises UserError with one line
  naming the file otherwise."""
  complete = True  # every record up to the end (or to the sample's size) was readable
  try:
    with _open_text(path) as f:
      reader = _reader(f, fmt)
      records = []
      try:
        for row in reader:
          if row:
            records.append(row)
            if len(records) >= _SAMPLE_RECORDS:
              break
      except csv.Error as e:
        if not records:  # nothing tells the file's layout
          raise UserError(f'{path}: its first record is not readable CSV ({e}); fix the file '
                          'or leave it out') from e
        complete = False  # a malformed record is a bad row, found and reported by the job itself
  except UserError:
    raise
  except Exception as e:  # any filesystem's error: not found, permission, corrupt gzip...
    raise UserError(f'cannot read {path}: {type(e).__name__}: {e}') from e
  if not records:
    return None
  layout = detect_layout(path, fmt, records[0])
  data = records[1:] if layout.has_header else records
  if not data and complete:
    return None
  if data and not any(len(r) == len(layout.names) for r in data):
    counts = sorted({len(r) for r in data})
    raise UserError(
        f'{path}: rows have {"/".join(map(str, counts))} fields but {len(layout.names)} columns '
        f'are expected ({", ".join(layout.names)}); fix CSV_COLUMNS/--column-names or the file')
  return layout


def match_inputs(patterns, flag):
  """Expands the user's paths/globs (any Beam filesystem) into {file: size in bytes}, in the
  patterns' order; a pattern matching nothing is an error."""
  files = {}
  for pattern in patterns:
    try:
      result = FileSystems.match([pattern])[0]
    except Exception as e:
      raise UserError(f'{flag} {pattern}: cannot list it: {e}') from e
    found = sorted((m.path, m.size_in_bytes) for m in result.metadata_list
                   if not m.path.endswith('/'))
    if not found:
      raise UserError(f'{flag} {pattern}: no file matches; check the path or glob')
    for path, size in found:
      files.setdefault(path, size)
  return files


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


def _error(path, line, kind, reason, raw):
  return {'file': path, 'line': line, 'kind': kind, 'reason': reason, 'raw': _printable(raw)}


class _LineTap:
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


class _Block:
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
  """Rows of a chunk parsed by Arrow's CSV reader, one physical line each (see _fast_block)."""

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
    cells = pc.utf8_trim_whitespace(original)
    missing = pc.is_in(cells, value_set=na)
    values = pc.if_else(missing, pa.scalar(None, pa.string()), cells)
    if column.dtype == 'string':
      typed = values.cast(pa.large_binary())
    else:
      arrow_type = _ARROW_TYPES[column.dtype]
      try:  # the common case: every cell parses (one cast, no search for the bad ones)
        typed = values.cast(arrow_type)
      except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        bad = _bad_indices(values, arrow_type)
        for i in bad:
          if bad_reason[i] is None:
            bad_kind[i] = 'bad_number'
            bad_reason[i] = (f'column {column.name!r}: {original[i].as_py()!r} is '
                             f'not a valid {column.dtype}')
        mask = np.zeros(n, bool)
        mask[bad] = True
        values = pc.if_else(pa.array(mask), pa.scalar(None, pa.string()), values)
        typed = values.cast(arrow_type)
      if column.dtype == 'float32' and not pc.all(pc.is_finite(typed)).as_py():
        nan = pc.fill_null(pc.is_nan(typed), False)
        missing = pc.or_(missing, nan)
        typed = pc.if_else(nan, pa.scalar(None, arrow_type), typed)
        infinite = np.flatnonzero(
            pc.fill_null(pc.is_inf(typed), False).to_numpy(zero_copy_only=False))
        for i in infinite:
          if bad_reason[i] is None:
            bad_kind[i] = 'bad_number'
            bad_reason[i] = (f'column {column.name!r}: {original[i].as_py()!r} is '
                             'not a finite float32')
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


def arrow_schema(fmt):
  """The Arrow schema of the batches this source emits (tfx_bsl's CSV layout)."""
  return pa.schema([pa.field(c.name, pa.large_list(_ARROW_TYPES[c.dtype])) for c in fmt.columns])


class ReadCsvFileFn(beam.DoFn):
  """file path -> RecordBatches (main output, and EVAL_TAG when carving an eval split) and
  dead-letter dicts (ERRORS_TAG, with a 'split' key)."""

  def __init__(self, fmt, split, eval_fraction=0.0, rows_per_batch=8192):
    self._fmt = fmt
    self._split = split
    self._eval_fraction = eval_fraction
    self._rows_per_batch = rows_per_batch

  def _split_of(self, raw):
    if self._eval_fraction and row_hash_fraction(raw.rstrip('\r\n')) < self._eval_fraction:
      return EVAL_TAG
    return self._split

  def _reject(self, path, line, kind, reason, raw):
    record = _error(path, line, kind, reason, raw)
    record['split'] = self._split_of(raw)
    return beam.pvalue.TaggedOutput(ERRORS_TAG, record)

  def _emit_block(self, block, positions, path):
    batch, kept, rejected = block_to_record_batch(block, positions, self._fmt)
    for i, kind, reason in rejected:
      yield self._reject(path, block.line(i), kind, reason, block.raw(i))
    if not self._eval_fraction:
      if batch.num_rows:
        yield batch
      return
    to_eval = np.array([row_hash_fraction(block.raw(i).rstrip('\r\n')) < self._eval_fraction
                        for i in kept], bool)
    train, evaluate = batch.filter(pa.array(~to_eval)), batch.filter(pa.array(to_eval))
    if train.num_rows:
      yield train
    if evaluate.num_rows:
      yield beam.pvalue.TaggedOutput(EVAL_TAG, evaluate)

  def process(self, unit):
    """`unit`: a file path, or a FileRange of one (see plan_ranges)."""
    if isinstance(unit, str):
      unit = FileRange(unit, 0, None, 1, None)
    path = unit.path
    state = _FileState()
    if unit.layout is not None:  # a range after the first: the header was read at launch
      state.set_layout(unit.layout)
    raw = FileSystems.open(path, mime_type='application/octet-stream',
                           compression_type=CompressionTypes.AUTO)
    if unit.start:
      raw.seek(unit.start)
    if unit.end is not None:
      raw = _Limited(raw, unit.end - unit.start)
    with raw:
      for chunk, first_line in _record_chunks(raw, unit.first_line, self._fmt.delimiter):
        if not isinstance(chunk, bytes):  # the rest of the stream, to read record by record
          rest = io.TextIOWrapper(io.BufferedReader(_RawReader(chunk), buffer_size=1 << 20),
                                  encoding='utf-8', errors='surrogateescape', newline='')
          yield from self._python_rows(rest, first_line, state, path)
          break
        block = _fast_block(chunk, first_line, state, self._fmt) if state.layout else None
        if block is not None:
          for start in range(0, len(block), self._rows_per_batch):
            yield from self._emit_block(block.slice(start, self._rows_per_batch),
                                        state.positions, path)
        else:
          text = io.StringIO(chunk.decode('utf-8', 'surrogateescape'), newline='')
          yield from self._python_rows(text, first_line, state, path)

  def _python_rows(self, lines, first_line, state, path):
    """Records of a text stream starting at line `first_line`, read by Python's csv module: the
    exact path, for chunks that Arrow's reader cannot map back to lines (see _fast_block)."""
    fmt = self._fmt
    tap = _LineTap(lines)
    tap.line_no = first_line - 1
    reader = _reader(tap, fmt)
    block = _Block()
    while True:
      start = tap.line_no + 1
      tap.record.clear()
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error as e:
        yield self._reject(path, start, 'malformed_csv', f'malformed CSV: {e}',
                           ''.join(tap.record))
        continue
      if not row:
        continue  # a blank line is not a row
      raw = tap.record[0] if len(tap.record) == 1 else ''.join(tap.record)
      if tap.exhausted:  # the csv module asked for more lines to close a quoted field
        yield self._reject(path, start, 'malformed_csv', 'malformed CSV: a quoted field is '
                           'still open at the end of the file (its closing quote is missing)',
                           raw)
        continue
      if '\0' in raw:
        yield self._reject(path, start, 'malformed_csv', 'malformed CSV: a NUL byte (binary '
                           'data in a text file, or a damaged file)', raw)
        continue
      if state.layout is None:
        try:
          state.set_layout(detect_layout(path, fmt, row))
        except UserError as e:  # checked at launch; a file changed since is this row's problem
          yield self._reject(path, start, 'bad_header', str(e), raw)
          continue
        if state.layout.has_header:
          continue
      if len(row) != state.width:
        yield self._reject(path, start, 'field_count',
                           f'{len(row)} fields, expected {state.width}', raw)
        continue
      if not raw.isascii():
        try:
          raw.encode('utf-8')
        except UnicodeEncodeError:
          yield self._reject(path, start, 'bad_encoding', 'bytes that are not valid UTF-8', raw)
          continue
      block.rows.append(row)
      block.lines.append(start)
      block.raws.append(raw)
      if len(block.rows) >= self._rows_per_batch:
        yield from self._emit_block(block, state.positions, path)
        block = _Block()
    if block.rows:
      yield from self._emit_block(block, state.positions, path)


class _FileState:
  """What reading a file has learned so far: its layout (from its first record)."""

  def __init__(self):
    self.layout = None
    self.positions = None
    self.width = None

  def set_layout(self, layout):
    self.layout = layout
    self.positions = {name: i for i, name in enumerate(layout.names)}
    self.width = len(layout.names)


# Files are read in chunks of whole records. The first chunk is small, so that the exact
# (Python csv) reader, which finds the header, handles few rows; later chunks are large.
_FIRST_CHUNK = 64 << 10
_CHUNK = 16 << 20
_MAX_CHUNK = 256 << 20  # no record boundary in this much: give up chunking (broken quoting)


def _line_breaks(data, end=None):
  """Line breaks as Python's universal newlines count them: \n, \r\n and a lone \r."""
  end = len(data) if end is None else end
  return data.count(b'\n', 0, end) + data.count(b'\r', 0, end) - data.count(b'\r\n', 0, end)


def _record_boundary(buffer):
  """The end of the last whole line in `buffer` that is outside quotes (an even number of quote
  characters before it), or None. Right where `buffer` starts a record and has no stray quote
  (see _has_stray_quote)."""
  pos = buffer.rfind(b'\n')
  while pos >= 0:
    if buffer.count(b'"', 0, pos) % 2 == 0:
      return pos + 1
    pos = buffer.rfind(b'\n', 0, pos)
  return None


_QUOTE = ord('"')


def _has_stray_quote(buffer, delimiter, odd_before=False, previous=b'\n'):
  """Whether `buffer` holds a quote character that Python's csv module reads as text: one outside
  a quoted field that does not start a field (`5'10"`, `ab"c`, `"a"b"c`).

  Counting quote characters tells inside a quoted field from outside only without such quotes:
  every quote that the count says is outside (an even number before it) must open a field
  (follow a delimiter, a line break or the start) or follow a quote (the second of an escaped
  `""`). One pass of numpy over the quotes' positions; nothing when there is no quote at all.
  `odd_before`: an odd number of quotes comes before `buffer`; `previous`: the byte before it.
  """
  if b'"' not in buffer:
    return False
  data = np.frombuffer(buffer, np.uint8)
  quotes = np.flatnonzero(data == _QUOTE)
  outside = quotes[1 if odd_before else 0::2]
  before = data[np.maximum(outside - 1, 0)]
  before[outside == 0] = previous[0]
  return not np.isin(before, np.frombuffer(delimiter.encode() + b'\n\r"', np.uint8)).all()


def _record_chunks(stream, first_line=1, delimiter=','):
  """(chunk of whole records, its first line number) through the file. Once no record boundary
  can be found (none in _MAX_CHUNK bytes: broken quoting; or a stray quote, which makes quote
  counting unreliable) it yields (a stream of the rest, line) instead and stops: the caller
  reads the rest record by record with the csv module."""
  buffer, line, size, eof = b'', first_line, _FIRST_CHUNK, False
  odd = False  # an odd number of quote characters in `buffer` (a chunk cut off holds an even one)
  while True:
    if not eof:
      data = stream.read(size)
      eof = not data
      # Only the new bytes are checked for stray quotes: what the buffer holds already was.
      stray = _has_stray_quote(data, delimiter, odd, buffer[-1:] or b'\n')
      odd ^= data.count(b'"') % 2 == 1
      buffer += data
    if not buffer:
      return
    # The exact reader takes over where quote counting fails, and for a last chunk that ends in
    # an open quoted field (Arrow would take it).
    if stray or (eof and odd):
      yield _Prepend(buffer, stream), line
      return
    cut = len(buffer) if eof else _record_boundary(buffer)
    if cut is None:
      if len(buffer) > _MAX_CHUNK:
        yield _Prepend(buffer, stream), line
        return
      size = _CHUNK
      continue
    chunk, buffer = buffer[:cut], buffer[cut:]
    yield chunk, line
    line += _line_breaks(chunk)
    size = _CHUNK


class _Limited:
  """The next `size` bytes of a stream."""

  def __init__(self, stream, size):
    self._stream, self._left = stream, size

  def read(self, size=-1):
    size = self._left if size < 0 else min(size, self._left)
    data = self._stream.read(size) if size else b''
    self._left -= len(data)
    return data

  def close(self):
    self._stream.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@dataclasses.dataclass(frozen=True)
class FileRange:
  """Records of `path` from byte `start` (a record's first byte, on line `first_line`) to byte
  `end` (the next range's start; None: the end of the file). `layout`: the file's, for ranges
  that do not hold its first record."""
  path: str
  start: int
  end: Optional[int]
  first_line: int
  layout: Optional[FileLayout]


RANGE_BYTES = 32 << 20  # uncompressed files are read in ranges of about this size
_SCAN_BLOCK = 16 << 20


def plan_ranges(path, size, layout, range_bytes=RANGE_BYTES, delimiter=','):
  """Splits an uncompressed file into FileRanges that start on record boundaries, so that workers
  read a large file in parallel; compressed and small files are one range.

  A record starts after a line break outside quotes (an even number of quote characters before
  it), so the boundaries come from one sequential pass over the file counting quotes and line
  breaks in C (bytes.count): about 0.1 s for 100 MB here. It also gives each range the line
  number its first record is on, for dead letters. A stray quote (see _has_stray_quote) before
  the last cut makes the count unreliable: such a file is read as one range.
  """
  compressed = CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED
  if compressed or size < 2 * range_bytes:
    return [FileRange(path, 0, None, 1, None)]
  targets = [k * size // (size // range_bytes) for k in range(1, size // range_bytes)]
  starts = [(0, 1)]
  quotes = lines = 0  # before `offset`
  offset, carry_cr, previous = 0, False, b'\n'
  with FileSystems.open(path, mime_type='application/octet-stream',
                        compression_type=CompressionTypes.UNCOMPRESSED) as f:
    while targets:
      block = f.read(_SCAN_BLOCK)
      if not block:
        break
      if _has_stray_quote(block, delimiter, quotes % 2 == 1, previous):
        return [FileRange(path, 0, None, 1, None)]
      previous = block[-1:]
      end = offset + len(block)
      while targets and targets[0] <= end:
        pos = max(targets[0], offset + 1) - 1 - offset  # look for a \n at or after target - 1
        found = None
        while True:
          i = block.find(b'\n', pos)
          if i < 0:
            break
          if (quotes + block.count(b'"', 0, i)) % 2 == 0:
            found = i + 1
            break
          pos = i + 1
        if found is None:
          break  # the boundary is in a later block
        if offset + found < size and offset + found > starts[-1][0]:
          starts.append((offset + found, lines + _line_breaks(block, found) -
                         (1 if carry_cr and block.startswith(b'\n') else 0) + 1))
        targets.pop(0)
      quotes += block.count(b'"')
      lines += _line_breaks(block) - (1 if carry_cr and block.startswith(b'\n') else 0)
      carry_cr = block.endswith(b'\r')
      offset = end
  ranges = []
  for k, (start, line) in enumerate(starts):
    end = starts[k + 1][0] if k + 1 < len(starts) else None
    ranges.append(FileRange(path, start, end, line, layout if start else None))
  return ranges


class _Prepend:
  """A stream that first returns `head`, then the rest of `stream`."""

  def __init__(self, head, stream):
    self._head, self._stream = head, stream

  def read(self, size=-1):
    if self._head:
      data, self._head = self._head[:size], self._head[size:]
      return data
    return self._stream.read(size)

  def close(self):
    self._stream.close()


def _fast_block(chunk, first_line, state, fmt):
  """The chunk's rows parsed by Arrow's CSV reader (C++, no Python object per cell), or None
  where its rows cannot be mapped one to one onto the chunk's lines, so that the exact reader
  must handle the chunk: quoted line breaks, blank lines, lone \r line ends, rows with a wrong
  field count, bytes that are not UTF-8. Dead letters then still name the right line. Blank
  lines are skipped, as the exact reader does. Rows the exact reader rejects and Arrow would
  take send the chunk to the exact reader too: a NUL byte, a line long enough to hold a field
  over FIELD_SIZE_LIMIT, bytes that are not UTF-8 in any column (Arrow only checks the columns
  it converts); and _record_chunks sends it a file's last chunk where a quoted field is still
  open. Each check is one C-speed pass over the bytes (or fewer), nothing per row."""
  if b'\r' in chunk and chunk.count(b'\r') != chunk.count(b'\r\n'):
    return None
  if b'\0' in chunk or _has_long_line(chunk) or not _is_utf8(chunk):
    return None
  line_of_row = _nonblank_lines(chunk) if _has_blank_line(chunk) else None
  lines = (len(line_of_row) if line_of_row is not None else
           chunk.count(b'\n') + (0 if chunk.endswith(b'\n') else 1))
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
            column_types={name: pa.binary() for name in wanted}, include_columns=wanted,
            null_values=[], strings_can_be_null=False, quoted_strings_can_be_null=False))
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
    return None
  if invalid or table.num_rows != lines:
    return None
  try:  # validates UTF-8
    columns = {name: table.column(name).combine_chunks().cast(pa.string()) for name in wanted}
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
    return None
  return _ArrowBlock(columns, table.num_rows, first_line, chunk, line_of_row=line_of_row)


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


def _has_long_line(chunk, limit=FIELD_SIZE_LIMIT):
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


class ReadCsv(beam.PTransform):
  """Matched CSV files, or FileRanges of them (plan_ranges) -> (RecordBatches, eval RecordBatches
  or None, dead-letter dicts)."""

  def __init__(self, files: Sequence[str], fmt: CsvFormat, split: str, eval_fraction=0.0,
               rows_per_batch=8192, spill=None):
    super().__init__()
    self._files = list(files)
    self._fmt = fmt
    self._split = split
    self._eval_fraction = eval_fraction
    self._rows_per_batch = rows_per_batch
    self._spill = spill

  def expand(self, pbegin):
    return read_units(pbegin, self._files, ReadCsvFileFn(
        self._fmt, self._split, self._eval_fraction, self._rows_per_batch), self._eval_fraction,
                      self._spill)
