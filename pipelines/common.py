"""Plumbing shared by every pipeline: user errors, flags, and the Beam runner choice."""

import argparse
import logging
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions


# Side outputs of the sources' DoFns: dead-letter dicts, and rows carved out for the eval split.
ERRORS_TAG = 'errors'
EVAL_TAG = 'eval'


def read_units(pbegin, units, read_fn, carves_eval):
  """Work units (files, ranges, shards) -> (RecordBatches, carved eval RecordBatches or None,
  dead letters), read by `read_fn`, a DoFn with the ERRORS_TAG and EVAL_TAG side outputs."""
  outputs = (
      pbegin
      | 'ListUnits' >> beam.Create(list(units))
      # A unit is a file, a range of one or a shard: spread them over workers before reading.
      | 'SpreadUnits' >> beam.Reshuffle()
      | 'Read' >> beam.ParDo(read_fn).with_outputs(ERRORS_TAG, EVAL_TAG, main='rows'))
  return outputs.rows, (outputs[EVAL_TAG] if carves_eval else None), outputs[ERRORS_TAG]


class UserError(Exception):
  """A problem the user can fix (bad path, flag or data): shown as one line, exit status 2."""


def main(run):
  """Runs `run(argv)` as a command: user errors end in one line on stderr and exit 2."""
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  # TF and Beam log a lot at INFO; the pipeline's own progress lines are what a user wants to see.
  for noisy in ('apache_beam', 'tensorflow', 'absl', 'tensorflow_transform', 'tfx_bsl'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    run(sys.argv[1:])
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print('error: interrupted; nothing was published', file=sys.stderr)
    sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are UserErrors, so tests and `main` see them the same way."""

  def error(self, message):
    raise UserError(f'{self.prog}: {message}')


def pipeline_options(beam_args):
  """PipelineOptions from the flags this project does not know.

  Without an explicit --runner the job runs on Beam's in-process FnApiRunner. Beam's DirectRunner
  would first try to download the Prism runner binary, which is network at run time that nobody
  asked for (and fails offline); the FnApiRunner is what DirectRunner falls back to anyway, and it
  honours --direct_running_mode and --direct_num_workers.

  Beam's construction-time type checks are off unless asked for (--pipeline_type_check): they
  check this project's own, tested transforms, and on TF Transform's many small transforms they
  cost over a second of every run's start-up (measured with cProfile).
  """
  beam_args = list(beam_args)
  if not any(a.lstrip('-').split('=')[0] in ('pipeline_type_check', 'no_pipeline_type_check')
             for a in beam_args):
    beam_args.append('--no_pipeline_type_check')
  options = PipelineOptions(beam_args)
  if options.view_as(StandardOptions).runner is None:
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    return options, FnApiRunner()
  return options, None


def make_pipeline(beam_args):
  options, runner = pipeline_options(beam_args)
  _fail_instructions_of_lost_workers()
  return beam.Pipeline(runner=runner, options=options)


def _fail_instructions_of_lost_workers():
  """Where the job service runs in this process (the default FnApiRunner, PortableRunner with
  --job_endpoint=embed), Beam waits for an SDK worker's answer to an instruction without a
  timeout. A worker process that dies (killed, out of memory) while the runner waits for such an
  answer, or before the runner's next instruction, hangs the job forever: the worker's control
  stream ends with an error that nothing passes on. Passed on here, the job fails and says why,
  as Beam itself does for Docker workers that exit (DockerSdkWorkerHandler.watch_container)."""
  from apache_beam.runners.portability.fn_api_runner import worker_handlers
  connection = worker_handlers.ControlConnection
  if getattr(connection, '_fails_when_lost', False):
    return
  read, push = connection._read, connection.push

  def read_then_fail_the_rest(self):
    try:
      read(self)
      cause = 'its control stream ended'
    except Exception as e:  # the stream broke: passed on below, not printed by the thread
      cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
    # Set before failing what waits: an instruction pushed from now on fails at once.
    self._lost = RuntimeError('an SDK worker process stopped (killed, crashed or out of memory) '
                              f'while the job waited for it ({cause})')
    for future in list(self._futures_by_id.values()):
      future.abort(self._lost)

  def push_or_fail(self, request):
    future = push(self, request)
    if future is not None and getattr(self, '_lost', None):
      future.abort(self._lost)
    return future

  connection._read = read_then_fail_the_rest
  connection.push = push_or_fail
  connection._fails_when_lost = True


def is_dry_run(pipeline):
  return bool(pipeline.options.get_all_options().get('dry_run'))
