"""Every read and write of user paths goes through Beam FileSystems, so gs:// (or any file system
Beam has) works: proved with a file system registered under a test scheme, objfs://, that
behaves like an object store (no directories; a "directory" is a prefix of object names; a
rename is a copy and a delete), backed by a local directory of flat object files.

What goes through it here: the CSV inputs (matched, inspected, read in byte ranges) of a real
run, and, with Beam's sinks and this project's publication, staging, shards, dead letters,
counts, the manifest and --overwrite. Not TF Transform's transform_fn/ and temp files: TFT writes
them with TensorFlow's own file system, which cannot learn a scheme from Python; an --output on
a scheme TensorFlow does not know is refused at launch (for gs:// both know it).
"""

import gzip
import json
import os
import urllib.parse
import uuid

import apache_beam as beam
import pyarrow as pa
import pytest
import tensorflow as tf
from apache_beam.io.filesystem import (
  BeamIOError,
  CompressedFile,
  CompressionTypes,
  FileMetadata,
  FileSystem,
)
from apache_beam.io.filesystems import FileSystems
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from pipelines import output_dir, tabular
from pipelines.runner import launch
from pipelines.sinks import dead_letters, row_counts, tfrecords
from tests import runs
from tests.helpers import read_adult_csv
from transforms import run_contract
from transforms.errors import UserError

SCHEME = 'objfs'


class ObjectStoreFileSystem(FileSystem):
  """objfs://NAME: the object NAME, stored as one file in `root` under its quoted name."""

  root = None  # set by the `objfs` fixture
  calls = []  # (method, path) of every call, for the tests to see what went through here

  @classmethod
  def scheme(cls):
    return SCHEME

  def _file(self, path):
    assert path.startswith(f'{SCHEME}://'), path
    return os.path.join(self.root, urllib.parse.quote(path[len(SCHEME) + 3:], safe=''))

  def _names(self):
    return [f'{SCHEME}://' + urllib.parse.unquote(n) for n in os.listdir(self.root)
            if not n.startswith('.')]

  def join(self, basepath, *paths):
    for p in paths:
      basepath = basepath + p if basepath.endswith('/') else basepath + '/' + p
    return basepath

  def split(self, path):
    head, _, tail = path.rpartition('/')
    return head, tail

  def mkdirs(self, path):
    pass  # no directories

  def has_dirs(self):
    return False

  def _list(self, dir_or_prefix):
    self.calls.append(('list', dir_or_prefix))
    for name in sorted(self._names()):
      if name.startswith(dir_or_prefix):
        yield self.metadata(name)

  def create(self, path, mime_type='application/octet-stream',
             compression_type=CompressionTypes.AUTO):
    self.calls.append(('create', path))
    target, temp = self._file(path), os.path.join(self.root, f'.upload-{uuid.uuid4().hex}')
    raw = open(temp, 'wb')
    close = raw.close

    def finish():  # an object appears whole, when its upload ends
      close()
      os.replace(temp, target)

    raw.close = finish
    compression_type = self._get_compression_type(path, compression_type)
    if compression_type == CompressionTypes.UNCOMPRESSED:
      return raw
    return CompressedFile(raw, compression_type=compression_type)

  def open(self, path, mime_type='application/octet-stream',
           compression_type=CompressionTypes.AUTO):
    self.calls.append(('open', path))
    if not os.path.exists(self._file(path)):
      raise BeamIOError(f'no such object {path}')
    raw = open(self._file(path), 'rb')
    compression_type = self._get_compression_type(path, compression_type)
    if compression_type == CompressionTypes.UNCOMPRESSED:
      return raw
    return CompressedFile(raw, compression_type=compression_type)

  def copy(self, source_file_names, destination_file_names):
    for source, destination in zip(source_file_names, destination_file_names):
      self.calls.append(('copy', source))
      with open(self._file(source), 'rb') as f:
        data = f.read()
      with self.create(destination, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)

  def rename(self, source_file_names, destination_file_names):
    self.copy(source_file_names, destination_file_names)
    self.delete(source_file_names)

  def exists(self, path):
    return os.path.exists(self._file(path))

  def size(self, path):
    return os.path.getsize(self._file(path))

  def last_updated(self, path):
    return os.path.getmtime(self._file(path))

  def checksum(self, path):
    return str(self.size(path))

  def metadata(self, path):
    return FileMetadata(path, self.size(path), self.last_updated(path))

  def delete(self, paths):
    """As GCS: a path ending in / deletes every object under it; any other path names objects
    (a glob, or one object), so a bare directory path deletes nothing."""
    for path in paths:
      self.calls.append(('delete', path))
      if path.endswith('/'):
        names = [n for n in self._names() if n.startswith(path)]
      else:
        names = [m.path for m in self.match([path])[0].metadata_list]
      for name in names:
        os.remove(self._file(name))


