"""The image source's own tar reader (written for speed) against Python's tarfile."""

import gzip
import io
import tarfile

import pytest

from pipelines.sources import image_files

MEMBERS = [
    ('a/b.png', b'x' * 700),
    ('d' * 150 + '/long_name_' + 'e' * 120 + '.png', b'y' * 513),  # needs GNU or pax headers
    ('ünïcode.txt', 'label'.encode()),
    ('empty.png', b''),
    ('big.png', b'q' * 5000),
    ('last.cls', b'3'),
]


def _tar(fmt, members=MEMBERS, extra=True):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w', format=fmt) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
    if extra:
      directory = tarfile.TarInfo('folder')
      directory.type = tarfile.DIRTYPE
      tar.addfile(directory)
      link = tarfile.TarInfo('link.png')
      link.type = tarfile.SYMTYPE
      link.linkname = 'a/b.png'
      tar.addfile(link)
  return buf.getvalue()


@pytest.mark.parametrize('fmt', [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile(fmt):
  raw = _tar(fmt)
  mine = list(image_files.tar_members(io.BytesIO(raw), max_bytes=4096))
  with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
    expected = [(m.name, 'file' if m.isfile() else 'dir' if m.isdir() else 'other', m.size,
                 tar.extractfile(m).read() if m.isfile() and m.size <= 4096 else None)
                for m in tar]
  assert [(n.rstrip('/'), k, s, d) for n, k, s, d in mine] == expected
  assert [n for n, k, _, _ in mine if k == 'file'] == [n for n, _ in MEMBERS]


def test_plain_ustar_with_a_prefix_field():
  name = 'p' * 90 + '/' + 'q' * 90 + '.png'  # fits ustar only through its prefix field
  raw = _tar(tarfile.USTAR_FORMAT, [(name, b'abc')], extra=False)
  assert list(image_files.tar_members(io.BytesIO(raw), 100)) == [(name, 'file', 3, b'abc')]


def test_oversized_members_are_skipped_unread():
  raw = _tar(tarfile.GNU_FORMAT, extra=False)
  by_name = {n: (s, d) for n, _, s, d in image_files.tar_members(io.BytesIO(raw), 600)}
  assert by_name['big.png'] == (5000, None)
  assert by_name['a/b.png'] == (700, None)
  assert by_name['last.cls'] == (1, b'3')  # reading goes on after a skipped member


@pytest.mark.parametrize('cut', [100, 512 + 100, 512 * 3 + 7, 'last header'])
def test_shards_cut_short_raise_or_name_the_cut_member(cut):
  raw = _tar(tarfile.GNU_FORMAT, extra=False)
  if cut == 'last header':
    cut = raw.index(b'last.cls') + 200
  try:
    members = list(image_files.tar_members(io.BytesIO(raw[:cut]), 1 << 20))
  except (EOFError, ValueError):
    return
  assert members[-1][1] == 'truncated'  # a cut inside member data names the member


def test_garbage_is_not_a_tar():
  with pytest.raises(ValueError, match='checksum'):
    list(image_files.tar_members(io.BytesIO(b'hello world' * 100), 1 << 20))


def test_a_shard_without_end_blocks_is_truncated():
  raw = _tar(tarfile.GNU_FORMAT, extra=False)
  end = raw.index(b'last.cls') + 1024  # its header and data block, no end-of-archive blocks
  with pytest.raises(EOFError, match='end-of-archive'):
    list(image_files.tar_members(io.BytesIO(raw[:end]), 1 << 20))
  with pytest.raises(EOFError):
    list(image_files.tar_members(io.BytesIO(b''), 10))  # an empty file is no tar either


def test_a_cut_inside_member_data_names_that_member():
  raw = _tar(tarfile.GNU_FORMAT, extra=False)
  members = list(image_files.tar_members(io.BytesIO(raw[:raw.index(b'q' * 5000) + 100]), 1 << 20))
  assert [(n, k) for n, k, _, _ in members][-2:] == [('empty.png', 'file'),
                                                     ('big.png', 'truncated')]


def test_webdataset_samples_from_a_gzipped_shard(tmp_path):
  raw = _tar(tarfile.GNU_FORMAT, [('s1.png', b'\x89PNG...'), ('s1.cls', b' 7\n'),
                                  ('s2.jpg', b'\xff\xd8\xff..'), ('s3.txt', b'coat'),
                                  ('dir/s4.png', b'img'), ('dir/s4.txt', b'')], extra=False)
  path = tmp_path / 'shard.tar.gz'
  path.write_bytes(gzip.compress(raw))
  samples = list(image_files._tar_samples(str(path), image_files.ImageFormat()))
  assert [(k, d, label, p and p[0]) for k, d, label, p in samples] == [
      ('s1', b'\x89PNG...', '7', None),
      ('s2', b'\xff\xd8\xff..', None, 'missing_label'),
      ('s3', None, None, 'missing_image'),
      ('dir/s4', b'img', None, 'missing_label'),
  ]
