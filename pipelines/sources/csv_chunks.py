"""Record boundaries in CSV bytes: a file read in chunks that each end on a record's end, whatever
quoted fields with line breaks it holds, and where quoting is broken."""


import numpy as np

# Files are read in chunks of whole records. The first chunk is small, so that the exact
# (Python csv) reader, which finds the header, handles few rows; later chunks are large.
_FIRST_CHUNK = 64 << 10
_CHUNK = 16 << 20
_MAX_CHUNK = 256 << 20  # no record boundary in this much: give up chunking (broken quoting)


def line_breaks(data, end=None):
  """Line breaks as Python's universal newlines count them: \n, \r\n and a lone \r."""
  end = len(data) if end is None else end
  if b'\r' not in data:  # one fast search spares two counts
    return data.count(b'\n', 0, end)
  return data.count(b'\n', 0, end) + data.count(b'\r', 0, end) - data.count(b'\r\n', 0, end)


def _record_boundary(buffer):
  """The end of the last whole line in `buffer` that is outside quotes (an even number of quote
  characters before it), or None. Right where `buffer` starts a record and has no stray quote
  (see has_stray_quote)."""
  pos = buffer.rfind(b'\n')
  while pos >= 0:
    if buffer.count(b'"', 0, pos) % 2 == 0:
      return pos + 1
    pos = buffer.rfind(b'\n', 0, pos)
  return None


_QUOTE = ord('"')


def has_stray_quote(buffer, delimiter, odd_before=False, previous=b'\n'):
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


def record_chunks(stream, first_line=1, delimiter=','):
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
      stray = has_stray_quote(data, delimiter, odd, buffer[-1:] or b'\n')
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
    line += line_breaks(chunk)
    size = _CHUNK


class Limited:
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
