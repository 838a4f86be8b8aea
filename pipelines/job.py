"""The part every pipeline shares once its source has produced Arrow RecordBatches per split:
analyze the train split with TF Transform, transform every split, write the shards, the dead
letters and the counts; then run the job, check what it did and publish (or publish nothing).
"""

import logging
import os
import shutil
import tempfile
import time

import apache_beam as beam
import tensorflow_transform.beam as tft_beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.runner import PipelineState

from pipelines import output_dir, report, statistics, vocabulary
from pipelines.runner import launch, progress
from pipelines.sinks import dead_letters, row_counts, tfrecords
from pipelines.sources import reading
from transforms.errors import UserError
from transforms import command

_LOG = logging.getLogger('pipelines')


def add_split_flags(parser, what, inputs_help):
  """The flags every pipeline takes for its splits and its output. `what`: 'rows' or 'images'."""
  parser.add_argument('--train', required=True, nargs='+', action='extend',
                      help=f'{inputs_help} of the training split; may repeat')
  parser.add_argument('--eval', nargs='+', action='extend', default=None,
                      help='the same for the eval split, transformed with the train analysis')
  parser.add_argument('--eval-fraction', type=float, default=0.0,
                      help=f'with --train only: carve this share of {what} out as the eval split, '
                           'by a hash of each one\'s content (the same ones on every run)')
  parser.add_argument('--output', required=True, help='output directory (local or gs://...)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a complete result already in --output')
  parser.add_argument('--num-shards', type=int, default=None,
                      help='TFRecord shards per split (default: one per 256 MiB of input)')
  parser.add_argument('--compression', choices=('gzip', 'none'), default='gzip')
  parser.add_argument('--max-bad-rows', default='1%',
                      help=f'rejected {what} a split may have before the run fails: a count or a '
                           f'percentage of {what} read (default 1%%)')
  report.add_flags(parser)


def check_split_flags(parser, args):
  """Checks the flags of add_split_flags; sets args.max_bad_rows_limit."""
  if args.eval and args.eval_fraction:
    parser.error('give either --eval or --eval-fraction, not both')
  if not 0 <= args.eval_fraction < 1:
    parser.error(f'--eval-fraction {args.eval_fraction}: must be in [0, 1)')
  if args.num_shards is not None and args.num_shards < 1:
    parser.error(f'--num-shards {args.num_shards}: must be at least 1 (or leave it out)')
  args.max_bad_rows_limit = output_dir.parse_max_bad_rows(args.max_bad_rows)


def plan_splits(args, input_bytes):
  """(splits, {split: shards}) from the flags and {split: bytes of its inputs}."""
  splits = ['train'] + (['eval'] if args.eval or args.eval_fraction else [])
  if args.eval_fraction:
    input_bytes = dict(input_bytes, eval=input_bytes['train'] * args.eval_fraction)
  return splits, {s: args.num_shards or output_dir.auto_num_shards(input_bytes[s]) for s in splits}


def make_spill(pipeline, out):
  """A reading.Spill for the train split's two reads, in a local directory of this run, where
  the pipeline's workers share this machine's disk (Beam's in-process runner, in one process or
  several); None elsewhere. run_and_check removes the directory."""
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # pylint: disable=import-outside-toplevel
  if not isinstance(pipeline.runner, FnApiRunner) or launch.is_dry_run(pipeline):
    return None
  if FileSystems.get_scheme(out.staging) is None:  # a plain local path
    directory = os.path.join(out.staging, 'spill')
  else:
    directory = tempfile.mkdtemp(prefix='spill-')
  return reading.Spill(directory, writes=True)


def read_splits(pipeline, read, units, eval_fraction, name, spill=None):
  """Reads every split with `read(units, split, eval_fraction, spill)`, a source PTransform
  returning (RecordBatches, carved eval RecordBatches or None, dead letters). Returns ({split:
  batches}, {split: dead letters}, a second read of the train split for the analysis alone).
  With `spill` (make_spill), the analysis's read keeps what it read for the other read of the
  train split, which runs after it (reading.Spill)."""
  raw, errors = {}, {}
  raw['train'], carved_eval, errors['train'] = pipeline | f'ReadTrain{name}' >> read(
      units['train'], 'train', eval_fraction, spill and spill.replaying())
  if eval_fraction:
    raw['eval'] = carved_eval
    errors['train'], errors['eval'] = (
        errors['train'] | 'SplitErrors' >> beam.Partition(
            lambda e, _: int(e['split'] == 'eval'), 2))
  elif 'eval' in units:
    raw['eval'], _, errors['eval'] = pipeline | f'ReadEval{name}' >> read(
        units['eval'], 'eval', 0.0, None)
  # The analysis reads the train split again (see transform_and_write); only the rows and dead
  # letters of the read above are counted.
  analyze, _, _ = pipeline | f'ReadTrain{name}ForAnalysis' >> read(
      units['train'], 'train', eval_fraction, spill)
  raw = {split: progress.count_batches(batches, 'transform', split)
         for split, batches in raw.items()}
  return raw, errors, progress.count_batches(analyze, 'analyze', 'train')