@pytest.fixture
def objfs(tmp_path):
  root = tmp_path / 'objfs'
  root.mkdir()
  ObjectStoreFileSystem.root = str(root)
  ObjectStoreFileSystem.calls = []
  yield ObjectStoreFileSystem
  ObjectStoreFileSystem.root = None


def _put(path, data):
  with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(data)


def _get(path):
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return f.read()


def _objects(prefix):
  return sorted(m.path[len(prefix):] for m in FileSystems.match([prefix + '**'])[0].metadata_list)


def test_csv_inputs_read_through_the_file_system(objfs, tmp_path, monkeypatch):
  """A real run with its inputs on objfs (the test file gzipped) and a local --output."""
  monkeypatch.chdir(tmp_path)  # a local open() of an objfs path would create objfs:/ here
  train, test = runs.small_adult(tmp_path)
  _put('objfs://in/adult/train.csv', open(train, 'rb').read())
  _put('objfs://in/adult/test.csv.gz', gzip.compress(open(test, 'rb').read()))
  out = tmp_path / 'out'
  manifest = tabular.run(['--transforms', 'transforms.census', '--train', 'objfs://in/*/train.csv',
                          '--eval', 'objfs://in/adult/test.csv.gz', '--output', str(out)])
  assert manifest.inputs == {'train': ['objfs://in/adult/train.csv'],
                                'eval': ['objfs://in/adult/test.csv.gz']}
  rows = len(read_adult_csv(train))
  counts = manifest.splits
  assert (counts['train'].rows_read, counts['train'].rows_written) == (rows, rows)
  assert counts['eval'].rows_written == len(read_adult_csv(test, 1))
  error, = [json.loads(line) for line in open(out / 'errors' / 'eval.jsonl')]
  assert (error['file'], error['line']) == ('objfs://in/adult/test.csv.gz', 1)
  opened = {path for method, path in objfs.calls if method == 'open'}
  assert opened == {'objfs://in/adult/train.csv', 'objfs://in/adult/test.csv.gz'}
  assert not os.path.exists(tmp_path / 'objfs:')
  runs.check_complete(str(out))


def test_an_output_tensorflow_cannot_write_is_refused_at_launch(objfs, tmp_path):
  train, _ = runs.small_adult(tmp_path)
  with pytest.raises(UserError) as e:
    tabular.run(['--transforms', 'transforms.census', '--train', train,
                 '--output', 'objfs://out'])
  message = str(e.value)
  assert message.startswith('--output objfs://out: ') and 'no file system for objfs://' in message
  assert 'gs://' in message
  assert os.listdir(objfs.root) == []  # nothing staged


def _batch(values):
  return pa.RecordBatch.from_arrays(
      [pa.array([[v] for v in values], pa.list_(pa.int64())),
       pa.array([[str(v).encode()] for v in values], pa.list_(pa.binary()))], ['x', 'w'])


