"""pipelines/transform_graph.py: graph mode's TF1 transform graph rewritten as a TF2 one.

A TF1 transform graph is made by TF Transform itself (graph mode, on Beam's in-process runner)
from a preprocessing_fn with dense, sparse and ragged inputs and outputs, vocabularies and
z-scores. The rewrite is checked against TF Transform's own application of the TF1 graph (its
tf.compat.v1 path, in a v1 graph), with and without some of the inputs; and a rewrite that fails
part way leaves the TF1 graph as it was, and nothing of the new one.
"""

import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from pipelines import transform_graph

SPEC = {'x': tf.io.FixedLenFeature([], tf.float32),
        'word': tf.io.FixedLenFeature([], tf.string),
        'tags': tf.io.VarLenFeature(tf.string),
        'label': tf.io.FixedLenFeature([], tf.int64)}


def preprocessing_fn(inputs):
  words = tf.strings.split(inputs['word'], sep='-')  # ragged
  return {
      'x_z': tft.scale_to_z_score(inputs['x']),
      'word_id': tft.compute_and_apply_vocabulary(inputs['word'], num_oov_buckets=1),
      'pieces': tft.compute_and_apply_vocabulary(words, vocab_filename='pieces'),
      'tag_ids': tft.compute_and_apply_vocabulary(inputs['tags'], vocab_filename='tags'),
      'x_times_label': inputs['x'] * tf.cast(inputs['label'], tf.float32),
      'label': inputs['label'],
  }


ROWS = [{'x': float(i) * 1.5, 'word': f'w{i % 7}-p{i % 3}', 'tags': [f't{i % 4}'] * (i % 3),
         'label': i % 2} for i in range(60)]


@pytest.fixture(scope='module')
def tf1_output(tmp_path_factory):
  """A transform output whose transform_fn is the TF1 SavedModel graph mode writes."""
  root = str(tmp_path_factory.mktemp('tf1'))
  metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(SPEC))
  with beam.Pipeline(runner=FnApiRunner()) as pipeline:
    with tft_beam.Context(temp_dir=os.path.join(root, 'tmp'), force_tf_compat_v1=True):
      transform_fn = ((pipeline | beam.Create(ROWS, reshuffle=False), metadata)
                      | tft_beam.AnalyzeDataset(preprocessing_fn))
      _ = transform_fn | tft_beam.WriteTransformFn(os.path.join(root, 'out'))
  out = os.path.join(root, 'out')
  assert transform_graph.tf1_meta_graph(os.path.join(out, 'transform_fn')) is not None
  return out


def _specs():
  """The batched TypeSpecs of SPEC, as tfx_bsl's TensorAdapter gives them to TF Transform."""
  return {'x': tf.TensorSpec([None], tf.float32), 'word': tf.TensorSpec([None], tf.string),
          'tags': tf.SparseTensorSpec([None, None], tf.string),
          'label': tf.TensorSpec([None], tf.int64)}


def _raw(rows, keys):
  raw = {}
  if 'x' in keys:
    raw['x'] = tf.constant([r['x'] for r in rows], tf.float32)
  if 'word' in keys:
    raw['word'] = tf.constant([r['word'] for r in rows])
  if 'tags' in keys:
    raw['tags'] = tf.sparse.from_dense(tf.ragged.constant(
        [r['tags'] for r in rows], dtype=tf.string).to_tensor(''))
    raw['tags'] = tf.sparse.retain(raw['tags'], tf.not_equal(raw['tags'].values, ''))
  if 'label' in keys:
    raw['label'] = tf.constant([r['label'] for r in rows], tf.int64)
  return raw


def _dense(value):
  if isinstance(value, tf.RaggedTensor):
    return value.to_list()
  if isinstance(value, tf.SparseTensor):
    return tf.sparse.to_dense(value).numpy().tolist()
  return value.numpy().tolist()


def _tf1_application(directory, keys):
  """TF Transform's own application of a TF1 transform graph: transform_raw_features inside a
  tf.compat.v1 graph, run in a session."""
  with tf.compat.v1.Graph().as_default():
    raw = _raw(ROWS[:20], keys)
    outputs = tft.TFTransformOutput(directory).transform_raw_features(raw)
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.tables_initializer())
      values = session.run(dict(outputs))
  result = {}
  for key, value in values.items():
    if isinstance(value, tf.compat.v1.SparseTensorValue):
      value = tf.sparse.to_dense(tf.SparseTensor(*value)).numpy()
    elif isinstance(value, tf.compat.v1.ragged.RaggedTensorValue):
      value = value.to_list()
    result[key] = value.tolist() if hasattr(value, 'tolist') else value
  return result


