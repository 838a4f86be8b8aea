"""The transform graph's session, handed from its binding to TF Transform's transform of the same
job in the same process, instead of the graph being loaded again.

pipelines/binding_packing.bind_all makes the transform graph: it imports the unbound graph into
a session, binds the analyzers' results, writes the bound SavedModel and, from the same session,
the graph's schema (its tables initialized). A moment later TF Transform's transform
(TransformDataset's _RunMetaGraphDoFn) loads that SavedModel into a new session: the same graph,
imported, its variables restored and its tables initialized once more. On a 300-column table
(about 15,000 ops) that load is about 2 s of the job's critical path (benchmarks/RESULTS.md).

Where the binding runs in the process that built the job (the in-process runner: bind_all is
given transform_graph.PROCESS_TOKEN), bind_all keeps its graph and session here (keep), and
the transform's first graph state for that SavedModel is made from them (_make_graph_state):
the steps of TF Transform's _GraphStateCompatV1 after its load (the tables initialized, the
graph finalized, the feeds the fetches depend on, one callable), on a session made with the
configuration TF Transform gives its own (the DoFn's tf_config). Anything else (another
SavedModel, TF2 tracing, another configuration, a worker of another process) loads as TF
Transform does. One session at most is kept; it is taken once, and the job drops what was not
taken when it ends (drop). The transformed values are the same either way
(tests/test_warm_session.py).

The same for a SavedModel that TF Transform writes from the traced graph itself, with nothing
bound: the analyzer inputs of the first phase (and a transform graph with no analyzers). TF
Transform's CreateSavedModel writes it when the job is built, from a session on the traced
graph; its ApplySavedModel then loads it back into a new graph (2.8 s at 300 columns). Here the
CreateSavedModel keeps the traced graph and the phase's table initializers (keep_traced), and
the first graph state for that SavedModel is a new session on the traced graph, its variables
and those tables initialized as TF Transform's load initializes them; the traced graph is not
finalized (the job's later steps may still read it). Where that SavedModel computes analyzer
inputs (TF Transform's CreateSavedModelForAnalyzerInputs), its session runs without Grappler's
graph optimizations (`analyzer_inputs_config`): they cost its first run about 1 s of a 300-column
graph's 1.4 s, and its later runs took as long without them (benchmarks/RESULTS.md). Its outputs
only feed the analyzers, whose results agree with TF Transform's own within the tolerances the
tests check (float sums may differ in their last bits); a transform graph's outputs, which must
equal what serving computes, keep TF Transform's configuration.

It builds on private parts of TF Transform 1.21 (NEEDS), checked with the vocabulary packing's
(pipelines/vocabulary.unfit_reason), and is switched on and off with it.
"""

import collections
import contextlib
import threading

import apache_beam as beam
from tensorflow_transform import graph_tools
from tensorflow_transform.beam import beam_nodes
from tensorflow_transform.beam import common as tft_beam_common
from tensorflow_transform.beam import impl as tft_impl

from pipelines import analysis_graph

_DoFn = getattr(tft_impl, '_RunMetaGraphDoFn', None)
NEEDS = ((tft_impl, '_RunMetaGraphDoFn'), (graph_tools, 'get_dependent_inputs'),
         (tft_impl, '_CreateSavedModelImpl'), (tft_impl, '_BindTensors'),
         (tft_impl, '_CREATE_SAVED_MODEL_COUNTER_NAME'), (beam_nodes, 'CreateSavedModel'),
         (tft_beam_common, 'get_unique_temp_path'), (tft_beam_common, 'IncrementCounter')) + (
    tuple((_DoFn, name) for name in ('_make_graph_state', '_GraphStateCompatV1',
                                     '_GraphStateCommon')) if _DoFn is not None else ())
_TFT_MAKE_GRAPH_STATE = getattr(_DoFn, '_make_graph_state', None)
_TFT_CREATE_SAVED_MODEL = getattr(tft_impl, '_CreateSavedModelImpl', None)
_GRAPH_MODE = tft_beam_common.EnvironmentTags.TF_COMPAT_V1
# The label of TF Transform's CreateSavedModel of a phase's analyzer inputs (its analysis graph
# builder names them CreateSavedModelForAnalyzerInputs[Phase0] and so on; the transform graph's
# own is CreateSavedModel).
_ANALYZER_INPUTS_LABEL = 'CreateSavedModelForAnalyzerInputs['

