"""The part every pipeline shares once its source has produced Arrow RecordBatches per split:
analyze the train split with TF Transform, transform every split, write the shards, the dead
letters and the counts; then run the job, check what it did and publish (or publish nothing).
"""

import logging
import os
import re
import shutil
import tempfile
import time
import traceback
import typing

import tensorflow_transform.beam as tft_beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.runner import PipelineState
from tensorflow_transform.tf_metadata import schema_utils
from tfx_bsl.public import tfxio
from tfx_bsl.tfxio import tensor_representation_util

from pipelines import analysis_cache, output_dir, report, stages, transform_graph, warm_session
from pipelines.runner import launch, progress
from pipelines.sinks import dead_letters
from pipelines.sources import reading
from transforms import command, run_contract
from transforms.errors import InternalError, UserError

_LOG = logging.getLogger('pipelines')


def adapter_config(arrow_schema, feature_spec):
  """The TFXIO TensorAdapterConfig of raw RecordBatches in `arrow_schema`, whose tensors TF
  Transform reads as `feature_spec` says (tfx_bsl infers them from its schema)."""
  schema = schema_utils.schema_from_feature_spec(feature_spec)
  return tfxio.TensorAdapterConfig(
      arrow_schema, tensor_representation_util.InferTensorRepresentationsFromSchema(schema))


def plan_splits(args, input_bytes):
  """(splits, {split: shards}) from the flags and {split: bytes of its inputs}."""
  splits = ['train'] + (['eval'] if args.eval or args.eval_fraction else [])
  if args.eval_fraction:
    input_bytes = dict(input_bytes, eval=input_bytes['train'] * args.eval_fraction)
  return splits, {s: args.num_shards or output_dir.auto_num_shards(input_bytes[s]) for s in splits}


class Job(typing.NamedTuple):
  pipeline: object  # beam.Pipeline
  spill: object  # reading.Spill or None
  cache: object  # analysis_cache.Plan or None


def build(beam_args, out, source, units, args, preprocessing_fn, adapter_config, shards,
          cache=None, **context):
  """The whole job in a new pipeline of `beam_args` (stages.add_preprocessing, in a
  tft_beam.Context with `context` and out's temp dir). Returns a Job. `cache`: an
  analysis_cache.Request (--analysis-cache), planned here for the tracing mode the job uses.

  By default (--tracing graph), the preprocessing_fn is traced in TF Transform's graph mode
  (tf.compat.v1), and with TF2 behaviours (tf.function) where graph mode cannot trace it
  (TF2-only APIs such as tft.make_and_track_object): the job is then built again; --tracing tf2
  asks for TF2 behaviours at once. Both give the same outputs, floats to within their last bit
  or two (tests/test_tabular_pipeline.py). With TF2 behaviours, TF Transform traces the function
  four times (to build the analysis, twice more to write the transform graph, once for its
  metadata) and saves and loads each phase's SavedModel through tf.function; graph mode traces
  it once and copies graphs. A 1,000-row census run took 19.7 s with TF2 behaviours and 13.4 s
  in graph mode here (medians of 5, benchmarks/small_run.py), one trace of a 300-column
  preprocessing_fn 10.5 s against 6.0 s (benchmarks/RESULTS.md). Graph mode's transform graph,
  a TF1 SavedModel, is rewritten as a TF2 one (pipelines/transform_graph), so that readers get
  the format TF2 behaviours give. Where graph mode cannot trace the function and TF2 cannot
  either, TF2's error is the one reported.
  """

  def build_job(graph_mode):
    pipeline = launch.make_pipeline(beam_args)
    with tft_beam.Context(temp_dir=out.tmp, force_tf_compat_v1=graph_mode, **context):
      plan = plan_cache(cache, out, preprocessing_fn, adapter_config, graph_mode)
      spill = make_spill(pipeline, out) if plan is None else None
      stages.add_preprocessing(pipeline, source, units, args.eval_fraction, preprocessing_fn,
                               adapter_config, out, shards, args.compression, spill, plan)
    return Job(pipeline, spill, plan)

  if args.tracing == 'graph':
    try:
      return build_job(True)
    except stages.TraceError as e:
      cause = e.__cause__ or e
      _LOG.info('the preprocessing_fn does not trace in graph mode (%s: %s); tracing it with '
                'TF2 behaviours', type(cause).__name__, output_dir.error_cause(cause, limit=200))
  return build_job(False)


