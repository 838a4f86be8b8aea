"""The image pipeline end to end on real Fashion-MNIST PNGs (and images made from them), checked
against pixels decoded independently with PIL, statistics computed with numpy, and the trainer's
export served back."""

import collections
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import tensorflow_transform as tft
from PIL import Image

from pipelines import images
from tests.conftest import REPO
from tests.helpers import TENSORFLOW_ONLY, read_split, tft_vocabulary_order
from trainer import input as input_lib
from trainer import serving, train
from transforms import images as image_transforms
from transforms.errors import UserError

SAMPLE = REPO / 'data' / 'fashion_mnist' / 'sample'
CLASSES = sorted(os.listdir(SAMPLE / 'train'))
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


# ---- independent views of images and of the pipeline's output --------------------------------


def sample_files(split, per_class=None):
  """{class: [path, ...]}: the first `per_class` PNGs of each class folder of the sample."""
  return {c: sorted((SAMPLE / split / c).glob('*.png'))[:per_class] for c in CLASSES}


def copy_tree(files, root, rename=lambda name: name):
  for label, paths in files.items():
    (root / label).mkdir(parents=True)
    for p in paths:
      shutil.copy(p, root / label / rename(p.name))
  return root


def pil_pixels(data, mode=None):
  """PIL's decoding of encoded image bytes: uint8 [H, W, C] (not TensorFlow's decoder)."""
  image = Image.open(io.BytesIO(data))
  image = image.convert(mode) if mode else image
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if array.ndim == 2 else array


def encode(array, fmt, **kwargs):
  """uint8 [H, W, C] -> PNG or JPEG bytes, with PIL."""
  image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


