"""The output directory of a pipeline run: staging, counts and atomic publication.

The layout of a published result (DIR) and its manifest are the run contract's
(transforms/run_contract.py). While a run works, everything goes to DIR/.staging/<run id>/ (TFT's
temp files included, so that distributed workers can reach them). Only a finished, checked run
moves its files into DIR and then writes the manifest, so a run that dies at any point leaves
nothing that looks complete.
All of this module's I/O goes through Beam FileSystems, so DIR may be gs://... as well as a local
path; TF Transform writes transform_fn/ with TensorFlow's own file system, so a pipeline's DIR must
be on a scheme both know (check_tensorflow_can_write, at launch).
"""

import datetime
import importlib.metadata
import json
import logging
import math
import traceback
import uuid

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms import run_contract
from transforms.errors import UserError
from transforms.run_contract import MANIFEST, OWNED, STAGING

# Written into a run's staging area before its publication touches DIR. Where one is found, the
# OWNED entries of a DIR without a manifest are what that interrupted publication left.
PUBLISHING = 'PUBLISHING'
_LOG = logging.getLogger('pipelines')
_VERSIONED = ('tensorflow', 'tensorflow-transform', 'tfx-bsl', 'apache-beam', 'pyarrow',
              'tensorflow-metadata')


def join(*parts):
  return FileSystems.join(*parts)


def _read_text(path):
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return f.read().decode('utf-8')


def write_text(path, text):
  with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(text.encode('utf-8'))


def files_under(directory):
  result = FileSystems.match([join(directory, '**')])[0]
  return sorted(m.path for m in result.metadata_list)


def entry_exists(path):
  """A file or a directory. On object stores (gs://) a directory is only a prefix of object
  names, which FileSystems.exists does not see."""
  return FileSystems.exists(path) or bool(
      FileSystems.match([join(path, '**')], [1])[0].metadata_list)


def delete_entries(paths):
  """Deletes files and directory trees. On object stores Beam's delete takes a directory's path
  for an object name and deletes nothing, so its objects are deleted by name."""
  if all(FileSystems.get_filesystem(p).has_dirs() for p in paths):
    FileSystems.delete(paths)
    return
  objects = [p for p in paths if FileSystems.exists(p)]
  objects += [f for p in paths for f in files_under(p)]
  if objects:
    FileSystems.delete(objects)


def mkdirs(path):
  try:
    FileSystems.mkdirs(path)
  except IOError:
    if not FileSystems.exists(path):
      raise


def package_versions():
  versions = {}
  for name in _VERSIONED:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def auto_num_shards(input_bytes, bytes_per_shard=256 << 20):
  return max(1, min(1000, math.ceil(input_bytes / bytes_per_shard)))


