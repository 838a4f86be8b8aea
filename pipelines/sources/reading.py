"""What every source shares: work units (files, ranges, shards) spread over workers, read by a
source DoFn a few outputs ahead of the stage that consumes them (ReadAhead), and what the first
read of the train split keeps on local disk for its second read (Spill)."""

import collections
import hashlib
import os
import pickle
import queue
import shutil
import threading

import apache_beam as beam
import pyarrow as pa

from pipelines.sizes import buffer_bytes

# Side outputs of the sources' DoFns: dead-letter dicts, and rows carved out for the eval split.
ERRORS_TAG = 'errors'
EVAL_TAG = 'eval'


def read_units(pbegin, units, read_fn, carves_eval, spill=None):
  """Work units (files, ranges, shards) -> (RecordBatches, carved eval RecordBatches or None,
  dead letters), read by `read_fn`, a DoFn with the ERRORS_TAG and EVAL_TAG side outputs.
  `spill`: a Spill this read writes or replays (see Spill), or None."""
  outputs = (
      pbegin
      | 'ListUnits' >> beam.Create(list(units))
      # A unit is a file, a range of one or a shard: spread them over workers before reading.
      | 'SpreadUnits' >> beam.Reshuffle()
      | 'Read' >> beam.ParDo(ReadAhead(read_fn, spill=spill)).with_outputs(
          ERRORS_TAG, EVAL_TAG, main='rows'))
  return outputs.rows, (outputs[EVAL_TAG] if carves_eval else None), outputs[ERRORS_TAG]


class Spill:
  """What one read of a split's work units gave, kept on local disk for a later read of the
  same units to give again instead of parsing (and decoding) them a second time.

  The train split is read twice: once for TF Transform's analysis, then again for the transform
  (see stages.add_preprocessing). Parsing the second time was about a seventh of the transform
  pass's CPU (1M CSV rows), and that pass is CPU-bound on two cores. With a Spill, the first
  read (`writes`) also writes each unit's outputs to a directory of its own in DIRECTORY, on its
  read-ahead thread: RecordBatches as Arrow IPC streams (Arrow writes and reads them in C++,
  without the GIL that the analysis needs), dead letters pickled. The directory gets its final
  name only once the unit was read to its end. The second read takes a unit's directory when
  there is one (renaming it first, so that no other read takes it too) and gives its outputs,
  then deletes it; else (another machine read it, the budget ran out, a retry) it reads the unit
  as before, so the outputs are the same either way.

  Only for runners whose workers share this machine's disk (the in-process runner, in one or
  several processes: job.make_spill). A process writes at most BUDGET bytes in a DIRECTORY, and
  leaves at least FREE_MARGIN free on the disk; past that, units are not spilled.
  """

  BUDGET = 4 << 30
  FREE_MARGIN = 2 << 30
  _written = collections.Counter()  # bytes this process has spilled, by directory
  _lock = threading.Lock()

  def __init__(self, directory, writes):
    self.directory = directory
    self.writes = writes

  def replaying(self):
    return Spill(self.directory, writes=False)

  def _path(self, unit):
    return os.path.join(self.directory, hashlib.sha1(repr(unit).encode('utf-8')).hexdigest())

  def replay(self, unit):
    """The outputs a writing read kept for `unit` (taking them: a second replay gets None), or
    None."""
    path = self._path(unit)
    taken = f'{path}.{os.getpid()}.{threading.get_ident()}.taken'
    try:
      os.rename(path, taken)
    except FileNotFoundError:
      return None
    return self._replay(taken)

  def _replay(self, path):
    try:
      for tag, name in _SPILL_STREAMS.items():
        if os.path.exists(os.path.join(path, name)):
          with pa.OSFile(os.path.join(path, name)) as f:
            for batch in pa.ipc.open_stream(f):
              yield batch if tag is None else beam.pvalue.TaggedOutput(tag, batch)
      if os.path.exists(os.path.join(path, _SPILL_OTHERS)):
        with open(os.path.join(path, _SPILL_OTHERS), 'rb') as f:
          for tag, value in pickle.load(f):
            yield beam.pvalue.TaggedOutput(tag, value)
    finally:
      shutil.rmtree(path, ignore_errors=True)

  def writer(self, unit):
    return _SpillWriter(self, self._path(unit))

  def reserve(self, size):
    """Whether `size` more bytes may be spilled in this directory (then counted)."""
    with Spill._lock:
      if Spill._written[self.directory] + size > self.BUDGET:
        return False
      if shutil.disk_usage(self.directory).free - size < self.FREE_MARGIN:
        return False
      Spill._written[self.directory] += size
      return True