# session: None for a traced graph (keep_traced), whose session the graph state makes;
# initializers: a traced graph's table initializers (a tuple), None for a bound session.
_Kept = collections.namedtuple('_Kept', ['graph', 'session', 'inputs', 'outputs', 'config',
                                         'tables_ready', 'initializers', 'analyzer_inputs'])
_LOCK = threading.Lock()
_STATE = {'on': False, 'kept': {}}  # kept: saved_model_dir -> _Kept, one at most


def missing():
  """The names of NEEDS that the installed TF Transform lacks."""
  return analysis_graph.missing(NEEDS)


def install(enabled):
  """Has TF Transform's transform take a kept session, and its CreateSavedModel keep a traced
  graph (enabled), or always load (not)."""
  _STATE['on'] = bool(enabled)
  if _DoFn is not None and _TFT_MAKE_GRAPH_STATE is not None:
    _DoFn._make_graph_state = _make_graph_state if enabled else _TFT_MAKE_GRAPH_STATE
  if _TFT_CREATE_SAVED_MODEL is not None:
    tft_beam_common.register_ptransform(beam_nodes.CreateSavedModel, tags={_GRAPH_MODE})(
        _TracedCreateSavedModelImpl if enabled else _TFT_CREATE_SAVED_MODEL)
  if not enabled:
    drop()


def keep(saved_model_dir, graph, session, inputs, outputs, config, tables_ready):
  """Keeps `session` (on `graph`, the one `saved_model_dir` was written from; `inputs` and
  `outputs` the SavedModel's signature tensors in it; `config` the ConfigProto it was made with)
  for the transform's graph state, in place of any kept before. Returns whether it was kept;
  where not, the session is the caller's to close."""
  if not _STATE['on']:
    return False
  with _LOCK:
    for other in [d for d, k in _STATE['kept'].items() if k.session is not None]:
      _STATE['kept'].pop(other).session.close()
    _STATE['kept'][saved_model_dir] = _Kept(graph, session, dict(inputs), dict(outputs), config,
                                            tables_ready, None, False)
  return True


def keep_traced(saved_model_dir, graph, inputs, outputs, table_initializers, analyzer_inputs):
  """Keeps the traced `graph` that `saved_model_dir` was written from with nothing bound
  (`inputs` and `outputs` its signature's tensors in it, `table_initializers` the ops of the
  tables it initializes; `analyzer_inputs`: whether its outputs only feed analyzers) for that
  SavedModel's first graph state."""
  if _STATE['on']:
    with _LOCK:
      _STATE['kept'][saved_model_dir] = _Kept(graph, None, dict(inputs), dict(outputs), None,
                                              False, tuple(table_initializers),
                                              bool(analyzer_inputs))


def drop():
  """Forgets what is kept and closes its sessions: the job ended without taking them."""
  with _LOCK:
    kept = _STATE['kept']
    while kept:
      session = kept.popitem()[1].session
      if session is not None:
        session.close()


def _take(saved_model_dir):
  with _LOCK:
    return _STATE['kept'].pop(saved_model_dir, None)


def _make_graph_state(self, saved_model_dir):
  kept = _take(saved_model_dir) if self._use_tf_compat_v1 else None
  if kept is not None and kept.session is None:  # a traced graph: a session of its own
    kept = _initialized(kept, self._tf_config)
  if kept is not None and kept.config == self._tf_config:
    try:
      state = _graph_state(self, saved_model_dir, kept)
    except Exception:  # TF Transform's load raises its own error, or succeeds
      state = None
    if state is not None:
      return state
  if kept is not None:
    kept.session.close()
  return _TFT_MAKE_GRAPH_STATE(self, saved_model_dir)


def _initialized(kept, config):
  """A session on a kept traced graph, its variables and the phase's tables initialized as
  TF Transform's load of the SavedModel initializes them; None where that fails (TF
  Transform's load then gives its own result or error)."""
  import tensorflow as tf

  session = tf.compat.v1.Session(
      graph=kept.graph, config=analyzer_inputs_config(config) if kept.analyzer_inputs else config)
  try:
    variables = kept.graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
    if variables:  # their initializer ops, run without adding any to the traced graph
      session.run([v.initializer for v in variables])
    if kept.initializers:
      session.run(list(kept.initializers))
  except Exception:
    session.close()
    return None
  return kept._replace(session=session, config=config, tables_ready=True)