def _stage_and_publish(directory, splits, overwrite, transform_fn_files):
  """What a run does around TF Transform, on objfs: stage, write shards, dead letters and counts
  with the pipeline's own sinks in a real Beam job, then publish. `splits`: {split: (values,
  dead letters)}; `transform_fn_files` stand in for what TFT writes with TensorFlow."""
  out = output_dir.OutputDir(directory, overwrite)
  out.prepare()
  for name, data in transform_fn_files.items():
    _put(output_dir.join(out.out, 'transform_fn', name), data)
  schema = schema_utils.schema_from_feature_spec({'x': tf.io.FixedLenFeature([], tf.int64),
                                                  'w': tf.io.FixedLenFeature([], tf.string)})
  with launch.make_pipeline([]) as p:
    metadata = beam.pvalue.PBegin(p) | 'Metadata' >> beam.Create(
        [dataset_metadata.DatasetMetadata(schema)])
    for split, (values, errors) in splits.items():
      label = split.capitalize()
      batches = p | f'Batches{label}' >> beam.Create([_batch(values[:5]), _batch(values[5:])])
      written = batches | f'Write{label}' >> tfrecords.WriteExamples(
          out.split_prefix(split), 2, 'gzip', output_dir.join(out.tmp, 'parts', split),
          type('Metadata', (), {'deferred_metadata': metadata}))
      rejected = (p | f'Errors{label}' >> beam.Create(errors)
                  | f'WriteErrors{label}' >> dead_letters.WriteErrors(out.errors_path(split)))
      rows = p | f'Rows{label}' >> beam.Create([len(values)])
      _ = (rows, written, rejected) | f'Count{label}' >> row_counts.WriteCounts(
          output_dir.join(out.counts, f'{split}.json'))
  counts = {split: out.read_counts(split) for split in splits}
  return out.publish(run_contract.Manifest(
      pipeline='tabular', transforms='inline', label_key='x',
      raw_columns=[run_contract.RawColumn('x', 'int64')], inputs={},
      splits={s: run_contract.SplitEntry(**c, files=run_contract.shard_pattern(s, 2, 'gzip'),
                                         num_shards=2) for s, c in counts.items()}))


def _examples(prefix, local_dir):
  """The x of every Example in the shards under `prefix`, read by TensorFlow (checksums too)
  from local copies: TensorFlow cannot open objfs://."""
  files = []
  for name in _objects(prefix):
    files.append(os.path.join(local_dir, name))
    with open(files[-1], 'wb') as f:
      f.write(_get(prefix + name))
  return sorted(tf.train.Example.FromString(r.numpy()).features.feature['x'].int64_list.value[0]
                for r in tf.data.TFRecordDataset(files, compression_type='GZIP'))


def test_sinks_and_publication_through_the_file_system(objfs, tmp_path):
  """Shards, dead letters, counts, the manifest and --overwrite on an object store: stale
  "directories" (prefixes) of the old result must go, as must the staging area."""
  bad = {'kind': 'bad_number', 'file': 'objfs://in/a.csv', 'line': 3, 'reason': 'x', 'raw': 'y'}
  first = _stage_and_publish('objfs://out', {'train': (list(range(10)), [bad]),
                                             'eval': (list(range(10, 20)), [])},
                             False, {'saved_model.pb': b'old', 'assets/old_vocab': b'a\n'})
  assert first.splits['train'].rows_written == 10
  assert first.splits['train'].rejected_by_kind == {'bad_number': 1}
  assert _objects('objfs://out/') == [
      'errors/eval.jsonl', 'errors/train.jsonl',
      'eval-00000-of-00002.tfrecord.gz', 'eval-00001-of-00002.tfrecord.gz', 'manifest.json',
      'train-00000-of-00002.tfrecord.gz', 'train-00001-of-00002.tfrecord.gz',
      'transform_fn/assets/old_vocab', 'transform_fn/saved_model.pb']
  assert json.loads(_get('objfs://out/errors/train.jsonl')) == bad
  assert json.loads(_get('objfs://out/manifest.json')) == first.to_dict()
  assert _examples('objfs://out/train-', tmp_path) == list(range(10))

  with pytest.raises(UserError):  # a complete result is replaced only with --overwrite
    output_dir.OutputDir('objfs://out').prepare()
  second = _stage_and_publish('objfs://out', {'train': (list(range(100, 110)), [])}, True,
                              {'saved_model.pb': b'new'})
  assert _objects('objfs://out/') == [
      'errors/train.jsonl', 'manifest.json', 'train-00000-of-00002.tfrecord.gz',
      'train-00001-of-00002.tfrecord.gz', 'transform_fn/saved_model.pb']
  assert _get('objfs://out/transform_fn/saved_model.pb') == b'new'
  assert json.loads(_get('objfs://out/manifest.json')) == second.to_dict()
  assert _examples('objfs://out/train-', tmp_path) == list(range(100, 110))
  # Staging, shard parts, counts and markers were written through the file system too.
  staged = {path.split('/', 5)[-1].split('/')[0] for method, path in objfs.calls
            if method == 'create' and path.startswith('objfs://out/.staging/')}
  assert {'RUNNING', 'PUBLISHING', 'manifest.json', 'out', 'tmp', 'counts'} <= staged, staged