def png_chunk(kind, data):
  return (struct.pack('>I', len(data)) + kind + data +
          struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png(width=100_000, height=100_000):
  """A valid PNG header claiming width x height 8-bit grayscale pixels, a little zlib data, IEND."""
  return (_PNG_SIGNATURE + png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
          + png_chunk(b'IDAT', zlib.compress(b'\0' * 100_000)) + png_chunk(b'IEND', b''))


def tar_bytes(members, gz=False):
  """[(name, bytes or a TarInfo)] -> the bytes of a tar (in this order)."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w:gz' if gz else 'w') as tar:
    for name, data in members:
      if isinstance(data, tarfile.TarInfo):
        tar.addfile(data)
        continue
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def example(features):
  """{key: bytes or int} -> a serialized tf.train.Example."""
  feature = {}
  for key, value in features.items():
    if isinstance(value, bytes):
      feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    else:
      feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecord(path, serialized, gzip=False):
  with tf.io.TFRecordWriter(str(path), options='GZIP' if gzip else None) as writer:
    for record in serialized:
      writer.write(record)


def run(*argv):
  return images.run([str(a) for a in argv])


def vocabulary(out):
  """The label vocabulary file, read as plain text."""
  with open(os.path.join(out, 'transform_fn', 'assets', 'label'), encoding='utf-8') as f:
    return f.read().splitlines()


def labelled_pixels(out, split):
  """Counter of (uint8 pixel bytes, label name) of a split's examples, the name looked up in the
  vocabulary file; and the parsed examples."""
  got = read_split(str(out), split)
  xf = got['image_xf']
  assert xf.min() >= 0 and xf.max() <= 255
  vocab = vocabulary(out)
  pairs = collections.Counter((image.astype(np.uint8).tobytes(), vocab[label])
                              for image, label in zip(xf, got['label_xf']))
  return pairs, got


def expected_pairs(files):
  """Counter of (PIL-decoded pixel bytes, class) of {class: [path]}."""
  return collections.Counter((pil_pixels(p.read_bytes()).tobytes(), c)
                             for c, paths in files.items() for p in paths)


def numpy_stats(pixel_arrays):
  """Per-channel population mean and std of pixels / 255 (TFT's mean and var), std floored."""
  scaled = np.concatenate([a.reshape(-1, a.shape[-1]) for a in pixel_arrays]) / 255.0
  return scaled.mean(axis=0), np.maximum(scaled.std(axis=0), 1e-3)


def assert_constant_stats(got, mean, std, atol=1e-5):
  n = len(got['image_xf'])
  np.testing.assert_allclose(got['image_mean_xf'], np.tile(mean, (n, 1)), atol=atol)
  np.testing.assert_allclose(got['image_std_xf'], np.tile(std, (n, 1)), atol=atol)


# ---- 1. class folders: pixels, statistics, vocabulary ----------------------------------------


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory):
  """20 PNGs per class for train (copied), the whole 200-image sample test split for eval."""
  root = tmp_path_factory.mktemp('folders')
  train_files = sample_files('train', 20)
  train_dir = copy_tree(train_files, root / 'train')
  eval_files = sample_files('test')
  out = root / 'out'
  manifest = run('--train', train_dir, '--eval', SAMPLE / 'test', '--output', out)
  return {'root': root, 'out': out, 'manifest': manifest, 'train_dir': train_dir,
          'train_files': train_files, 'eval_files': eval_files}


def test_class_folders_counts_and_manifest(folder_run):
  out, m = folder_run['out'], folder_run['manifest']
  assert m.to_dict() == json.load(open(out / 'manifest.json'))
  assert m.pipeline == 'images' and m.label_key == 'label'
  assert m.image['height'] == 28 and m.image['width'] == 28 and m.image['channels'] == 1
  for split, n in (('train', 200), ('eval', 200)):
    c = m.splits[split]
    assert c.rows_read == c.rows_written + c.rows_rejected
    assert (c.rows_read, c.rows_written, c.rows_rejected) == (n, n, 0)
    assert c.rejected_by_kind == {}
    shards = sorted(out.glob(c.files))
    assert len(shards) == c.num_shards == 1
    assert c.bytes_written == sum(os.path.getsize(s) for s in shards)
    assert c.bytes_per_image > 0
    assert abs(c.bytes_per_image - c.bytes_written / n) <= 0.1
    assert open(out / 'errors' / f'{split}.jsonl').read() == ''
  spec = tft.TFTransformOutput(str(out)).transformed_feature_spec()
  assert set(spec) == {'image_xf', 'image_mean_xf', 'image_std_xf', 'label_xf'}
  assert spec['image_xf'] == tf.io.FixedLenFeature([28, 28, 1], tf.int64)
  assert spec['image_mean_xf'] == tf.io.FixedLenFeature([1], tf.float32)
  assert spec['image_std_xf'] == tf.io.FixedLenFeature([1], tf.float32)
  assert spec['label_xf'] == tf.io.FixedLenFeature([], tf.int64)
  assert not os.path.exists(out / '.staging')


def test_class_folder_pixels_and_labels_are_exact(folder_run):
  """image_xf is PIL's decoding of the file (28x28: no resampling); label_xf names its folder."""
  for split, files in (('train', folder_run['train_files']), ('eval', folder_run['eval_files'])):
    got, _ = labelled_pixels(folder_run['out'], split)
    assert got == expected_pairs(files), split


def test_statistics_are_the_train_pixels(folder_run):
  train_px = [pil_pixels(p.read_bytes()) for ps in folder_run['train_files'].values() for p in ps]
  eval_px = [pil_pixels(p.read_bytes()) for ps in folder_run['eval_files'].values() for p in ps]
  mean, std = numpy_stats(train_px)
  assert 0.1 < mean[0] < 0.6 and 0.1 < std[0] < 0.6
  _, train_got = labelled_pixels(folder_run['out'], 'train')
  _, eval_got = labelled_pixels(folder_run['out'], 'eval')
  assert_constant_stats(train_got, mean, std)
  # eval carries the train statistics, not its own (which differ by more than the tolerance).
  assert_constant_stats(eval_got, mean, std)
  eval_mean, _ = numpy_stats(eval_px)
  assert abs(eval_mean[0] - mean[0]) > 1e-4


def test_label_vocabulary_is_the_class_folders(folder_run):
  vocab = vocabulary(folder_run['out'])
  assert sorted(vocab) == CLASSES
  labels = pd.Series([c for c, ps in folder_run['train_files'].items() for _ in ps])
  assert vocab == tft_vocabulary_order(labels)


# ---- 2. resizing and channel conversion ------------------------------------------------------

def _independent_resize(pixels, height, width):
  resized = tf.image.resize(pixels.astype(np.float32), [height, width], method='bilinear',
                            antialias=True).numpy()
  return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def _coloured(height, width):
  """An RGB image made of real Fashion-MNIST pixels (one image per channel), resized by PIL."""
  px = [pil_pixels(p.read_bytes())[..., 0] for p in sample_files('train', 2)['Coat']]
  rgb = np.stack([px[0], 255 - px[0], px[1]], axis=-1)
  return np.asarray(Image.fromarray(rgb).resize((width, height), Image.NEAREST))


def _check_rgb_run(tmp_path, made, height, width):
  """Writes {name: (label, bytes, PIL mode or None)} as class folders, runs --image-size HEIGHT
  WIDTH --channels 3, and checks the examples against decode_and_resize run eagerly and against
  PIL's decoding (PNGs: exactly at the target size, within 1 after an independent resize)."""
  for name, (label, data, _) in made.items():
    (tmp_path / 'in' / label).mkdir(parents=True, exist_ok=True)
    (tmp_path / 'in' / label / name).write_bytes(data)
  out = tmp_path / 'out'
  m = run('--train', tmp_path / 'in', '--output', out, '--image-size', height, width,
          '--channels', 3)
  assert (m.image['height'], m.image['width'], m.image['channels']) == (height, width, 3)
  assert m.splits['train'].rows_written == len(made)
  spec = tft.TFTransformOutput(str(out)).transformed_feature_spec()
  assert spec['image_xf'].shape == [height, width, 3]
  assert spec['image_mean_xf'].shape == [3] and spec['image_std_xf'].shape == [3]

  got, parsed = labelled_pixels(out, 'train')
  assert parsed['image_xf'].shape == (len(made), height, width, 3)
  eager = {name: image_transforms.decode_and_resize(tf.constant([data]), height, width,
                                                    3).numpy()[0]
           for name, (_, data, _) in made.items()}
  assert got == collections.Counter((eager[n].tobytes(), label)
                                    for n, (label, _, _) in made.items())
  for name, (_, data, mode) in made.items():
    if mode is None:  # JPEG: PIL's and TensorFlow's JPEG decoders may differ slightly
      continue
    pixels = pil_pixels(data, mode)
    if pixels.shape[:2] == (height, width):
      np.testing.assert_array_equal(eager[name], pixels, err_msg=name)
    else:
      diff = np.abs(eager[name].astype(int) -
                    _independent_resize(pixels, height, width).astype(int))
      assert diff.max() <= 1, name
  mean, std = numpy_stats(list(eager.values()))
  assert_constant_stats(parsed, mean, std)
  assert not np.allclose(mean, mean[0])  # three distinct channel statistics
  return eager


def test_channels_are_converted(tmp_path):
  """RGB, RGBA and grayscale PNGs and JPEGs already 16x20 -> [16, 20, 3], not resampled."""
  rng = np.random.default_rng(7)
  gray = _coloured(16, 20)[..., :1]
  made = {  # name: (label, bytes, the mode PIL converts to for the independent check)
      'rgb.png': ('png', encode(_coloured(16, 20), 'PNG'), 'RGB'),
      'rgba.png': ('png', encode(np.concatenate(
          [_coloured(16, 20)[::-1], rng.integers(0, 256, (16, 20, 1), dtype=np.uint8)], -1),
          'PNG'), 'RGB'),
      'gray.png': ('png', encode(gray, 'PNG'), 'RGB'),
      'rgb.jpg': ('jpeg', tf.io.encode_jpeg(_coloured(16, 20), quality=90).numpy(), None),
      'gray.jpg': ('jpeg', tf.io.encode_jpeg(gray, quality=90).numpy(), None),
  }
  eager = _check_rgb_run(tmp_path, made, 16, 20)
  for name in ('gray.png', 'gray.jpg'):  # grayscale: the one channel, three times
    image = eager[name]
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
  np.testing.assert_array_equal(eager['gray.png'][..., 0], gray[..., 0])


def test_resize(tmp_path):
  """JPEGs and PNGs of other sizes (larger, smaller, another aspect) -> [16, 20, 3]."""
  rng = np.random.default_rng(8)
  made = {
      'exact.png': ('png', encode(_coloured(16, 20), 'PNG'), 'RGB'),
      'large.png': ('png', encode(_coloured(45, 37), 'PNG'), 'RGB'),
      'small.png': ('png', encode(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8), 'PNG'), 'RGB'),
      'fmnist.png': ('png', sample_files('train', 1)['Bag'][0].read_bytes(), 'RGB'),  # 28x28 gray
      'a.jpg': ('jpeg', tf.io.encode_jpeg(_coloured(50, 60), quality=90).numpy(), None),
      'b.jpeg': ('jpeg', tf.io.encode_jpeg(_coloured(20, 16), quality=90).numpy(), None),
  }
  _check_rgb_run(tmp_path, made, 16, 20)