def analyzer_inputs_config(config):
  """`config` (a ConfigProto, or None for TensorFlow's defaults) with Grappler's graph
  optimizations off: for a session whose outputs only feed analyzers."""
  import tensorflow as tf

  result = tf.compat.v1.ConfigProto()
  if config is not None:
    result.CopyFrom(config)
  result.graph_options.rewrite_options.disable_meta_optimizer = True
  return result


def _graph_state(dofn, saved_model_dir, kept):
  """What TF Transform's _GraphStateCompatV1 makes of the SavedModel once loaded, from the kept
  graph and session; None where the DoFn's inputs or excluded outputs are not the graph's (TF
  Transform's load then raises its own error)."""
  import tensorflow as tf

  graph, session, inputs, outputs = kept.graph, kept.session, kept.inputs, kept.outputs
  input_names = dofn._get_input_tensor_names()
  exclude = dofn._exclude_outputs
  if set(input_names) - inputs.keys() or set(exclude) - outputs.keys():
    return None
  with graph.as_default():
    if not kept.tables_ready:
      session.run(tf.compat.v1.tables_initializer())
    if kept.initializers is None:  # a bound graph is this session's alone
      graph.finalize()
    output_keys = sorted(set(outputs) - set(exclude))
    fetches = [outputs[key] for key in output_keys]
    # TF Transform finds the feeds from the graph's table initializers: a traced graph's are
    # every phase's, the SavedModel's only this phase's (as CreateSavedModel wrote them).
    with _table_initializers(graph, kept.initializers):
      tensor_inputs = graph_tools.get_dependent_inputs(graph, inputs, fetches)
    input_keys = sorted(tensor_inputs)
    callable_get_outputs = session.make_callable(
        fetches, feed_list=[tensor_inputs[key] for key in input_keys])
  state = object.__new__(_DoFn._GraphStateCompatV1)
  state._session = session
  _DoFn._GraphStateCommon.__init__(state, saved_model_dir, input_keys, output_keys,
                                   callable_get_outputs)
  return state


@contextlib.contextmanager
def _table_initializers(graph, ops):
  """Within the block, `graph`'s table initializers are `ops` (a phase's), as TF Transform's
  CreateSavedModel sets them to write that phase's SavedModel; all of them again after it.
  None: the graph's own, unchanged."""
  import tensorflow as tf

  collection = graph.get_collection_ref(tf.compat.v1.GraphKeys.TABLE_INITIALIZERS)
  original = list(collection)
  if ops is not None:
    collection[:] = list(ops)
  try:
    yield
  finally:
    collection[:] = original


class _TracedCreateSavedModelImpl(beam.PTransform):
  """TF Transform's CreateSavedModel in graph mode. Where nothing is bound (no inputs), its
  steps: the traced graph's SavedModel written from a session on it, with the phase's table
  initializers, when the job is built; and the traced graph kept for that SavedModel
  (keep_traced). Anything else is TF Transform's own implementation."""

  def __init__(self, operation, extra_args):
    super().__init__()
    self._tft = _TFT_CREATE_SAVED_MODEL(operation, extra_args)
    self._base_temp_dir = extra_args.base_temp_dir
    self._graph = extra_args.graph
    self._inputs = extra_args.input_signature
    self._outputs = operation.output_signature
    self._table_initializers = operation.table_initializers
    self._analyzer_inputs = operation.label.startswith(_ANALYZER_INPUTS_LABEL)

  def expand(self, inputs):
    if not isinstance(inputs, beam.pvalue.PBegin):
      return self._tft.expand(inputs)
    import tensorflow as tf
    from tensorflow_transform.saved import saved_transform_io

    saved_model_dir = tft_beam_common.get_unique_temp_path(self._base_temp_dir)
    with self._graph.as_default():
      with tf.compat.v1.Session(graph=self._graph) as session, _table_initializers(
          self._graph, self._table_initializers):  # the phase's tables only
        session.run(tf.compat.v1.global_variables_initializer())
        saved_transform_io.write_saved_transform_from_session(
            session, self._inputs, self._outputs, saved_model_dir)
    keep_traced(saved_model_dir, self._graph, self._inputs, self._outputs,
                self._table_initializers, self._analyzer_inputs)
    return (inputs
            | 'BindTensors' >> tft_impl._BindTensors(self._base_temp_dir, saved_model_dir)
            | 'Count' >> tft_beam_common.IncrementCounter(
                tft_impl._CREATE_SAVED_MODEL_COUNTER_NAME))
