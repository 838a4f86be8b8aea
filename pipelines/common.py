"""Plumbing shared by every pipeline: user errors, flags, and the Beam runner choice."""

import argparse
import atexit
import collections
import gc
import hashlib
import logging
import os
import pickle
import queue
import shutil
import sys
import threading
import weakref

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from transforms.errors import UserError  # noqa: F401  (re-exported: pipelines raise common.UserError)


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
  (see job.transform_and_write). Parsing the second time was about a seventh of the transform
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
    size = value.nbytes if streamed else (_buffer_bytes(value) or 1024)
    if not self._spill.reserve(size):
      self.drop()
      return
    try:
      if streamed:
        self._stream(tag, value.schema).write_batch(value)
      else:
        self._others.append((tag, value))
    except Exception:  # pylint: disable=broad-except  # not kept: the unit is read again
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
    except Exception:  # pylint: disable=broad-except  # a spill never fails the read
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
      except BaseException as e:  # pylint: disable=broad-except  # raised in the stage
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




def main(run):
  """Runs `run(argv)` as a command: user errors end in one line on stderr and exit 2."""
  _settle(command=True)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  # TF and Beam log a lot at INFO; the pipeline's own progress lines are what a user wants to see.
  for noisy in ('apache_beam', 'tensorflow', 'absl', 'tensorflow_transform', 'tfx_bsl'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    run(sys.argv[1:])
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    _exit(2)
  except KeyboardInterrupt:
    print('error: interrupted; nothing was published', file=sys.stderr)
    _exit(130)
  _exit(0)


_COMMAND = False  # whether this process is one of the pipeline commands (main)


def _settle(command=False):
  """Keeps Python's cyclic garbage collector off the objects a command has made so far.

  The collector's full collections walk every object the process tracks, and a pipeline
  command tracks a great many that live as long as it does: TensorFlow's, Beam's and TF
  Transform's modules, then the pipeline's graph. In a 1M-row run, 9 full collections took
  1.8 s and all collections 2.1 s (gc.callbacks). The command modules turn the collector off
  while they import (their first lines); main() then moves what the imports made to the
  collector's permanent generation (gc.freeze) and turns it on again, and the pipeline's
  objects are moved there too just before the job runs (run_and_check). Collections then walk
  only what the job makes as it runs: 1.9 s -> 0.23 s of collections in a 1M-row run; 19.2 s
  -> 18.3 s (0.96x, 8 paired runs on a noisy machine), for about 20 MiB more peak memory
  (cycles among the kept objects that become garbage stay until the command ends). Only in a
  command: a process that imports these modules (tests, a notebook) keeps the collector as it
  is."""
  global _COMMAND  # pylint: disable=global-statement
  _COMMAND = _COMMAND or command
  if _COMMAND:
    gc.freeze()
    gc.enable()


def settle_before_run():
  """See _settle: called with the pipeline built, before it runs."""
  _settle()


def _exit(status):
  """Ends the command once its work is done (published, or failed and said why).

  The interpreter's own teardown after a run (freeing TensorFlow's and Beam's modules and
  objects one by one) took about 1.6 s of every command's wall time, measured on the 2-core
  machine of benchmarks/RESULTS.md, and does nothing a finished command needs. The exit handlers
  (logging's flush among them) still run, and the output streams are flushed; then the process
  ends without the teardown."""
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
      pass
  os._exit(status)  # pylint: disable=protected-access


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are UserErrors, so tests and `main` see them the same way."""

  def error(self, message):
    raise UserError(f'{self.prog}: {message}')


def pipeline_options(beam_args):
  """PipelineOptions from the flags this project does not know.

  Without an explicit --runner the job runs on Beam's in-process FnApiRunner. Beam's DirectRunner
  would first try to download the Prism runner binary, which is network at run time that nobody
  asked for (and fails offline); the FnApiRunner is what DirectRunner falls back to anyway, and it
  honours --direct_running_mode and --direct_num_workers.

  Beam's construction-time type checks are off unless asked for (--pipeline_type_check): they
  check this project's own, tested transforms, and on TF Transform's many small transforms they
  cost over a second of every run's start-up (measured with cProfile).

  SDK worker processes (multi-process, portable runners, Dataflow) import WORKER_PLUGIN first
  (Beam's --beam_plugins), so that they run with the same speed-ups as this process.
  """
  _keep_option_views()
  beam_args = list(beam_args) + [f'--beam_plugins={WORKER_PLUGIN}']
  if not any(a.lstrip('-').split('=')[0] in ('pipeline_type_check', 'no_pipeline_type_check')
             for a in beam_args):
    beam_args.append('--no_pipeline_type_check')
  options = PipelineOptions(beam_args)
  if options.view_as(StandardOptions).runner is None:
    return options, _in_process_runner(options.view_as(SetupOptions).beam_plugins)
  return options, None


def _in_process_runner(plugins):
  """Beam's FnApiRunner, whose worker processes (--direct_running_mode=multi_processing) import
  `plugins`: it passes them no pipeline options of their own unless given them here."""
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.job import utils as job_utils
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner, fn_runner
  return FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(
          retrieval_token='unused-retrieval-token',
          pipeline_options=job_utils.dict_to_struct({'beam_plugins': list(plugins)}))))


WORKER_PLUGIN = 'pipelines.worker_plugin'


def make_pipeline(beam_args):
  options, runner = pipeline_options(beam_args)
  _fail_instructions_of_lost_workers()
  install_worker_speedups()
  return beam.Pipeline(runner=runner, options=options)


def install_worker_speedups():
  """What speeds up the running of bundles, wherever an SDK worker runs them: in this process
  (Beam's in-process runner) or in a worker process, which imports WORKER_PLUGIN to call this."""
  _remember_dofn_specs()
  _size_samples_from_buffers()
  _size_cached_values_from_buffers()
  _sample_states_briefly()


def _keep_option_views():
  """Beam reads an option through a view (options.view_as(SomeOptions)), and builds each view
  anew: a fresh argparse parser with all that class's flags, parsed again. While the pipeline is
  built it does so for every transform applied, about 1,800 views for TF Transform's transforms,
  about 0.7 s of every run's start-up (cProfile, benchmarks/RESULTS.md). A view holds nothing of
  its own (its values live in the options' shared dictionary, which every view reads and
  writes), so the first view of each class is kept for each options object and given again."""
  if getattr(PipelineOptions, '_views_kept', False):
    return
  make_view = PipelineOptions.view_as
  views = weakref.WeakKeyDictionary()

  def view_as(self, cls):
    try:
      kept = views.setdefault(self, {})
    except TypeError:  # cannot be weakly referenced: a view each time, as before
      return make_view(self, cls)
    view = kept.get(cls)
    if view is None:
      view = kept[cls] = make_view(self, cls)
    return view

  PipelineOptions.view_as = view_as
  PipelineOptions._views_kept = True  # pylint: disable=protected-access


def _remember_dofn_specs():
  """Beam asks whether a DoFn uses state or timers (userstate.get_dofn_specs) about four times
  for each DoFn: when the ParDo is made, when it is translated for the runner, and twice when
  the runner builds the stage that runs it. Each time it takes the signature of every method of
  the DoFn, about 30 of them. On TF Transform's hundreds of small transforms that was about 1.5 s
  of every run's fixed cost (cProfile, benchmarks/RESULTS.md). The answer depends only on the
  DoFn's methods, so it is kept for each DoFn object; a DoFn that cannot be a weak dictionary
  key (it defines __eq__ without __hash__) is inspected each time, as before."""
  from apache_beam.transforms import userstate
  if getattr(userstate, '_specs_remembered', False):
    return
  inspect_specs = userstate.get_dofn_specs
  known = weakref.WeakKeyDictionary()

  def get_dofn_specs(dofn):
    try:
      specs = known.get(dofn)
    except TypeError:  # not hashable or not weakly referenceable
      return inspect_specs(dofn)
    if specs is None:
      specs = inspect_specs(dofn)
      try:
        known[dofn] = specs
      except TypeError:
        pass
    return set(specs[0]), set(specs[1])  # copies: callers own what they get

  userstate.get_dofn_specs = get_dofn_specs
  userstate._specs_remembered = True  # pylint: disable=protected-access


_SIZE_HEAD = 64


def _buffer_bytes(value):
  """About the bytes an Arrow or numpy value holds, or a dict, list or tuple of them and of
  scalars; None for anything else."""
  if isinstance(value, (pa.RecordBatch, pa.Table, pa.Array)):
    return value.nbytes
  if isinstance(value, np.ndarray):
    if value.dtype != object:
      return value.nbytes
    flat = value.reshape(-1)  # strings: pointers, and the mean length of the first few
    head = [x for x in flat[:16] if isinstance(x, (bytes, str))]
    return flat.size * (8 + (sum(map(len, head)) // len(head) if head else 8))
  if isinstance(value, np.generic):  # a numpy scalar
    return value.nbytes
  if value is None or isinstance(value, (bool, int, float)):
    return 8
  if isinstance(value, (bytes, str)):
    return len(value)
  if isinstance(value, (dict, list, tuple)):
    items = list(value.values()) if isinstance(value, dict) else value
    head = items[:_SIZE_HEAD]  # a long list (of vocabulary counts, say): its first items
    total = 0
    for item in head:
      size = _buffer_bytes(item)
      if size is None:
        return None
      total += size
    return total * len(items) // len(head) if head else 0
  if type(value).__name__ == 'EagerTensor':  # TF Transform passes some tensors on
    if value.dtype.is_numpy_compatible and value.dtype.size and value.shape.is_fully_defined():
      return value.shape.num_elements() * value.dtype.size  # without copying it out
    return _buffer_bytes(value.numpy())
  return None


class _SizeFromBuffers:
  """A stand-in for a stage output's coder where Beam samples element sizes (see
  _size_samples_from_buffers): sizes of Arrow and numpy values (and of containers of them) are
  read off their buffers, any other value is measured by the coder as before."""

  def __init__(self, coder_impl):
    self._coder_impl = coder_impl

  def get_estimated_size_and_observables(self, windowed_value, nested=False):
    size = _buffer_bytes(getattr(windowed_value, 'value', None))
    if size is None:
      return self._coder_impl.get_estimated_size_and_observables(windowed_value, nested)
    return size, []


def _size_samples_from_buffers():
  """Beam's SDK harness samples the elements each operation outputs and measures them for its
  MeanByteCount metrics by encoding them with the PCollection's coder. For this project's
  elements (RecordBatches of 65,536 rows, TF Transform's dicts of numpy arrays and tensors) the
  coder is pickle: the samples were pickled whole, over 1.4 GB of pickling in a 1M-row run and
  about 2 s of the main thread's work under cProfile (benchmarks/RESULTS.md). Their size is
  known without encoding: each operation built by this process's harness (the in-process runner,
  or a worker process that imported WORKER_PLUGIN) measures them from their buffers. Where
  Beam's internals differ from what this expects, nothing changes."""
  from apache_beam.runners.worker import bundle_processor
  processor = bundle_processor.BundleProcessor
  if getattr(processor, '_sizes_from_buffers', False):
    return
  init = processor.__init__

  def __init__(self, *args, **kwargs):
    init(self, *args, **kwargs)
    try:  # the operations' receivers exist once __init__ has set them up
      for op in self.ops.values():
        for receiver in op.receivers:
          counter = receiver.opcounter
          if counter.coder_impl is not None:
            counter.coder_impl = _SizeFromBuffers(counter.coder_impl)
    except AttributeError:  # another Beam version: its own size sampling stays
      pass

  processor.__init__ = __init__
  processor._sizes_from_buffers = True  # pylint: disable=protected-access


def _size_cached_values_from_buffers():
  """The SDK harness keeps side inputs (and user state) in a cache bounded by their deep size,
  measured with objsize when each value enters it. Each such measurement also walks the globals
  of every loaded module (to leave them out), about 2 ms with TensorFlow loaded, and TF
  Transform's stages read about a hundred side inputs per run (saved model paths, analyzer
  results, schemas). Values whose size _buffer_bytes knows (lists of strings, numbers, numpy
  arrays, TF Transform's tensor bindings) are weighed by it; any other by objsize, as before.
  The weight only decides what the cache evicts first."""
  from apache_beam.runners.worker import statecache
  if getattr(statecache, '_sized_from_buffers', False):
    return
  deep_size = statecache.get_deep_size

  def get_deep_size(*values):
    sizes = [_buffer_bytes(value) for value in values]
    if None in sizes:
      return deep_size(*values)
    return max(sum(sizes), 8)

  statecache.get_deep_size = get_deep_size
  statecache._sized_from_buffers = True  # pylint: disable=protected-access


SAMPLING_PERIOD_MS = 20


def _sample_states_briefly():
  """Beam's SDK harness gives every bundle a state sampler: a thread that wakes up, first
  every 2 ms and then less and less often up to every 200 ms (its default period), to add the
  time spent in each step to its metrics. When the bundle ends, the harness joins that thread,
  which is asleep for up to a whole period: a bundle of more than about a second waited on
  average 100 ms after its work was done, and this pipeline has a few such bundles per split
  (reading, analysis, saved models) and some ninety short ones. A period of SAMPLING_PERIOD_MS
  caps that wait; the thread then wakes 50 times a second, a negligible cost, and the step
  timings are, if anything, more precise. Measured on the 1M-row benchmark: 0.25 to 0.4 s less
  per run (benchmarks/RESULTS.md)."""
  from apache_beam.runners.worker import statesampler
  if getattr(statesampler, '_sampled_briefly', False):
    return
  beams_sampler = statesampler.StateSampler

  class StateSampler(beams_sampler):

    def __init__(self, prefix, counter_factory, sampling_period_ms=SAMPLING_PERIOD_MS):
      super().__init__(prefix, counter_factory, sampling_period_ms)

  statesampler.StateSampler = StateSampler
  statesampler._sampled_briefly = True  # pylint: disable=protected-access


def _fail_instructions_of_lost_workers():
  """Where the job service runs in this process (the default FnApiRunner, PortableRunner with
  --job_endpoint=embed), Beam waits for an SDK worker's answer to an instruction without a
  timeout. A worker process that dies (killed, out of memory) while the runner waits for such an
  answer, or before the runner's next instruction, hangs the job forever: the worker's control
  stream ends with an error that nothing passes on. Passed on here, the job fails and says why,
  as Beam itself does for Docker workers that exit (DockerSdkWorkerHandler.watch_container)."""
  from apache_beam.runners.portability.fn_api_runner import worker_handlers
  connection = worker_handlers.ControlConnection
  if getattr(connection, '_fails_when_lost', False):
    return
  read, push = connection._read, connection.push

  def read_then_fail_the_rest(self):
    try:
      read(self)
      cause = 'its control stream ended'
    except Exception as e:  # the stream broke: passed on below, not printed by the thread
      cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
    # Set before failing what waits: an instruction pushed from now on fails at once.
    self._lost = RuntimeError('an SDK worker process stopped (killed, crashed or out of memory) '
                              f'while the job waited for it ({cause})')
    for future in list(self._futures_by_id.values()):
      future.abort(self._lost)

  def push_or_fail(self, request):
    future = push(self, request)
    if future is not None and getattr(self, '_lost', None):
      future.abort(self._lost)
    return future

  connection._read = read_then_fail_the_rest
  connection.push = push_or_fail
  connection._fails_when_lost = True


def is_dry_run(pipeline):
  return bool(pipeline.options.get_all_options().get('dry_run'))
