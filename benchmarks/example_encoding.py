"""The examples sink's numpy encoder of tf.train.Example against tfx_bsl's, side by side.

  .venv/bin/python benchmarks/example_encoding.py [--runs 7]        (or: make bench-encode)

Two batch shapes, as TF Transform hands them to the sink (large_list columns, one value per row):
  wide:   351 features x 10,000 rows (200 z-scored floats, 50 bucket ids, 100 vocabulary ids,
          a label), the outputs of benchmarks/wide.py at 300 columns;
  narrow: 21 features x 65,536 rows (8 floats, 8 bucket ids, 4 vocabulary ids, a label), a batch
          of the default --rows-per-batch.
Each round times, in turn, pipelines/sinks/example_encoding.encode and tfx_bsl's
RecordBatchToExamplesEncoder.encode on the same batch (one thread, nothing else running), and
the ratio is taken per round; medians are printed. Before timing, every record of both is
parsed and compared (the same Examples, the same lengths).
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.sinks import example_encoding


def _column(values):
  offsets = pa.array(np.arange(len(values) + 1, dtype=np.int64))
  return pa.LargeListArray.from_arrays(offsets, pa.array(values))


def _batch(rows, floats, buckets, ids, seed=0):
  rng = np.random.default_rng(seed)
  columns, names = [], []
  for i in range(floats):
    columns.append(_column(rng.normal(size=rows).astype(np.float32)))
    names.append(f'num_{i:03d}_z')
  for i in range(buckets):
    columns.append(_column(rng.integers(0, 10, rows)))
    names.append(f'num_{i:03d}_bucket')
  for i in range(ids):
    columns.append(_column(rng.zipf(1.3, rows) % 2001))
    names.append(f'cat_{i:03d}_id')
  columns.append(_column(rng.integers(0, 2, rows)))
  names.append('label')
  return pa.RecordBatch.from_arrays(columns, names)


def _check(batch, reference):
  from tensorflow.core.example import example_pb2
  ours, theirs = example_encoding.encode(batch), reference.encode(batch)
  assert ours is not None and len(ours) == len(theirs)
  for mine, other in zip(ours, theirs):
    assert len(mine) == len(other)
    assert example_pb2.Example.FromString(mine) == example_pb2.Example.FromString(other)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', type=int, default=7)
  args = parser.parse_args()
  from tfx_bsl.coders import example_coder
  reference = example_coder.RecordBatchToExamplesEncoder()
  shapes = {'wide (351 features x 10,000 rows)': _batch(10_000, 200, 50, 100),
            'narrow (21 features x 65,536 rows)': _batch(65_536, 8, 8, 4)}
  print(f'{args.runs} rounds each, medians; one thread')
  for name, batch in shapes.items():
    _check(batch, reference)
    ours, theirs, ratios = [], [], []
    for _ in range(args.runs):
      start = time.perf_counter()
      example_encoding.encode(batch)
      ours.append(time.perf_counter() - start)
      start = time.perf_counter()
      reference.encode(batch)
      theirs.append(time.perf_counter() - start)
      ratios.append(theirs[-1] / ours[-1])
    print(f'  {name}: example_encoding {statistics.median(ours) * 1e3:7.1f} ms, tfx_bsl '
          f'{statistics.median(theirs) * 1e3:7.1f} ms, tfx_bsl / ours '
          f'{statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})')


if __name__ == '__main__':
  main()
