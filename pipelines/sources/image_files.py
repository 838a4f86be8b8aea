"""Image inputs -> Arrow RecordBatches of (image, label), with unusable images sent to dead letters.

Three layouts, all read through Beam FileSystems (so gs:// and any registered filesystem work):
  * a class-folder tree, ROOT/<label>/<file> (the `image_dataset_from_directory` layout);
  * WebDataset tar shards (*.tar, *.tar.gz, *.tgz): members `<key>.jpg|jpeg|png` with the label in
    `<key>.cls` or `<key>.txt`, the members of one sample adjacent;
  * TFRecord shards (*.tfrecord[s][.gz]) of tf.train.Example with the encoded image and the label
    under configurable keys (`image/encoded`, `image/class/label` by default).

Every image is checked before it reaches TF Transform, because one undecodable image inside a
decode op of the transform graph would fail the whole bundle (TF ops have no per-element recovery):
  1. size: empty files, and files over --max-image-bytes, are rejected without being decoded;
  2. format: only JPEG and PNG (by their signature bytes, whatever the file name says);
  3. the header's width x height against --max-pixels, before any pixel is decoded (a small file
     can claim gigapixels: a decompression bomb);
  4. decoding with the very op the transform graph uses (tf.io.decode_image, same channels). The
     whole batch is decoded in one graph call first (about a third of the cost of decoding image
     by image eagerly); only when that fails is the batch decoded image by image to find the
     culprits.
Rejected images become dead-letter records (split, file, key, kind, reason, bytes); the run goes on.
Tar member names are only ever used as keys: nothing is extracted to the filesystem.
"""

import dataclasses
import hashlib
import struct
from typing import List, Optional, Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.sources.reading import ERRORS_TAG, EVAL_TAG, read_units
from transforms.errors import UserError

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png')
LABEL_EXTENSIONS = ('cls', 'txt')  # WebDataset: .cls holds a class index, .txt a class name
TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz')
TFRECORD_SUFFIXES = ('.tfrecord', '.tfrecords', '.tfrecord.gz', '.tfrecords.gz')
FILES_PER_ELEMENT = 256  # class-folder files read by one Beam element
_BATCH_BYTES = 64 << 20  # a RecordBatch is cut at this many image bytes, whatever its row count
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
JPEG_SIGNATURE = b'\xff\xd8\xff'
# JPEG start-of-frame markers (they carry the image size): C0-CF except DHT, JPG and DAC.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclasses.dataclass(frozen=True)
class ImageFormat:
  """How to read and check images (plain data: it travels to workers)."""
  channels: int = 3
  max_pixels: int = 50_000_000
  max_bytes: int = 32 << 20
  image_key: str = 'image/encoded'  # TFRecord inputs
  label_key: str = 'image/class/label'


def arrow_schema():
  """TFXIO's layout: every column a list of values, one list per image. `key` (the file path,
  `<tar key>` or `<TFRecord file>#<index>`) rides along for tracing; the transform's inputs
  are `image` and `label` only."""
  return pa.schema([('key', pa.large_list(pa.large_binary())),
                    ('image', pa.large_list(pa.large_binary())),
                    ('label', pa.large_list(pa.large_binary()))])


# ---- listing the inputs ---------------------------------------------------------------------


def _kind_of(path):
  lower = path.lower()
  if lower.endswith(TAR_SUFFIXES):
    return 'tar'
  if lower.endswith(TFRECORD_SUFFIXES):
    return 'tfrecord'
  return None


def _match(pattern, flag):
  try:
    result = FileSystems.match([pattern])[0]
  except Exception as e:
    raise UserError(f'{flag} {pattern}: cannot list it: {e}') from e
  return sorted((m.path, m.size_in_bytes) for m in result.metadata_list
                if not m.path.endswith('/'))


def span_of(unit):
  """A work unit's span for the analysis cache, and the files it reads: a shard is its own
  span; the images of a class-folder tree are one span, its root's (ROOT/<label>/<image>)."""
  kind, payload = unit
  if kind != 'files':
    return payload, (payload,)
  root = payload[0][0].rsplit('/', 2)[0]
  return root, tuple(path for path, _ in payload)


