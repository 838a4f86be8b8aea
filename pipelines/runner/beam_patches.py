"""Patches of Beam internals that make its in-process runner and SDK workers faster (or, for lost
workers, fail instead of hanging)."""

import weakref

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.sizes import buffer_bytes

def install_worker_speedups():
  """What speeds up the running of bundles, wherever an SDK worker runs them: in this process
  (Beam's in-process runner) or in a worker process, which imports WORKER_PLUGIN to call this."""
  _remember_dofn_specs()
  _size_samples_from_buffers()
  _size_cached_values_from_buffers()
  _sample_states_briefly()


def keep_option_views():
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


class _SizeFromBuffers:
  """A stand-in for a stage output's coder where Beam samples element sizes (see
  _size_samples_from_buffers): sizes of Arrow and numpy values (and of containers of them) are
  read off their buffers, any other value is measured by the coder as before."""

  def __init__(self, coder_impl):
    self._coder_impl = coder_impl

  def get_estimated_size_and_observables(self, windowed_value, nested=False):
    size = buffer_bytes(getattr(windowed_value, 'value', None))
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
    sizes = [buffer_bytes(value) for value in values]
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


def fail_instructions_of_lost_workers():
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
