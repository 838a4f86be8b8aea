"""Patches of Beam internals that make its in-process runner and SDK workers faster (or, for lost
workers, fail instead of hanging), all in one place, each behind a gate.

They reach into Beam's private modules, which change from release to release without notice, so
each is listed in PATCHES (at the end of this module) with what it replaces and the Beam
versions (major.minor) it was written and tested against. A patch is applied only where the
installed Beam is one of those versions and what it replaces is there; otherwise Beam runs as
released for it, and the process logs one line naming what it skipped and why. Each patch's
docstring gives its measured gain (benchmarks/RESULTS.md) and, where the fix could live in Beam
itself, says how: each of them is a candidate to send upstream, after which it goes.

Everything here can be switched off: with TFT_PIPELINES_BEAM_PATCHES=off (ENV) in the environment
of the launching process, nothing of Beam is patched, the job's workers are not given this
project's worker plugin, and TF Transform's own vocabulary counting, chains of stages and
bindings run (pipelines/vocabulary.py, vocabulary_packing.py, binding_packing.py): the way to
tell a bug of these patches from one of the pipeline, or to run on an untested Beam. The
outputs are the same either way (tests/test_beam_patches.py), only slower.
"""

import collections
import importlib
import logging
import os
import types
import weakref

from pipelines.sizes import buffer_bytes

_LOG = logging.getLogger('pipelines')

ENV = 'TFT_PIPELINES_BEAM_PATCHES'
_OFF = ('off', '0', 'false', 'no')


def enabled():
  """Whether this project's patches of Beam (and its TF Transform vocabulary counting and
  packing) are wanted: yes unless ENV is 'off' (or 0, false, no). Read each time it is asked, so
  that what installs a patch (and the worker processes, which inherit the environment) sees the
  variable as it is then. Logs one line, once per process, when they are off."""
  off = os.environ.get(ENV, '').strip().lower() in _OFF
  if off:
    _log_once('off', logging.INFO, f'{ENV}={os.environ[ENV]}: Beam and TF Transform run as '
              'released, without the patches of pipelines/runner/beam_patches.py')
  return not off


def install(*names):
  """Applies the patches of PATCHES named, in this process, where they apply (applies); a
  patch already applied is left as it is."""
  for name in names:
    if name in _APPLIED or not applies(name):
      continue
    try:
      _BY_NAME[name].apply()
    except Exception as e:  # Beam's internals moved under it
      _log_once(f'failed {name}', logging.WARNING,
                f'Beam patch {name} not applied, Beam runs as released there: {e!r}')
      continue
    _APPLIED.add(name)


def applies(name):
  """Whether the patch `name` of PATCHES is wanted (enabled) and fits the installed Beam."""
  return enabled() and name in _fitting()


def applied():
  """The names of the patches applied in this process."""
  return frozenset(_APPLIED)


def keep_option_views():
  """Where the pipeline's options are made (see _keep_option_views)."""
  install('keep_option_views')


def install_worker_speedups():
  """What speeds up the running of bundles, wherever an SDK worker runs them: in this process
  (Beam's in-process runner) or in a worker process, which imports the worker plugin
  (pipelines/runner/worker_plugin.py) to call this."""
  install('remember_dofn_specs', 'remember_signatures', 'size_samples_from_buffers',
          'size_cached_values_from_buffers', 'sample_states_briefly')


def install_runner_patches():
  """Where the job service runs in this process (Beam's in-process runner, or PortableRunner
  with an embedded job service): _fail_instructions_of_lost_workers, _index_side_inputs_once,
  _release_finished_stages."""
  install('fail_instructions_of_lost_workers', 'index_side_inputs_once', 'release_finished_stages')


Patch = collections.namedtuple('Patch', 'name targets tested apply')
Patch.__doc__ = """One entry of PATCHES: `targets`, what it replaces or relies on in Beam
('module:attribute.path'); `tested`, the Beam versions (major.minor) it was written and tested
against; `apply`, what applies it (None: not a patch, an internal that launch.py uses)."""


