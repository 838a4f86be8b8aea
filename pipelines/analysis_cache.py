"""--analysis-cache DIR: TF Transform's analyzer cache over spans, so that a run over yesterday's
files and one new one analyzes the new file only.

Each input of the train split (a CSV file, a tar or TFRecord shard, a class-folder root) is a
span: one TF Transform dataset key. TF Transform keeps, per dataset key, the accumulators of its
cacheable analyzers (tft_beam.AnalyzeDatasetWithCache, analyzer_cache.ReadAnalysisCacheFromFS /
WriteAnalysisCacheToFS) and merges cached and new ones into the same results as one pass over all
spans. What this module adds is what makes that safe to leave running:

  * Never a stale hit. A span's dataset key is a digest of its content (the bytes of its files,
    not their names) and of everything else its accumulators depend on: the traced
    preprocessing_fn (its whole graph, ops and constants: TF Transform's own cache keys describe
    an analyzer's input path by op attributes only, so `x + 1` and `x - 1` would share one), the
    tracing mode, the dataset contract and reader options each pipeline names, and the versions
    of Python, TensorFlow, TF Transform, tfx_bsl, Beam and pyarrow. Any change is another key,
    hence a miss. (A preprocessing_fn whose results depend on Python state its graph does not
    show, a tf.py_function's body, is beyond what a graph digest sees.)
  * Nothing half-written. TF Transform writes a dataset key's entries (and its MANIFEST, at graph
    construction) into the run's staging area; only a run that succeeded copies each new span
    into DIR, under a temporary name renamed into place where the file system has directories,
    and with a CHECKSUMS.json (every file's SHA-256) written last: an entry without it, or whose
    files do not match it, is a miss with a warning, never a failure or a wrong result.
  * Only what is needed is read. TF Transform's own graph inspection
    (analysis_graph_builder.get_analysis_dataset_keys) says which spans an analysis still needs
    with the cache it has: none for a fully cached span of a fully cacheable analysis; every span
    where an analyzer cannot be cached (an analyzer of another's result, for one).

The results equal an uncached run over the same spans: tests/test_analysis_cache.py compares
vocabulary files byte for byte, means and variances, and quantile boundaries.
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import pickle
import platform
import re
import struct
import uuid
import zlib
from typing import Dict, FrozenSet, Optional, Tuple

import apache_beam as beam
import tensorflow_transform.beam as tft_beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines import analysis_graph, cache_packing, output_dir

_LOG = logging.getLogger('pipelines')

FORMAT = 1  # of this module's keys and CHECKSUMS.json: another format is another key
CHECKSUMS = 'CHECKSUMS.json'
_TFT_MANIFEST = 'MANIFEST'  # TF Transform's list of a dataset key's entries (a pickled dict)
_CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class Span:
  """One input of the train split: its name (a path), its work units and the files it reads."""
  name: str
  units: Tuple
  files: Tuple[str, ...]


def spans(units, span_of):
  """Work units -> Spans, in the order of their first unit. `span_of(unit)`: (span name, the
  files the unit reads)."""
  grouped = {}
  for unit in units:
    name, files = span_of(unit)
    found_units, found_files = grouped.setdefault(name, ([], []))
    found_units.append(unit)
    found_files.extend(f for f in files if f not in found_files)
  return [Span(name, tuple(u), tuple(f)) for name, (u, f) in grouped.items()]


def content_digest(paths):
  """SHA-256 of the bytes of `paths` (as stored: a .gz file's compressed bytes), in the given
  order, each prefixed by its length so that boundaries count."""
  digest = hashlib.sha256()
  for path in paths:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      size = 0
      file_digest = hashlib.sha256()
      while True:
        chunk = f.read(_CHUNK)
        if not chunk:
          break
        size += len(chunk)
        file_digest.update(chunk)
    digest.update(f'{size}:'.encode() + file_digest.digest())
  return digest.hexdigest()


def trace(preprocessing_fn, type_specs, graph_mode):
  """The preprocessing_fn traced by TF Transform's own tracing (impl_helper, which its analysis
  and its graph inspection use): (graph, structured inputs, structured outputs). Raises what the
  trace raises."""
  from tensorflow_transform import impl_helper
  return impl_helper.trace_preprocessing_function(
      preprocessing_fn, type_specs, use_tf_compat_v1=graph_mode)


def digest_of(graph):
  """SHA-256 of a traced graph (every op, attribute and constant), the same for every trace of
  the same function."""
  return hashlib.sha256(_canonical_graph_def(graph.as_graph_def())).hexdigest()


@contextlib.contextmanager
def reusing_trace(preprocessing_fn, traced):
  """Within the block, TF Transform's next trace of `preprocessing_fn` is `traced` (a trace of
  the same function with the same specs and mode, made and digested before) instead of a new
  one. A cached run traced the function three times: once for its digest, once more in TF
  Transform's inspection of which spans to read, once more in its analysis (4 s each on a
  300-column table); the digest's trace serves all three (Plan.traced). TF Transform's graph
  builder takes the analyzers' tensors to replace out of the graph's collection
  (analyzer_nodes.TENSOR_REPLACEMENTS) as it reads them, so the block puts them back as they
  were when it ends: the next use finds the trace as it was made (tests/test_analysis_cache.py).
  Both trace through impl_helper's module attribute on the TF Transform versions
  vocabulary.TESTED_TFT names; on another, or without `traced`, TF Transform traces again as
  released."""
  from tensorflow_transform import analyzer_nodes, impl_helper

  from pipelines import vocabulary
  original = getattr(impl_helper, 'trace_preprocessing_function', None)
  sinks_key = getattr(analyzer_nodes, 'TENSOR_REPLACEMENTS', None)
  if (traced is None or original is None or sinks_key is None or
      not vocabulary.tft_tested()):
    yield
    return
  graph = traced[0]
  sinks = list(graph.get_collection(sinks_key))
  unused = [traced]

  def trace_once(fn, *args, **kwargs):
    if unused and fn is preprocessing_fn:
      return unused.pop()
    return original(fn, *args, **kwargs)

  impl_helper.trace_preprocessing_function = trace_once
  try:
    yield
  finally:
    impl_helper.trace_preprocessing_function = original
    graph.clear_collection(sinks_key)
    for sink in sinks:
      graph.add_to_collection(sinks_key, sink)


def _canonical_graph_def(graph_def):
  """The GraphDef serialized with its functions' names made independent of the process: TF
  names a traced function (a tf.map_fn's loop body, a tf.cond's branch) with a counter global to
  the process, so the second trace of a function in one process would otherwise give another
  digest (a miss). Each name's counter becomes its rank among the functions of the same stem
  (counters grow in the order functions are made), and the library is sorted by the new names."""
  from google.protobuf import text_format
  from tensorflow.core.framework import graph_pb2
  names = [f.signature.name for f in graph_def.library.function]
  if not names:
    return graph_def.SerializeToString(deterministic=True)
  by_stem = {}
  for name in names:
    match = re.fullmatch(r'(.*?)_(\d+)', name)
    if match:  # a name without a counter is the same in every trace
      by_stem.setdefault(match.group(1), []).append((int(match.group(2)), name))
  canonical = {name: f'{stem}_#{rank}' for stem, found in by_stem.items()
               for rank, (_, name) in enumerate(sorted(found))}
  if not canonical:
    return graph_def.SerializeToString(deterministic=True)
  # References: a function's own name, a node's op (a call), a func attribute, and names made
  # from it (its arguments' "<name>___redundant_placeholder0"); not inside a longer name.
  pattern = re.compile(r'(?<![\w])(' + '|'.join(
      re.escape(n) for n in sorted(canonical, key=len, reverse=True)) + r')(?![0-9])')
  text = pattern.sub(lambda m: canonical[m.group(1)], text_format.MessageToString(graph_def))
  result = text_format.Parse(text, graph_pb2.GraphDef())
  functions = sorted(result.library.function, key=lambda f: f.signature.name)
  del result.library.function[:]
  result.library.function.extend(functions)
  return result.SerializeToString(deterministic=True)


def run_identity(reader):
  """What, besides a span's content and the graph, its accumulators depend on."""
  versions = output_dir.package_versions()
  return {'format': FORMAT, 'python': platform.python_version(), 'versions': versions,
          'reader': reader}


