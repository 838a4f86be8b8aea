"""The whole Dataflow job built offline by Beam's DataflowRunner with --dry_run=True.

This is the check a user makes before paying for workers: the real runner translates the real
pipeline, builds the sdist from setup.py and prepares everything it would stage, and stops short of
submitting. Inputs and --output are local: the runner accepts them for building a job, and they
keep the test away from GCS, which the launcher would otherwise reach for to check --output.
"""

import sys
import tarfile
import tempfile

import pytest
from apache_beam.options.pipeline_options import GoogleCloudOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

from pipelines import output_dir, tabular
from pipelines.runner import launch
from tests.conftest import ADULT_TEST, ADULT_TRAIN, REPO, head_lines

# Connections attempted in this process while a dry run is watched (the sdist build and Beam's
# `pip freeze` are subprocesses, out of sight); None when nothing is watched. Audit hooks cannot be
# removed, so the hook stays installed and this switches it on and off.
_connections = None


def _audit(event, args):
  if _connections is not None and event in ('socket.connect', 'socket.getaddrinfo'):
    _connections.append((event, args[1] if event == 'socket.connect' else args[:2]))


sys.addaudithook(_audit)


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
  """Runs the dry run once and keeps the pipeline that `run` built, to look at what Beam made."""
  global _connections
  root = tmp_path_factory.mktemp('dataflow')
  train, test, out = root / 'train.csv', root / 'test.csv', root / 'out'
  train.write_bytes(b''.join(head_lines(ADULT_TRAIN, 300)))
  test.write_bytes(b''.join(head_lines(ADULT_TEST, 150)))
  # Beam builds the sdist and the other artifacts in a temp dir it never removes.
  beam_temp = root / 'beam_temp'
  beam_temp.mkdir()
  built, make_real = [], launch.make_pipeline

  def make_pipeline(beam_args):
    built.append(make_real(beam_args))
    return built[-1]

  _connections = []
  try:
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(launch, 'make_pipeline', make_pipeline)
      patch.setattr(tempfile, 'tempdir', str(beam_temp))
      result = tabular.run([
          '--transforms', 'transforms.census', '--train', str(train), '--eval', str(test),
          '--output', str(out),
          '--runner', 'DataflowRunner', '--project', 'test-project', '--region', 'us-central1',
          '--temp_location', 'gs://some-bucket/tmp', '--setup_file', str(REPO / 'setup.py'),
          '--dry_run=True'])
    connections = _connections
  finally:
    _connections = None
  [pipeline] = built
  return dict(result=result, out=out, pipeline=pipeline, connections=connections,
              beam_temp=beam_temp)


def test_nothing_is_run_or_left_behind(dry_run):
  assert dry_run['result'] is None
  assert not (dry_run['out'] / output_dir.MANIFEST).exists()
  # Not even the staging area or the directory itself: the run created both and removed them.
  assert not dry_run['out'].exists()


def test_offline(dry_run):
  assert dry_run['connections'] == []


def test_the_job_is_built_by_the_dataflow_runner(dry_run):
  runner = dry_run['pipeline'].runner
  assert isinstance(runner, DataflowRunner)
  assert runner.job.proto.name.startswith('beamapp-')
  options = runner.job.options.view_as(GoogleCloudOptions)
  assert (options.project, options.region) == ('test-project', 'us-central1')
  proto = runner.proto_pipeline
  [root] = proto.root_transform_ids
  steps = {proto.components.transforms[t].unique_name
           for t in proto.components.transforms[root].subtransforms}
  assert steps == {'ReadTrain', 'ReadTrainForAnalysis', 'ReadEval', 'AnalyzeTrain',
                   'TransformAndWriteTrain', 'TransformAndWriteEval', 'StatisticsTrain',
                   'StatisticsEval'}, steps
  # TF Transform's analysis is expanded into the job, not left to run at launch.
  assert any(t.unique_name.startswith('AnalyzeTrain/')
             for t in proto.components.transforms.values())


def _staged(proto):
  """{name on the workers: local file} for every artifact the job would stage."""
  staged = {}
  for env in proto.components.environments.values():
    for dep in env.dependencies:
      assert dep.type_urn == common_urns.artifact_types.FILE.urn
      assert dep.role_urn == common_urns.artifact_roles.STAGING_TO.urn
      name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(
          dep.role_payload).staged_name
      staged[name] = beam_runner_api_pb2.ArtifactFilePayload.FromString(dep.type_payload).path
  return staged


def test_the_sdist_of_setup_py_would_be_staged(dry_run):
  staged = _staged(dry_run['pipeline'].runner.proto_pipeline)
  sdist = staged['workflow.tar.gz']  # the name Dataflow workers install --setup_file's package by
  assert sdist.startswith(str(dry_run['beam_temp']))  # built by this dry run
  with tarfile.open(sdist) as tar:
    names = {n.split('/', 1)[1] for n in tar.getnames() if '/' in n}
  assert {'setup.py', 'pipelines/tabular.py', 'pipelines/sources/csv_files.py',
          'pipelines/output_dir.py', 'transforms/census.py', 'transforms/contract.py'} <= names
  assert not any(n.startswith(('data/', 'tests/')) for n in names)


def test_discard_leaves_an_existing_directory_as_it_was(tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  out = output_dir.OutputDir(str(tmp_path))
  out.prepare()
  out.discard()
  assert [p.name for p in tmp_path.iterdir()] == ['notes.txt']


def test_discard_keeps_failed_runs_staging_areas(tmp_path):
  failed = output_dir.OutputDir(str(tmp_path))
  failed.prepare()  # and never discarded, as after a failure
  out = output_dir.OutputDir(str(tmp_path))
  out.prepare()
  out.discard()
  assert [p.name for p in (tmp_path / output_dir.STAGING).iterdir()] == [failed.run_id]