def plan_cache(request, out, preprocessing_fn, adapter_config, graph_mode):
  """The analysis_cache.Plan of a Request (None without one); a preprocessing_fn that does not
  trace is a stages.TraceError, as when the job traces it."""
  if request is None:
    return None
  from tfx_bsl.tfxio import tensor_adapter
  specs = tensor_adapter.TensorAdapter(adapter_config).OriginalTypeSpecs()
  try:
    traced = analysis_cache.trace(preprocessing_fn, specs, graph_mode)
  except Exception as e:  # the user's function, as stages.AnalyzeTrain reports it
    raise stages.TraceError(stages.traced_failure(e, out)) from e
  plan = analysis_cache.plan(request, output_dir.join(out.staging, 'analysis_cache'),
                             preprocessing_fn, specs, graph_mode, traced)
  _LOG.info('analysis cache %s: %d of %d spans cached, %d to read', request.directory,
            len(plan.cached), len(plan.spans), len(plan.to_read))
  return plan


def make_spill(pipeline, out):
  """A reading.Spill for the train split's two reads, in a local directory of this run, where
  the pipeline's workers share this machine's disk (Beam's in-process runner, in one process or
  several); None elsewhere. run_and_check removes the directory."""
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  if not isinstance(pipeline.runner, FnApiRunner) or launch.is_dry_run(pipeline):
    return None
  if FileSystems.get_scheme(out.staging) is None:  # a plain local path
    directory = os.path.join(out.staging, 'spill')
  else:
    directory = tempfile.mkdtemp(prefix='spill-')
  return reading.Spill(directory, writes=True)


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


# What a bug of the project raises; a TensorFlow error, a file system's or a lost worker's is about
# the user's preprocessing_fn, data or machine, whatever code it passed through.
_BUG_TYPES = ('AttributeError', 'KeyError', 'TypeError', 'NameError', 'IndexError',
              'AssertionError', 'UnboundLocalError', 'ZeroDivisionError', 'NotImplementedError',
              'RecursionError')
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROJECT_CODE = tuple(os.path.join(_PROJECT, d) + os.sep for d in ('pipelines', 'trainer')) + tuple(
    os.path.join(_PROJECT, 'transforms', f) for f in ('contract.py', 'command.py', 'errors.py',
                                                      'run_contract.py'))
# A frame of a traceback as text (one that came back from a worker process): its file and line.
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def internal_failure(error):
  """'file:line' of this project's code where a failed job raised a bug's error type, or None
  when the failure is not the project's (the user's function or data, a file system, a worker
  lost). In-process the error keeps its type and traceback; from a worker process it is text that
  holds the worker's traceback."""
  frames = [(f.filename, f.lineno) for f in traceback.extract_tb(error.__traceback__)]
  name = type(error).__name__
  text = str(error)
  if _FRAME.search(text):  # the worker's own traceback, inside the error's message
    frames = [(path, int(line)) for path, line in _FRAME.findall(text)]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raised = [line.split(':', 1)[0] for line in lines
              if re.match(r'^[\w.]+(Error|Exception)\b', line)]
    name = raised[-1].rsplit('.', 1)[-1] if raised else name
  if name not in _BUG_TYPES or not frames:
    return None
  path, line = frames[-1]
  if not os.path.abspath(path).startswith(_PROJECT_CODE):
    return None
  return f'{os.path.relpath(path, _PROJECT)}:{line}'


def _check_bad_rows(split, counts, limit, out, what):
  count, share = limit
  allowed = count if count is not None else int(share * counts['rows_read'])
  rejected = counts['rows_rejected']
  if rejected > allowed:
    reasons = ', '.join(f'{k}: {v}' for k, v in counts['rejected_by_kind'].items())
    raise UserError(
        f'{split}: {rejected} of {counts["rows_read"]} {what} rejected ({reasons}), more than '
        f'--max-bad-rows allows ({allowed}); see {out.errors_path(split)}; nothing was published')


def run_and_check(pipeline, out, splits, max_bad_rows, what='rows', spill=None,
                  main_split='train'):
  """Runs the job; returns {split: counts} of a successful run, or None for a dry run.
  `main_split`: the split that must not be empty (train; a transform-only run's own).

  Any failure is one line and leaves DIR as it was (nothing published): an InternalError where
  the project's own code failed (internal_failure), a UserError otherwise.
  """
  command.settle_before_run()
  state = None
  try:
    with progress.Reporter(pipeline, what):
      state = pipeline.run().wait_until_finish()
  except Exception as e:  # a worker's failure (often the user's preprocessing_fn)
    where = internal_failure(e)
    if where:
      raise InternalError(f'the pipeline failed in {where}: {out.failure(e)}') from e
    raise UserError(out.failure(e)) from e
  finally:
    if state != PipelineState.DONE:  # the job failed: nothing of it is published
      transform_graph.kill_background()
    warm_session.drop()  # a transform graph's session its transform did not take
    transform_graph.release_prepared()  # a rewrite's child that no rewrite took
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
  if not counts[main_split]['rows_read']:
    flag = '--train' if main_split == 'train' else '--input'
    raise UserError(f'{flag}: no {what} were read from its inputs (files without '
                    f'{what} in them?); give inputs with data; nothing was published')
  if 'eval' in counts and not counts['eval']['rows_read']:
    raise UserError(f'the eval split is empty: its --eval inputs hold no {what} (or '
                    f'--eval-fraction carved none out of too few {what}); give inputs '
                    'with data or a larger fraction; nothing was published')
  try:
    for split, c in counts.items():
      _check_bad_rows(split, c, max_bad_rows, out, what)
  except UserError:  # what was rejected, before the one line that says the run failed
    print('\n'.join(['dead letters:'] + dead_letters.dead_letter_lines(
        {split: c['rejected_by_kind'] for split, c in counts.items()}, out.errors_path, what)))
    raise
  return counts