def match_image_inputs(patterns, flag):
  """The user's paths -> work units: ('tar', path), ('tfrecord', path) or ('files', [(path,
  label)...]); and the total bytes. A path that is not a tar or TFRecord shard is a class-folder
  root. Anything matching nothing is a UserError."""
  units, total = [], 0
  for pattern in patterns:
    kind = _kind_of(pattern.rstrip('*'))
    if kind:
      found = _match(pattern, flag)
      if not found:
        raise UserError(f'{flag} {pattern}: no file matches; check the path or glob')
      for path, size in found:
        units.append((_kind_of(path) or kind, path))
        total += size
      continue
    root = pattern.rstrip('/')
    found = _match(FileSystems.join(root, '*', '*'), flag)
    if not found:
      shards = [p for p, _ in _match(pattern, flag) if _kind_of(p)]
      hint = (f'; it matches shards ({shards[0]}, ...): give a glob ending in .tar or .tfrecord'
              if shards else '')
      raise UserError(f'{flag} {pattern}: no ROOT/<label>/<image> files under it (a class-folder '
                      'tree), and it is not a tar (.tar, .tar.gz, .tgz) or TFRecord '
                      f'(.tfrecord[.gz]) shard{hint}')
    files = [(path, path[:path.rindex('/')].rsplit('/', 1)[-1]) for path, _ in found]
    total += sum(size for _, size in found)
    for i in range(0, len(files), FILES_PER_ELEMENT):
      units.append(('files', files[i:i + FILES_PER_ELEMENT]))
  if not total:
    raise UserError(f'{flag} {" ".join(patterns)}: every matched file is empty (0 bytes); check '
                    'the paths')
  return units, total


# ---- checking one image ---------------------------------------------------------------------


def _jpeg_size(data):
  """(height, width) from a JPEG's start-of-frame segment, or None if the markers are broken."""
  pos = 2
  while pos + 4 <= len(data):
    if data[pos] != 0xFF:
      return None
    marker = data[pos + 1]
    if marker == 0xFF:  # fill byte
      pos += 1
      continue
    if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # markers without a length
      pos += 2
      continue
    length = struct.unpack('>H', data[pos + 2:pos + 4])[0]
    if marker in _SOF:
      if pos + 9 > len(data):
        return None
      height, width = struct.unpack('>HH', data[pos + 5:pos + 9])
      return height, width
    if marker == 0xDA or length < 2:  # start of scan before any frame header
      return None
    pos += 2 + length
  return None


def check_header(data, fmt):
  """(kind, reason) of an image that must not be decoded, or None."""
  if not data:
    return 'empty_file', 'zero bytes'
  if len(data) > fmt.max_bytes:
    return 'too_large', f'{len(data):,} bytes, over --max-image-bytes {fmt.max_bytes:,}'
  if data.startswith(PNG_SIGNATURE):
    if len(data) < 24 or data[12:16] != b'IHDR':
      return 'corrupt_image', 'PNG without a valid IHDR header'
    width, height = struct.unpack('>II', data[16:24])
  elif data.startswith(JPEG_SIGNATURE):
    size = _jpeg_size(data)
    if size is None:
      return 'corrupt_image', 'JPEG without a readable frame header'
    height, width = size
  else:
    return 'not_an_image', f'not a JPEG or PNG (starts with {data[:8]!r})'
  if width == 0 or height == 0:
    return 'corrupt_image', f'header says {width}x{height} pixels'
  if width * height > fmt.max_pixels:
    return 'too_many_pixels', (f'header says {width}x{height} = {width * height:,} pixels, over '
                               f'--max-pixels {fmt.max_pixels:,}')
  return None


class _Decoder:
  """Decodes like the transform graph; finds the images of a batch that it cannot decode."""

  def __init__(self, channels):
    import tensorflow as tf  # imported on the worker, where the DoFn is set up
    self._tf = tf
    self._channels = channels

    def decode_one(data):
      image = tf.io.decode_image(data, channels=channels, expand_animations=False)
      return tf.cast(tf.size(image), tf.int64)  # a data dependency, so the decode is not pruned

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def decode_all(batch):
      return tf.map_fn(decode_one, batch, fn_output_signature=tf.int64)

    self._decode_all = decode_all

  def failures(self, images):
    """{index: reason} of the images that do not decode."""
    tf = self._tf
    if not images:
      return {}
    try:
      self._decode_all(tf.constant(images))
      return {}
    except tf.errors.OpError:
      pass
    failed = {}
    for i, data in enumerate(images):
      try:
        tf.io.decode_image(data, channels=self._channels, expand_animations=False)
      except tf.errors.OpError as e:
        failed[i] = 'cannot be decoded: ' + e.message.strip().splitlines()[-1][:200]
    return failed