def gate(patches, beam_version):
  """(names of the `patches` that fit Beam `beam_version` (its __version__), one line saying
  which do not and why, or None where all fit)."""
  version = '.'.join(beam_version.split('.')[:2])
  fitting, untested, missing = [], collections.defaultdict(list), []
  for patch in patches:
    if version not in patch.tested:
      untested[patch.tested].append(patch.name)
      continue
    absent = [t for t in patch.targets if not _exists(t)]
    if absent:
      missing.append(f'{patch.name} ({absent[0]} is not there)')
    else:
      fitting.append(patch.name)
  skipped = [f'{", ".join(names)} (tested on {", ".join(tested)} only)'
             for tested, names in untested.items()] + missing
  if not skipped:
    return fitting, None
  return fitting, f'Beam {beam_version}: runs as released, not patched, for {"; ".join(skipped)}'


def _exists(target):
  module, _, path = target.partition(':')
  try:
    found = importlib.import_module(module)
    for name in path.split('.') if path else ():
      found = getattr(found, name)
  except Exception:  # not importable or renamed: not there
    return False
  return True


_FITTING = None  # the names of PATCHES that fit this process's Beam, once gate() has said
_APPLIED = set()
_LOGGED = set()


def _fitting():
  global _FITTING
  if _FITTING is None:
    import apache_beam
    fitting, line = gate(PATCHES, apache_beam.__version__)
    if line:
      _log_once('gate', logging.WARNING, line)
    _FITTING = frozenset(fitting)
  return _FITTING


def _log_once(key, level, line):
  if key not in _LOGGED:
    _LOGGED.add(key)
    _LOG.log(level, line)


def _keep_option_views():
  """Beam reads an option through a view (options.view_as(SomeOptions)), and builds each view
  anew: a fresh argparse parser with all that class's flags, parsed again. While the pipeline is
  built it does so for every transform applied, about 1,800 views for TF Transform's transforms,
  about 0.7 s of every run's start-up: the pipeline's construction 3.5 s -> 2.1 s under cProfile
  (benchmarks/RESULTS.md). A view holds nothing of its own (its values live in the options'
  shared dictionary, which every view reads and writes), so the first view of each class is kept
  for each options object and given again. Could live upstream: PipelineOptions.view_as could
  cache its views per options object the same way."""
  from apache_beam.options.pipeline_options import PipelineOptions
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
  PipelineOptions._views_kept = True


def _remember_dofn_specs():
  """Beam asks whether a DoFn uses state or timers (userstate.get_dofn_specs) about four times
  for each DoFn: when the ParDo is made, when it is translated for the runner, and twice when
  the runner builds the stage that runs it. Each time it takes the signature of every method of
  the DoFn, about 30 of them. On TF Transform's hundreds of small transforms that was about 1.5 s
  of every run's fixed cost (cProfile; with the read-ahead and larger batches of the same
  change, 24.2 s -> 19.3 s at 1M rows, benchmarks/RESULTS.md). The answer depends only on the
  DoFn's methods, so it is kept for each DoFn object; a DoFn that cannot be a weak dictionary
  key (it defines __eq__ without __hash__) is inspected each time, as before. Could live
  upstream: the ParDo could inspect its DoFn once and carry the specs to the runner."""
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
  userstate._specs_remembered = True


def _remember_signatures():
  """Beam takes the signature of a DoFn's or a Map's function (typehints.decorators.get_signature,
  inspect.signature underneath) whenever it builds, translates, checks or runs a transform: the
  10+1-span analysis of the cache benchmark asked 44,925 times about 480 functions, 0.9 s of its
  10 s. A function's signature depends only on what it is made of, so it is kept for each plain
  function, and for each function bound as a method (a bound method's signature leaves `self`
  out, whatever object it is bound to), with a check on each use that its code, defaults,
  annotations, __wrapped__ and __signature__ are still the objects they were; anything else (a
  builtin, a class, a partial, a callable object) is inspected each time, as before. Could live
  upstream: get_signature could keep what it found."""
  from apache_beam.transforms import core, ptransform, util
  from apache_beam.typehints import decorators
  if getattr(decorators, '_signatures_remembered', False):
    return
  inspect_signature = decorators.get_signature
  functions, methods = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()

  def parts(function):
    return (function.__code__, function.__defaults__, function.__kwdefaults__,
            function.__annotations__, function.__dict__.get('__wrapped__'),
            function.__dict__.get('__signature__'))

  def get_signature(func):
    if isinstance(func, types.FunctionType):
      known, function = functions, func
    elif isinstance(func, types.MethodType) and isinstance(func.__func__, types.FunctionType):
      known, function = methods, func.__func__
    else:
      return inspect_signature(func)
    found = known.get(function)
    now = parts(function)
    if found is not None and all(a is b for a, b in zip(found[0], now)):
      return found[1]
    signature = inspect_signature(func)
    known[function] = (now, signature)
    return signature

  for module in (decorators, core, ptransform, util):  # each imported it by name
    module.get_signature = get_signature
  decorators._signatures_remembered = True