def dataset_key(span_digest, graph, graph_mode, identity):
  text = json.dumps({'span': span_digest, 'graph': graph, 'graph_mode': graph_mode,
                     'identity': identity}, sort_keys=True, default=repr)
  digest = hashlib.sha256(text.encode()).hexdigest()
  return tft_beam.analyzer_cache.DatasetKey(f'span-{digest[:40]}')


def _read(path):
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return f.read()


def _file_digests(directory):
  """{name relative to directory: SHA-256} of the files under it (the checksums file aside)."""
  result = {}
  for path in output_dir.files_under(directory):
    name = path[len(directory) + 1:]
    if name != CHECKSUMS:
      result[name] = hashlib.sha256(_read(path)).hexdigest()
  return result


def _entry_files(names, index):
  """Which of a span's files (names relative to its directory) hold one cache entry, as TF
  Transform's WriteAnalysisCacheToFS names them (<index>-<shard>-of-<shards>[.gz])."""
  return sorted(n for n in names if re.fullmatch(rf'{index}-\d+-of-\d+(\.gz)?', n))


def cached_entries(directory):
  """{cache entry key: ((path, SHA-256), ...) of its files} of one span's entry in DIR (TF
  Transform's MANIFEST names the entries), or None where it is absent (a plain miss) or cannot
  be trusted (a miss with a warning: incomplete, corrupt, another format)."""
  checksums = output_dir.join(directory, CHECKSUMS)
  if not FileSystems.exists(checksums):
    if output_dir.entry_exists(directory):
      _LOG.warning('analysis cache: %s is incomplete (no %s: a run that was stopped while it '
                   'wrote it?); its span is analyzed again', directory, CHECKSUMS)
    return None
  try:
    recorded = json.loads(_read(checksums))
    if recorded.get('format') != FORMAT:
      raise ValueError(f'format {recorded.get("format")!r}, not {FORMAT}')
    found = _file_digests(directory)
    if found != recorded['files']:
      changed = sorted(set(found.items()) ^ set(recorded['files'].items()))
      raise ValueError(f'{changed[0][0]} does not match its checksum')
    manifest = pickle.loads(_read(output_dir.join(directory, _TFT_MANIFEST)))
    if not isinstance(manifest, dict) or not all(isinstance(i, int) for i in manifest.values()):
      raise ValueError(f'{_TFT_MANIFEST} is not a dict of entry indices')
    result = {}
    for entry, index in manifest.items():
      files = _entry_files(found, index)
      if not files:
        raise ValueError(f'entry {index} of its {_TFT_MANIFEST} has no file')
      result[entry] = tuple((output_dir.join(directory, name), found[name]) for name in files)
    return result
  except Exception as e:  # whatever is wrong with it, the span is analyzed again
    _LOG.warning('analysis cache: %s cannot be used (%s: %s); its span is analyzed again',
                 directory, type(e).__name__, output_dir.error_cause(e, limit=200))
    return None


