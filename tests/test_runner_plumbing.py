"""What pipelines/runner/beam_patches.py and pipelines/sources/reading.py add to Beam for speed,
against Beam's own behaviour:

* ReadAhead runs a source DoFn in a thread of its own and must give exactly its outputs, in
  order, raise its errors, stay a bounded number of outputs ahead and stop with the stage;
* the DoFn state/timer inspection kept per DoFn must answer as Beam's own does;
* element sizes read off Arrow and numpy buffers must be close to what they hold, and leave
  every other value to Beam's coder.
"""

import threading
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import userstate

from pipelines import sizes
from pipelines.runner import beam_patches, launch
from pipelines.sources import reading
from transforms import command


class _Numbers(beam.DoFn):
  """n -> 0..n-1 on the main output, and the odd ones tagged 'odd' too; fails on n < 0."""

  def __init__(self, produced=None):
    self.produced = produced

  def process(self, n):
    if n < 0:
      raise ValueError(f'negative: {n}')
    for i in range(n):
      if self.produced is not None:
        self.produced.append(i)
      yield i
      if i % 2:
        yield beam.pvalue.TaggedOutput('odd', i)


def test_read_ahead_gives_every_output_in_order():
  fn = reading.ReadAhead(_Numbers())
  outputs = list(fn.process(1000))
  expected = []
  for i in range(1000):
    expected.append(i)
    if i % 2:
      expected.append(('odd', i))
  assert [(o.tag, o.value) if isinstance(o, beam.pvalue.TaggedOutput) else o
          for o in outputs] == expected


def test_read_ahead_in_a_beam_pipeline_with_tagged_outputs():
  with beam.Pipeline(runner=FnApiRunner()) as p:
    results = (p | beam.Create([3, 5, 0])
               | beam.ParDo(reading.ReadAhead(_Numbers())).with_outputs('odd', main='all'))
    assert_that(results.all, equal_to([0, 1, 2, 0, 1, 2, 3, 4]), label='all')
    assert_that(results.odd, equal_to([1, 1, 3]), label='odd')


class _Bundled(beam.DoFn):
  """Counts its bundle's elements and outputs the count when the bundle finishes."""

  def start_bundle(self):
    self.count = 0

  def process(self, n):
    self.count += 1
    yield n

  def finish_bundle(self):
    yield beam.transforms.window.GlobalWindows.windowed_value(('count', self.count))


def test_read_ahead_keeps_the_sources_bundle_methods():
  with beam.Pipeline(runner=FnApiRunner()) as p:
    results = p | beam.Create([5, 6, 7]) | beam.ParDo(reading.ReadAhead(_Bundled()))
    assert_that(results, equal_to([5, 6, 7, ('count', 3)]))


def test_read_ahead_raises_the_sources_error_and_leaves_no_thread():
  before = threading.active_count()
  with pytest.raises(ValueError, match='negative: -1'):
    list(reading.ReadAhead(_Numbers()).process(-1))
  assert threading.active_count() == before


def test_read_ahead_stays_bounded_and_stops_with_the_stage():
  produced = []
  before = threading.active_count()
  outputs = reading.ReadAhead(_Numbers(produced), depth=3).process(10**9)
  taken = [next(outputs) for _ in range(10)]  # the outputs of numbers 0 to 6
  assert taken[:2] == [0, 1]
  time.sleep(0.3)  # the thread runs as far ahead as it may
  assert len(produced) <= 7 + 3 + 2  # 3 waiting outputs, and one in hand
  outputs.close()  # the stage stops early (an error downstream, say)
  assert threading.active_count() == before
  stopped_at = len(produced)
  time.sleep(0.1)
  assert len(produced) == stopped_at


def _as_list(outputs):
  return [(o.tag, o.value) if isinstance(o, beam.pvalue.TaggedOutput) else (None, o)
          for o in outputs]


class _Batches(beam.DoFn):
  """unit -> two RecordBatches, a carved eval batch and a dead letter; counts its reads."""

  def __init__(self):
    self.reads = []

  def process(self, unit):
    self.reads.append(unit)
    yield pa.record_batch({'x': pa.array([1.0, 2.0]), 'unit': pa.array([unit] * 2)})
    yield beam.pvalue.TaggedOutput(reading.EVAL_TAG, pa.record_batch({'x': pa.array([3.0])}))
    yield beam.pvalue.TaggedOutput(reading.ERRORS_TAG, {'file': unit, 'line': 7, 'kind': 'x'})
    yield pa.record_batch({'x': pa.array([4.0]), 'unit': pa.array([unit])})


