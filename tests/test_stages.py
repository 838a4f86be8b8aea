"""The named stages of the Beam graph (pipelines/stages.py), each on inline data in a TestPipeline,
checked with Beam's assert_that and against numpy."""

import glob
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from tensorflow_transform.tf_metadata import schema_utils
from tfx_bsl.public import tfxio
from tfx_bsl.tfxio import tensor_representation_util

from pipelines import output_dir, stages, statistics
from pipelines.sources import csv_files, csv_layout, csv_rows
from transforms import contract as contract_lib
from transforms.errors import UserError

COLUMNS = (contract_lib.Column('x', 'float32', False, None),
           contract_lib.Column('color', 'string', False, ''))
FORMAT = csv_layout.CsvFormat(columns=COLUMNS, column_names=None)
SPEC = {'x': tf.io.FixedLenFeature([], tf.float32),
        'color': tf.io.FixedLenFeature([], tf.string)}
X = [1.0, 2.0, 4.0, 8.0, 16.0, 3.0]
COLORS = ['red', 'blue', 'red', 'green', 'red', 'blue']


def _pipeline():
  return test_pipeline.TestPipeline(
      runner=FnApiRunner(),
      options=beam.options.pipeline_options.PipelineOptions(['--no_pipeline_type_check']))


def _adapter_config():
  schema = schema_utils.schema_from_feature_spec(SPEC)
  return tfxio.TensorAdapterConfig(
      csv_rows.arrow_schema(FORMAT),
      tensor_representation_util.InferTensorRepresentationsFromSchema(schema))


def _batch(xs, colors):
  return pa.RecordBatch.from_arrays(
      [pa.array([[x] for x in xs], pa.large_list(pa.float32())),
       pa.array([[c.encode()] for c in colors], pa.large_list(pa.large_binary()))],
      schema=csv_rows.arrow_schema(FORMAT))


def _preprocessing_fn(inputs):
  return {'x_z': tft.scale_to_z_score(inputs['x']),
          'color_id': tft.compute_and_apply_vocabulary(inputs['color'], vocab_filename='color')}


def _source(units, split, eval_fraction, spill):
  return csv_files.ReadCsv(units, FORMAT, split, eval_fraction, 4, spill=spill)


def test_read_split_gives_rows_and_dead_letters(tmp_path):
  path = tmp_path / 'in.csv'
  path.write_text('x,color\n1.5,red\nnot-a-number,blue\n2.5,green\n')
  with _pipeline() as p:
    rows, carved, errors = p | 'ReadTrain' >> stages.ReadSplit(_source, [str(path)], 'train')
    assert carved is None
    assert_that(rows | beam.FlatMap(lambda b: b.column('x').to_pylist()),
                equal_to([[1.5], [2.5]]), label='rows')
    assert_that(errors | beam.Map(lambda e: (e['line'], e['kind'])),
                equal_to([(3, 'bad_number')]), label='errors')


def test_read_split_carves_the_eval_split(tmp_path):
  path = tmp_path / 'in.csv'
  path.write_text('x,color\n' + ''.join(f'{i}.0,c{i}\n' for i in range(200)))
  with _pipeline() as p:
    rows, carved, _ = p | stages.ReadSplit(_source, [str(path)], 'train', eval_fraction=0.3)
    counted = ((rows | 'TrainRows' >> beam.Map(lambda b: ('train', b.num_rows)),
                carved | 'EvalRows' >> beam.Map(lambda b: ('eval', b.num_rows)))
               | beam.Flatten() | beam.CombinePerKey(sum))

    def check(found):
      found = dict(found)
      assert found['train'] + found['eval'] == 200 and 30 < found['eval'] < 90, found

    assert_that(counted, check)


def test_analyze_transform_write_and_statistics(tmp_path):
  out = output_dir.OutputDir(str(tmp_path / 'out'))
  out.prepare()
  config = _adapter_config()
  with _pipeline() as p, tft_beam.Context(temp_dir=out.tmp):
    train = p | 'Train' >> beam.Create([_batch(X[:4], COLORS[:4]), _batch(X[4:], COLORS[4:])])
    errors = p | 'NoErrors' >> beam.Create([])
    transform_fn = train | 'AnalyzeTrain' >> stages.AnalyzeTrain(_preprocessing_fn, config, out)
    transformed = (train, errors) | 'TransformAndWriteTrain' >> stages.TransformAndWriteSplit(
        'train', transform_fn, config, out, 2, 'gzip')
    _ = (train, transformed) | 'StatisticsTrain' >> stages.SplitStatistics('train', out)
    # TF Transform gives (RecordBatch, passthrough features) pairs.
    values = transformed | beam.FlatMap(
        lambda t: zip(t[0].column('x_z').to_pylist(), t[0].column('color_id').to_pylist()))
    mean, std = np.mean(X), np.std(X)
    # The vocabulary orders by count, then by token: red 3, blue 2, green 1.
    ids = {'red': 0, 'blue': 1, 'green': 2}
    expected = [((x - mean) / std, ids[c]) for x, c in zip(X, COLORS)]

    def check(found):
      got = sorted((z[0] if isinstance(z, list) else z, i[0] if isinstance(i, list) else i)
                   for z, i in found)
      want = sorted(expected)
      assert [i for _, i in got] == [i for _, i in want]
      np.testing.assert_allclose([z for z, _ in got], [z for z, _ in want], rtol=1e-5)

    assert_that(values, check)
  shards = sorted(glob.glob(os.path.join(out.out, 'train-*-of-00002.tfrecord.gz')))
  assert len(shards) == 2
  examples = list(tf.data.TFRecordDataset(shards, compression_type='GZIP').as_numpy_iterator())
  assert len(examples) == len(X)
  assert out.read_counts('train') == {'rows_read': 6, 'rows_written': 6, 'rows_rejected': 0,
                                      'rejected_by_kind': {}}
  vocabulary = open(os.path.join(out.out, 'transform_fn', 'assets', 'color'), 'rb').read()
  assert vocabulary.split() == [b'red', b'blue', b'green']
  raw = statistics.read_statistics(statistics.statistics_path(out.out, 'train', 'raw'))
  assert raw.num_examples == len(X)
  [x_stats] = [f for f in raw.features if f.path.step[0] == 'x']
  assert x_stats.num_stats.mean == pytest.approx(np.mean(X), rel=1e-6)


def test_analyze_train_refuses_a_function_it_cannot_trace(tmp_path):
  out = output_dir.OutputDir(str(tmp_path / 'out'))
  out.prepare()
  with pytest.raises(UserError, match="the preprocessing_fn could not be traced: KeyError"):
    with _pipeline() as p, tft_beam.Context(temp_dir=out.tmp):
      train = p | beam.Create([_batch(X, COLORS)])
      _ = train | stages.AnalyzeTrain(lambda inputs: {'y': inputs['nope']}, _adapter_config(),
                                      out)
