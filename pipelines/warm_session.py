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

It builds on private parts of TF Transform 1.21 (NEEDS), checked with the vocabulary packing's
(pipelines/vocabulary.unfit_reason), and is switched on and off with it.
"""

import collections
import threading

from tensorflow_transform import graph_tools
from tensorflow_transform.beam import impl as tft_impl

from pipelines import analysis_graph

_DoFn = getattr(tft_impl, '_RunMetaGraphDoFn', None)
NEEDS = ((tft_impl, '_RunMetaGraphDoFn'), (graph_tools, 'get_dependent_inputs')) + (
    tuple((_DoFn, name) for name in ('_make_graph_state', '_GraphStateCompatV1',
                                     '_GraphStateCommon')) if _DoFn is not None else ())
_TFT_MAKE_GRAPH_STATE = getattr(_DoFn, '_make_graph_state', None)

_Kept = collections.namedtuple('_Kept', ['graph', 'session', 'inputs', 'outputs', 'config',
                                         'tables_ready'])
_LOCK = threading.Lock()
_STATE = {'on': False, 'kept': {}}  # kept: saved_model_dir -> _Kept, one at most


def missing():
  """The names of NEEDS that the installed TF Transform lacks."""
  return analysis_graph.missing(NEEDS)


def install(enabled):
  """Has TF Transform's transform take a kept session (enabled) or always load (not)."""
  _STATE['on'] = bool(enabled)
  if _DoFn is not None and _TFT_MAKE_GRAPH_STATE is not None:
    _DoFn._make_graph_state = _make_graph_state if enabled else _TFT_MAKE_GRAPH_STATE
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
    _close_all()
    _STATE['kept'][saved_model_dir] = _Kept(graph, session, dict(inputs), dict(outputs), config,
                                            tables_ready)
  return True


def drop():
  """Closes the kept session, if any: the job ended without its transform taking it."""
  with _LOCK:
    _close_all()


def _close_all():
  kept = _STATE['kept']
  while kept:
    kept.popitem()[1].session.close()


def _take(saved_model_dir):
  with _LOCK:
    return _STATE['kept'].pop(saved_model_dir, None)


def _make_graph_state(self, saved_model_dir):
  kept = _take(saved_model_dir) if self._use_tf_compat_v1 else None
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
    graph.finalize()
    output_keys = sorted(set(outputs) - set(exclude))
    fetches = [outputs[key] for key in output_keys]
    tensor_inputs = graph_tools.get_dependent_inputs(graph, inputs, fetches)
    input_keys = sorted(tensor_inputs)
    callable_get_outputs = session.make_callable(
        fetches, feed_list=[tensor_inputs[key] for key in input_keys])
  state = object.__new__(_DoFn._GraphStateCompatV1)
  state._session = session
  _DoFn._GraphStateCommon.__init__(state, saved_model_dir, input_keys, output_keys,
                                   callable_get_outputs)
  return state