@dataclasses.dataclass
class Plan:
  """What one run reads from and writes to DIR."""
  directory: str
  spans: Tuple[Span, ...]
  keys: Dict[str, object]  # span name -> its DatasetKey
  cached: Dict[str, Dict[bytes, tuple]]  # span name -> {cache entry key: ((file, SHA-256),
  #   ...)}, in DIR
  to_read: FrozenSet[str]  # the spans the analysis reads
  staging: str  # where TF Transform writes the new entries
  # The plan's trace of the preprocessing_fn, for the analysis (reusing_trace); graph mode only
  # (TF2 behaviours trace with the analysis's temporary directory for their assets).
  traced: Optional[tuple] = dataclasses.field(default=None, repr=False, compare=False)

  def summary(self):
    """The manifest's entry: each span, its key and whether its accumulators came from DIR."""
    return {'directory': self.directory,
            'spans': [{'input': s.name, 'key': self.keys[s.name].key,
                       'from_cache': s.name in self.cached, 'read': s.name in self.to_read}
                      for s in self.spans]}


@dataclasses.dataclass(frozen=True)
class Request:
  """--analysis-cache DIR as a pipeline asks for it: the train split's spans, their content
  digests and the reader options its accumulators depend on (the contract's columns, the
  parsing and batching flags, --eval-fraction: anything that changes the rows analyzed)."""
  directory: str
  spans: Tuple[Span, ...]
  digests: Dict[str, str]
  reader: Dict


