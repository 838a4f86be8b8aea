"""The analysis cache over spans: adding an 11th span to 10 cached ones, against analyzing all 11.

  .venv/bin/python benchmarks/analysis_cache.py [--spans 11] [--rows 200000] [--runs 3]
                                                                  (or: make bench-cache)

The dataset is benchmarks/synthetic.py, one CSV file of --rows rows per span (a different seed
each). Before timing, the first --spans - 1 spans are analyzed once with --analysis-cache into a
cache directory. Then, side by side and alternating, each in a fresh process:
  (A) the analysis of all spans without a cache: the pipeline's own analysis stages
      (pipelines/stages.add_analysis: the train split's read, TF Transform's analysis, the
      transform graph written), built and run as `python -m pipelines.tabular` builds them;
  (B) the same with the cache, on a fresh copy of the 10-span cache each time: every span's
      digest, the cache's plan (two traces of the preprocessing_fn), the cached spans'
      accumulators read, the new span's analysis, the merge, the new entry published;
  (N) for scale, the analysis of the new span alone without a cache: what an analysis of one
      span costs, the pipeline's fixed costs included, a floor that (B), which reads the new
      span too, can approach but not go under;
and whole commands, for the cost of a run:
  (u) `python -m pipelines.tabular` over all spans, no cache;
  (c) the same with --analysis-cache (a fresh copy of the 10-span cache).
(A) and (B) are timed from before the inputs are inspected to the end of the job (not the
imports, which both pay); (u) and (c) as whole commands. Medians of --runs, (B)/(A) with the
median of the per-round ratios (target <= 0.25), (N)/(A), and (c)/(u).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

if __name__ == '__main__' and sys.argv[1:2] == ['--analyze-only']:
  from transforms import command
  command.start()  # as pipelines.tabular: before TensorFlow and Beam are imported

import tabular_pipeline  # noqa: E402

MODULE = os.path.join(HERE, 'synthetic.py')


def _write(path, rows, seed):
  subprocess.run([sys.executable, '-c', f'import sys; sys.path.insert(0, {HERE!r}); import '
                  f'synthetic; synthetic.write_csv({path!r}, {rows}, seed={seed})'], check=True)


def _argv(spans, out, cache=None):
  return (['--transforms', MODULE, '--train', *spans, '--output', out, '--overwrite'] +
          (['--analysis-cache', cache] if cache else []))


def _analyze_only(argv):
  """(A)/(B) in this process: the run's analysis alone, as pipelines.tabular builds and runs it
  (run as a command by transforms.command.main, as pipelines.tabular is, with its handling of
  the garbage collector: off while the modules load, what they made frozen, and the built
  pipeline frozen before it runs)."""
  import tensorflow_transform.beam as tft_beam

  from pipelines import analysis_cache, job, output_dir, stages, tabular
  from pipelines.runner import launch
  from pipelines.sources import csv_files
  from transforms import command
  started = time.perf_counter()
  args, beam_args = tabular.parse_args(argv)
  inputs = tabular.inspect_inputs(args)
  out = output_dir.OutputDir(args.output, args.overwrite)
  out.prepare()

  def source(units, split, eval_fraction, spill):
    return csv_files.ReadCsv(units, inputs.fmt, split, eval_fraction, args.rows_per_batch,
                             spill=spill)

  pipeline = launch.make_pipeline(beam_args)
  with tft_beam.Context(temp_dir=out.tmp, force_tf_compat_v1=True):
    plan = job.plan_cache(inputs.cache, out, inputs.contract.preprocessing_fn,
                          inputs.adapter_config, True)
    stages.add_analysis(pipeline, source, inputs.units['train'], 0.0,
                        inputs.contract.preprocessing_fn, inputs.adapter_config, out, None, plan)
  command.settle_before_run()
  pipeline.run().wait_until_finish()
  analysis_cache.publish(plan)
  print('ANALYSIS', time.perf_counter() - started, flush=True)


def _timed_analysis(argv, name):
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--analyze-only', *argv],
                        capture_output=True, text=True, cwd=tabular_pipeline.ROOT,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  lines = [line for line in proc.stdout.splitlines() if line.startswith('ANALYSIS')]
  if proc.returncode or not lines:
    sys.exit(f'error: {name} failed:\n{proc.stderr[-3000:]}')
  return float(lines[-1].split()[1])


def _fresh_copy(seeded, work):
  cache = os.path.join(work, 'cache_run')
  shutil.rmtree(cache, ignore_errors=True)
  shutil.copytree(seeded, cache)
  return cache


def main():
  if len(sys.argv) > 1 and sys.argv[1] == '--analyze-only':
    from transforms import command
    del sys.argv[1]
    command.main(_analyze_only)  # ends the process (no teardown of TensorFlow's objects)
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--spans', type=int, default=11)
  parser.add_argument('--rows', type=int, default=200_000, help='rows per span')
  parser.add_argument('--runs', type=int, default=3)
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix='bench_cache_')
  try:
    spans = [os.path.join(work, f'span{i:02d}.csv') for i in range(args.spans)]
    for i, path in enumerate(spans):
      _write(path, args.rows, seed=100 + i)
    seeded = os.path.join(work, 'cache_seeded')
    _timed_analysis(_argv(spans[:-1], os.path.join(work, 'seed_out'), seeded), 'seeding')
    times = {k: [] for k in 'ABNuc'}
    for run in range(args.runs):
      times['A'].append(_timed_analysis(_argv(spans, os.path.join(work, 'a')), '(A)'))
      times['B'].append(_timed_analysis(
          _argv(spans, os.path.join(work, 'b'), _fresh_copy(seeded, work)), '(B)'))
      times['N'].append(_timed_analysis(_argv(spans[-1:], os.path.join(work, 'n')), '(N)'))
      times['u'].append(tabular_pipeline.timed_command(
          [sys.executable, '-m', 'pipelines.tabular', *_argv(spans, os.path.join(work, 'u'))],
          '(u)')[0])
      times['c'].append(tabular_pipeline.timed_command(
          [sys.executable, '-m', 'pipelines.tabular',
           *_argv(spans, os.path.join(work, 'c'), _fresh_copy(seeded, work))], '(c)')[0])
      print(f'run {run + 1}: ' + '  '.join(f'({k}) {v[-1]:.1f} s' for k, v in times.items()),
            flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    rows = args.spans * args.rows
    print(f'\n{args.spans} spans x {args.rows:,} rows ({rows:,} rows), {args.runs} runs each, '
          'medians:')
    names = {'A': '(A) analysis of all spans, no cache',
             'B': f'(B) analysis, {args.spans - 1} spans cached + 1 new',
             'N': '(N) analysis of the new span alone, no cache',
             'u': '(u) whole run, no cache', 'c': '(c) whole run, with the cache'}
    for key, name in names.items():
      print(f'  {name:44s} {median[key]:7.1f} s')
    rounds = statistics.median(b / a for a, b in zip(times['A'], times['B']))
    floor = statistics.median(n / a for a, n in zip(times['A'], times['N']))
    print(f'  (B)/(A): {median["B"] / median["A"]:.2f} of medians, {rounds:.2f} median of '
          f'rounds (target <= 0.25); (N)/(A): {floor:.2f}; (c)/(u): '
          f'{median["c"] / median["u"]:.2f}')
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
