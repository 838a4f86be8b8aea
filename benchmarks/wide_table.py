"""Wide tables: the tabular pipeline against TF Transform's TFXIO pipeline as the width grows.

  .venv/bin/python benchmarks/wide_table.py [--rows 100000] [--widths 30,100,300,1000]
      [--runs 3] [--baseline-widths 300]                      (or: make bench-wide)

The dataset is benchmarks/wide.py at each width (7 floats for every 3 strings: 300 columns are
200 floats, each z-scored, 50 of them also in 10 quantile buckets, and 100 strings of up to
2,000 Zipf-distributed values, each a vocabulary with one OOV bucket; plus an int label). At every
width, (c) `python -m pipelines.tabular` with its defaults runs --runs times; at the --baseline-
widths, (b) TF Transform's recommended TFXIO pipeline (CsvTFXIO, RecordBatches,
AnalyzeAndTransformDataset, the same preprocessing_fn, gzip TFRecords of tf.train.Example;
tabular_pipeline.tfxio_path) runs as many times, alternating with (c). One worker (Beam's in-process
runner) each; each run is a separate process timed as a whole command, peak RSS is the largest total
resident set of it and its children at one time, peak PSS the largest total of their proportional
set sizes (a page that the pipeline and its TF2-rewrite child both map from TensorFlow's libraries
counts twice in the one, once in the other); medians are printed, with (b)/(c) and the growth of
(c) with the width.
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

MODULE = os.path.join(HERE, 'wide.py')


def _ours(csv_path, out):
  return [sys.executable, '-m', 'pipelines.tabular', '--transforms', MODULE, '--train', csv_path,
          '--output', out, '--overwrite']


def _theirs(csv_path, out):
  return [sys.executable, os.path.abspath(__file__), '--run-tfxio', '--csv', csv_path,
          '--out', out]


def _write(width, rows, path):
  subprocess.run([sys.executable, os.path.abspath(__file__), '--write', path, '--rows',
                  str(rows)], check=True,
                 env={**os.environ, 'WIDE_COLUMNS': str(width), 'TF_CPP_MIN_LOG_LEVEL': '3'})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', type=int, default=100_000)
  parser.add_argument('--widths', default='30,100,300,1000')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--baseline-widths', default='300',
                      help='widths at which TF Transform\'s TFXIO pipeline runs too ("" for none)')
  parser.add_argument('--write', help=argparse.SUPPRESS)
  parser.add_argument('--run-tfxio', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--csv', help=argparse.SUPPRESS)
  parser.add_argument('--out', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.write:  # one CSV at the width of WIDE_COLUMNS
    import wide
    wide.write_csv(args.write, args.rows)
    return
  if args.run_tfxio:  # (b) in this process, timed by the parent
    import wide
    tabular_pipeline.tfxio_path(args.csv, args.out, wide)
    sys.stdout.flush()
    os._exit(0)  # as tabular_pipeline: no interpreter teardown of TensorFlow's objects

  widths = [int(w) for w in args.widths.split(',')]
  baseline = {int(w) for w in args.baseline_widths.split(',') if w}
  work = tempfile.mkdtemp(prefix='bench_wide_')
  results = {}
  try:
    for width in widths:
      csv_path = os.path.join(work, f'wide_{width}.csv')
      _write(width, args.rows, csv_path)
      env = {'WIDE_COLUMNS': str(width)}
      contenders = {'c': _ours} if width not in baseline else {'c': _ours, 'b': _theirs}
      runs = {c: [] for c in contenders}
      for run in range(args.runs):
        for c, command in contenders.items():
          out = os.path.join(work, 'out')
          shutil.rmtree(out, ignore_errors=True)
          os.makedirs(out)
          seconds, rss, _, pss = tabular_pipeline.timed_command(command(csv_path, out), c, env,
                                                                pss=True)
          runs[c].append((seconds, rss, pss))
          print(f'{width} columns, run {run + 1} ({c}): {seconds:7.1f} s {rss:7.0f} MiB RSS '
                f'{pss:7.0f} MiB PSS', flush=True)
      results[width] = {c: tuple(statistics.median(x[i] for x in r) for i in range(3))
                        for c, r in runs.items()}
      os.remove(csv_path)
  finally:
    shutil.rmtree(work, ignore_errors=True)

  print(f'\n{args.rows:,} rows, {os.cpu_count()} CPUs, one worker, median of {args.runs} runs, '
        'each a whole command (start-up included)')
  print('  peak memory of the process tree: RSS summed (a page two processes share counts twice),'
        ' PSS summed (once)')
  print(f'  {"columns":>8} {"(c) s":>9} {"(c) RSS":>9} {"(c) PSS":>9} {"(b) s":>9} '
        f'{"(b) RSS":>9} {"(b)/(c)":>8}')
  for width, r in results.items():
    seconds, rss, pss = r['c']
    line = f'  {width:8d} {seconds:9.1f} {rss:9.0f} {pss:9.0f}'
    if 'b' in r:
      line += f' {r["b"][0]:9.1f} {r["b"][1]:9.0f} {r["b"][0] / seconds:7.2f}x'
    print(line)
  first = widths[0]
  for width in widths[1:]:
    (seconds, rss, _), (seconds_0, rss_0, _) = results[width]['c'], results[first]['c']
    print(f'  (c) at {width} columns / at {first}: time {seconds / seconds_0:.2f}x, '
          f'peak RSS {rss / rss_0:.2f}x (width {width / first:.1f}x)')
  print('  targets: 300 columns <= 30 s and <= 2,048 MiB, (b)/(c) >= 8x; 1,000 columns '
        '<= 4,096 MiB')


if __name__ == '__main__':
  main()