# ---- reading the layouts --------------------------------------------------------------------


def _read(path):
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return f.read()


def _read_exact(stream, size):
  parts, left = [], size
  while left > 0:
    chunk = stream.read(min(left, 16 << 20))
    if not chunk:
      break
    parts.append(chunk)
    left -= len(chunk)
  return b''.join(parts) if len(parts) != 1 else parts[0]


def _skip(stream, size):
  while size > 0:
    chunk = stream.read(min(size, 16 << 20))
    if not chunk:
      raise EOFError('the shard ends inside a member')
    size -= len(chunk)


def _tar_number(field):
  if field[:1] in (b'\x80', b'\xff'):  # GNU base-256, for sizes of 8 GiB and more
    value = int.from_bytes(field[1:], 'big')
    return -value if field[:1] == b'\xff' else value
  text = field.split(b'\0', 1)[0].strip()
  return int(text, 8) if text else 0


def _pax_records(data):
  records, pos = {}, 0
  while pos < len(data):
    space = data.index(b' ', pos)
    length = int(data[pos:space])
    key, _, value = data[space + 1:pos + length - 1].partition(b'=')
    records[key.decode('utf-8', 'replace')] = value
    pos += length
  return records


def tar_members(stream, max_bytes):
  """(name, kind, size, data) for each member of a tar stream; kind is 'file', 'dir', 'other' or
  'truncated' (the stream ends inside this member: the last one); data is None unless a file of
  at most max_bytes.

  Written for speed instead of using `tarfile`: its per-member header handling in Python cost
  about 140 microseconds per WebDataset sample here, more than TF Transform's whole work on a
  small image (benchmarks/image_pipeline.py). This reads POSIX ustar, GNU (long names, base-256
  sizes) and pax (path, size) headers, checks each header's checksum, and never seeks, so any
  Beam FileSystems stream (gzip-decompressing ones too) works. Raises ValueError or EOFError where
  the shard is truncated or corrupt.
  """
  long_name, pax = None, {}
  while True:
    header = _read_exact(stream, 512)
    if not header:  # tar writers end an archive with zero blocks: without them, data is missing
      raise EOFError('the shard ends without the end-of-archive blocks (cut short?)')
    if len(header) < 512:
      raise EOFError('the shard ends inside a header')
    if header.count(0) == 512:  # the end-of-archive blocks
      return
    try:
      stored = _tar_number(header[148:156])
      size = _tar_number(header[124:136])
    except ValueError:
      stored, size = None, 0
    if stored != sum(header[:148]) + 256 + sum(header[156:]):
      raise ValueError('a tar header has a bad checksum (not a tar file, or corrupt)')
    kind_flag = header[156:157]
    name = header[:100].split(b'\0', 1)[0]
    if header[257:262] == b'ustar':
      prefix = header[345:500].split(b'\0', 1)[0]
      if prefix:
        name = prefix + b'/' + name
    if kind_flag in (b'L', b'x', b'g'):  # metadata for the next member (or global: ignored)
      data = _read_exact(stream, size)
      _skip(stream, -size % 512)
      if len(data) < size:
        raise EOFError('the shard ends inside a header')
      if kind_flag == b'L':
        long_name = data.split(b'\0', 1)[0]
      elif kind_flag == b'x':
        pax = _pax_records(data)
      continue
    if 'path' in pax:
      name = pax['path']
    elif long_name is not None:
      name = long_name
    if 'size' in pax:
      size = int(pax['size'])
    long_name, pax = None, {}
    text = name.decode('utf-8', 'replace')
    if kind_flag in (b'0', b'\0', b'7'):
      if size <= max_bytes:
        data = _read_exact(stream, size)
        if len(data) < size:  # named, so that the samples before this one are complete
          yield text, 'truncated', size, None
          return
        yield text, 'file', size, data
        _skip(stream, -size % 512)
        continue
      yield text, 'file', size, None
    else:
      yield text, 'dir' if kind_flag == b'5' else 'other', size, None
    try:
      _skip(stream, size + (-size % 512))
    except EOFError:
      yield text, 'truncated', size, None
      return