# ---- 3. class folders, WebDataset tars and TFRecords give the same result ---------------------


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
  """The same 30 PNGs (3 per class) as a class-folder tree, tar shards and TFRecord shards, the
  labels being class indices (WebDataset .cls files and int64 TFRecord labels hold indices)."""
  root = tmp_path_factory.mktemp('layouts')
  files = sample_files('train', 3)
  items = [(str(CLASSES.index(c)), p.read_bytes()) for c in CLASSES for p in files[c]]
  copy_tree({str(i): files[c] for i, c in enumerate(CLASSES)}, root / 'folders')

  members = [[], []]
  for n, (label, data) in enumerate(items):
    key = f'part{n % 3}/sample{n:04d}' if n % 5 == 0 else f'sample{n:04d}'
    label_member = ((f'{key}.cls', label.encode()) if n % 2 else
                    (f'{key}.txt', f' {label}\n'.encode()))  # a .txt label is stripped
    members[n % 2].extend([(f'{key}.png', data), label_member])
  (root / 'shards').mkdir()
  (root / 'shards' / 'a.tar').write_bytes(tar_bytes(members[0]))
  (root / 'shards' / 'b.tar.gz').write_bytes(tar_bytes(members[1], gz=True))

  half = len(items) // 2
  write_tfrecord(root / 'shards' / 'bytes.tfrecord',
                 [example({'image/encoded': d, 'image/class/label': label.encode()})
                  for label, d in items[:half]])
  write_tfrecord(root / 'shards' / 'ints.tfrecord.gz',
                 [example({'image/encoded': d, 'image/class/label': int(label)})
                  for label, d in items[half:]], gzip=True)
  write_tfrecord(root / 'shards' / 'custom.tfrecords',
                 [example({'png': d, 'y': int(label), 'image/encoded': b'not used'})
                  for label, d in items])

  shards = root / 'shards'
  inputs = {
      'folders': [root / 'folders'],
      'tar': [shards / 'a.tar', shards / 'b.tar.gz'],
      'tfrecord': [shards / '*.tfrecord', shards / 'ints.tfrecord.gz'],
      'tfrecord_custom_keys': [shards / 'custom.tfrecords', '--image-feature', 'png',
                               '--label-feature', 'y'],
  }
  results = {}
  for name, args in inputs.items():
    out = root / f'out_{name}'
    manifest = run('--train', *args, '--output', out)
    results[name] = (out, manifest)
  expected = collections.Counter((pil_pixels(d).tobytes(), label) for label, d in items)
  return {'results': results, 'expected': expected,
          'stats': numpy_stats([pil_pixels(d) for _, d in items])}


