"""Progress of a run while it goes: the stage, the rows read so far and their rate.

On a terminal it is one line that updates in place; anywhere else (CI, a log file, a pipe) it is
plain lines, one when a stage ends and one a minute while a long stage goes on, so logs stay
readable.

Counting: the sources' RecordBatches pass through `count_batches` (one Python call per batch of
thousands of rows, not per row), which adds to a counter in this module. That counter is the
launching process's only where the DoFns run in it: Beam's in-process FnApiRunner (the default
here, in_memory or multi_threading mode). Worker processes (multi_processing mode, the portable
runner, Dataflow) count in their own memory, which the launching process cannot see; there the
reporter says so once and shows only the stage lines it knows (started, finished).
"""

import sys
import threading
import time

import apache_beam as beam

from pipelines.runner import launch

# What each stage does, as the reporter names it; in the order a run goes through them.
STAGES = {'analyze': 'analyzing the train split', 'transform': 'transforming and writing'}
_TTY_INTERVAL = 0.2  # seconds between redraws of the terminal line
_LOG_INTERVAL = 60.0  # seconds between plain lines during one long stage

_lock = threading.Lock()
_counts = {}  # (stage, split) -> rows
_times = {}  # stage -> [time of its first batch, time of its last]


def _add(stage, split, rows):
  with _lock:
    now = time.time()
    _times.setdefault(stage, [now, now])[1] = now
    _counts[(stage, split)] = _counts.get((stage, split), 0) + rows


def _snapshot():
  with _lock:
    return dict(_counts), {stage: tuple(t) for stage, t in _times.items()}


def _reset():
  with _lock:
    _counts.clear()
    _times.clear()


class _CountFn(beam.DoFn):
  def __init__(self, stage, split):
    self._stage, self._split = stage, split

  def process(self, batch):
    _add(self._stage, self._split, batch.num_rows)
    yield batch


def count_batches(batches, stage, split):
  """`batches` (RecordBatches) unchanged, counted for the reporter as rows of (stage, split)."""
  return batches | f'Progress{stage.capitalize()}{split.capitalize()}' >> beam.ParDo(
      _CountFn(stage, split))


def counts_here(pipeline):
  """Whether the pipeline's DoFns run in this process, so that its counts are visible here."""
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  mode = pipeline.options.get_all_options().get('direct_running_mode') or 'in_memory'
  return isinstance(pipeline.runner, FnApiRunner) and mode != 'multi_processing'


class Reporter:
  """Shows progress on `stream` (stderr) while a `with` block runs the pipeline."""

  def __init__(self, pipeline, what='rows', stream=None):
    self._what = what
    self._stream = stream or sys.stderr
    self._tty = self._stream.isatty()
    self._local = counts_here(pipeline)
    self._quiet = launch.is_dry_run(pipeline)  # nothing runs
    self._runner = type(pipeline.runner).__name__ if pipeline.runner else 'the runner'
    self._stop = threading.Event()
    self._thread = None
    self._reported = set()  # stages whose closing plain line was written
    self._last_line = 0.0
    self._width = 0

  def __enter__(self):
    _reset()
    self._begun = time.time()
    if self._quiet:
      return self
    if not self._local:
      self._print(f'progress: {self._runner} may run the job\'s DoFns in other processes, whose '
                  f'counts of {self._what} this one cannot see; they are shown when the job ends')
      return self
    self._thread = threading.Thread(target=self._loop, name='progress', daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._report(final=True)
    if self._tty and self._width:
      self._stream.write('\r' + ' ' * self._width + '\r')
      self._stream.flush()
    elif not self._local and not self._quiet:
      self._print(f'progress: the job ended after {time.time() - self._begun:.1f}s')
    _reset()
    return False

  def _loop(self):
    interval = _TTY_INTERVAL if self._tty else 1.0
    while not self._stop.wait(interval):
      self._report()

  def _stage_text(self, stage, counts, since, until):
    """'<stage>: <split> <rows>, ... <what> (<rate>/s)', the rate over [since, until] (left out
    over less than a tenth of a second: a stage of one or two batches has no rate to speak of)."""
    rows = {split: n for (s, split), n in counts.items() if s == stage}
    splits = ', '.join(f'{split} {n:,}' for split, n in rows.items())
    rate = ''
    if until - since >= 0.1:
      rate = f' ({sum(rows.values()) / (until - since):,.0f} {self._what}/s)'
    return f'{STAGES.get(stage, stage)}: {splits} {self._what}{rate}'

  def _report(self, final=False):
    counts, times = _snapshot()
    now = time.time()
    stages = sorted(times, key=times.get)
    if self._tty:
      text = 'starting the pipeline'
      if stages:  # the rate of reading: from the stage's first batch to its latest
        text = self._stage_text(stages[-1], counts, *times[stages[-1]])
      self._draw(f'{text} [{now - self._begun:.0f}s]')
      return
    # Plain lines: each stage once when the next one begins (or the run ends), and a line a
    # minute while one goes on.
    for stage in stages if final else stages[:-1]:
      if stage not in self._reported:
        self._reported.add(stage)
        self._print(f'progress: {self._stage_text(stage, counts, *times[stage])}')
    if stages and not final and min(now - self._last_line, now - times[stages[-1]][0]) >= (
        _LOG_INTERVAL):
      self._print(f'progress: {self._stage_text(stages[-1], counts, times[stages[-1]][0], now)}'
                  ' so far')

  def _draw(self, text):
    text = text[:200]
    pad = max(self._width - len(text), 0)
    self._stream.write('\r' + text + ' ' * pad)
    self._stream.flush()
    self._width = len(text)

  def _print(self, line):
    self._last_line = time.time()
    print(line, file=self._stream, flush=True)
