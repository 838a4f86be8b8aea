"""Small runs: a 1,000-row census run of the tabular pipeline against importing its stack.

  .venv/bin/python benchmarks/small_run.py [--rows 1000] [--runs 5]      (or: make bench-small)

Side by side, alternating, each a whole command in a fresh process: (i) `python -c "import
tensorflow, tensorflow_transform, apache_beam"`, the least any run of the pipeline costs;
(c) `python -m pipelines.tabular --transforms transforms.census` on the first --rows rows of
the bundled Adult train file (its default: TF Transform's graph mode, the transform graph
rewritten as a TF2 one); (t) the same with --tracing tf2 (TF2 behaviours). Medians are printed
with (c)/(i) and (t)/(i).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import tabular_pipeline  # noqa: E402

ADULT = os.path.join(tabular_pipeline.ROOT, 'data', 'adult', 'adult.data')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', type=int, default=1000)
  parser.add_argument('--runs', type=int, default=5)
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix='bench_small_')
  try:
    csv_path = os.path.join(work, 'adult.csv')
    with open(ADULT, 'rb') as src, open(csv_path, 'wb') as dst:
      for _, line in zip(range(args.rows), src):
        dst.write(line)
    out = os.path.join(work, 'out')
    run = [sys.executable, '-m', 'pipelines.tabular', '--transforms', 'transforms.census',
           '--train', csv_path, '--output', out, '--overwrite']
    commands = {
        'i': [sys.executable, '-c', 'import tensorflow, tensorflow_transform, apache_beam'],
        'c': run,
        't': run + ['--tracing', 'tf2'],
    }
    seconds = {name: [] for name in commands}
    for i in range(args.runs):
      for name, command in commands.items():
        shutil.rmtree(out, ignore_errors=True)
        s, rss, _ = tabular_pipeline.timed_command(command, name)
        seconds[name].append(s)
        print(f'run {i + 1} ({name}): {s:6.1f} s {rss:6.0f} MiB', flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  median = {name: statistics.median(values) for name, values in seconds.items()}
  print(f'\n{args.rows:,}-row census run, {os.cpu_count()} CPUs, median of {args.runs} runs')
  print(f'  (i) import tensorflow, tensorflow_transform, apache_beam {median["i"]:6.1f} s')
  print(f'  (c) pipelines.tabular                                 {median["c"]:6.1f} s  '
        f'(c)/(i) {median["c"] / median["i"]:.2f}x (target <= 1.5x)')
  print(f'  (t) pipelines.tabular --tracing tf2                  {median["t"]:6.1f} s  '
        f'(t)/(i) {median["t"] / median["i"]:.2f}x')


if __name__ == '__main__':
  main()