def _tar_samples(path, fmt):
  """(key, image bytes or None, label or None, problem or None) per sample of a WebDataset tar.

  The members of a sample share a key (the member name up to the first dot of its base name) and
  are adjacent. Streams the tar (no seeking, no extraction); a truncated or corrupt shard ends
  with one 'truncated_shard' record for whatever could not be read.
  """
  key, members, problem = None, {}, None

  def sample():
    if problem:
      return key, None, None, problem
    if not members:
      return None
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    label_ext = next((e for e in LABEL_EXTENSIONS if e in members), None)
    have = ', '.join('.' + e for e in sorted(members))
    if image_ext is None:
      return key, None, None, ('missing_image', f'no .jpg/.jpeg/.png member (has {have})')
    if label_ext is None:
      return key, members[image_ext], None, ('missing_label',
                                             f'no .cls or .txt member (has {have})')
    try:
      label = members[label_ext].decode('utf-8').strip()
    except UnicodeDecodeError:
      return key, members[image_ext], None, ('bad_label', f'.{label_ext} is not UTF-8 text')
    if not label:
      return key, members[image_ext], None, ('missing_label', f'.{label_ext} is empty')
    return key, members[image_ext], label, None

  compression = (CompressionTypes.GZIP if path.lower().endswith(('.gz', '.tgz'))
                 else CompressionTypes.UNCOMPRESSED)
  with FileSystems.open(path, compression_type=compression) as stream:
    try:
      for name, kind, size, data in tar_members(stream, fmt.max_bytes):
        if kind == 'dir':
          continue
        directory, _, base = name.rpartition('/')
        stem, dot, ext = base.partition('.')
        member_key = (directory + '/' if directory else '') + stem
        if member_key != key:
          done = sample()
          if done:
            yield done
          key, members, problem = member_key, {}, None
        if kind == 'truncated':
          yield key, None, None, ('truncated_shard', f'the tar shard ends inside member {name!r}')
          return
        if problem:
          continue  # the sample is already rejected
        if kind != 'file':
          problem = ('not_a_file', f'member {name!r} is a link or device')
        elif data is None:
          problem = ('too_large', f'member {name!r} has {size:,} bytes, over --max-image-bytes '
                     f'{fmt.max_bytes:,}')
        else:
          members[ext.lower() if dot else ''] = data
    except (ValueError, EOFError, OSError) as e:
      yield (key or path), None, None, ('truncated_shard', f'the tar shard ends or breaks here: '
                                        f'{e}')
      return
  done = sample()
  if done:
    yield done


def _tfrecord_payloads(stream):
  """Payloads of a TFRecord stream; raises ValueError where the framing is broken.

  TFRecord framing: uint64 length, uint32 masked CRC of the length, data, uint32 masked CRC of
  the data. The CRCs are not verified (Example parsing and image decoding catch corruption).
  """
  while True:
    header = stream.read(12)
    if not header:
      return
    if len(header) < 12:
      raise ValueError('truncated record header')
    length = struct.unpack('<Q', header[:8])[0]
    data = stream.read(length)
    footer = stream.read(4)
    if len(data) < length or len(footer) < 4:
      raise ValueError('truncated record')
    yield data


def _tfrecord_samples(path, fmt):
  from tensorflow.core.example import example_pb2  # proto only: no TF runtime needed here
  compression = (CompressionTypes.GZIP if path.lower().endswith('.gz')
                 else CompressionTypes.UNCOMPRESSED)
  index = -1
  with FileSystems.open(path, compression_type=compression) as stream:
    try:
      for index, payload in enumerate(_tfrecord_payloads(stream)):
        key = f'{path.rsplit("/", 1)[-1]}#{index}'
        try:
          example = example_pb2.Example.FromString(payload)
        except Exception:
          yield key, None, None, ('bad_record', 'not a serialized tf.train.Example')
          continue
        features = example.features.feature
        image = features[fmt.image_key].bytes_list.value if fmt.image_key in features else []
        if len(image) != 1:
          yield key, None, None, ('missing_image', f'no single bytes value under {fmt.image_key!r}'
                                  ' (see --image-feature)')
          continue
        label = None
        if fmt.label_key in features:
          value = features[fmt.label_key]
          values = list(value.int64_list.value) or list(value.bytes_list.value)
          if len(values) == 1:
            label = (values[0] if isinstance(values[0], int)
                     else values[0].decode('utf-8', 'replace'))
            label = str(label).strip()
        if not label:
          yield key, image[0], None, ('missing_label', f'no single label under {fmt.label_key!r} '
                                      '(see --label-feature)')
          continue
        yield key, image[0], label, None
    except (ValueError, OSError, EOFError) as e:
      yield f'{path.rsplit("/", 1)[-1]}#{index + 1}', None, None, (
          'truncated_shard', f'the TFRecord shard ends or breaks here: {e}')


