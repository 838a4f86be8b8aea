"""The tabular pipeline against the ways TF Transform is usually run, and a single-process bound.

  .venv/bin/python benchmarks/tabular_pipeline.py [--rows 1000000] [--runs 3]
      [--contenders a,b,c,d] [--scale-rows 4000000 --scale-runs 3]     (or: make bench)

Contenders, all on the same seeded CSV (benchmarks/synthetic.py: 8 float columns, 4 string
columns of 1,000-4,000 values, an int label), all computing the same preprocessing_fn and writing
gzip TFRecords of tf.train.Example, all on Beam's in-process runner with one worker:
  (a) the tutorial pipeline: ReadFromText line by line, each line parsed into an instance dict,
      AnalyzeAndTransformDataset on instance dicts, ExampleProtoCoder, WriteToTFRecord;
  (b) TF Transform's recommended TFXIO path: CsvTFXIO, RecordBatches, output_record_batches=True,
      EncodeTransformedDataset, WriteToTFRecord;
  (c) this project: `python -m pipelines.tabular` with its defaults;
  (d) the single-process lower bound: pyarrow CSV read, numpy exact mean/std/quantiles and
      vocabularies, tfx_bsl's RecordBatchToExamplesEncoder, tf.io.TFRecordWriter.
Each run is a separate process, timed as a whole command; peak RSS is the largest total resident set
of that process and its children at one time (sampled every 100 ms from /proc, and never below the
largest single process's own peak). Runs go round the contenders; medians are reported. With
--scale-rows, (c) also runs on that many rows with 1 and 2 workers (multi-process) and its peak RSS
is compared with the --rows run.
"""

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # noqa: E402

MODULE = os.path.join(ROOT, 'benchmarks', 'synthetic.py')
GZIP_LEVEL = 1  # the level pipelines.tabular writes (with ISA-L's deflate; (d) uses TF's zlib)


def _transform_context(temp_dir):
  import tensorflow_transform.beam as tft_beam
  return tft_beam.Context(temp_dir=temp_dir)


def _pipeline():
  import apache_beam as beam
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  return beam.Pipeline(runner=FnApiRunner())


def _raw_schema(dataset=synthetic):
  from tensorflow_transform.tf_metadata import schema_utils
  return schema_utils.schema_from_feature_spec(dataset.RAW_FEATURE_SPEC)


def tutorial(csv_path, out):
  """(a) Per-line reads, a Python dict per row, instance-dict TFT, per-example encoding."""
  import apache_beam as beam
  import numpy as np
  import tensorflow_transform.beam as tft_beam
  from tensorflow_transform import coders
  from tensorflow_transform.tf_metadata import dataset_metadata

  columns = synthetic.CSV_COLUMNS

  def parse(line):
    values = next(csv.reader([line]))
    row = dict(zip(columns, values))
    return {**{f: np.float32(row[f]) for f in synthetic.FLOATS},
            **{s: row[s].encode() for s in synthetic.STRINGS},
            synthetic.LABEL_KEY: np.int64(row[synthetic.LABEL_KEY])}

  metadata = dataset_metadata.DatasetMetadata(_raw_schema())
  with _pipeline() as p, _transform_context(os.path.join(out, 'tmp')):
    rows = (p | beam.io.ReadFromText(csv_path, skip_header_lines=1) | beam.Map(parse))
    (data, transformed_metadata), transform_fn = (
        (rows, metadata) | tft_beam.AnalyzeAndTransformDataset(synthetic.preprocessing_fn))
    coder = coders.ExampleProtoCoder(transformed_metadata.schema)
    _ = (data | beam.Map(coder.encode)
         | beam.io.WriteToTFRecord(os.path.join(out, 'train'), file_name_suffix='.tfrecord.gz'))
    _ = transform_fn | tft_beam.WriteTransformFn(out)


