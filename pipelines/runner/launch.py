"""Which Beam runner a job runs on, with which options; building the pipeline object."""

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from pipelines.runner import beam_patches


def pipeline_options(beam_args):
  """PipelineOptions from the flags this project does not know.

  Without an explicit --runner the job runs on Beam's in-process FnApiRunner. Beam's DirectRunner
  would first try to download the Prism runner binary, which is network at run time that nobody
  asked for (and fails offline); the FnApiRunner is what DirectRunner falls back to anyway, and it
  honours --direct_running_mode and --direct_num_workers.

  Beam's construction-time type checks are off unless asked for (--pipeline_type_check): they
  check this project's own, tested transforms, and on TF Transform's many small transforms they
  cost over a second of every run's start-up (measured with cProfile).

  SDK worker processes (multi-process, portable runners, Dataflow) import WORKER_PLUGIN first
  (Beam's --beam_plugins), so that they run with the same speed-ups as this process; not where
  the patches are off (beam_patches.ENV), where the workers run Beam as released.
  """
  beam_patches.keep_option_views()
  patched = beam_patches.enabled()
  beam_args = list(beam_args) + ([f'--beam_plugins={WORKER_PLUGIN}'] if patched else [])
  if not any(a.lstrip('-').split('=')[0] in ('pipeline_type_check', 'no_pipeline_type_check')
             for a in beam_args):
    beam_args.append('--no_pipeline_type_check')
  options = PipelineOptions(beam_args)
  if options.view_as(StandardOptions).runner is None:
    return options, _in_process_runner(options.view_as(SetupOptions).beam_plugins)
  return options, None


def _in_process_runner(plugins):
  """Beam's FnApiRunner, whose worker processes (--direct_running_mode=multi_processing) import
  `plugins`: it passes them no pipeline options of their own unless given them here, through
  Beam's private ExtendedProvisionInfo (beam_patches.PATCHES, 'plugins_for_local_workers').
  Where that does not apply (patches off, another Beam), or without plugins, Beam's own
  FnApiRunner(): its worker processes then run Beam as released."""
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner, fn_runner
  if not plugins or not beam_patches.applies('plugins_for_local_workers'):
    return FnApiRunner()
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.job import utils as job_utils
  return FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(
          retrieval_token='unused-retrieval-token',
          pipeline_options=job_utils.dict_to_struct({'beam_plugins': list(plugins)}))))


WORKER_PLUGIN = 'pipelines.runner.worker_plugin'


def make_pipeline(beam_args):
  options, runner = pipeline_options(beam_args)
  beam_patches.install_runner_patches()
  beam_patches.install_worker_speedups()
  return beam.Pipeline(runner=runner, options=options)


def is_dry_run(pipeline):
  return bool(pipeline.options.get_all_options().get('dry_run'))