class OutputDir:
  """One run's view of DIR: refuses to clobber a complete result, stages, then publishes."""

  def __init__(self, directory, overwrite=False):
    self.directory = directory.rstrip('/') if len(directory) > 1 else directory
    self.overwrite = overwrite
    self.run_id = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S') + (
        '-' + uuid.uuid4().hex[:8])
    self.staging = join(self.directory, STAGING, self.run_id)
    self.out = join(self.staging, 'out')  # what publication moves into DIR
    self.tmp = join(self.staging, 'tmp')  # TFT's temp dir
    self.counts = join(self.staging, 'counts')
    self._new_directory = False

  def prepare(self):
    """Checks DIR before any work is done and creates the staging area."""
    if FileSystems.exists(join(self.directory, MANIFEST)):
      if not self.overwrite:
        raise UserError(f'--output {self.directory} already holds a complete result; pass '
                        '--overwrite to replace it, or choose another directory')
    elif not self.overwrite:
      self._check_leftovers()
    # Only on directory-aware filesystems (local, HDFS) does a directory outlive its files.
    self._new_directory = (FileSystems.get_filesystem(self.directory).has_dirs() and
                           not FileSystems.exists(self.directory))
    try:
      for d in (self.out, self.tmp, self.counts):
        mkdirs(d)
      write_text(join(self.staging, 'RUNNING'), self.run_id)
    except Exception as e:
      raise UserError(f'--output {self.directory} is not writable ({e}); choose a directory '
                      'you can write to') from e

  def _owned_entries(self):
    """The OWNED entries present in DIR (what publication replaces)."""
    found = []
    for name in OWNED:
      path = join(self.directory, name)
      if '*' in name:
        found.extend(sorted(m.path for m in FileSystems.match([path])[0].metadata_list))
      elif entry_exists(path):
        found.append(path)
    return found

  def _check_leftovers(self):
    """A DIR without a manifest may still hold shards or a transform_fn/. Those an interrupted
    publication of this pipeline left are replaced (rerunning the same command just works);
    anything else may be someone's data, and is replaced only with --overwrite."""
    leftovers = self._owned_entries()
    if not leftovers:
      return
    interrupted = FileSystems.match([join(self.directory, STAGING, '*', PUBLISHING)])[0]
    if interrupted.metadata_list:
      _LOG.info('%s holds what an interrupted publication left (no %s); this run replaces it',
                self.directory, MANIFEST)
      return
    more = f' and {len(leftovers) - 1} more' if len(leftovers) > 1 else ''
    raise UserError(f'--output {self.directory} holds {leftovers[0]}{more} but no {MANIFEST}: '
                    'not a complete result of this pipeline; pass --overwrite to replace those '
                    'entries, or choose another directory')

  def split_prefix(self, split):
    return join(self.out, split)

  def errors_path(self, split, staged=True):
    return join(self.out if staged else self.directory, run_contract.errors_file(split))

  def read_counts(self, split):
    return json.loads(_read_text(join(self.counts, f'{split}.json')))

  def failure(self, error):
    """One line on a failed job; its full traceback is kept in the staging area."""
    return f'the pipeline failed: {error_cause(error)}; {self.keep_traceback(error)}; ' \
           'nothing was published'

  def keep_traceback(self, error):
    """Writes the error's traceback into the staging area; says where it is."""
    path = join(self.staging, 'traceback.txt')
    text = ''.join(traceback.format_exception(error))
    try:
      write_text(path, text)
      return f'full traceback in {path}'
    except Exception:  # the filesystem itself may be what failed
      _LOG.error('%s', text)
      return 'the traceback is in the log above'

  def discard(self):
    """Removes what this run created (after a dry run), so that DIR is left as it was found.

    `.staging` goes too unless it holds earlier failed runs' files, and so does DIR if this run
    created it: a dry run is a check, and empty directories it left would be clutter.
    """
    delete_entries([self.staging])
    leftovers = [join(self.directory, STAGING)] + ([self.directory] if self._new_directory else [])
    for path in leftovers:
      if FileSystems.get_filesystem(path).has_dirs() and not files_under(path):
        FileSystems.delete([path])

  def publish(self, manifest):
    """Makes the staged result the content of DIR; the manifest is written last.

    A kill at any step leaves DIR either complete (the old result until its manifest goes, the
    new one once the new manifest is in) or without a manifest: never a manifest beside files of
    another run. The PUBLISHING marker tells a rerun that OWNED entries left without a manifest
    are this pipeline's, to replace without --overwrite.
    """
    write_text(join(self.staging, PUBLISHING), self.run_id)
    old_manifest = join(self.directory, MANIFEST)
    if FileSystems.exists(old_manifest):
      FileSystems.delete([old_manifest])  # from here on DIR no longer claims to be complete
    stale = self._owned_entries()
    if stale:
      delete_entries(stale)
    self._move(self.out, self.directory)
    manifest = manifest.replace(complete=True, published=_now())
    temp = join(self.staging, MANIFEST)
    write_text(temp, manifest.to_json())
    FileSystems.rename([temp], [old_manifest])
    self._remove_staging()
    return manifest

  def _move(self, source, destination):
    files = [path[len(source) + 1:] for path in files_under(source)]
    if FileSystems.get_filesystem(source).has_dirs():
      # Directory-aware filesystems (local, HDFS) move whole top-level entries: fewer calls, and
      # the empty directories a SavedModel may hold come along.
      names = sorted({f.split('/', 1)[0] for f in files})
    else:
      names = files
    FileSystems.rename([join(source, n) for n in names], [join(destination, n) for n in names])

  def _remove_staging(self):
    # Staging areas left by earlier failed runs (kept for their errors and tracebacks) are
    # superseded by this published result.
    delete_entries([join(self.directory, STAGING)])


def error_cause(error, limit=400):
  """The line of an error that says what went wrong: the last line that says something (gRPC
  errors end in '>'), or gRPC's own details line; cut at `limit` characters."""
  lines = [line.strip() for line in str(error).splitlines() if any(c.isalnum() for c in line)]
  details = [line for line in lines if line.startswith('details = ')]
  cause = (details or lines or [type(error).__name__])[-1]
  return cause[:limit] + '...' if len(cause) > limit else cause


def check_tensorflow_can_write(directory):
  """TF Transform writes transform_fn/ and its temp files with TensorFlow's file system, not
  Beam's: on a scheme only Beam knows, building the job fails with TensorFlow's traceback."""
  scheme = FileSystems.get_scheme(directory)
  if scheme in (None, 'file'):
    return
  import tensorflow as tf  # only here: the rest of this module needs Beam alone
  known = tf.io.gfile.get_registered_schemes()
  if scheme not in known:
    others = ''.join(f' or {s}://' for s in sorted(known) if s not in ('', 'file', 'ram'))
    raise UserError(f'--output {directory}: TF Transform writes transform_fn/ through TensorFlow, '
                    f'which has no file system for {scheme}://; use a local path{others}, or '
                    f'install a TensorFlow file system plugin for {scheme}:// (e.g. tensorflow-io)')


def _now():
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
