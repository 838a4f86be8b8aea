"""The analysis cache over spans: adding an 11th span to 10 cached ones, against analyzing all 11.

  .venv/bin/python benchmarks/analysis_cache.py [--spans 11] [--rows 200000] [--runs 3]
                                                                  (or: make bench-cache)

The dataset is benchmarks/synthetic.py, one CSV file of --rows rows per span (a different seed
each). Before timing, the first --spans - 1 spans are analyzed once with --analysis-cache into a
cache directory. Then, side by side and alternating, each a whole command in a fresh process:
  (u) `python -m pipelines.tabular` over all spans, no cache: analysis of all of them, transform;
  (c) the same with --analysis-cache, on a fresh copy of the 10-span cache each time: the new
      span's analysis (and the cached spans' digests and the cache's read), transform;
  (t) `python -m pipelines.transform` of all spans with (u)'s transform graph: the transform
      and everything else of a run, without an analysis.
A run's analysis costs its time minus (t)'s: (u) - (t) is the uncached analysis of all spans,
(c) - (t) the analysis with the cache. (t) reads and parses every span, which a run with an
analysis does once (its transform replays the analysis's parse where no cache is used), so the
subtraction takes too much off both and the ratio printed, (c - t) / (u - t), errs high. Medians
of --runs, and the median of the per-round ratios; the target is <= 0.25.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import tabular_pipeline  # noqa: E402

MODULE = os.path.join(HERE, 'synthetic.py')


def _write(path, rows, seed):
  subprocess.run([sys.executable, '-c', f'import sys; sys.path.insert(0, {HERE!r}); import '
                  f'synthetic; synthetic.write_csv({path!r}, {rows}, seed={seed})'], check=True)


def _tabular(spans, out, cache=None):
  command = [sys.executable, '-m', 'pipelines.tabular', '--transforms', MODULE, '--train',
             *spans, '--output', out, '--overwrite']
  return command + (['--analysis-cache', cache] if cache else [])


def main():
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
    tabular_pipeline.timed_command(_tabular(spans[:-1], os.path.join(work, 'seed_out'), seeded),
                                   'seeding the cache')
    out_u, out_c, out_t = (os.path.join(work, n) for n in ('out_u', 'out_c', 'out_t'))
    times = {'u': [], 'c': [], 't': []}
    rss = {'u': [], 'c': [], 't': []}
    for run in range(args.runs):
      seconds, peak, _ = tabular_pipeline.timed_command(_tabular(spans, out_u), '(u)')
      times['u'].append(seconds)
      rss['u'].append(peak)
      cache = os.path.join(work, 'cache_run')
      shutil.rmtree(cache, ignore_errors=True)
      shutil.copytree(seeded, cache)
      seconds, peak, _ = tabular_pipeline.timed_command(_tabular(spans, out_c, cache), '(c)')
      times['c'].append(seconds)
      rss['c'].append(peak)
      seconds, peak, _ = tabular_pipeline.timed_command(
          [sys.executable, '-m', 'pipelines.transform', '--transform-fn', out_u, '--input',
           *spans, '--output', out_t, '--overwrite', '--split', 'train'], '(t)')
      times['t'].append(seconds)
      rss['t'].append(peak)
      print(f'run {run + 1}: (u) {times["u"][-1]:.1f} s  (c) {times["c"][-1]:.1f} s  '
            f'(t) {times["t"][-1]:.1f} s', flush=True)
    rows = args.spans * args.rows
    print(f'\n{args.spans} spans x {args.rows:,} rows ({rows:,} rows), {args.runs} runs each, '
          'medians:')
    names = {'u': '(u) all spans analyzed, no cache', 'c': f'(c) {args.spans - 1} spans cached, '
             '1 analyzed', 't': '(t) transform only, no analysis'}
    for key, name in names.items():
      print(f'  {name:38s} {statistics.median(times[key]):7.1f} s '
            f'{statistics.median(rss[key]):7.0f} MiB')
    median = {k: statistics.median(v) for k, v in times.items()}
    uncached, cached = median['u'] - median['t'], median['c'] - median['t']
    per_round = [(c - t) / (u - t) for u, c, t in zip(times['u'], times['c'], times['t'])
                 if u > t]
    print(f'  analysis, uncached (u - t): {uncached:.1f} s; with the cache (c - t): '
          f'{cached:.1f} s')
    print(f'  (c - t) / (u - t): {cached / uncached:.2f} of medians, '
          f'{statistics.median(per_round):.2f} median of rounds (target <= 0.25)')
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