def request(directory, units, span_of, reader):
  """A Request for the train split's work units; reads every span once for its digest, two at
  a time (hashlib and file reads let go of the GIL: 11 spans of 21 MB, 0.30 -> 0.10 s)."""
  span_list = tuple(spans(units, span_of))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    digests = dict(zip((s.name for s in span_list),
                       pool.map(content_digest, (s.files for s in span_list))))
  return Request(directory.rstrip('/') or '/', span_list, digests, reader)


def plan(req: Request, staging, preprocessing_fn, type_specs, graph_mode, traced=None):
  """The Plan of one run: keys, the spans DIR holds, those the analysis reads. `traced`: the
  function's trace, if already made (and not yet used by anything else). Raises what tracing
  the preprocessing_fn raises."""
  from tensorflow_transform.beam import analysis_graph_builder
  directory, span_list, digests = req.directory, req.spans, req.digests
  if traced is None:
    traced = trace(preprocessing_fn, type_specs, graph_mode)
  graph = digest_of(traced[0])
  identity = run_identity(req.reader)
  keys = {s.name: dataset_key(digests[s.name], graph, graph_mode, identity) for s in span_list}
  cached = {}
  for s in span_list:
    entries = cached_entries(output_dir.join(directory, keys[s.name].key))
    if entries is not None:
      cached[s.name] = entries
  with reusing_trace(preprocessing_fn, traced):
    needed = analysis_graph_builder.get_analysis_dataset_keys(
        preprocessing_fn, type_specs, list(keys.values()),
        {keys[name]: tft_beam.analyzer_cache.DatasetCache({entry: True for entry in entries},
                                                          None)
         for name, entries in cached.items()},
        graph_mode)
  needed = set(needed)
  to_read = frozenset(s.name for s in span_list if keys[s.name] in needed)
  return Plan(directory, tuple(span_list), keys, cached, to_read, staging,
              traced if graph_mode else None)


def _records(framed):
  """The records of an uncompressed TFRecord file's bytes. The framing's CRCs are not checked:
  the file's SHA-256 has been (the one recorded when it was written)."""
  records, at = [], 0
  while at < len(framed):
    if at + 12 > len(framed):
      raise ValueError('a record is cut short')
    (length,) = struct.unpack_from('<Q', framed, at)
    at += 12  # the length and its CRC
    if at + length + 4 > len(framed):
      raise ValueError('a record is cut short')
    records.append(framed[at:at + length])
    at += length + 4  # the data and its CRC
  return records


class _ReadEntriesFn(beam.DoFn):
  """A cached entry's file -> its records (the encoded accumulators) on the output of the entry
  it belongs to (one by one, or with `lists` as one list), and with `lists` also as one list on
  the output of that entry of every span and as (cache entry key, that list) on the output of
  every entry. The file is checked against the SHA-256 the plan found it had: one that changed
  since is a failure naming it, never another run's accumulators."""

  def __init__(self, lists):
    self._lists = lists

  def process(self, file):
    # its entry's key, its tag, the spans-together tag, SHA-256
    path, entry, own, together, expected = file
    data = _read(path)
    if hashlib.sha256(data).hexdigest() != expected:
      raise ValueError(f'analysis cache: {path} changed while this run read it (another run '
                       'writing the same cache?); run again')
    if path.endswith('.gz'):
      data = zlib.decompress(data, wbits=31)  # gzip, as TF Transform writes the entries
    records = _records(data)
    if not self._lists:
      for record in records:
        yield beam.pvalue.TaggedOutput(own, record)
      return
    yield beam.pvalue.TaggedOutput(own, records)
    yield beam.pvalue.TaggedOutput(together, records)
    yield beam.pvalue.TaggedOutput(_EVERY_ENTRY_TAG, (entry, records))


