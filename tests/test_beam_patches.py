"""The patches of Beam internals (pipelines/runner/beam_patches.py) behind their gates: switched
off by beam_patches.ENV, or skipped on a Beam they were not tested with, nothing of Beam is
replaced, with one line in the log; and a run with them off gives what a run with them gives.

The processes that must start without the patches are subprocesses: once applied, a patch stays
for the process (the test process has them from the other tests)."""

import json
import os
import subprocess
import sys

import pytest

from pipelines import vocabulary
from pipelines.runner import beam_patches, launch
from tests import runs

# What a subprocess reports: which of Beam's functions are still Beam's own after the pipeline
# is built (and the worker plugin imported), what was applied, what the job's workers get, and
# what the process logged. argv[1]: 'mismatch' makes Beam's version one nobody tested.
_REPORT = r'''
import json, logging, sys
logged = []
class Keep(logging.Handler):
  def emit(self, record):
    logged.append(record.getMessage())
log = logging.getLogger('pipelines')
log.addHandler(Keep())
log.setLevel(logging.INFO)
import apache_beam
if sys.argv[1] == 'mismatch':
  apache_beam.__version__ = '2.78.0'
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.transforms import core, userstate
from apache_beam.typehints import decorators
from apache_beam.runners.worker import bundle_processor, statecache, statesampler
from apache_beam.runners.portability.fn_api_runner import execution, fn_runner, worker_handlers
def targets():
  return {
      'PipelineOptions.view_as': PipelineOptions.view_as,
      'userstate.get_dofn_specs': userstate.get_dofn_specs,
      'decorators.get_signature': decorators.get_signature,
      'core.get_signature': core.get_signature,
      'BundleProcessor.__init__': bundle_processor.BundleProcessor.__init__,
      'statecache.get_deep_size': statecache.get_deep_size,
      'statesampler.StateSampler': statesampler.StateSampler,
      'ControlConnection._read': worker_handlers.ControlConnection._read,
      'ControlConnection.push': worker_handlers.ControlConnection.push,
      'FnApiRunnerExecutionContext._build_data_side_inputs_map':
          execution.FnApiRunnerExecutionContext._build_data_side_inputs_map,
      'FnApiRunner._execute_bundle': fn_runner.FnApiRunner._execute_bundle,
  }
originals = targets()
from pipelines.runner import beam_patches, launch
p = launch.make_pipeline([])
launch.make_pipeline(['--direct_num_workers=2'])  # again: nothing more is applied or logged
import pipelines.runner.worker_plugin
now = targets()
print(json.dumps({
    'beams_own': sorted(k for k in originals if now[k] is originals[k]),
    'qualnames': sorted(v.__qualname__ for v in now.values()),
    'applied': sorted(beam_patches.applied()),
    'plugins': p.options.view_as(SetupOptions).beam_plugins,
    'options_for_workers': p.runner._provision_info.provision_info.HasField('pipeline_options'),
    'logged': logged,
}))
'''

_ALL = ['BundleProcessor.__init__', 'ControlConnection._read', 'ControlConnection.push',
        'FnApiRunner._execute_bundle',
        'FnApiRunnerExecutionContext._build_data_side_inputs_map', 'PipelineOptions.view_as',
        'core.get_signature', 'decorators.get_signature', 'statecache.get_deep_size',
        'statesampler.StateSampler', 'userstate.get_dofn_specs']


def _env(patches):
  env = runs.command_env()
  env.pop(beam_patches.ENV, None)
  if patches == 'off':
    env[beam_patches.ENV] = 'off'
  return env