class _SizeFromBuffers:
  """A stand-in for a stage output's coder where Beam samples element sizes (see
  _size_samples_from_buffers): sizes of Arrow and numpy values (and of containers of them) are
  read off their buffers, any other value is measured by the coder as before."""

  def __init__(self, coder_impl):
    self._coder_impl = coder_impl

  def get_estimated_size_and_observables(self, windowed_value, nested=False):
    size = buffer_bytes(getattr(windowed_value, 'value', None), whole_buffers=True)
    if size is None:
      return self._coder_impl.get_estimated_size_and_observables(windowed_value, nested)
    return size, []

  def __getattr__(self, name):  # whatever else the counter asks of the coder: the coder's
    return getattr(self._coder_impl, name)


def _size_samples_from_buffers():
  """Beam's SDK harness samples the elements each operation outputs and measures them for its
  MeanByteCount metrics by encoding them with the PCollection's coder. For this project's
  elements (RecordBatches of 65,536 rows, TF Transform's dicts of numpy arrays and tensors) the
  coder is pickle: the samples were pickled whole, over 1.4 GB of pickling in a 1M-row run and
  about 2 s of the main thread's work under cProfile (paired wall time within the machine's
  noise, benchmarks/RESULTS.md). Their size is known without encoding: each operation built by
  this process's harness (the in-process runner, or a worker process that imported the worker
  plugin) measures them from their buffers. Where Beam's operations differ from what this
  expects, their own size sampling stays. Could live upstream: a coder could offer a cheap size
  estimate (pickle's has none), or the harness could sample the sizes of large elements less
  often."""
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
  processor._sizes_from_buffers = True


