"""pipelines/warm_session.py: the transform graph's session handed from its binding to TF
Transform's transform in the same process, and the traced graph to the first phase's apply.

End to end, an analysis and transform with the hand-overs gives the same vocabulary files and
transformed values as one where TF Transform loads both graphs itself, and both hand-overs did
happen. Then TF Transform's own DoFn on a small SavedModel: the kept session serves only its
own SavedModel and TF Transform's session configuration; anything else loads as TF Transform
does, and what is not taken is closed.
"""

import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
import tensorflow_transform as tft
from apache_beam.utils import shared
from tensorflow_transform.beam import impl as tft_impl
from tensorflow_transform.saved import saved_transform_io

from pipelines import job, vocabulary, warm_session
from tests import helpers

SPEC = {'x': tf.io.FixedLenFeature([], tf.float32), 's': tf.io.FixedLenFeature([], tf.string)}


def _fn(inputs):
  return {'x_z': tft.scale_to_z_score(inputs['x']), 'x_q': tft.bucketize(inputs['x'], 3),
          's_id': tft.compute_and_apply_vocabulary(inputs['s'], num_oov_buckets=1)}


def _rows():
  rng = np.random.default_rng(3)
  return [{'x': float(rng.normal(2, 3)), 's': f'v{int(rng.zipf(1.6)) % 9}'.encode()}
          for _ in range(300)]


def _recording_configs(monkeypatch):
  """Records, for each session made on a kept traced graph, (whether its outputs only feed
  analyzers, whether Grappler's optimizations are off in the session's configuration)."""
  made = []
  real = warm_session._initialized

  def recorded(kept, config):
    result = real(kept, config)
    if result is not None:
      options = result.session._config.graph_options.rewrite_options
      made.append((kept.analyzer_inputs, options.disable_meta_optimizer))
    return result
  monkeypatch.setattr(warm_session, '_initialized', recorded)
  return made


def _counting(monkeypatch):
  """Counts the graph states made from a kept session (the real ones, made as without)."""
  made = []
  real = warm_session._graph_state

  def counted(*args):
    state = real(*args)
    made.append(state is not None)
    return state
  monkeypatch.setattr(warm_session, '_graph_state', counted)
  return made


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  try:
    vocabulary.install()
    made = _counting(mp)
    configs = _recording_configs(mp)
    warm = helpers.analyze_in_graph_mode(_fn, SPEC, _rows(), str(tmp_path_factory.mktemp('w')),
                                         batch_size=64)
    warm_made, warm_configs = list(made), list(configs)
    warm_session.install(False)  # the packing stays: only TF Transform's load differs
    cold = helpers.analyze_in_graph_mode(_fn, SPEC, _rows(), str(tmp_path_factory.mktemp('c')),
                                         batch_size=64)
    cold_made = list(made[len(warm_made):])
  finally:
    mp.undo()
    vocabulary.install()
  return warm, warm_made, cold, cold_made, warm_configs


def test_the_transform_takes_the_bound_session_and_gives_the_same_values(runs):
  (warm_files, warm_rows, _), warm_made, (cold_files, cold_rows, _), cold_made, _ = runs
  # the first phase's graph state from the traced graph, the transform's from the binding
  assert warm_made == [True, True] and cold_made == []
  assert warm_files == cold_files
  assert [sorted(r.items()) for r in warm_rows] == [sorted(r.items()) for r in cold_rows]
  # and against numpy: the z-scores are the rows' own
  x = np.array([r['x'] for r in _rows()])
  z = np.array([r['x_z'] for r in warm_rows])
  np.testing.assert_allclose(np.sort(z), np.sort((x - x.mean()) / x.std()), rtol=1e-4,
                             atol=1e-5)
  assert not warm_session._STATE['kept']  # taken once, nothing left


def test_the_analyzer_inputs_run_without_grappler_and_a_transform_graph_with_it(runs, tmp_path):
  # the first phase's analyzer inputs: Grappler off (what the cold run's TF Transform computed
  # with it on agreed above, its vocabulary files identical and its rows equal)
  assert runs[4] == [(True, True)]
  mp = pytest.MonkeyPatch()
  try:
    vocabulary.install()
    configs = _recording_configs(mp)
    _, rows, _ = helpers.analyze_in_graph_mode(
        lambda inputs: {'y': inputs['x'] * 2.0 + 1.0}, SPEC, _rows(), str(tmp_path),
        batch_size=64)
  finally:
    mp.undo()
  # no analyzers: the traced graph is the transform graph, whose outputs serving computes too
  assert configs == [(False, False)]
  np.testing.assert_allclose(sorted(r['y'] for r in rows),
                             sorted(2.0 * r['x'] + 1.0 for r in _rows()), rtol=1e-6)