def read_cache(pipeline, p: Plan):
  """The cached spans' accumulators, as AnalyzeDatasetWithCache takes them: {DatasetKey:
  DatasetCache({cache entry key: PCollection of encoded accumulators}, None)}.

  TF Transform's ReadAnalysisCacheFromFS reads each entry of each span with a Beam source of its
  own (and each span's metadata, which only its telemetry uses): 10 spans of a 20-analyzer
  function were 660 transforms and as many stages' fixed costs. Here one DoFn reads every
  entry's files, as the plan found and checked them, and puts each record on its entry's tagged
  output; where this project's rewrites of the analysis graph are on (which decode the entries
  themselves: cache_packing), the records of each file as one list on it, on the output of that
  entry of every span (under cache_packing.TOGETHER) and on one output of every entry. It reads
  each file whole: entries are small (a vocabulary's counts, a combiner's
  accumulator), and Beam's ReadAllFromTFRecord (one read of them all before), which splits and
  reshuffles the files and reads the gzip stream in small pieces in Python, spent 0.8 s reading
  the 200 entries of the cache benchmark, where this DoFn spends 0.2 s (py-spy)."""
  if not p.cached:
    return {}
  # The files are the elements, with their tags and checksums, not the DoFn's: the runner
  # unpickled the DoFn 224 times in the cache benchmark's run (0.22 s with 200 files in it).
  lists = analysis_graph.cache_rewrites_enabled()
  files, by_entry, together = [], {}, {}  # (path, entry, 2 tags, SHA-256); (span, entry) -> tag;
  for name, entries in p.cached.items():  # entry -> the tag of its records of every span
    for entry, checked in entries.items():
      by_entry[(name, entry)] = tag = f'entry{len(by_entry)}'
      both = (tag, together.setdefault(entry, f'together{len(together)}'))
      files.extend((path, entry, *both, digest) for path, digest in checked)
  read = (pipeline
          | 'ListCachedEntries' >> beam.Create(sorted(files), reshuffle=False)
          | 'ReadCachedEntries' >> beam.ParDo(_ReadEntriesFn(lists)).with_outputs(
              *by_entry.values(), *together.values(), _EVERY_ENTRY_TAG))
  cache = {p.keys[name]: tft_beam.analyzer_cache.DatasetCache(
      {entry: read[by_entry[(name, entry)]] for entry in entries}, None)
      for name, entries in p.cached.items()}
  if not lists:
    return cache
  # Each entry's records of every span, a list per file, for cache_packing's rewrites (TF
  # Transform reads only the keys of the spans it analyzes); the per-span outputs they replace
  # are left unread.
  cache[cache_packing.TOGETHER] = tft_beam.analyzer_cache.DatasetCache(
      {**{entry: read[tag] for entry, tag in together.items()},
       cache_packing.EVERY_ENTRY: read[_EVERY_ENTRY_TAG]}, None)
  return cache


_EVERY_ENTRY_TAG = 'every_entry'


class _WriteEntryFn(beam.DoFn):
  """((span key, entry index), encoded accumulators, each a record or a list of records) -> the
  entry's file in the staging area, named and framed as TF Transform's WriteAnalysisCacheToFS
  writes it (a gzip TFRecord file <index>-00000-of-00001.gz; None values only make sure that an
  empty entry has its file)."""

  def __init__(self, staging):
    self._staging = staging

  def process(self, keyed):
    import tensorflow as tf
    (span, index), values = keyed
    directory = output_dir.join(self._staging, span)
    output_dir.mkdirs(directory)
    path = output_dir.join(directory, f'{index}-00000-of-00001.gz')
    with tf.io.TFRecordWriter(path, tf.io.TFRecordOptions(compression_type='GZIP')) as writer:
      for value in values:
        for record in value if isinstance(value, list) else () if value is None else (value,):
          writer.write(record)
    yield path