def test_patched_off_or_on_an_untested_beam_nothing_of_beam_is_replaced():
  modes = {'on': 'on', 'off': 'off', 'mismatch': 'on'}  # mode: the patches' switch
  procs = {mode: subprocess.Popen([sys.executable, '-c', _REPORT, mode], cwd=runs.REPO,
                                  env=_env(patches), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for mode, patches in modes.items()}
  reports = {}
  for mode, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    reports[mode] = json.loads(out.strip().splitlines()[-1])

  on, off, mismatch = reports['on'], reports['off'], reports['mismatch']
  assert on['beams_own'] == [] and on['logged'] == [], on
  assert on['applied'] == sorted(p.name for p in beam_patches.PATCHES if p.apply), on
  assert on['plugins'] == [launch.WORKER_PLUGIN] and on['options_for_workers']

  # Off: Beam's own functions, Beam's own FnApiRunner, no plugin for the workers; one line says so.
  assert off['beams_own'] == _ALL and off['applied'] == [], off
  assert not any('_keep_option_views' in q or '<locals>' in q for q in off['qualnames']), off
  assert off['plugins'] is None and not off['options_for_workers']
  assert len(off['logged']) == 1 and f'{beam_patches.ENV}=off' in off['logged'][0], off

  # Another Beam: the same, except that the workers are still told of the plugin (it gates
  # itself there); one line names the version and every patch skipped.
  assert mismatch['beams_own'] == _ALL and mismatch['applied'] == [], mismatch
  assert not mismatch['options_for_workers']
  assert len(mismatch['logged']) == 1, mismatch
  line = mismatch['logged'][0]
  assert '2.78.0' in line and 'tested on 2.77 only' in line
  assert all(p.name in line for p in beam_patches.PATCHES), line


def test_the_gate_reads_major_and_minor_of_the_version():
  fitting, line = beam_patches.gate(beam_patches.PATCHES, '2.77.3')
  assert fitting == [p.name for p in beam_patches.PATCHES] and line is None
  fitting, line = beam_patches.gate(beam_patches.PATCHES, '2.7.0')
  assert fitting == [] and line.startswith('Beam 2.7.0: ')


def test_a_renamed_internal_is_skipped_with_one_line(monkeypatch, caplog):
  """A patch whose target is not there (renamed in Beam) is not applied, and one line says so;
  one whose application fails anyway leaves Beam as it is, and the install goes on."""
  calls = []
  renamed = beam_patches.Patch('renamed', ('apache_beam.transforms.userstate:no_such_function',
                                           'apache_beam.no_such_module:thing'),
                               ('2.77',), lambda: calls.append('renamed'))

  def fails():
    raise AttributeError("module 'statecache' has no attribute 'moved'")

  failing = beam_patches.Patch('failing', ('apache_beam.transforms.userstate:get_dofn_specs',),
                               ('2.77',), fails)
  monkeypatch.setattr(beam_patches, 'PATCHES', beam_patches.PATCHES + (renamed, failing))
  monkeypatch.setattr(beam_patches, '_BY_NAME', dict(beam_patches._BY_NAME, renamed=renamed,
                                                     failing=failing))
  monkeypatch.setattr(beam_patches, '_FITTING', None)  # gated anew
  monkeypatch.setattr(beam_patches, '_LOGGED', set())
  monkeypatch.setattr(beam_patches, '_APPLIED', set(beam_patches._APPLIED))
  monkeypatch.delenv(beam_patches.ENV, raising=False)
  with caplog.at_level('INFO', logger='pipelines'):
    for _ in range(2):
      beam_patches.install('renamed', 'failing')
  assert calls == [] and not {'renamed', 'failing'} & beam_patches.applied()
  lines = [r.getMessage() for r in caplog.records if r.name == 'pipelines']
  assert len(lines) == 2, lines
  assert 'renamed (apache_beam.transforms.userstate:no_such_function is not there)' in lines[0]
  assert 'failing' not in lines[0]
  assert lines[1].startswith('Beam patch failing not applied') and 'moved' in lines[1]


def _registered_vocabulary_accumulate():
  from tensorflow_transform import analyzer_nodes
  from tensorflow_transform.beam import common
  registry = common._PTRANSFORM_BY_OPERATION_DEF_SUBCLASS
  return registry[analyzer_nodes.VocabularyAccumulate].get_ptransform(None)[0]


def test_the_vocabulary_counting_is_gated_too(monkeypatch, caplog):
  from tensorflow_transform.beam import analyzer_impls
  tfts = analyzer_impls._VocabularyAccumulateImpl
  monkeypatch.delenv(beam_patches.ENV, raising=False)
  try:
    vocabulary.install()
    assert _registered_vocabulary_accumulate() is not tfts
    monkeypatch.setenv(beam_patches.ENV, 'off')  # TFT's own, put back
    vocabulary.install()
    assert _registered_vocabulary_accumulate() is tfts
    monkeypatch.delenv(beam_patches.ENV)
    vocabulary.install()
    assert _registered_vocabulary_accumulate() is not tfts
    monkeypatch.setattr('tensorflow_transform.__version__', '1.22.0')
    monkeypatch.setitem(vocabulary._STATE, 'logged', False)
    caplog.clear()
    with caplog.at_level('INFO', logger='pipelines'):  # another TF Transform: TFT's own, one line
      vocabulary.install()
      vocabulary.install()
      vocabulary.install()
      with vocabulary.tft_implementation():
        assert _registered_vocabulary_accumulate() is tfts
    assert _registered_vocabulary_accumulate() is tfts
    lines = [r.getMessage() for r in caplog.records if r.name == 'pipelines']
    assert len(lines) == 1 and '1.22.0' in lines[0] and '1.21 only' in lines[0], lines
  finally:
    monkeypatch.undo()
    vocabulary.install()
  assert _registered_vocabulary_accumulate() is not tfts
  assert vocabulary.unfit_reason() is None
  assert 'TF Transform 1.21 only' in vocabulary.unfit_reason('1.22.1')


def _outputs(out):
  """What a run published, in comparable form: each split's Examples (sorted: shard order may
  differ), the vocabulary files, the manifest's counts and the dead letters."""
  manifest = json.load(open(os.path.join(out, 'manifest.json')))
  compression = 'GZIP' if manifest['compression'] == 'gzip' else ''
  found = {'vocabularies': runs.vocabularies(out), 'splits': {}}
  for split, entry in manifest['splits'].items():
    errors = os.path.join(out, 'errors', f'{split}.jsonl')
    found['splits'][split] = {
        'examples': sorted(runs.examples_of(out, entry['files'], compression).elements()),
        'counts': {k: entry[k] for k in ('rows_read', 'rows_written', 'rows_rejected',
                                         'rejected_by_kind')},
        'dead letters': sorted(open(errors).readlines()) if os.path.exists(errors) else [],
    }
  return found


def test_a_run_without_the_patches_gives_the_same_outputs(request, tmp_path):
  """The tabular command with the patches off (a subprocess: Beam and TF Transform as released,
  TFT's own vocabulary counting) gives what the shared run of the suite gave with them (the
  `trained` fixture's pipeline output, run in the test process, where they are on), on the same
  real rows. The command starts first, so that it runs beside that fixture where nothing has
  made it yet."""
  train_csv, test_csv = request.getfixturevalue('adult_sample')
  args = ['--transforms', 'transforms.census', '--train', str(train_csv), '--eval',
          str(test_csv)]  # as the `trained` fixture runs it
  plain, log = tmp_path / 'plain', tmp_path / 'plain.log'
  proc = runs.start_cli(args + ['--output', str(plain)], log, env={beam_patches.ENV: 'off'})
  try:
    patched = request.getfixturevalue('trained')['transformed']
    if not beam_patches.enabled():  # the suite runs with the patches off: a patched run here
      patched = str(tmp_path / 'patched')
      result = subprocess.run([sys.executable, '-m', 'pipelines.tabular', *args, '--output',
                               patched], cwd=runs.REPO, env=_env('on'), capture_output=True,
                              text=True, timeout=300)
      assert result.returncode == 0, result.stderr[-3000:]
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert f'{beam_patches.ENV}=off' in log.read_text()  # it did run as released
  ours, theirs = _outputs(patched), _outputs(str(plain))
  assert sorted(ours['splits']) == ['eval', 'train']
  assert ours['splits']['eval']['dead letters'] and ours['splits']['train']['examples']
  assert ours['vocabularies'] and ours['vocabularies'] == theirs['vocabularies']
  for split in ours['splits']:
    for what in ('counts', 'dead letters', 'examples'):
      assert ours['splits'][split][what] == theirs['splits'][split][what], (split, what)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))