def test_spill_gives_the_second_read_what_the_first_read_gave(tmp_path):
  spill = reading.Spill(str(tmp_path / 'spill'), writes=True)
  first, second = _Batches(), _Batches()
  read = _as_list(reading.ReadAhead(first, spill=spill).process('a.csv'))
  assert first.reads == ['a.csv'] and len(read) == 4
  assert len(list((tmp_path / 'spill').iterdir())) == 1  # committed: no .partial
  assert not list((tmp_path / 'spill').glob('*.partial'))
  replayed = _as_list(reading.ReadAhead(second, spill=spill.replaying()).process('a.csv'))
  assert second.reads == []  # not read again
  def comparable(outputs):  # each output PCollection's elements, in order
    return sorted((str(t), repr(v.to_pydict() if isinstance(v, pa.RecordBatch) else v))
                  for t, v in outputs)

  assert comparable(replayed) == comparable(read)
  assert not list((tmp_path / 'spill').iterdir())  # each spill is replayed once
  # A unit without a spill (read elsewhere, or replayed already) is read.
  again = _as_list(reading.ReadAhead(second, spill=spill.replaying()).process('a.csv'))
  assert second.reads == ['a.csv'] and len(again) == 4


def test_spill_keeps_nothing_of_a_failed_or_unfinished_read(tmp_path):
  spill = reading.Spill(str(tmp_path), writes=True)
  with pytest.raises(ValueError, match='negative'):
    list(reading.ReadAhead(_Numbers(), spill=spill).process(-1))
  outputs = reading.ReadAhead(_Numbers(), spill=spill).process(10**9)
  next(outputs)
  outputs.close()  # the stage stopped early
  assert not list(tmp_path.iterdir())
  assert spill.replaying().replay(10**9) is None
  assert spill.replaying().replay(-1) is None


def test_spill_stays_within_its_budget(tmp_path, monkeypatch):
  monkeypatch.setattr(reading.Spill, 'BUDGET', 20)  # one small batch's worth
  spill = reading.Spill(str(tmp_path), writes=True)
  first = _Batches()
  read = _as_list(reading.ReadAhead(first, spill=spill).process('big.csv'))
  assert len(read) == 4  # everything is given, nothing is kept
  assert not list(tmp_path.iterdir())
  second = _Batches()
  assert len(_as_list(reading.ReadAhead(second, spill=spill.replaying()).process('big.csv'))) == 4
  assert second.reads == ['big.csv']
  # A dead letter that does not pickle: the unit is not kept, and read again.
  class _Unpicklable(_Batches):
    def process(self, unit):
      yield from super().process(unit)
      yield beam.pvalue.TaggedOutput(reading.ERRORS_TAG, {'file': unit, 'lock': threading.Lock()})

  monkeypatch.setattr(reading.Spill, 'BUDGET', 1 << 30)
  assert len(_as_list(reading.ReadAhead(_Unpicklable(), spill=spill).process('odd.csv'))) == 5
  assert not list(tmp_path.iterdir())
  # Nowhere to write (a read-only or vanished disk): read as without a spill.
  blocked = tmp_path / 'file'
  blocked.write_text('')
  outputs = _as_list(reading.ReadAhead(_Batches(), spill=reading.Spill(
      str(blocked / 'spill'), writes=True)).process('c.csv'))
  assert len(outputs) == 4


class _Stateful(beam.DoFn):
  COUNT = userstate.ReadModifyWriteStateSpec('count', beam.coders.VarIntCoder())

  def process(self, kv, count=beam.DoFn.StateParam(COUNT)):  # noqa: B008  # Beam's state API
    yield kv


def test_kept_dofn_specs_answer_as_beam_does():
  launch.make_pipeline([])  # installs the speed-ups
  stateful, plain = _Stateful(), _Numbers()
  for _ in range(2):  # the second answer comes from what was kept
    assert userstate.is_stateful_dofn(stateful)
    assert not userstate.is_stateful_dofn(plain)
    states, timers = userstate.get_dofn_specs(stateful)
    assert [s.name for s in states] == ['count'] and not timers
    states.clear()  # callers get copies: what is kept does not change
  assert len(userstate.get_dofn_specs(stateful)[0]) == 1


