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

The parts: csv_layout.py (launch-time checks, ranges), csv_chunks.py (record boundaries),
csv_rows.py (rows -> RecordBatches and dead letters); this module is the Beam source."""

import csv
import io
from typing import Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.sources import csv_chunks, csv_layout, csv_rows
from pipelines.sources.reading import ERRORS_TAG, EVAL_TAG, read_units
from transforms.errors import UserError


def span_of(unit):
  """A work unit's span for the analysis cache: its file (a whole file, or a range of one)."""
  path = unit if isinstance(unit, str) else unit.path
  return path, (path,)


class ReadCsvFileFn(beam.DoFn):
  """file path -> RecordBatches (main output, and EVAL_TAG when carving an eval split) and
  dead-letter dicts (ERRORS_TAG, with a 'split' key)."""

  def __init__(self, fmt, split, eval_fraction=0.0, rows_per_batch=8192):
    self._fmt = fmt
    self._split = split
    self._eval_fraction = eval_fraction
    self._rows_per_batch = rows_per_batch

  def _split_of(self, raw):
    if self._eval_fraction and csv_rows.row_hash_fraction(raw.rstrip('\r\n')) < self._eval_fraction:
      return EVAL_TAG
    return self._split

  def _reject(self, path, line, kind, reason, raw):
    record = csv_rows.dead_letter(path, line, kind, reason, raw)
    record['split'] = self._split_of(raw)
    return beam.pvalue.TaggedOutput(ERRORS_TAG, record)

  def _emit_block(self, block, positions, path):
    batch, kept, rejected = csv_rows.block_to_record_batch(block, positions, self._fmt)
    for i, kind, reason in rejected:
      yield self._reject(path, block.line(i), kind, reason, block.raw(i))
    if not self._eval_fraction:
      if batch.num_rows:
        yield batch
      return
    fraction = csv_rows.row_hash_fraction
    to_eval = np.array([fraction(block.raw(i).rstrip('\r\n')) < self._eval_fraction
                        for i in kept], bool)
    train, evaluate = batch.filter(pa.array(~to_eval)), batch.filter(pa.array(to_eval))
    if train.num_rows:
      yield train
    if evaluate.num_rows:
      yield beam.pvalue.TaggedOutput(EVAL_TAG, evaluate)

  def process(self, unit):
    """`unit`: a file path, or a csv_layout.FileRange of one (see csv_layout.plan_ranges)."""
    if isinstance(unit, str):
      unit = csv_layout.FileRange(unit, 0, None, 1, None)
    path = unit.path
    state = _FileState()
    if unit.layout is not None:  # a range after the first: the header was read at launch
      state.set_layout(unit.layout)
    raw = FileSystems.open(path, mime_type='application/octet-stream',
                           compression_type=CompressionTypes.AUTO)
    if unit.start:
      raw.seek(unit.start)
    if unit.end is not None:
      raw = csv_chunks.Limited(raw, unit.end - unit.start)
    with raw:
      for chunk, first_line in csv_chunks.record_chunks(raw, unit.first_line, self._fmt.delimiter):
        if not isinstance(chunk, bytes):  # the rest of the stream, to read record by record
          rest = io.TextIOWrapper(
              io.BufferedReader(csv_layout.RawReader(chunk), buffer_size=1 << 20),
              encoding='utf-8', errors='surrogateescape', newline='')
          yield from self._python_rows(rest, first_line, state, path)
          break
        block = csv_rows.fast_block(chunk, first_line, state, self._fmt) if state.layout else None
        if block is not None:
          for start in range(0, len(block), self._rows_per_batch):
            yield from self._emit_block(block.slice(start, self._rows_per_batch),
                                        state.positions, path)
        else:
          text = io.StringIO(chunk.decode('utf-8', 'surrogateescape'), newline='')
          yield from self._python_rows(text, first_line, state, path)

  def _python_rows(self, lines, first_line, state, path):
    """Records of a text stream starting at line `first_line`, read by Python's csv module: the
    exact path, for chunks that Arrow's reader cannot map back to lines (csv_rows.fast_block)."""
    fmt = self._fmt
    tap = csv_rows.LineTap(lines)
    tap.line_no = first_line - 1
    reader = csv_layout.csv_reader(tap, fmt)
    block = csv_rows.Block()
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
          state.set_layout(csv_layout.detect_layout(path, fmt, row))
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
        block = csv_rows.Block()
    if block.rows:
      yield from self._emit_block(block, state.positions, path)


class _FileState:
  """What reading a file has learned so far: its layout (from its first record), and whether
  Arrow's CSV reader may still convert its numeric columns (csv_rows.fast_block)."""

  def __init__(self):
    self.layout = None
    self.positions = None
    self.width = None
    self.typed = True

  def set_layout(self, layout):
    self.layout = layout
    self.positions = {name: i for i, name in enumerate(layout.names)}
    self.width = len(layout.names)


class ReadCsv(beam.PTransform):
  """Matched CSV files, or FileRanges of them (csv_layout.plan_ranges) -> (RecordBatches, eval
  RecordBatches or None, dead-letter dicts)."""

  def __init__(self, files: Sequence[str], fmt: csv_layout.CsvFormat, split: str, eval_fraction=0.0,
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