def test_the_side_input_index_is_beams_own(monkeypatch):
  """_index_side_inputs_once gives the index Beam builds, on the stages of a job whose fused
  stages read side inputs of every access pattern, several per transform and from several
  producers."""
  import apache_beam as beam
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner, execution
  beam_patches.install('index_side_inputs_once')
  context = execution.FnApiRunnerExecutionContext
  if 'index_side_inputs_once' not in beam_patches.applied():
    pytest.skip('the patch does not apply to this Beam')
  ours, beams = context._build_data_side_inputs_map, context._beams_build_data_side_inputs_map
  seen = []

  def both(stages):
    seen.append((ours(stages), beams(stages)))
    return seen[-1][0]

  monkeypatch.setattr(context, '_build_data_side_inputs_map', staticmethod(both))
  with beam.Pipeline(runner=FnApiRunner()) as p:
    numbers = p | 'Numbers' >> beam.Create(range(20))
    total = numbers | 'Sum' >> beam.CombineGlobally(sum)
    biggest = numbers | 'Max' >> beam.CombineGlobally(max)
    pairs = numbers | 'Pairs' >> beam.Map(lambda x: (x % 3, x))
    shifted = (numbers
               | 'Shift' >> beam.Map(lambda x, t, m, ps: x + t + m + len(ps),
                                     beam.pvalue.AsSingleton(total),
                                     beam.pvalue.AsSingleton(biggest),
                                     beam.pvalue.AsList(pairs))
               | 'Keyed' >> beam.Map(lambda x, d: x + sum(d.values()),
                                     beam.pvalue.AsDict(pairs | 'Distinct' >> beam.Distinct())))
    _ = shifted | 'Again' >> beam.Map(lambda x, t: x - t, beam.pvalue.AsSingleton(total))
  assert seen and all(a == b for a, b in seen)
  assert sum(len(v) for v in seen[0][0].values()) >= 5  # the side inputs were indexed