def check_remote_paths(beam_args, output, paths):
  """Dataflow workers cannot see this machine's disk: local paths would only fail once workers
  start (and bill); a dry run only builds the job, so it may use them. And --output must be on a
  file system TensorFlow knows too (TF Transform writes with it)."""
  output_dir.check_tensorflow_can_write(output)
  options, _ = launch.pipeline_options(beam_args)
  runner = str(options.view_as(StandardOptions).runner or '').lower()
  if 'dataflow' not in runner or options.get_all_options().get('dry_run'):
    return
  local = [p for p in [output] + list(paths) if '://' not in p]
  if local:
    raise UserError(f'{local[0]}: DataflowRunner workers cannot read local paths; put '
                           'inputs and --output on gs:// (or add --dry_run=True to only build)')


def transform_and_write(raw, errors, analyze, adapter_config, preprocessing_fn, out, shards,
                        compression):
  """Adds TFT and the sinks to the pipeline of `raw` ({split: PCollection of RecordBatches}) and
  `errors` ({split: PCollection of dead-letter dicts}).

  `analyze` is a second read of the train split, for the analysis alone. On Beam's local
  runners a PCollection that two stages consume (analysis, then transform once the analysis is
  done) is held in memory in full between them; reading the input twice keeps memory flat
  whatever the data size, and costs less time than holding it (benchmarks/tabular_pipeline.py).
  Where the workers share this machine's disk, the second read does not parse again: it gives
  what the analysis's read spilled to disk (read_splits, reading.Spill).
  """
  vocabulary.install()
  try:  # TF Transform traces the preprocessing_fn here, while the graph is built
    transform_fn = ((analyze, adapter_config)
                    | 'AnalyzeTrain' >> tft_beam.AnalyzeDataset(preprocessing_fn))
  except Exception as e:  # the user's function (a wrong key, an op on the wrong type, ...)
    raise UserError(traced_failure(e, out)) from e
  transformed = {}
  for split in raw:
    transformed[split] = (
        ((raw[split], adapter_config), transform_fn)
        | f'Transform{split.capitalize()}' >> tft_beam.TransformDataset(
            output_record_batches=True))
  _ = transform_fn | 'WriteTransformFn' >> tft_beam.WriteTransformFn(out.out)
  statistics.add_statistics(raw, transformed, out)

  for split in raw:
    label = split.capitalize()
    data, metadata = transformed[split]
    written = data | f'Write{label}' >> tfrecords.WriteExamples(
        out.split_prefix(split), shards[split], compression, output_dir.join(out.tmp, 'parts', split),
        metadata)
    rejected = errors[split] | f'Write{label}Errors' >> dead_letters.WriteErrors(out.errors_path(split))
    rows_ok = (raw[split]
               | f'Rows{label}' >> beam.Map(lambda batch: batch.num_rows)
               | f'Sum{label}' >> beam.CombineGlobally(sum))
    _ = (rows_ok, written, rejected) | f'Count{label}' >> row_counts.WriteCounts(
        output_dir.join(out.counts, f'{split}.json'))


def traced_failure(error, out):
  """One line on a preprocessing_fn that TF Transform could not trace; the traceback is kept
  in the staging area, as for a failed job."""
  hint = ''
  if 'invalid dtype' in str(error):
    hint = ('; outputs must be int64, float32 or string tensors (tf.strings.length and '
            'tf.argmax give int32, for one): cast them, e.g. tf.cast(x, tf.int64)')
  return (f'the preprocessing_fn could not be traced: {type(error).__name__}: '
          f'{output_dir.error_cause(error)}{hint}; {out.keep_traceback(error)}; '
          'nothing was published')


def _check_bad_rows(split, counts, limit, out, what):
  count, share = limit
  allowed = count if count is not None else int(share * counts['rows_read'])
  rejected = counts['rows_rejected']
  if rejected > allowed:
    reasons = ', '.join(f'{k}: {v}' for k, v in counts['rejected_by_kind'].items())
    raise UserError(
        f'{split}: {rejected} of {counts["rows_read"]} {what} rejected ({reasons}), more than '
        f'--max-bad-rows allows ({allowed}); see {out.errors_path(split)}; nothing was published')