# ---- TF Transform's own DoFn on a small SavedModel ------------------------------------------

CONFIG = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=1)


def _saved_model(directory):
  """A SavedModel of y = 2 x, written from a session; (graph, session, inputs, outputs)."""
  graph = tf.compat.v1.Graph()
  with graph.as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None], name='x')
    inputs, outputs = {'x': x}, {'y': x * 2.0}
    session = tf.compat.v1.Session(graph=graph, config=CONFIG)
    saved_transform_io.write_saved_transform_from_session(session, inputs, outputs, directory)
  return graph, session, inputs, outputs


def _dofn(config):
  spec = {'x': tf.io.FixedLenFeature([], tf.float32)}
  adapter = job.adapter_config(pa.schema([('x', pa.large_list(pa.float32()))]), spec)
  fn = tft_impl._RunMetaGraphDoFn(config, shared.Shared(), [], True, adapter)
  fn.setup()
  return fn


def _y(fn, directory):
  state = warm_session._DoFn._make_graph_state(fn, directory)
  batch = pa.RecordBatch.from_arrays([pa.array([[1.0], [3.0]], pa.large_list(pa.float32()))],
                                     ['x'])
  fn._graph_state = state
  return state, fn._handle_batch(batch)['y'].tolist()


def _closed(session):
  with pytest.raises(RuntimeError, match='closed Session'):
    session.run(tf.constant(1))
  return True


@pytest.fixture
def on():
  vocabulary.install()
  assert warm_session._STATE['on']
  yield
  warm_session.drop()


def test_a_kept_session_serves_its_own_saved_model_once(on, tmp_path):
  directory = str(tmp_path / 'm')
  graph, session, inputs, outputs = _saved_model(directory)
  assert warm_session.keep(directory, graph, session, inputs, outputs, CONFIG, True)
  state, y = _y(_dofn(CONFIG), directory)
  assert state._session is session and y == [2.0, 6.0]
  assert not warm_session._STATE['kept']
  state, y = _y(_dofn(CONFIG), directory)  # the next one loads as TF Transform does
  assert state._session is not session and y == [2.0, 6.0]


def test_another_configuration_or_saved_model_loads_as_tensorflow_transform_does(on, tmp_path):
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  graph, session, inputs, outputs = _saved_model(a)
  _saved_model(b)
  warm_session.keep(a, graph, session, inputs, outputs, CONFIG, True)
  state, y = _y(_dofn(CONFIG), b)  # another SavedModel: loaded, the kept one stays
  assert state._session is not session and y == [2.0, 6.0]
  assert a in warm_session._STATE['kept']
  other = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=2)
  state, y = _y(_dofn(other), a)  # another configuration: loaded, the kept one closed
  assert state._session is not session and y == [2.0, 6.0]
  assert not warm_session._STATE['kept'] and _closed(session)


def test_one_session_is_kept_at_most_and_what_is_not_taken_is_closed(on, tmp_path):
  first = _saved_model(str(tmp_path / 'a'))
  second = _saved_model(str(tmp_path / 'b'))
  warm_session.keep(str(tmp_path / 'a'), *first, CONFIG, True)
  warm_session.keep(str(tmp_path / 'b'), *second, CONFIG, True)
  assert list(warm_session._STATE['kept']) == [str(tmp_path / 'b')] and _closed(first[1])
  warm_session.drop()
  assert not warm_session._STATE['kept'] and _closed(second[1])


def test_off_nothing_is_kept(tmp_path):
  graph, session, inputs, outputs = _saved_model(str(tmp_path / 'm'))
  try:
    warm_session.install(False)
    assert warm_session._DoFn._make_graph_state is warm_session._TFT_MAKE_GRAPH_STATE
    assert not warm_session.keep(str(tmp_path / 'm'), graph, session, inputs, outputs, CONFIG,
                                 True)
    assert not warm_session._STATE['kept']
  finally:
    session.close()
    vocabulary.install()