def write_cache(pipeline, output_cache, p: Plan):
  """The new accumulators into the run's staging area (publish() moves them into DIR), in TF
  Transform's layout: per span, its MANIFEST ({cache entry key: index}, pickled as TF Transform
  pickles it, written now as TF Transform writes it) and one file per entry.

  TF Transform's WriteAnalysisCacheToFS gives every entry of every span a WriteToTFRecord of its
  own: 10 new spans of a 20-analyzer function were 400 Beam stages, 9 s of a 52 s run. Here
  every entry goes through one GroupByKey to one DoFn that writes each entry's file. The entries
  cache_packing.encode_together and span_counting.encode_together packed come keyed by their
  cache entry key (with a record, or a list of them), under an EncodedTogether key that names
  them."""
  keyed, every_entry = [], []
  for key, cache in output_cache.items():
    manifest = {}
    for name, values in cache.cache_dict.items():
      if isinstance(name, cache_packing.EncodedTogether):
        at = {}
        for entry in name.entries:
          at[entry] = manifest[entry] = index = len(manifest)
          every_entry.append(((key.key, index), None))
        keyed.append(values | f'KeyCacheEntries{len(keyed)}' >> beam.Map(
            lambda pair, span, at: ((span, at[pair[0]]), pair[1]), key.key, at))
        continue
      manifest[name] = index = len(manifest)
      every_entry.append(((key.key, index), None))
      keyed.append(values | f'KeyCacheEntry{len(keyed)}' >> beam.Map(
          lambda value, at: (at, value), (key.key, index)))
    directory = output_dir.join(p.staging, key.key)
    output_dir.mkdirs(directory)
    with FileSystems.create(output_dir.join(directory, _TFT_MANIFEST),
                            compression_type=CompressionTypes.UNCOMPRESSED) as f:
      f.write(pickle.dumps(manifest, protocol=0))
  if not keyed:
    return None
  every = pipeline | 'EveryCacheEntry' >> beam.Create(every_entry)
  return ((every, *keyed)
          | 'AllCacheEntries' >> beam.Flatten()
          | 'ByCacheEntry' >> beam.GroupByKey()
          | 'WriteCacheEntries' >> beam.ParDo(_WriteEntryFn(p.staging)))


def publish(p: Optional[Plan]):
  """Moves the new spans' entries of a successful run into DIR; returns their span names. Each
  goes under a temporary name and is renamed into place where the file system has directories;
  its CHECKSUMS.json is written last either way, so a copy that stops halfway is a miss."""
  if p is None:
    return []
  output_dir.mkdirs(p.directory)
  published = []
  for s in p.spans:
    key = p.keys[s.name].key
    staged = output_dir.join(p.staging, key)
    final = output_dir.join(p.directory, key)
    if s.name in p.cached or not output_dir.entry_exists(staged):
      continue
    output_dir.write_text(output_dir.join(staged, CHECKSUMS), json.dumps(
        {'format': FORMAT, 'span': s.name, 'files': _file_digests(staged)}, indent=1,
        sort_keys=True))
    if output_dir.entry_exists(final):  # incomplete or corrupt when planned (or as good as this)
      output_dir.delete_entries([final])
    if FileSystems.get_filesystem(final).has_dirs():
      temp = output_dir.join(p.directory, f'.partial-{key}-{uuid.uuid4().hex[:8]}')
      FileSystems.copy([staged], [temp])
      FileSystems.rename([temp], [final])
    else:  # object stores: the files first, the checksums last
      files = [f[len(staged) + 1:] for f in output_dir.files_under(staged)]
      files.sort(key=lambda name: name == CHECKSUMS)
      for name in files:
        FileSystems.copy([output_dir.join(staged, name)], [output_dir.join(final, name)])
    published.append(s.name)
  return published


def summary_lines(entry):
  """The end-of-run summary's lines on the cache (a manifest's analysis_cache entry)."""
  spans = entry['spans']
  cached = [s for s in spans if s['from_cache']]
  lines = [f'analysis cache {entry["directory"]}: {len(cached)} of {len(spans)} train spans '
           f'from the cache, {len(spans) - len(cached)} analyzed and added']
  reread = [s for s in cached if s['read']]
  if reread:
    lines.append(f'  {len(reread)} cached spans read again: the preprocessing_fn has analyzers '
                 'TF Transform cannot cache (an analyzer of another\'s result, for one)')
  shown = spans if len(spans) <= 12 else [s for s in spans if not s['from_cache']][:10]
  lines += [f'  {"cached  " if s["from_cache"] else "analyzed"}  {s["input"]}' for s in shown]
  if len(shown) < len(spans):
    lines.append(f'  ... and {len(spans) - len(shown)} more (manifest.json, analysis_cache)')
  return lines