def split_entries(counts, shards, compression):
  """The manifest's splits: counts, shard pattern and shard count of each split."""
  return {split: run_contract.SplitEntry(
      **c, files=run_contract.shard_pattern(split, shards[split], compression),
      num_shards=shards[split]) for split, c in counts.items()}


def save_label_inverse(out, inverse_label_fn):
  """The dataset module's inverse_label_fn as a SavedModel beside the transform graph
  (DIR/label_inverse), so that the trainer attaches it to the export with TensorFlow alone,
  without importing the dataset module; returns its name in DIR, or None without one. Called
  once the staging area exists and before the job is built, so that a function that cannot be
  traced fails the run at its start."""
  if inverse_label_fn is None:
    return None
  import tensorflow as tf

  module = tf.Module()
  module.inverse = tf.function(lambda y: tf.cast(inverse_label_fn(y), tf.float32),
                               input_signature=[tf.TensorSpec([None], tf.float32, name='y')])
  try:
    module.inverse.get_concrete_function()
  except Exception as e:  # the user's function: one line naming it
    raise UserError(f'inverse_label_fn(y) cannot be traced for a float32 [batch] y: '
                    f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}; '
                    'write it with TensorFlow ops (tf.exp(y), y * 1000.0, ...)') from e
  tf.saved_model.save(module, output_dir.join(out.out, run_contract.LABEL_INVERSE))
  return run_contract.LABEL_INVERSE


def publish(out, args, argv, beam_args, started, what='rows', cache=None, reference=None,
            **entries):
  """Publishes the result with its run_contract.Manifest (the pipeline's own `entries`, and what
  every pipeline records) and prints the summary; returns the published Manifest. `cache`: the
  run's analysis_cache.Plan, whose new spans go into the cache first (they are as complete as
  the result, and the staging area they are in goes with its publication). `reference`: a
  transform-only run's earlier run, whose train statistics the report measures drift against."""
  if cache is not None:
    analysis_cache.publish(cache)
  manifest = run_contract.Manifest(
      **entries,
      analysis_cache=cache.summary() if cache is not None else None,
      eval_fraction=getattr(args, 'eval_fraction', 0.0),
      compression=args.compression,
      options={'argv': list(argv) if argv is not None else None, 'beam': beam_args},
      versions=output_dir.package_versions(),
      run_id=out.run_id,
      elapsed_seconds=round(time.time() - started, 1))
  manifest = report.write_report(out, manifest, report.Options.from_args(args), reference)
  transform_graph.wait_for_background()  # the TF2 rewrite, where it ran beside the job
  manifest = out.publish(manifest)
  print_summary(manifest, args.output, what)
  return manifest


def print_summary(manifest, directory, what='rows'):
  """What every successful run ends with: rows per split, rejects by reason with examples,
  elapsed time and throughput, and where the outputs are."""
  splits = manifest.splits
  seconds = manifest.elapsed_seconds
  read = sum(c.rows_read for c in splits.values())
  lines = [f'published {directory} in {seconds}s',
           f'  {"split":8s} {"read":>12s} {"written":>12s} {"rejected":>10s}']
  for split, c in splits.items():
    lines.append(f'  {split:8s} {c.rows_read:>12,} {c.rows_written:>12,} {c.rows_rejected:>10,}')
  lines.append(f'  {read:,} {what} read in {seconds}s: {read / max(seconds, 0.1):,.0f} {what}/s')

  def errors_path(split):
    return output_dir.join(directory, run_contract.errors_file(split))

  letters = dead_letters.dead_letter_lines(
      {split: c.rejected_by_kind for split, c in splits.items()}, errors_path, what)
  if letters:
    lines += ['dead letters:'] + letters
  if manifest.analysis_cache:
    lines += analysis_cache.summary_lines(manifest.analysis_cache)
  lines += [f'outputs in {directory}:',
            '  shards        ' + ', '.join(output_dir.join(directory, c.files)
                                          for c in splits.values()),
            f'  transform_fn  {output_dir.join(directory, run_contract.TRANSFORM_FN)}',
            '  errors        ' + ', '.join(errors_path(split) for split in splits)]
  if manifest.report:
    lines.append(f'  report        {output_dir.join(directory, manifest.report)} (statistics in '
                 f'{output_dir.join(directory, run_contract.STATISTICS)})')
  print('\n'.join(lines))