@pytest.mark.parametrize('layout', ['folders', 'tar', 'tfrecord', 'tfrecord_custom_keys'])
def test_layouts_give_the_same_examples(layouts, layout):
  out, manifest = layouts['results'][layout]
  c = manifest.splits['train']
  assert (c.rows_read, c.rows_written, c.rows_rejected) == (30, 30, 0)
  got, parsed = labelled_pixels(out, 'train')
  assert got == layouts['expected']
  mean, std = layouts['stats']
  assert_constant_stats(parsed, mean, std)
  assert vocabulary(out) == tft_vocabulary_order(pd.Series([str(i) for i in range(10)] * 3))


def test_layouts_give_the_same_statistics(layouts):
  stats = []
  for out, _ in layouts['results'].values():
    parsed = read_split(str(out), 'train')
    stats.append((parsed['image_mean_xf'][0], parsed['image_std_xf'][0]))
  for mean, std in stats[1:]:
    np.testing.assert_allclose(mean, stats[0][0], atol=1e-6)
    np.testing.assert_allclose(std, stats[0][1], atol=1e-6)


# ---- 4. bad input is dead-lettered -----------------------------------------------------------


@pytest.fixture(scope='module')
def bad_input(tmp_path_factory):
  """40 good class-folder PNGs, broken files among them, and two tar shards with broken samples.
  Returns the inputs, the expected dead letters {(file, key): kind}, the good images."""
  root = tmp_path_factory.mktemp('bad')
  rng = np.random.default_rng(3)
  files = sample_files('train', 4)
  train = copy_tree(files, root / 'train')
  good = expected_pairs(files)
  coat = files['Coat'][0].read_bytes()
  jpeg = tf.io.encode_jpeg(np.repeat(pil_pixels(files['Dress'][0].read_bytes()), 3, -1),
                           quality=95).numpy()
  noise = b'\0' + rng.bytes(499)
  big = tf.io.encode_jpeg(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), quality=95).numpy()
  assert len(big) > 2000 and len(jpeg) < 2000
  broken = {  # path: (bytes, kind)
      train / 'Coat' / 'empty.png': (b'', 'empty_file'),
      train / 'Coat' / 'half.png': (coat[:len(coat) // 2], 'corrupt_image'),
      train / 'Dress' / 'half.jpg': (jpeg[:len(jpeg) // 2], 'corrupt_image'),
      train / 'Bag' / 'noise.jpg': (noise, 'not_an_image'),
      train / 'Bag' / 'notes.txt': (b'these are notes, not an image\n', 'not_an_image'),
      train / 'Shirt' / 'bomb.png': (bomb_png(), 'too_many_pixels'),
      train / 'Sandal' / 'big.jpg': (big, 'too_large'),
  }
  for path, (data, _) in broken.items():
    path.write_bytes(data)
  expected = {(str(p), str(p)): kind for p, (_, kind) in broken.items()}

  bag, sneaker = files['Bag'][0].read_bytes(), files['Sneaker'][0].read_bytes()
  link = tarfile.TarInfo('link.png')
  link.type, link.linkname = tarfile.SYMTYPE, '/etc/passwd'
  shards = root / 'shards'
  shards.mkdir()
  mixed = tar_bytes([
      ('ok1.png', coat), ('ok1.txt', b'Coat'),
      ('nolabel.png', bag),                                  # missing_label
      ('orphan.txt', b'Bag'),                                # missing_image
      ('../../evil.png', sneaker),                           # missing_label, nothing extracted
      ('badlabel.png', bag), ('badlabel.txt', b'\xff\xfeBag'),  # bad_label
      ('emptylabel.png', bag), ('emptylabel.cls', b'  \n'),  # missing_label
      ('link.png', link),                                    # not_a_file
      ('ok2.png', bag), ('ok2.txt', b'Bag'),
  ])
  (shards / 'mixed.tar').write_bytes(mixed)
  expected.update({(str(shards / 'mixed.tar'), key): kind for key, kind in [
      ('nolabel', 'missing_label'), ('orphan', 'missing_image'), ('../../evil', 'missing_label'),
      ('badlabel', 'bad_label'), ('emptylabel', 'missing_label'), ('link', 'not_a_file')]})
  good.update([(pil_pixels(coat).tobytes(), 'Coat'), (pil_pixels(bag).tobytes(), 'Bag')])

  trouser = sample_files('train', 5)['Trouser'][4].read_bytes()  # not among the 40
  whole = tar_bytes([('c1.png', coat), ('c1.txt', b'Coat'), ('c2.png', trouser),
                     ('c2.txt', b'Trouser'), ('c3.png', sneaker), ('c3.txt', b'Sneaker')])
  cut = whole.index(sneaker) + len(sneaker) // 2  # in the middle of c3.png's data
  (shards / 'cut.tar').write_bytes(whole[:cut])
  expected[(str(shards / 'cut.tar'), 'c3')] = 'truncated_shard'
  good.update([(pil_pixels(coat).tobytes(), 'Coat'), (pil_pixels(trouser).tobytes(), 'Trouser')])

  args = ['--train', train, shards / '*.tar', '--max-image-bytes', 2000]
  return {'root': root, 'args': args, 'expected': expected, 'good': good,
          'c2': collections.Counter([(pil_pixels(trouser).tobytes(), 'Trouser')]),
          'cut_tar': str(shards / 'cut.tar'),
          'sizes': {str(p): len(d) for p, (d, _) in broken.items()}}


def _entries(directory):
  return {str(p) for p in directory.rglob('*')}


@pytest.fixture(scope='module')
def bad_run(bad_input):
  root = bad_input['root']
  before = _entries(root.parent)
  out = root / 'out'
  manifest = run(*bad_input['args'], '--output', out, '--max-bad-rows', '50%')
  created = _entries(root.parent) - before
  return {'out': out, 'manifest': manifest, 'created': created}


def _errors(bad_run):
  return [json.loads(line) for line in open(bad_run['out'] / 'errors' / 'train.jsonl')]


def test_bad_images_are_dead_lettered(bad_input, bad_run):
  """Every broken file and sample is one dead letter of the right kind; every good image is
  written."""
  cut_tar = bad_input['cut_tar']
  expected = {k: v for k, v in bad_input['expected'].items() if k[0] != cut_tar}
  errors = _errors(bad_run)
  assert {(e['file'], e['key']): e['kind'] for e in errors if e['file'] != cut_tar} == expected
  assert [e['kind'] for e in errors if e['file'] == cut_tar] == ['truncated_shard']
  assert len(errors) == len(bad_input['expected'])
  for e in errors:
    assert e['split'] == 'train' and e['reason'] and isinstance(e['key'], str)
    if e['file'] in bad_input['sizes']:
      assert e['bytes'] == bad_input['sizes'][e['file']]
  by_kind = {e['kind']: e for e in errors}
  assert '100000x100000' in by_kind['too_many_pixels']['reason']
  assert '--max-image-bytes' in by_kind['too_large']['reason']
  assert by_kind['empty_file']['bytes'] == 0

  c = bad_run['manifest'].splits['train']
  assert c.rows_rejected == len(errors) == 14
  assert c.rows_read == c.rows_written + c.rows_rejected
  assert c.rejected_by_kind == dict(sorted(collections.Counter(
      bad_input['expected'].values()).items()))
  got, _ = labelled_pixels(bad_run['out'], 'train')
  assert c.rows_written == sum(got.values())
  assert got == bad_input['good'] and sum(got.values()) == 44  # c2, before the cut, included


def test_a_tar_cut_inside_a_member_keeps_the_samples_before_it(bad_input, bad_run):
  cut = [(e['key'], e['kind']) for e in _errors(bad_run) if e['file'] == bad_input['cut_tar']]
  assert cut == [('c3', 'truncated_shard')]
  c = bad_run['manifest'].splits['train']
  assert (c.rows_read, c.rows_written) == (58, 44)
  got, _ = labelled_pixels(bad_run['out'], 'train')
  assert got == bad_input['good']


def test_tar_member_names_are_only_keys(bad_input, bad_run):
  """`../../evil.png` and a symlink member: nothing is written outside the output directory."""
  root = bad_input['root']
  outside = {p for p in bad_run['created'] if not p.startswith(str(bad_run['out']) + os.sep)
             and p != str(bad_run['out'])}
  assert outside == set()
  for place in (root.parent, REPO, REPO.parent):
    assert not list(place.glob('evil*')) and not list(place.glob('link*'))


def test_too_many_bad_images_fail_and_publish_nothing(bad_input, bad_run, tmp_path):
  out = tmp_path / 'out'
  with pytest.raises(UserError) as e:
    run(*bad_input['args'], '--output', out)  # the default --max-bad-rows 1%
  message = str(e.value)
  c = bad_run['manifest'].splits['train']  # the same input, let through
  rejected, read = c.rows_rejected, c.rows_read
  assert '\n' not in message
  assert f'{rejected} of {read} images rejected' in message and 'nothing was published' in message
  errors_file = message.split('see ')[1].split(';')[0]
  assert errors_file.endswith(os.path.join('errors', 'train.jsonl'))
  assert len(open(errors_file).readlines()) == rejected
  assert not os.path.exists(out / 'manifest.json')
  assert not list(out.glob('train-*'))


# One dead letter per rejected tar sample, and a tar cut inside a header is a truncated shard.


@pytest.fixture(scope='module')
def tar_edge_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('tar_edges')
  files = sample_files('train', 1)
  coat, bag = files['Coat'][0].read_bytes(), files['Bag'][0].read_bytes()
  rng = np.random.default_rng(5)
  big = tf.io.encode_jpeg(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), quality=95).numpy()
  (root / 'big.tar').write_bytes(tar_bytes([
      ('ok.png', coat), ('ok.txt', b'Coat'), ('big.jpg', big), ('big.txt', b'Coat')]))
  whole = tar_bytes([('a.png', bag), ('a.txt', b'Bag'), ('b.png', coat), ('b.txt', b'Coat')])
  cut = whole.index(b'b.png') + 100  # inside b.png's header
  (root / 'cut_header.tar').write_bytes(whole[:cut])
  out = root / 'out'
  manifest = run('--train', root / '*.tar', '--output', out, '--max-image-bytes', 2000,
                 '--max-bad-rows', '100%')
  errors = [json.loads(line) for line in open(out / 'errors' / 'train.jsonl')]
  good = ((pil_pixels(coat).tobytes(), 'Coat'), (pil_pixels(bag).tobytes(), 'Bag'))
  return {'root': root, 'manifest': manifest, 'errors': errors, 'good': good, 'out': out}


def test_a_too_large_tar_image_is_one_dead_letter(tar_edge_run):
  """The oversized image's label member is part of the same rejected sample, not a sample
  missing its image."""
  big = [(e['key'], e['kind']) for e in tar_edge_run['errors'] if e['file'].endswith('big.tar')]
  assert big == [('big', 'too_large')]


def test_a_tar_cut_inside_a_header_is_a_truncated_shard(tar_edge_run):
  """A cut inside b.png's header: one truncated_shard; b is not read. Whether sample a (all its
  members read, but the next member's name unknown) was complete cannot be known: it is either
  written or the key the truncated_shard names."""
  cut = [(e['key'], e['kind']) for e in tar_edge_run['errors']
         if e['file'].endswith('cut_header.tar')]
  assert [kind for _, kind in cut] == ['truncated_shard']
  c = tar_edge_run['manifest'].splits['train']
  assert c.rows_read == c.rows_written + c.rows_rejected
  assert c.rejected_by_kind == {'too_large': 1, 'truncated_shard': 1}
  got, _ = labelled_pixels(tar_edge_run['out'], 'train')
  ok, a = tar_edge_run['good']
  assert got in (collections.Counter([ok]), collections.Counter([ok, a]))
  assert (got == collections.Counter([ok, a])) == (cut[0][0] != 'a')


# ---- 5. user errors --------------------------------------------------------------------------


def _loose_files(p):
  (p / 'loose').mkdir()
  (p / 'loose' / 'x.png').write_bytes(sample_files('train', 1)['Bag'][0].read_bytes())
  return ['--train', p / 'loose']


def _shards_dir(p):
  (p / 'shards').mkdir()
  (p / 'shards' / 'a.tar').write_bytes(tar_bytes([('x.txt', b'Bag')]))
  return ['--train', p / 'shards' / '*']


@pytest.mark.parametrize('make_args, expected', [
    (_loose_files, r'--train .*loose: no ROOT/<label>/<image> files under it'),
    (lambda p: ['--train', p / 'nowhere'], 'no ROOT/<label>/<image> files under it'),
    (_shards_dir, r'it matches shards \(.*a\.tar, \.\.\.\): give a glob ending in \.tar'),
    (lambda p: ['--train', p / 'none-*.tfrecord'], 'no file matches'),
    (lambda p: ['--train', SAMPLE / 'test', '--image-size', 0, 5],
     '--image-size 0 5: both must be >= 1'),
    (lambda p: ['--train', SAMPLE / 'test', '--channels', 2], "--channels: invalid choice: '?2'?"),
    (lambda p: ['--train', SAMPLE / 'test', '--eval', SAMPLE / 'test', '--eval-fraction', 0.2],
     'either --eval or --eval-fraction'),
    (lambda p: ['--train', SAMPLE / 'test', '--eval-fraction', 1], r'must be in \[0, 1\)'),
    (lambda p: ['--train', SAMPLE / 'test', '--max-image-bytes', 0],
     '--max-image-bytes must be at least 1'),
])
def test_user_errors(tmp_path, make_args, expected):
  with pytest.raises(UserError, match=expected) as e:
    run(*make_args(tmp_path), '--output', tmp_path / 'out')
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'out')


def test_refuses_a_complete_output(folder_run):
  out = folder_run['out']
  before = (out / 'manifest.json').read_bytes()
  with pytest.raises(UserError, match='already holds a complete result; pass --overwrite') as e:
    run('--train', folder_run['train_dir'], '--output', out)
  assert '\n' not in str(e.value)
  assert (out / 'manifest.json').read_bytes() == before
  assert not os.path.exists(out / '.staging')


# ---- 6. trainer, export, no training/serving skew --------------------------------------------


@pytest.fixture(scope='module')
def trained(folder_run, tmp_path_factory):
  root = tmp_path_factory.mktemp('image_models')
  config = train.TrainConfig(transformed_dir=str(folder_run['out']), model_dir=str(root),
                             epochs=1, max_steps=20, batch_size=32)
  path, metrics, model = train.train_and_export(config)
  # The eval split's raw PNG bytes in the order of its examples (matched by their pixels).
  png_of = {pil_pixels(p.read_bytes()).tobytes(): p.read_bytes()
            for ps in folder_run['eval_files'].values() for p in ps}
  assert len(png_of) == 200  # no two eval images alike
  transformed = read_split(str(folder_run['out']), 'eval')
  pngs = [png_of[x.astype(np.uint8).tobytes()] for x in transformed['image_xf']]
  return {'root': root, 'path': path, 'metrics': metrics, 'model': model,
          'transformed': transformed, 'pngs': pngs, 'out': folder_run['out']}


def _in_training(model, transformed):
  return model.predict({k: transformed[k] for k in model.input_names}, verbose=0)


def test_export_signatures(trained):
  assert trained['path'] == str(trained['root'] / 'images' / '1')
  assert 0 <= trained['metrics']['accuracy'] <= 1
  loaded = tf.saved_model.load(trained['path'])
  assert set(loaded.signatures) == {'serving_default', 'transform_features', 'predict_raw',
                                    'predict_images'}


def test_no_training_serving_skew_for_images(trained):
  """predict_images / serving_default / predict_raw on the raw PNGs == the trained Keras model on
  the pipeline's transformed eval examples of the same images."""
  expected = _in_training(trained['model'], trained['transformed'])
  assert expected.shape == (200, 10)
  model = serving.load_model(trained['path'])
  by_images = model.predict_images(trained['pngs'], batch_size=64)
  np.testing.assert_allclose(by_images['probabilities'], expected, atol=1e-5)
  by_examples = model.predict([{'image': b} for b in trained['pngs']])
  np.testing.assert_allclose(by_examples['probabilities'], expected, atol=1e-5)
  raw = tf.saved_model.load(trained['path']).signatures['predict_raw'](
      image=tf.constant(trained['pngs'][:10]))
  np.testing.assert_allclose(raw['probabilities'].numpy(), expected[:10], atol=1e-5)
  vocab = vocabulary(trained['out'])
  assert list(by_images['classes']) == [vocab[i] for i in expected.argmax(axis=1)]
  np.testing.assert_array_equal(by_images['class_ids'], expected.argmax(axis=1))
  # The export's transform is the pipeline's: transform_features gives the same pixels.
  transformed = model.transform([{'image': b} for b in trained['pngs'][:5]])
  np.testing.assert_array_equal(transformed['image_xf'], trained['transformed']['image_xf'][:5])
  assert 'label_xf' not in transformed


def test_predict_images_converts_and_refuses(trained):
  model = serving.load_model(trained['path'])
  rgb = np.repeat(pil_pixels(trained['pngs'][0]), 3, -1)
  result = model.predict_images([encode(rgb, 'JPEG', quality=95)])  # RGB JPEG -> 1 channel
  assert result['probabilities'].shape == (1, 10)
  assert abs(result['probabilities'].sum() - 1) < 1e-5
  with pytest.raises(UserError, match='as bytes'):
    model.predict_images(['not bytes'])


def test_augmentation_is_training_only(folder_run, trained, tmp_path):
  transformed_dir = str(folder_run['out'])
  config = train.TrainConfig(transformed_dir=transformed_dir, model_dir=str(tmp_path),
                             epochs=1, max_steps=4, batch_size=32, augment=('flip', 'crop'))
  path, _, model = train.train_and_export(config)
  served = serving.load_model(path)
  first = served.predict_images(trained['pngs'][:50])['probabilities']
  second = served.predict_images(trained['pngs'][:50])['probabilities']
  np.testing.assert_array_equal(first, second)
  expected = _in_training(model, {k: v[:50] for k, v in trained['transformed'].items()})
  np.testing.assert_allclose(first, expected, atol=1e-5)
  # Training batches are augmented: most images are no longer the stored pixels.
  spec = tft.TFTransformOutput(transformed_dir).transformed_feature_spec()
  files = sorted(str(p) for p in folder_run['out'].glob('train-*'))

  def images_of(augment):
    ds = input_lib.make_dataset(files, spec, 'label_xf', 64, 'gzip', shuffle=True, seed=1,
                                augment=augment, image_keys=('image_xf',))
    return collections.Counter(x.astype(np.uint8).tobytes()
                               for features, _ in ds for x in features['image_xf'].numpy())

  plain, augmented = images_of(()), images_of(('flip', 'crop'))
  assert sum(plain.values()) == sum(augmented.values()) == 200
  assert sum((plain & augmented).values()) < 100


# ---- 7. --eval-fraction --------------------------------------------------------------------


def test_eval_fraction_is_by_content_and_deterministic(folder_run, tmp_path):
  """Two runs (the second on a copy with other file names) carve out the same images, those
  whose bytes hash below the fraction; train + eval is every image."""
  files = folder_run['train_files']
  copy = copy_tree(files, tmp_path / 'renamed', rename=lambda name: 'copy-' + name)
  datas = [p.read_bytes() for ps in files.values() for p in ps]
  to_eval = {pil_pixels(d).tobytes() for d in datas
             if int.from_bytes(hashlib.blake2b(d, digest_size=8).digest(), 'big') / 2**64 < 0.2}
  assert 20 < len(to_eval) < 60
  everything = expected_pairs(files)
  runs = []
  for name, tree in (('a', folder_run['train_dir']), ('b', copy)):
    out = tmp_path / name
    manifest = run('--train', tree, '--eval-fraction', 0.2, '--output', out)
    s = manifest.splits
    assert s['eval'].rows_written == len(to_eval)
    assert s['train'].rows_written + s['eval'].rows_written == 200
    assert s['train'].rows_read == s['train'].rows_written
    assert manifest.eval_fraction == 0.2
    train_pairs, _ = labelled_pixels(out, 'train')
    eval_pairs, _ = labelled_pixels(out, 'eval')
    assert {pixels for pixels, _ in eval_pairs} == to_eval
    assert train_pairs + eval_pairs == everything
    runs.append(eval_pairs)
  assert runs[0] == runs[1]


def test_image_model_serves_with_tensorflow_alone(trained, tmp_path):
  """A copy of the export, with no pipeline output beside it, in a process that cannot import
  TF Transform, tfx-bsl or Beam: predict_images still gives the in-training predictions."""
  shutil.copytree(trained['path'], tmp_path / 'fmnist' / '1')
  png = tmp_path / 'one.png'
  png.write_bytes(trained['pngs'][0])
  script = TENSORFLOW_ONLY + f'''
from trainer import serving
m = serving.load_model({str(tmp_path / 'fmnist')!r})
p = m.predict_images([open({str(png)!r}, 'rb').read()])['probabilities'][0]
print('PROBS', ' '.join(repr(float(x)) for x in p))
'''
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  probs = [float(x) for x in proc.stdout.split('PROBS', 1)[1].split()]
  expected = _in_training(trained['model'], {k: v[:1] for k, v in trained['transformed'].items()})
  np.testing.assert_allclose(probs, expected[0], atol=1e-5)