def tfxio_path(csv_path, out, dataset=synthetic):
  """(b) TF Transform's recommended path: CsvTFXIO RecordBatches end to end into TFT (on the
  dataset module `dataset`: its CSV columns, raw feature spec and preprocessing_fn)."""
  import apache_beam as beam
  import tensorflow_transform.beam as tft_beam
  from tfx_bsl.public import tfxio

  source = tfxio.CsvTFXIO(csv_path, column_names=dataset.CSV_COLUMNS,
                          schema=_raw_schema(dataset), skip_header_lines=1,
                          telemetry_descriptors=['benchmark'])
  with _pipeline() as p, _transform_context(os.path.join(out, 'tmp')):
    raw = p | source.BeamSource()
    transformed, transform_fn = (
        (raw, source.TensorAdapterConfig())
        | tft_beam.AnalyzeAndTransformDataset(dataset.preprocessing_fn,
                                              output_record_batches=True))
    _ = (transformed | tft_beam.EncodeTransformedDataset()
         | beam.io.WriteToTFRecord(os.path.join(out, 'train'), file_name_suffix='.tfrecord.gz'))
    _ = transform_fn | tft_beam.WriteTransformFn(out)


def lower_bound(csv_path, out, chunk=65536):
  """(d) One process, no Beam, no TFT: exact statistics with numpy, the same encoder and file
  format. Writes train.tfrecord.gz and one vocabulary file per string column."""
  import numpy as np
  import pyarrow as pa
  import pyarrow.compute as pc
  import pyarrow.csv as pacsv
  import tensorflow as tf
  from tfx_bsl.coders import example_coder

  table = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(column_types={
      **{f: pa.float32() for f in synthetic.FLOATS}, **{s: pa.string() for s in synthetic.STRINGS},
      synthetic.LABEL_KEY: pa.int64()}))
  columns = {}
  for f in synthetic.FLOATS:
    x = table[f].to_numpy()
    mean, std = x.mean(dtype=np.float64), x.std(dtype=np.float64)
    columns[f'{f}_z'] = ((x - mean) / std).astype(np.float32)
    boundaries = np.quantile(x, np.arange(1, synthetic.NUM_BUCKETS) / synthetic.NUM_BUCKETS)
    columns[f'{f}_bucket'] = np.searchsorted(boundaries, x, side='right').astype(np.int64)
  os.makedirs(os.path.join(out, 'vocabularies'), exist_ok=True)
  for s in synthetic.STRINGS:
    counts = pc.value_counts(table[s]).flatten()
    values, freq = counts[0].to_numpy(zero_copy_only=False), counts[1].to_numpy()
    order = np.lexsort((-np.arange(len(values)), values))[::-1]  # by value, descending
    order = order[np.argsort(-freq[order], kind='stable')]  # then by count, descending
    vocab = values[order]
    with open(os.path.join(out, 'vocabularies', s), 'w') as f:
      f.write('\n'.join(vocab) + '\n')
    ids = pc.index_in(table[s], value_set=pa.array(vocab)).to_numpy(zero_copy_only=False)
    columns[f'{s}_id'] = np.where(np.isnan(ids), len(vocab), ids).astype(np.int64)
  columns[synthetic.LABEL_KEY] = table[synthetic.LABEL_KEY].to_numpy()
  names = sorted(columns)
  schema = None
  options = tf.io.TFRecordOptions(compression_type='GZIP', compression_level=GZIP_LEVEL)
  with tf.io.TFRecordWriter(os.path.join(out, 'train.tfrecord.gz'), options) as writer:
    for start in range(0, table.num_rows, chunk):
      arrays = []
      for name in names:
        values = pa.array(columns[name][start:start + chunk])
        offsets = pa.array(np.arange(len(values) + 1, dtype=np.int64))
        arrays.append(pa.LargeListArray.from_arrays(offsets, values))
      batch = pa.RecordBatch.from_arrays(arrays, names)
      if schema is None:
        schema = _transformed_schema(batch)
      for example in example_coder.RecordBatchToExamplesEncoder(schema).encode(batch):
        writer.write(example)


def _transformed_schema(batch):
  import tensorflow as tf
  from tensorflow_transform.tf_metadata import schema_utils
  types = {'float': tf.float32, 'int64': tf.int64}
  return schema_utils.schema_from_feature_spec({
      field.name: tf.io.FixedLenFeature([], types[str(field.type.value_type)])
      for field in batch.schema})


def _our_command(csv_path, out, workers=None):
  """(c) The project's pipeline, as a user runs it."""
  argv = [sys.executable, '-m', 'pipelines.tabular', '--transforms', MODULE, '--train', csv_path,
          '--output', out, '--overwrite']
  if workers:
    argv += [f'--direct_num_workers={workers}', '--direct_running_mode=multi_processing']
  return argv