def test_sizes_from_buffers():
  batch = pa.RecordBatch.from_arrays([pa.array(np.arange(1000, dtype=np.int64))], ['x'])
  assert sizes.buffer_bytes(batch) == 8000
  floats = np.zeros((100, 4), np.float32)
  assert sizes.buffer_bytes({'a': floats, 'b': (None, 3)}) == 1600 + 16
  words = np.array([b'abcd'] * 50, dtype=object)
  assert sizes.buffer_bytes(words) == 50 * (8 + 4)
  assert sizes.buffer_bytes(tf.constant([1.0, 2.0])) == 8
  assert sizes.buffer_bytes(tf.constant(3, tf.int64)) == 8
  assert sizes.buffer_bytes(tf.constant([b'ab', b'cd'])) == 2 * (8 + 2)
  assert sizes.buffer_bytes((batch, {})) == 8000
  # A slice: its own bytes, or (Beam's size sampling) the buffers it keeps alive, counted whole.
  half = batch.slice(500)
  assert sizes.buffer_bytes(half) == 4000
  assert sizes.buffer_bytes(half, whole_buffers=True) == 8000
  assert sizes.buffer_bytes((half, {'b': half.column(0)}), whole_buffers=True) == 16000
  # TF Transform's analyzer results reach its SavedModel stage as dataclasses (_TensorBinding)
  from tensorflow_transform.beam import impl as tft_impl
  binding = tft_impl._TensorBinding(np.zeros(10, np.float32), 'mean:0', 1, False)
  assert sizes.buffer_bytes(binding) == 40 + len("mean:0") + 8 + 8
  assert sizes.buffer_bytes(object()) is None  # left to Beam's coder


def test_the_statistics_accumulator_is_weighed_without_pickling():
  """The statistics' accumulator says about how big it is: within a factor of 2 of its pickled
  size (what Beam's size sampling measured before), as its string features' exact counts grow
  and once a feature has gone over to its sketch."""
  import pickle

  from pipelines.statistics import accumulators
  rng = np.random.default_rng(0)
  n = 12_000  # distinct values: past accumulators.EXACT_VALUES with the second batch
  fn = accumulators.StatisticsFn('train')
  acc = fn.create_accumulator()
  for start in (0, 10 ** 6):
    columns = {f'f{i}': rng.normal(size=n) for i in range(10)}
    columns.update({f's{i}': pa.array([f'v{x}' for x in rng.integers(start, start + 10 ** 6, n)])
                    for i in range(5)})
    acc = fn.add_input(acc, pa.record_batch(columns))
    weighed, pickled = sizes.buffer_bytes(acc), len(pickle.dumps(acc))
    assert pickled / 2 < weighed < 2 * pickled, (weighed, pickled)
  assert all(f.top is not None for name, f in acc.features.items() if name.startswith('s'))
  assert sizes.buffer_bytes([1, object()]) is None


def test_pipelines_run_with_sizes_from_buffers(monkeypatch):
  """The in-process harness measures sampled elements from their buffers, and the pipeline's
  results are unchanged."""
  measured = []
  size_of = sizes.buffer_bytes
  monkeypatch.setattr(beam_patches, 'buffer_bytes',
                      lambda v, **kw: measured.append(v) or size_of(v, **kw))
  p = launch.make_pipeline([])
  rows = (p | beam.Create([1, 2, 3])
          | beam.Map(lambda n: pa.RecordBatch.from_arrays([pa.array(np.zeros(n * 1000))], ['x']))
          | beam.Map(lambda batch: batch.num_rows))
  assert_that(rows, equal_to([1000, 2000, 3000]))
  p.run().wait_until_finish()
  assert any(isinstance(v, pa.RecordBatch) for v in measured)


def test_kept_option_views_read_and_write_the_same_options():
  import pickle

  from apache_beam.options.pipeline_options import DebugOptions, PipelineOptions, StandardOptions
  options, _ = launch.pipeline_options(['--runner=SomeRunner', '--experiments=a'])
  assert options.view_as(StandardOptions) is options.view_as(StandardOptions)
  options.view_as(StandardOptions).runner = 'Other'
  assert options.view_as(StandardOptions).runner == 'Other'
  assert options.get_all_options()['runner'] == 'Other'
  options.view_as(DebugOptions).add_experiment('b')
  assert options.view_as(DebugOptions).experiments == ['a', 'b']
  assert options.view_as(PipelineOptions).get_all_options()['experiments'] == ['a', 'b']
  copy = pickle.loads(pickle.dumps(options))  # what a runner ships: the options, no views
  assert copy.view_as(StandardOptions).runner == 'Other'
  assert copy.view_as(StandardOptions) is not options.view_as(StandardOptions)