def test_the_rewrite_applies_eagerly_as_tf_transform_applies_the_tf1_graph(tf1_output, tmp_path):
  import shutil
  out = str(tmp_path / 'out')
  shutil.copytree(tf1_output, out)
  expected = {keys: _tf1_application(tf1_output, keys)
              for keys in (tuple(SPEC), ('x', 'word', 'tags'))}
  transform_graph.rewrite_as_tf2(out, _specs(), str(tmp_path))
  assert transform_graph.tf1_meta_graph(os.path.join(out, 'transform_fn')) is None
  assert sorted(os.listdir(tmp_path)) == ['out']  # nothing of the rewrite left beside it
  assets = sorted(os.listdir(os.path.join(out, 'transform_fn', 'assets')))
  assert assets == sorted(os.listdir(os.path.join(tf1_output, 'transform_fn', 'assets')))
  output = tft.TFTransformOutput(out)
  for keys, want in expected.items():
    got = output.transform_raw_features(_raw(ROWS[:20], keys))
    # Without the label, the outputs that need it are left out, as TF Transform's TF2 graphs do.
    assert sorted(got) == sorted(want), keys
    if 'label' not in keys:
      assert 'x_times_label' not in got and 'x_z' in got and 'pieces' in got
    for key, value in want.items():
      if isinstance(value, list) and value and isinstance(value[0], float):
        np.testing.assert_allclose(_dense(got[key]), value, rtol=1e-6)
      else:
        assert _dense(got[key]) == value, key
  assert isinstance(got['pieces'], tf.RaggedTensor)
  assert isinstance(got['tag_ids'], tf.SparseTensor)


def test_a_failed_rewrite_leaves_the_tf1_graph_and_nothing_else(tf1_output, tmp_path,
                                                                monkeypatch):
  import shutil
  out = str(tmp_path / 'out')
  shutil.copytree(tf1_output, out)
  before = {name: open(os.path.join(out, 'transform_fn', name), 'rb').read()
            for name in ('saved_model.pb',)}

  def fail(module, path, *args, **kwargs):
    os.makedirs(os.path.join(path, 'variables'))  # half written, then the failure
    raise OSError('disk full')

  monkeypatch.setattr(tf.saved_model, 'save', fail)
  with pytest.raises(OSError, match='disk full'):
    transform_graph.rewrite_as_tf2(out, _specs(), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['out']
  assert sorted(os.listdir(out)) == sorted(os.listdir(tf1_output))
  for name, content in before.items():  # the signature is back, byte for byte
    assert open(os.path.join(out, 'transform_fn', name), 'rb').read() == content
  assert transform_graph.tf1_meta_graph(os.path.join(out, 'transform_fn')) is not None


def _tf1_graph_with_a_variable(directory, extra_placeholder=False):
  """A TF1 transform graph (TF Transform's tag and signature names) whose output reads a
  variable, restored from its checkpoint: y = x * scale + 1, scale = 3; with
  `extra_placeholder`, the output also reads a placeholder that is not one of its inputs."""
  with tf.compat.v1.Graph().as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None], name='transform/inputs/x')
    scale = tf.compat.v1.get_variable('scale', initializer=3.0, use_resource=True)
    y = x * scale + 1.0
    if extra_placeholder:
      y += tf.compat.v1.placeholder_with_default(0.0, [], name='offset') + \
          tf.compat.v1.placeholder(tf.float32, [], name='unfed')
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      builder = tf.compat.v1.saved_model.builder.SavedModelBuilder(
          os.path.join(directory, 'transform_fn'))
      info = tf.compat.v1.saved_model.utils.build_tensor_info
      signature = tf.compat.v1.saved_model.signature_def_utils.build_signature_def(
          {'x': info(x)}, {'y': info(tf.identity(y, name='transform/y'))})
      builder.add_meta_graph_and_variables(session, [transform_graph.TF1_TAG], signature_def_map={
          transform_graph.TF1_SIGNATURE: signature})
      builder.save()


def test_a_variable_of_the_tf1_graph_is_read_in_the_rewritten_graph(tmp_path):
  out = str(tmp_path / 'out')
  _tf1_graph_with_a_variable(out)
  os.makedirs(tmp_path / 'tmp')
  transform_graph.rewrite_as_tf2(out, {'x': tf.TensorSpec([None], tf.float32)},
                                 str(tmp_path / 'tmp'))
  loaded = tf.saved_model.load(os.path.join(out, 'transform_fn'))
  got = loaded.transform_fn({'x': tf.constant([1.0, 2.0])})
  assert got['y'].numpy().tolist() == [4.0, 7.0]