CONTENDERS = {'a': tutorial, 'b': tfxio_path, 'd': lower_bound}
NAMES = {'a': '(a) tutorial: ReadFromText + instance dicts',
         'b': '(b) TFT recommended: CsvTFXIO + RecordBatches',
         'c': '(c) pipelines.tabular, defaults',
         'd': '(d) lower bound: pyarrow + numpy, 1 process'}

_TIMED = r'''
import os, resource, subprocess, sys, threading, time

PAGE_KIB = os.sysconf('SC_PAGE_SIZE') // 1024

def tree(root):
  """{pid: resident KiB} of `root` and its descendants now (Linux /proc: each process's parent
  and resident pages, fields 4 and 24 of /proc/PID/stat)."""
  children, rss = {}, {}
  for pid in os.listdir('/proc'):
    if not pid.isdigit():
      continue
    try:
      with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):  # ended meanwhile
      continue
    children.setdefault(int(fields[1]), []).append(int(pid))
    rss[int(pid)] = int(fields[21]) * PAGE_KIB
  found, stack = {}, [root]
  while stack:
    pid = stack.pop()
    found[pid] = rss.get(pid, 0)
    stack.extend(children.get(pid, ()))
  return found

def pss(pid):
  """The proportional set size of `pid` in KiB (/proc/PID/smaps_rollup): its private pages,
  and each page it shares with other processes divided among them; 0 where unreadable."""
  try:
    with open(f'/proc/{pid}/smaps_rollup') as f:
      for line in f:
        if line.startswith('Pss:'):
          return int(line.split()[1])
  except OSError:
    pass
  return 0

# Reading a process's PSS walks its page tables under its memory map's lock: about 60 ms for a
# 4 GB process, which stalls its page faults meanwhile. Read every 0.1 s it slowed a 300-column
# run by a fifth or more, so it is read only where asked, and at most once a second while the
# tree's RSS is above what it was at the last read (the peak follows RSS's). RSS
# (/proc/PID/stat) costs nothing measurable.
WANT_PSS = os.environ.pop('BENCH_SAMPLE_PSS', '') == '1'
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
peak = [0, 0]  # the tree's summed RSS, its summed PSS
def sample():
  last, at_last = float('-inf'), 0
  while proc.poll() is None:
    found = tree(proc.pid)
    total = sum(found.values())
    now = time.perf_counter()
    if WANT_PSS and total > at_last and now - last >= 1.0:
      peak[1] = max(peak[1], sum(pss(pid) for pid in found))
      last, at_last = now, total
    peak[0] = max(peak[0], total)
    time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
code = proc.wait()
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print('RESULT', code, seconds, max(usage.ru_maxrss, peak[0]), usage.ru_utime + usage.ru_stime,
      peak[1])
'''


def timed(contender, csv_path, out, workers=None):
  """(seconds, peak RSS in MiB, CPU seconds of all its processes) of one run in a fresh
  process."""
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  if contender == 'c':  # the user's command itself, not through this script's imports
    command = _our_command(csv_path, out, workers)
  else:
    command = [sys.executable, os.path.abspath(__file__), '--run', contender, '--csv', csv_path,
               '--out', out]
  return timed_command(command, contender)


def timed_command(command, name, env=None, pss=False):
  """(seconds, peak RSS in MiB, CPU seconds of all its processes) of `command` run as a whole
  in a fresh process (with `env` added to the environment); exits naming `name` if it fails.
  The peak RSS is the largest total of the process tree's resident sets: pages that two of its
  processes map from the same file (TensorFlow's libraries in a child) count twice. With `pss`,
  also the tree's peak total PSS in MiB, which counts each shared page once, divided among the
  processes sharing it (sampled less often than RSS: its reads slow the command, see _TIMED)."""
  proc = subprocess.run([sys.executable, '-c', _TIMED] + command, capture_output=True, text=True,
                        cwd=ROOT, env={**os.environ, **(env or {}),
                                       'BENCH_SAMPLE_PSS': '1' if pss else '0'})
  # (c)'s summary goes to stdout too: only RESULT lines are read
  line = [out_line for out_line in proc.stdout.splitlines()
          if out_line.startswith('RESULT')][-1].split()
  if line[1] != '0':
    sys.exit(f'error: contender {name} failed:\n{proc.stderr[-3000:]}')
  result = (float(line[2]), int(line[3]) / 1024, float(line[4]))
  return (*result, int(line[5]) / 1024) if pss else result