def _size_cached_values_from_buffers():
  """The SDK harness keeps side inputs (and user state) in a cache bounded by their deep size,
  measured with objsize when each value enters it. Each such measurement also walks the globals
  of every loaded module (to leave them out), about 2 ms with TensorFlow loaded, and TF
  Transform's stages read about a hundred side inputs per run (saved model paths, analyzer
  results, schemas): about 0.15 s a run (benchmarks/RESULTS.md); on a 300-column table, whose
  SavedModel stage reads 500 analyzer results (TF Transform's _TensorBinding dataclasses), each
  about 10 ms, 4% of the run. Values whose size sizes.buffer_bytes knows (lists of strings,
  numbers, numpy arrays, dataclasses of those such as the tensor bindings) are weighed by it;
  any other by objsize, as before. The weight only decides what the
  cache evicts first. Could live upstream: get_deep_size could gather the module globals it
  leaves out once, not for every value."""
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
  statecache._sized_from_buffers = True


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
  per run (benchmarks/RESULTS.md). Could live upstream: the sampler could wait on an event that
  stopping it sets, so that joining it does not wait out its sleep."""
  from apache_beam.runners.worker import statesampler
  if getattr(statesampler, '_sampled_briefly', False):
    return
  beams_sampler = statesampler.StateSampler

  class StateSampler(beams_sampler):

    def __init__(self, prefix, counter_factory, sampling_period_ms=SAMPLING_PERIOD_MS):
      super().__init__(prefix, counter_factory, sampling_period_ms)

  statesampler.StateSampler = StateSampler
  statesampler._sampled_briefly = True


def _index_side_inputs_once():
  """Before it runs a job, Beam's in-process runner indexes which stage produces each side input
  (FnApiRunnerExecutionContext._build_data_side_inputs_map). It asks again for every output of
  every transform whether it is one of its stage's side inputs, each time parsing the ParDo
  payload of every transform of the stage, and parses a consumer's payload again for each of
  its side inputs: quadratic in the transforms of a fused stage and in the side inputs of a
  transform. TF Transform gives the Map that builds a phase's SavedModel one side input per
  analyzer result, so a 300-column table (500 of them, 47 stages) spent 10.0 s of a 103 s run
  here (benchmarks/RESULTS.md). The same index, with each stage's side inputs and each
  payload's parse computed once: 0.35 s. Could live upstream as it is."""
  from apache_beam.portability.api import beam_runner_api_pb2
  from apache_beam.runners.portability.fn_api_runner import execution, translations
  from apache_beam.utils import proto_utils
  context = execution.FnApiRunnerExecutionContext
  if getattr(context, '_side_inputs_indexed_once', False):
    return

  def build_data_side_inputs_map(stages):
    consumers = collections.defaultdict(list)  # pcollection -> transforms that read it
    side_inputs = {}  # stage name -> the pcollections its transforms read as side inputs
    for stage in stages:
      for transform in stage.transforms:
        for pcollection in transform.inputs.values():
          consumers[pcollection].append(transform)
      side_inputs[stage.name] = set(stage.side_inputs())
    producers, result = {}, {}
    for stage in stages:
      result[stage.name] = {}
      for transform in stage.transforms:
        for pcollection in transform.outputs.values():
          if pcollection not in side_inputs[stage.name]:
            producers.setdefault(pcollection, stage)
    payloads = {}  # a transform's unique name -> its parsed ParDoPayload
    for side_pc in frozenset().union(*side_inputs.values()):
      for transform in consumers[side_pc]:
        if transform.spec.urn not in translations.PAR_DO_URNS:
          continue
        payload = payloads.get(transform.unique_name)
        if payload is None:
          payload = payloads[transform.unique_name] = proto_utils.parse_Bytes(
              transform.spec.payload, beam_runner_api_pb2.ParDoPayload)
        for tag, side_input in payload.side_inputs.items():
          if transform.inputs[tag] == side_pc:
            result[producers[side_pc].name][(transform.unique_name, tag)] = (
                translations.create_buffer_id(side_pc), side_input.access_pattern)
    return result

  context._beams_build_data_side_inputs_map = context._build_data_side_inputs_map  # tests
  context._build_data_side_inputs_map = staticmethod(build_data_side_inputs_map)
  context._side_inputs_indexed_once = True


def _fail_instructions_of_lost_workers():
  """Where the job service runs in this process (the default FnApiRunner, PortableRunner with
  --job_endpoint=embed), Beam waits for an SDK worker's answer to an instruction without a
  timeout. A worker process that dies (killed, out of memory) while the runner waits for such an
  answer, or before the runner's next instruction, hangs the job forever: the worker's control
  stream ends with an error that nothing passes on. Passed on here, the job fails and says why,
  as Beam itself does for Docker workers that exit (DockerSdkWorkerHandler.watch_container).
  Not a speed-up: without it a lost worker hangs the job instead of failing it
  (tests/test_distributed.py). Could live upstream: ControlConnection could fail its pending
  and later instructions when its control stream ends."""
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