# A spilled unit's RecordBatches, by output tag, as Arrow IPC streams; its other outputs (dead
# letters) pickled together.
_SPILL_STREAMS = {None: 'rows.arrow', EVAL_TAG: 'eval.arrow'}
_SPILL_OTHERS = 'others.pickle'


class _SpillWriter:
  """Writes one unit's outputs under `path` + '.partial'; commit() gives it its final name.
  Anything it cannot keep (over the budget, a batch of another schema, a value that does not
  pickle, a full disk) drops the whole unit, which the later read then reads itself."""

  def __init__(self, spill, path):
    self._spill = spill
    self._path = path
    self._partial = f'{path}.{os.getpid()}.{threading.get_ident()}.partial'
    self._streams = {}  # tag -> (file, IPC writer)
    self._others = []
    self._dropped = False
    os.makedirs(self._partial)

  def add(self, output):
    if self._dropped:
      return
    tag, value = ((output.tag, output.value) if isinstance(output, beam.pvalue.TaggedOutput)
                  else (None, output))
    streamed = tag in _SPILL_STREAMS and isinstance(value, pa.RecordBatch)
    size = value.nbytes if streamed else (buffer_bytes(value) or 1024)
    if not self._spill.reserve(size):
      self.drop()
      return
    try:
      if streamed:
        self._stream(tag, value.schema).write_batch(value)
      else:
        self._others.append((tag, value))
    except Exception:  # not kept: the unit is read again
      self.drop()

  def _stream(self, tag, schema):
    if tag not in self._streams:
      f = pa.OSFile(os.path.join(self._partial, _SPILL_STREAMS[tag]), 'wb')
      self._streams[tag] = (f, pa.ipc.new_stream(f, schema))
    return self._streams[tag][1]

  def commit(self):
    if self._dropped:
      return
    try:
      self._close()
      if self._others:
        with open(os.path.join(self._partial, _SPILL_OTHERS), 'wb') as f:
          pickle.dump(self._others, f, protocol=pickle.HIGHEST_PROTOCOL)
      os.rename(self._partial, self._path)
    except Exception:  # a spill never fails the read
      self.drop()

  def _close(self):
    for f, writer in self._streams.values():
      writer.close()
      f.close()
    self._streams = {}

  def drop(self):
    self._dropped = True
    self._others = []
    try:
      self._close()
    except (pa.ArrowException, OSError):
      pass
    shutil.rmtree(self._partial, ignore_errors=True)


class ReadAhead(beam.DoFn):
  """Runs a source DoFn's `process` in a thread of its own, `depth` outputs ahead of the stage
  that consumes them.

  Beam's in-process runner runs a fused stage in one thread: the source parses a block, then TF
  Transform works on it, then the source parses the next. Parsing is mostly Arrow C++ (and
  file reads, image decodes) that runs without the GIL, so reading ahead lets it use a second
  core while the consumer works (benchmarks/tabular_pipeline.py). Memory stays bounded: at most
  `depth` outputs wait. An exception of the source is raised in the stage as its own; a stage
  that stops early stops the thread.
  """

  _END = object()

  def __init__(self, fn, depth=3, spill=None):
    self._fn = fn
    self._depth = depth
    self._spill = spill

  def setup(self):
    self._fn.setup()

  def teardown(self):
    self._fn.teardown()

  def start_bundle(self):
    self._fn.start_bundle()

  def finish_bundle(self):  # after every element's thread has ended (process joins it)
    return self._fn.finish_bundle()

  def process(self, element):
    ready = queue.Queue(maxsize=self._depth)
    stop = threading.Event()

    def put(item):
      while not stop.is_set():
        try:
          ready.put(item, timeout=0.1)
          return True
        except queue.Full:
          pass
      return False

    def produce():
      try:
        for output in self._outputs(element):
          if not put((None, output)):
            return
        put((None, self._END))
      except BaseException as e:  # raised in the stage
        put((e, None))

    thread = threading.Thread(target=produce, name='read-ahead', daemon=True)
    thread.start()
    try:
      while True:
        error, output = ready.get()
        if error is not None:
          raise error
        if output is self._END:
          return
        yield output
    finally:
      stop.set()
      thread.join()

  def _outputs(self, element):
    """The source's outputs for `element`: read, or replayed from a Spill, or read and spilled."""
    replayed = self._spill.replay(element) if self._spill and not self._spill.writes else None
    if replayed is not None:
      yield from replayed
      return
    writer = None
    if self._spill and self._spill.writes:
      try:
        writer = self._spill.writer(element)
      except OSError:  # nowhere to write it: the unit is read again later, as without a spill
        pass
    try:
      for output in self._fn.process(element) or ():
        if writer:
          writer.add(output)
        yield output
    except BaseException:
      if writer:
        writer.drop()
      raise
    if writer:
      writer.commit()