def test_cached_side_inputs_weighed_from_buffers():
  from apache_beam.runners.worker import statecache
  beam_patches.install_worker_speedups()
  assert statecache.get_deep_size([np.zeros(100, np.float32), 'abcd']) == 404
  assert statecache.get_deep_size([]) == 8  # never 0: Beam warns of a weight of 0
  assert statecache.get_deep_size([object()]) > 0  # unknown: measured by objsize, as before
  p = launch.make_pipeline([])
  main = p | 'Main' >> beam.Create([1, 2])
  side = p | 'Side' >> beam.Create([np.arange(3.0)])
  totals = main | beam.Map(lambda x, s: x + float(s.sum()), s=beam.pvalue.AsSingleton(side))
  assert_that(totals, equal_to([4.0, 5.0]))
  p.run().wait_until_finish()


def _sampling_period(_):
  from apache_beam.runners.worker import statesampler
  return statesampler.get_current_tracker().sampling_period_ms


def test_bundles_sample_their_states_briefly():
  """Each bundle's state sampler wakes every SAMPLING_PERIOD_MS at most, so that the harness,
  which joins it when the bundle ends, does not wait up to Beam's default 200 ms for it."""
  p = launch.make_pipeline([])
  periods = p | beam.Create([1, 2]) | beam.Map(_sampling_period)
  assert_that(periods, equal_to([beam_patches.SAMPLING_PERIOD_MS] * 2))
  p.run().wait_until_finish()
  assert beam_patches.SAMPLING_PERIOD_MS < 200


def _worker_facts(_):
  import os
  import sys
  return os.getpid(), 'pipelines.runner.worker_plugin' in sys.modules


def test_worker_processes_run_with_the_speedups():
  """Beam's in-process runner starts multi-process workers without pipeline options; they are
  given --beam_plugins, so each imports pipelines.runner.worker_plugin before running a bundle."""
  import os
  p = launch.make_pipeline(['--direct_num_workers=2', '--direct_running_mode=multi_processing'])
  facts = p | beam.Create(list(range(8))) | beam.Map(_worker_facts)
  launcher = os.getpid()
  assert_that(facts, lambda found: _check_worker_facts(found, launcher))
  p.run().wait_until_finish()


def _check_worker_facts(found, launcher_pid):
  assert found and all(imported for _, imported in found), found
  assert all(pid != launcher_pid for pid, _ in found), found


def test_the_train_split_is_parsed_once_and_replayed(tmp_path, monkeypatch):
  """The analysis's read of the train split spills what it read; the transform's read gives it
  again (dead letters included) instead of parsing the files a second time, and the counts are
  those of the data (pandas); nothing of the spill is left."""
  from pipelines import tabular
  from tests import runs
  inputs = runs.small_adult(str(tmp_path))
  expected = runs.expected_counts(inputs)
  with open(inputs[0], 'ab') as f:
    f.write(b'not,a,census,row\n')
  read, written, rejected = expected['train']
  expected['train'] = (read + 1, written, rejected + 1)
  replays = []
  replay = reading.Spill.replay

  def recording(self, unit):
    replayed = replay(self, unit)
    replays.append(replayed is not None)
    return replayed

  monkeypatch.setattr(reading.Spill, 'replay', recording)
  out = tmp_path / 'out'
  manifest = tabular.run(runs.tabular_args(inputs, out))
  assert replays and all(replays)
  assert runs.counts(manifest) == expected
  assert not list(out.rglob('*.spill*')) and not list(out.rglob('spill'))


def test_the_command_keeps_the_collector_off_its_long_lived_objects(tmp_path):
  """As a command, a pipeline imports with the garbage collector off, then moves what it made
  (modules, the built pipeline) to the collector's permanent generation and turns it on again;
  imported as a module it leaves the collector alone."""
  import gc
  import subprocess
  import sys

  from pipelines import tabular  # noqa: F401  (imported, not run as a command)
  from tests import runs
  assert gc.isenabled() and not command._COMMAND
  inputs = runs.small_adult(str(tmp_path))
  code = ('import atexit, gc, runpy, sys\n'
          'atexit.register(lambda: print("collector", gc.isenabled(), gc.get_freeze_count()))\n'
          f'sys.argv = ["tabular"] + {runs.tabular_args(inputs, tmp_path / "out")!r}\n'
          'runpy.run_module("pipelines.tabular", run_name="__main__")\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=runs.REPO, env=runs.command_env(),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  line = [out_line for out_line in result.stdout.splitlines()
          if out_line.startswith('collector')][-1]
  _, enabled, frozen = line.split()
  assert enabled == 'True' and int(frozen) > 100_000, line
