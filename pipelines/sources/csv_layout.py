"""What a CSV file looks like, checked at launch before any work starts (its header or column
names, its field count, its first records), and how a large file is cut into ranges that start
on record boundaries, so that workers read them side by side."""

import csv
import dataclasses
import io
from typing import Optional, Tuple

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.sources import csv_chunks
from transforms.errors import UserError

# Python's csv default (128 KiB) is smaller than some real cells; larger fields are rejected rows.
FIELD_SIZE_LIMIT = 1 << 20
_SAMPLE_RECORDS = 100  # records looked at when checking a file's layout at launch


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


class RawReader(io.RawIOBase):
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


def open_text(path):
  raw = FileSystems.open(path, mime_type='application/octet-stream',
                         compression_type=CompressionTypes.AUTO)
  # surrogateescape keeps undecodable bytes visible to us (as lone surrogates) instead of failing
  # the whole file; rows holding them are rejected one by one.
  return io.TextIOWrapper(io.BufferedReader(RawReader(raw), buffer_size=1 << 20),
                          encoding='utf-8', errors='surrogateescape', newline='')


def csv_reader(lines, fmt):
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
    with open_text(path) as f:
      reader = csv_reader(f, fmt)
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
  number its first record is on, for dead letters. A stray quote (csv_chunks.has_stray_quote)
  before the last cut makes the count unreliable: such a file is read as one range.
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
      if csv_chunks.has_stray_quote(block, delimiter, quotes % 2 == 1, previous):
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
          starts.append((offset + found, lines + csv_chunks.line_breaks(block, found) -
                         (1 if carry_cr and block.startswith(b'\n') else 0) + 1))
        targets.pop(0)
      quotes += block.count(b'"')
      lines += csv_chunks.line_breaks(block) - (1 if carry_cr and block.startswith(b'\n') else 0)
      carry_cr = block.endswith(b'\r')
      offset = end
  ranges = []
  for k, (start, line) in enumerate(starts):
    end = starts[k + 1][0] if k + 1 < len(starts) else None
    ranges.append(FileRange(path, start, end, line, layout if start else None))
  return ranges