def run_and_check(pipeline, out, splits, max_bad_rows, what='rows', spill=None):
  """Runs the job; returns {split: counts} of a successful run, or None for a dry run.

  Any failure is one UserError line and leaves DIR as it was (nothing published).
  """
  command.settle_before_run()
  try:
    with progress.Reporter(pipeline, what):
      state = pipeline.run().wait_until_finish()
  except Exception as e:  # a worker's failure (often the user's preprocessing_fn)
    raise UserError(out.failure(e)) from e
  finally:
    if spill is not None:  # what a retried or unfinished read left
      shutil.rmtree(spill.directory, ignore_errors=True)
  if launch.is_dry_run(pipeline):
    out.discard()
    _LOG.info('dry run: the job was built and not run; nothing was written')
    return None
  if state != PipelineState.DONE:
    raise UserError(f'the pipeline ended in state {state}; nothing was published '
                           f'(staged files are in {out.staging})')
  counts = {split: out.read_counts(split) for split in splits}
  for split, c in counts.items():
    if c['rows_read'] != c['rows_written'] + c['rows_rejected']:
      raise RuntimeError(f'{split}: {what} read {c["rows_read"]} != written {c["rows_written"]} '
                         f'+ rejected {c["rows_rejected"]}; nothing was published')
  if not counts['train']['rows_read']:
    raise UserError(f'--train: no {what} were read from its inputs (files without '
                           f'{what} in them?); give inputs with data; nothing was published')
  if 'eval' in counts and not counts['eval']['rows_read']:
    raise UserError(f'the eval split is empty: its --eval inputs hold no {what} (or '
                           f'--eval-fraction carved none out of too few {what}); give inputs '
                           'with data or a larger fraction; nothing was published')
  try:
    for split, c in counts.items():
      _check_bad_rows(split, c, max_bad_rows, out, what)
  except UserError:  # what was rejected, before the one line that says the run failed
    print('\n'.join(['dead letters:'] + dead_letters.dead_letter_lines(counts, out.errors_path, what)))
    raise
  return counts


def split_entries(counts, shards, compression):
  """The manifest's 'splits': counts, shard pattern and shard count of each split."""
  suffix = '.tfrecord.gz' if compression == 'gzip' else '.tfrecord'
  return {split: dict(c, files=f'{split}-*-of-{shards[split]:05d}{suffix}',
                      num_shards=shards[split])
          for split, c in counts.items()}


def save_label_inverse(out, inverse_label_fn):
  """The dataset module's inverse_label_fn as a SavedModel beside the transform graph
  (DIR/label_inverse), so that the trainer attaches it to the export with TensorFlow alone,
  without importing the dataset module; returns its name in DIR, or None without one. Called
  once the staging area exists and before the job is built, so that a function that cannot be
  traced fails the run at its start."""
  if inverse_label_fn is None:
    return None
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  module = tf.Module()
  module.inverse = tf.function(lambda y: tf.cast(inverse_label_fn(y), tf.float32),
                               input_signature=[tf.TensorSpec([None], tf.float32, name='y')])
  try:
    module.inverse.get_concrete_function()
  except Exception as e:  # the user's function: one line naming it
    raise UserError(f'inverse_label_fn(y) cannot be traced for a float32 [batch] y: '
                           f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}; '
                           'write it with TensorFlow ops (tf.exp(y), y * 1000.0, ...)') from e
  tf.saved_model.save(module, output_dir.join(out.out, output_dir.LABEL_INVERSE))
  return output_dir.LABEL_INVERSE


def publish(out, manifest, args, argv, beam_args, started, what='rows'):
  """Adds what every pipeline records to the pipeline's own `manifest` (which has 'splits'),
  publishes the result and prints the summary; returns the published manifest."""
  manifest = dict(
      manifest,
      eval_fraction=args.eval_fraction,
      compression=args.compression,
      options={'argv': list(argv) if argv is not None else None, 'beam': beam_args},
      versions=output_dir.package_versions(),
      run_id=out.run_id,
      elapsed_seconds=round(time.time() - started, 1))
  manifest = out.publish(report.write_report(out, manifest, report.Options.from_args(args)))
  print_summary(manifest, args.output, what)
  return manifest


def print_summary(manifest, directory, what='rows'):
  """What every successful run ends with: rows per split, rejects by reason with examples,
  elapsed time and throughput, and where the outputs are."""
  splits = manifest['splits']
  seconds = manifest['elapsed_seconds']
  read = sum(c['rows_read'] for c in splits.values())
  lines = [f'published {directory} in {seconds}s',
           f'  {"split":8s} {"read":>12s} {"written":>12s} {"rejected":>10s}']
  for split, c in splits.items():
    lines.append(f'  {split:8s} {c["rows_read"]:>12,} {c["rows_written"]:>12,} '
                 f'{c["rows_rejected"]:>10,}')
  lines.append(f'  {read:,} {what} read in {seconds}s: {read / max(seconds, 0.1):,.0f} {what}/s')
  letters = dead_letters.dead_letter_lines(splits, lambda split: output_dir.join(directory, 'errors',
                                                                 f'{split}.jsonl'), what)
  if letters:
    lines += ['dead letters:'] + letters
  lines += [f'outputs in {directory}:',
            '  shards        ' + ', '.join(output_dir.join(directory, c['files'])
                                          for c in splits.values()),
            f'  transform_fn  {output_dir.join(directory, "transform_fn")}',
            '  errors        ' + ', '.join(output_dir.join(directory, 'errors', f'{split}.jsonl')
                                          for split in splits)]
  if manifest.get('report'):
    lines.append(f'  report        {output_dir.join(directory, manifest["report"])} (statistics in '
                 f'{output_dir.join(directory, "statistics")})')
  print('\n'.join(lines))