def _release_finished_stages():
  """Beam's in-process runner keeps every stage's BundleProcessor (its operations and DoFns, and
  what those hold) cached after the stage has run, until the job ends or the processor has been
  idle for a minute (BundleProcessorCache's periodic shutdown). A stage whose output watermark
  has reached the end of time gets no more bundles: its processors are shut down (DoFn teardown)
  as that periodic shutdown would. TF Transform's analysis and transform stages each hold a
  TensorFlow session of the whole transform graph, so on wide tables the sessions of finished
  stages were most of what the transform pass kept beside its own (benchmarks/RESULTS.md).
  A bundle that came later after all would find no processor and make a new one, as after the
  periodic shutdown. Could live upstream: the runner could release a stage once it is done."""
  from apache_beam.runners.portability.fn_api_runner import fn_runner, worker_handlers
  from apache_beam.runners.worker import sdk_worker
  from apache_beam.utils import timestamp
  runner = fn_runner.FnApiRunner
  if getattr(runner, '_releases_finished_stages', False):
    return
  execute = runner._execute_bundle

  def _execute_bundle(self, context, bundle_context_manager, bundle_input):
    result = execute(self, context, bundle_context_manager, bundle_input)
    try:
      done = (context.watermark_manager.get_stage_node(bundle_context_manager.stage.name)
              .output_watermark() >= timestamp.MAX_TIMESTAMP)
      if done:
        descriptor = bundle_context_manager.process_bundle_descriptor.id
        for handler in bundle_context_manager.worker_handlers:
          if isinstance(handler, worker_handlers.EmbeddedWorkerHandler):
            cached = handler.bundle_processor_cache.cached_bundle_processors
            sdk_worker.BundleProcessorCache._shutdown_cached_bundle_processors(
                cached.pop(descriptor, []))
    except AttributeError:  # another Beam version: processors stay until the job ends
      pass
    return result

  runner._execute_bundle = _execute_bundle
  runner._releases_finished_stages = True


# Every patch of Beam in this project, and the one private Beam API that launch.py builds on.
# 'plugins_for_local_workers' patches nothing: launch.py hands Beam's in-process runner an
# ExtendedProvisionInfo of its own so that its multi-process workers import the worker plugin
# (Beam gives them no pipeline options); 1M rows on 2 workers, 25.6 s -> 24.2 s (0.94x,
# benchmarks/RESULTS.md). Could live upstream: the FnApiRunner could pass its pipeline options
# to the worker processes it starts.
PATCHES = (
    Patch('keep_option_views', ('apache_beam.options.pipeline_options:PipelineOptions.view_as',),
          ('2.77',), _keep_option_views),
    Patch('remember_dofn_specs', ('apache_beam.transforms.userstate:get_dofn_specs',),
          ('2.77',), _remember_dofn_specs),
    Patch('remember_signatures',
          ('apache_beam.typehints.decorators:get_signature',
           'apache_beam.transforms.core:get_signature',
           'apache_beam.transforms.ptransform:get_signature',
           'apache_beam.transforms.util:get_signature'),
          ('2.77',), _remember_signatures),
    Patch('size_samples_from_buffers',
          ('apache_beam.runners.worker.bundle_processor:BundleProcessor.__init__',
           'apache_beam.runners.worker.opcounters:OperationCounters'),
          ('2.77',), _size_samples_from_buffers),
    Patch('size_cached_values_from_buffers',
          ('apache_beam.runners.worker.statecache:get_deep_size',),
          ('2.77',), _size_cached_values_from_buffers),
    Patch('sample_states_briefly', ('apache_beam.runners.worker.statesampler:StateSampler',),
          ('2.77',), _sample_states_briefly),
    Patch('index_side_inputs_once',
          ('apache_beam.runners.portability.fn_api_runner.execution:'
           'FnApiRunnerExecutionContext._build_data_side_inputs_map',
           'apache_beam.runners.portability.fn_api_runner.translations:Stage.side_inputs',
           'apache_beam.runners.portability.fn_api_runner.translations:PAR_DO_URNS',
           'apache_beam.runners.portability.fn_api_runner.translations:create_buffer_id'),
          ('2.77',), _index_side_inputs_once),
    Patch('fail_instructions_of_lost_workers',
          ('apache_beam.runners.portability.fn_api_runner.worker_handlers:ControlConnection._read',
           'apache_beam.runners.portability.fn_api_runner.worker_handlers:ControlConnection.push'),
          ('2.77',), _fail_instructions_of_lost_workers),
    Patch('release_finished_stages',
          ('apache_beam.runners.portability.fn_api_runner.fn_runner:FnApiRunner._execute_bundle',
           'apache_beam.runners.worker.sdk_worker:BundleProcessorCache.'
           '_shutdown_cached_bundle_processors'),
          ('2.77',), _release_finished_stages),
    Patch('plugins_for_local_workers',
          ('apache_beam.runners.portability.fn_api_runner.fn_runner:ExtendedProvisionInfo',
           'apache_beam.runners.job.utils:dict_to_struct'),
          ('2.77',), None),
)
_BY_NAME = {patch.name: patch for patch in PATCHES}