def _row(name, seconds, rss, rows):
  return (f'  {name:48s} {statistics.median(seconds):8.1f} s'
          f' {rows / statistics.median(seconds):10,.0f} rows/s {statistics.median(rss):8.0f} MiB')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', type=int, default=1_000_000)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--contenders', default='a,b,c,d')
  parser.add_argument('--scale-rows', type=int, default=0,
                      help='also run (c) on this many rows with 1 and 2 workers')
  parser.add_argument('--scale-runs', type=int, default=3)
  parser.add_argument('--run', choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
  parser.add_argument('--csv', help=argparse.SUPPRESS)
  parser.add_argument('--out', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.run:  # one contender, in this process (timed by the parent)
    CONTENDERS[args.run](args.csv, args.out)
    # The work is done and written. Skip interpreter teardown: with instance-dict TF Transform
    # (a), TensorFlow objects crashed the garbage collector at exit here (SIGSEGV).
    sys.stdout.flush()
    os._exit(0)

  contenders = args.contenders.split(',')
  work = tempfile.mkdtemp(prefix='bench_tabular_')
  try:
    csv_path = os.path.join(work, f'rows_{args.rows}.csv')
    synthetic.write_csv(csv_path, args.rows)
    seconds = {c: [] for c in contenders}
    rss = {c: [] for c in contenders}
    for run in range(args.runs):
      for c in contenders:
        s, m, _ = timed(c, csv_path, os.path.join(work, 'out'))
        seconds[c].append(s)
        rss[c].append(m)
        print(f'run {run + 1} {c}: {s:7.1f} s  {args.rows / s:9,.0f} rows/s  {m:6.0f} MiB',
              flush=True)
    print(f'\n{args.rows:,} rows x {len(synthetic.CSV_COLUMNS)} columns '
          f'({os.path.getsize(csv_path) / 2**20:.0f} MiB CSV), {os.cpu_count()} CPUs, '
          f'median of {args.runs} runs, each a whole command (start-up included)')
    for c in contenders:
      print(_row(NAMES[c], seconds[c], rss[c], args.rows))
    if 'c' in contenders:
      median = {c: statistics.median(seconds[c]) for c in contenders}
      for other, target in (('a', 10), ('b', 4)):
        if other in contenders:
          print(f'  (c) throughput / ({other}): {median[other] / median["c"]:.2f}x '
                f'(target >= {target}x)')
      if 'd' in contenders:
        print(f'  (c) wall time / (d): {median["c"] / median["d"]:.2f}x (target <= 2.5x)')

    if args.scale_rows:
      big = os.path.join(work, f'rows_{args.scale_rows}.csv')
      synthetic.write_csv(big, args.scale_rows)
      one, two, rss_big, cpu_one, cpu_two = [], [], [], [], []
      for run in range(args.scale_runs):
        s1, m1, c1 = timed('c', big, os.path.join(work, 'out'))
        s2, _, c2 = timed('c', big, os.path.join(work, 'out'), workers=2)
        one.append(s1)
        two.append(s2)
        rss_big.append(m1)
        cpu_one.append(c1)
        cpu_two.append(c2)
        print(f'scale run {run + 1}: 1 worker {s1:.1f} s ({m1:.0f} MiB, {c1:.1f} s CPU), '
              f'2 workers {s2:.1f} s ({c2:.1f} s CPU)', flush=True)
      print(f'\n(c) on {args.scale_rows:,} rows, median of {args.scale_runs} runs')
      print(f'  1 worker  {statistics.median(one):8.1f} s'
            f' {args.scale_rows / statistics.median(one):10,.0f} rows/s '
            f'{statistics.median(rss_big):8.0f} MiB, {statistics.median(cpu_one):.1f} s CPU '
            f'({statistics.median(cpu_one) / statistics.median(one):.2f} cores busy on average)')
      print(f'  2 workers {statistics.median(two):8.1f} s'
            f' {args.scale_rows / statistics.median(two):10,.0f} rows/s'
            f' {statistics.median(cpu_two):.1f} s CPU'
            ' (--direct_num_workers=2 --direct_running_mode=multi_processing)')
      print(f'  speed-up with 2 workers: {statistics.median(one) / statistics.median(two):.2f}x '
            '(target >= 1.6x)')
      if 'c' in contenders:
        print(f'  peak RSS {args.scale_rows:,} rows / {args.rows:,} rows: '
              f'{statistics.median(rss_big) / statistics.median(rss["c"]):.2f}x (target <= 1.3x)')
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