def content_fraction(data):
  """An image's position in [0, 1) from its bytes alone (for --eval-fraction)."""
  digest = hashlib.blake2b(data, digest_size=8).digest()
  return int.from_bytes(digest, 'big') / 2.0**64


class ReadImagesFn(beam.DoFn):
  """A work unit -> RecordBatches of checked images (main output, and EVAL_TAG when carving an
  eval split) and dead-letter dicts (ERRORS_TAG, with a 'split' key)."""

  def __init__(self, fmt: ImageFormat, split: str, eval_fraction=0.0, images_per_batch=256):
    self._fmt = fmt
    self._split = split
    self._eval_fraction = eval_fraction
    self._images_per_batch = images_per_batch
    self._decoder = None

  def setup(self):
    self._decoder = _Decoder(self._fmt.channels)

  def _split_of(self, data):
    if self._eval_fraction and data and content_fraction(data) < self._eval_fraction:
      return EVAL_TAG
    return self._split

  def _reject(self, path, key, data, kind, reason):
    split = self._split_of(data)
    return beam.pvalue.TaggedOutput(ERRORS_TAG, {
        'split': 'eval' if split == EVAL_TAG else split, 'file': path, 'key': key,
        'kind': kind, 'reason': reason, 'bytes': len(data) if data is not None else None})

  def _samples(self, unit):
    kind, what = unit
    if kind == 'files':
      for path, label in what:
        try:
          yield path, path, _read(path), label, None
        except Exception as e:  # unreadable file: a dead letter, not a failed bundle
          yield path, path, None, label, ('unreadable', f'{type(e).__name__}: {e}')
    elif kind == 'tar':
      for key, data, label, problem in _tar_samples(what, self._fmt):
        yield what, key, data, label, problem
    else:
      for key, data, label, problem in _tfrecord_samples(what, self._fmt):
        yield what, key, data, label, problem

  def _flush(self, pending):
    failed = self._decoder.failures([p[2] for p in pending])
    good = {self._split: ([], [], []), EVAL_TAG: ([], [], [])}
    for i, (path, key, data, label) in enumerate(pending):
      if i in failed:
        yield self._reject(path, key, data, 'corrupt_image', failed[i])
        continue
      keys, images, labels = good[self._split_of(data)]
      keys.append([key.encode('utf-8', 'surrogateescape')])
      images.append([data])
      labels.append([label.encode('utf-8')])
    for tag, columns in good.items():
      if columns[0]:
        batch = pa.RecordBatch.from_arrays(
            [pa.array(c, pa.large_list(pa.large_binary())) for c in columns], schema=arrow_schema())
        yield batch if tag == self._split else beam.pvalue.TaggedOutput(EVAL_TAG, batch)

  def process(self, unit):
    pending: List[Tuple[str, str, bytes, str]] = []
    size = 0
    for path, key, data, label, problem in self._samples(unit):
      if problem is None:
        problem = check_header(data, self._fmt)
      if problem is not None:
        yield self._reject(path, key, data, *problem)
        continue
      pending.append((path, key, data, label))
      size += len(data)
      if len(pending) >= self._images_per_batch or size >= _BATCH_BYTES:
        yield from self._flush(pending)
        pending, size = [], 0
    if pending:
      yield from self._flush(pending)


class ReadImages(beam.PTransform):
  """Work units from match_image_inputs -> (RecordBatches, eval RecordBatches or None, dead
  letters)."""

  def __init__(self, units, fmt: ImageFormat, split: str, eval_fraction=0.0,
               images_per_batch=256, label: Optional[str] = None, spill=None):
    super().__init__(label)
    self._units = list(units)
    self._fmt = fmt
    self._split = split
    self._eval_fraction = eval_fraction
    self._images_per_batch = images_per_batch
    self._spill = spill

  def expand(self, pbegin):
    return read_units(pbegin, self._units, ReadImagesFn(
        self._fmt, self._split, self._eval_fraction, self._images_per_batch), self._eval_fraction,
                      self._spill)
