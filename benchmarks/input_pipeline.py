"""Trainer input throughput against a plain TFRecordDataset + parse_example over the same files.

  .venv/bin/python benchmarks/input_pipeline.py [--transformed DIR] [--runs 5] [--passes 10]

Without --transformed, the Adult data is preprocessed first (8 shards) into a temporary directory.
Each run reads every example --passes times, batch 256; the two contenders alternate run by run,
and the table reports medians of examples/s and the median of the per-pair ratios.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf
import tensorflow_transform as tft

from trainer import input as input_lib
from transforms import run_contract

BATCH = 256


def trainer_input(files, spec, label, compression, passes):
  # Each pass is one epoch as the trainer runs it (file order reshuffled, windows permuted).
  return input_lib.make_dataset(files, spec, label, BATCH, compression, shuffle=True).repeat(passes)


def plain_baseline(files, spec, label, compression, passes):
  ds = tf.data.TFRecordDataset(files, compression_type='GZIP' if compression == 'gzip' else '')
  return ds.repeat(passes).batch(BATCH).map(lambda r: tf.io.parse_example(r, spec)).prefetch(1)


def examples_per_second(make, *args):
  start = time.perf_counter()
  n = 0
  for batch in make(*args):
    first = batch[0] if isinstance(batch, tuple) else batch
    n += int(tf.shape(next(iter(first.values())))[0])
  return n / (time.perf_counter() - start), n


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--transformed', default=None)
  p.add_argument('--runs', type=int, default=5)
  p.add_argument('--passes', type=int, default=10)
  args = p.parse_args()
  transformed = args.transformed
  if transformed is None:
    from pipelines import tabular
    transformed = os.path.join(tempfile.mkdtemp(prefix='bench_input_'), 'tft')
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tabular.run(['--transforms', 'transforms.census', '--train',
                 os.path.join(repo, 'data', 'adult', 'adult.data'), '--output', transformed,
                 '--num-shards', '8'])
  manifest = run_contract.read_manifest(transformed)
  files = input_lib.split_files(transformed, manifest, 'train')
  spec = tft.TFTransformOutput(transformed).transformed_feature_spec()
  label = input_lib.transformed_label_key(manifest, spec, transformed)
  contenders = {'trainer input (trainer/input.py)': trainer_input,
                'plain TFRecordDataset + parse_example': plain_baseline}
  rates = {name: [] for name in contenders}
  for _name, make in contenders.items():  # warm-up: file cache, graph tracing
    examples_per_second(make, files, spec, label, manifest.compression, 1)
  for _ in range(args.runs):
    for name, make in contenders.items():
      rate, n = examples_per_second(make, files, spec, label, manifest.compression, args.passes)
      rates[name].append(rate)
  names = list(contenders)
  ratios = [a / b for a, b in zip(rates[names[0]], rates[names[1]])]
  print(f'{n:,} examples a run ({len(files)} gzip shards x {args.passes} passes), batch {BATCH}, '
        f'{args.runs} runs each, {os.cpu_count()} CPUs, TF {tf.__version__}')
  for name in names:
    print(f'  {name:40s} median {statistics.median(rates[name]):>10,.0f} examples/s  '
          f'(min {min(rates[name]):,.0f}, max {max(rates[name]):,.0f})')
  ratio = statistics.median(ratios)
  print(f'  ratio trainer/plain: median {ratio:.2f} (target >= 0.80: '
        f'{"met" if ratio >= 0.8 else "NOT met"})')


if __name__ == '__main__':
  main()