def test_a_tf1_graph_that_reads_what_no_input_feeds_is_left_as_it_is(tmp_path):
  out = str(tmp_path / 'out')
  _tf1_graph_with_a_variable(out, extra_placeholder=True)
  os.makedirs(tmp_path / 'tmp')
  with pytest.raises(Exception, match='unfed'):  # TF's own error, naming the placeholder
    transform_graph.rewrite_as_tf2(out, {'x': tf.TensorSpec([None], tf.float32)},
                                   str(tmp_path / 'tmp'))
  assert transform_graph.tf1_meta_graph(os.path.join(out, 'transform_fn')) is not None
  assert os.listdir(tmp_path / 'tmp') == []


def _adapter_config(spec=SPEC):
  """The TensorAdapterConfig a pipeline gives the rewrite for `spec`'s raw RecordBatches."""
  import pyarrow as pa

  from pipelines import job
  types = {tf.float32: pa.float32(), tf.string: pa.large_binary(), tf.int64: pa.int64()}
  arrow = pa.schema([(name, pa.large_list(types[f.dtype])) for name, f in spec.items()])
  return job.adapter_config(arrow, spec)


@pytest.mark.parametrize('started', ['fresh', 'prepared', 'prepared, died'])
def test_a_rewrite_in_a_child_process_gives_the_inline_rewrite(tf1_output, tmp_path, started):
  """stages.AnalyzeTrain's rewrite where the job runs in this process: a child process rewrites
  the graph while the job goes on; wait_for_background gives the same graph as inline. The
  child started for it ahead (prepare_child, as the binding does) takes it; where that one died
  before, a fresh one does."""
  import shutil
  inline, child = str(tmp_path / 'inline'), str(tmp_path / 'child')
  for out in (inline, child):
    shutil.copytree(tf1_output, out)
  os.makedirs(tmp_path / 'tmp')
  prepared = None
  if started != 'fresh':
    transform_graph.prepare_child()
    prepared = transform_graph._PREPARED['child'].process
    if started == 'prepared, died':
      prepared.kill()
      prepared.wait()
  transform_graph.start_in_background(child, _adapter_config(), str(tmp_path / 'tmp'))
  (running,) = transform_graph._RUNNING.values()
  assert (running.process is prepared) == (started == 'prepared')
  transform_graph.rewrite_as_tf2(inline, _specs(), str(tmp_path))
  transform_graph.wait_for_background()
  assert transform_graph.tf1_meta_graph(os.path.join(child, 'transform_fn')) is None
  assert os.listdir(tmp_path / 'tmp') == []
  raw = _raw(ROWS[:20], tuple(SPEC))
  want = tft.TFTransformOutput(inline).transform_raw_features(raw)
  got = tft.TFTransformOutput(child).transform_raw_features(raw)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(_dense(got[key]), dtype=object),
                                  np.asarray(_dense(value), dtype=object), err_msg=key)


def test_a_prepared_child_that_no_rewrite_takes_ends_and_leaves_nothing():
  transform_graph.prepare_child()
  child = transform_graph._PREPARED['child']
  transform_graph.prepare_child()  # one at most: the same one
  assert transform_graph._PREPARED['child'] is child
  transform_graph.release_prepared()
  assert child.process.returncode is not None and not os.path.exists(child.job)
  assert not transform_graph._PREPARED


def test_a_child_rewrite_that_fails_or_dies_leaves_the_tf1_graph_with_a_warning(
    tf1_output, tmp_path, caplog):
  """A rewrite that raises in the child (here: specs without one of the graph's inputs) and a
  child killed part way both leave the TF1 graph, published with the one warning."""
  import shutil
  import signal
  spec = {k: v for k, v in SPEC.items() if k != 'tags'}
  for case in ('raises', 'killed'):
    out = str(tmp_path / case)
    shutil.copytree(tf1_output, out)
    os.makedirs(tmp_path / f'{case}-tmp')
    caplog.clear()
    transform_graph.start_in_background(
        out, _adapter_config(spec if case == 'raises' else SPEC), str(tmp_path / f'{case}-tmp'))
    if case == 'killed':
      (child,) = transform_graph._RUNNING.values()
      child.process.send_signal(signal.SIGKILL)
    transform_graph.wait_for_background()
    assert transform_graph.tf1_meta_graph(os.path.join(out, 'transform_fn')) is not None
    assert sorted(os.listdir(out)) == sorted(os.listdir(tf1_output))
    (record,) = [r for r in caplog.records if 'stays a TF1 SavedModel' in r.getMessage()]
    assert ('KeyError' in record.getMessage() if case == 'raises'
            else 'exit status -9' in record.getMessage()), record.getMessage()