def test_a_finished_stage_is_torn_down_before_the_next_one_runs(tmp_path):
  """_release_finished_stages: the DoFn of a stage whose output is complete is torn down (and
  what it holds freed) before a stage after a GroupByKey runs, not when the job ends; the job's
  result is the same. (The DoFns are pickled: they tell each other through a file.)"""
  import apache_beam as beam
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  from apache_beam.testing.util import assert_that, equal_to
  beam_patches.install('release_finished_stages')
  if 'release_finished_stages' not in beam_patches.applied():
    pytest.skip('the patch does not apply to this Beam')
  marker = str(tmp_path / 'torn_down')

  class Holds(beam.DoFn):
    def setup(self):
      self.big = bytearray(1 << 20)  # what a TF Transform stage's session would be

    def process(self, x):
      yield x % 2, x

    def teardown(self):
      with open(marker, 'w') as f:
        f.write('first stage')

  def after_the_grouping(kv):
    return kv[0], sum(kv[1]), os.path.exists(marker)

  with beam.Pipeline(runner=FnApiRunner()) as p:
    result = (p | beam.Create(range(10)) | beam.ParDo(Holds()) | beam.GroupByKey()
              | beam.Map(after_the_grouping))
    assert_that(result, equal_to([(0, 20, True), (1, 25, True)]))


def test_remembered_signatures_are_inspects_and_follow_a_changed_function():
  if not beam_patches.applies('remember_signatures'):
    pytest.skip('the patch does not apply to this Beam')
  beam_patches.install('remember_signatures')
  import inspect

  import apache_beam as beam
  from apache_beam.typehints import decorators

  def f(a, b=1):
    return a + b

  assert decorators.get_signature(f) == inspect.signature(f)
  assert decorators.get_signature(f) is decorators.get_signature(f)  # kept
  f.__defaults__ = (2,)
  assert decorators.get_signature(f).parameters['b'].default == 2

  class Fn(beam.DoFn):
    def process(self, element, when=beam.DoFn.TimestampParam):
      yield element

  one, other = Fn(), Fn()
  assert list(decorators.get_signature(one.process).parameters) == ['element', 'when']
  assert decorators.get_signature(other.process) == inspect.signature(other.process)
  assert decorators.get_signature(len) == inspect.signature(len)  # a builtin, not kept
