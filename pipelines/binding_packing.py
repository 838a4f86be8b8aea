"""The analyzer results of a phase bound into its SavedModel in one step, not one chain each.

After a packed merge (TF Transform's, or pipelines/merge_packing.py's) every analyzer keeps Beam
transforms of its own: an ExtractFromDict and an ExtractPackedCombineMergeOutputs, and a
CreateTensorBinding for each of its outputs; a packed vocabulary (pipelines/vocabulary_packing.py)
likewise ends in an ExtractPackedVocabulary and a CreateTensorBinding per size and path; and the
phase's CreateSavedModel reads every binding as a side input of its own. On a 300-column table
that is about two thousand transforms and 650 side inputs, each paying the Beam graph's
construction (a DoFn built and pickled), the runner's fusion and bundle set-up, whatever the
number of rows.

This rewrite of TF Transform's analysis graph (pipelines/analysis_graph.py) replaces them:
  - the bindings taken straight from a packed merge's outputs, or from packed vocabularies, become
    one PackedTensorBindings per source: a single list of TF Transform's own _TensorBinding
    values, made from the same values;
  - the CreateSavedModel reading them becomes a PackedCreateSavedModel: TF Transform's own
    CreateSavedModel implementation writes the unbound SavedModel, and TF Transform's own
    replacement binds every value, the lists flattened.
Graph mode only: the TF2 path traces the preprocessing_fn again with the bindings, and is left
as it is. Every other binding (an analyzer whose output goes through further operations, an
unpacked vocabulary, ...) stays TF Transform's own and is bound in the same step. The values,
the transform graph and its assets are unchanged: tests/test_binding_packing.py compares a wide
analysis with TF Transform's own.

The binding of the transform graph's phase also computes the graph's schema, in the graph and
session it has just written the bound SavedModel from (write_deferred_schema), and TF Transform's
ComputeDeferredMetadata step reads it (infer_metadata_from_saved_model) instead of loading the
whole graph into one more session to compute the same: one load fewer of a graph that, at 300
columns, has about 15,000 ops (benchmarks/RESULTS.md).

It builds on private parts of TF Transform 1.21 (the node types named in NEEDS, impl's
_TensorBinding, _CreateSavedModelImpl, _get_tensor_replacement_map and
_infer_metadata_from_saved_model), checked with the vocabulary packing's
(pipelines/vocabulary.unfit_reason).
"""

import collections

import apache_beam as beam
from tensorflow_transform import analyzer_nodes, nodes
from tensorflow_transform.beam import beam_nodes
from tensorflow_transform.beam import common as tft_beam_common
from tensorflow_transform.beam import impl as tft_impl

from pipelines import analysis_graph, transform_graph, vocabulary_packing, warm_session
from pipelines.analysis_graph import is_a as _is
from pipelines.analysis_graph import value_key

NEEDS = ((analyzer_nodes, 'PackedCombineMerge'),
         (analyzer_nodes, 'ExtractPackedCombineMergeOutputs'),
         (beam_nodes, 'CreateTensorBinding'), (beam_nodes, 'CreateSavedModel'),
         (beam_nodes, 'ExtractFromDict'),
         (tft_impl, '_TensorBinding'), (tft_impl, '_CreateSavedModelImpl'),
         (tft_impl, '_get_tensor_replacement_map'),
         (tft_impl, '_infer_metadata_from_saved_model'),
         (tft_beam_common, 'get_unique_temp_path'))

FINAL_LABEL = 'CreateSavedModel'
# Where a packed binding's value comes from: a packed merge's dict, or packed vocabularies.
FROM_MERGE, FROM_VOCABULARIES = 'merge', 'vocabularies'


def missing():
  """The names of NEEDS that the installed TF Transform lacks."""
  return analysis_graph.missing(NEEDS)


class PackedTensorBindings(
    collections.namedtuple('PackedTensorBindings', ['source', 'entries', 'label']),
    nodes.OperationDef):
  """A packed merge's dict, or the packed vocabularies' (index, outputs) pairs -> one list of
  TF Transform's _TensorBinding, one per entry: (locator, number of outputs, output index,
  tensor_name, dtype_enum, is_asset_filepath); the locator is the dict's key or the index."""
  __slots__ = ()


class PackedCreateSavedModel(
    collections.namedtuple('PackedCreateSavedModel',
                           ['table_initializers', 'output_signature', 'label']),
    nodes.OperationDef):
  """TF Transform's CreateSavedModel whose inputs are bindings or lists of them."""
  __slots__ = ()


def _source(binding_op):
  """(source ValueNode, source kind, locator, number of outputs, output index) of a
  CreateTensorBinding taken straight from a packed merge or packed vocabularies; None if not."""
  (value,) = binding_op.inputs
  extract = value.parent_operation
  if _is(extract, analyzer_nodes.ExtractPackedCombineMergeOutputs):
    (by_name,) = extract.inputs
    from_dict = by_name.parent_operation
    if not _is(from_dict, beam_nodes.ExtractFromDict):
      return None
    keys = from_dict.operation_def.keys
    (merged,) = from_dict.inputs
    if isinstance(keys, tuple) or not _is(merged.parent_operation,
                                          analyzer_nodes.PackedCombineMerge):
      return None
    return merged, FROM_MERGE, keys, extract.operation_def.num_outputs, value.value_index
  if _is(extract, vocabulary_packing.ExtractPackedVocabulary):
    (packed,) = extract.inputs
    return (packed, FROM_VOCABULARIES, extract.operation_def.index,
            extract.operation_def.num_outputs, value.value_index)
  return None


def pack(leaves, graph_mode, cache_dict=None):
  """The graph under `leaves` with the bindings of its packed merges and packed vocabularies
  packed, in graph mode; returns the new leaves. (`cache_dict`: an analyzer cache's, where the
  analysis reads one; the bindings are the same either way.)"""
  del cache_dict
  if not graph_mode:  # the TF2 path traces the preprocessing_fn again with the bindings
    return tuple(leaves)
  ops, consumers = analysis_graph.operations(leaves)
  replacements = {}
  for op in ops.values():
    if _is(op, beam_nodes.CreateSavedModel) and op.inputs:
      replacement = _new_create_saved_model(op, consumers)
      if replacement is not None:
        replacements[value_key(op.outputs[0])] = replacement
  if not replacements:
    return tuple(leaves)
  return analysis_graph.substitute(leaves, replacements)


def _new_create_saved_model(save, consumers):
  """A function building the PackedCreateSavedModel that replaces `save`, or None where none of
  its bindings can be packed."""
  packed, kept = {}, []  # source value key -> (ValueNode, kind, [entries])
  for binding in save.inputs:
    op = binding.parent_operation
    source = None
    if _is(op, beam_nodes.CreateTensorBinding) and all(
        _is(c, beam_nodes.CreateSavedModel) for c in consumers[value_key(binding)]):
      source = _source(op)
    if source is None:
      kept.append(binding)
      continue
    value, kind, locator, num_outputs, index = source
    d = op.operation_def
    group = packed.setdefault(value_key(value), (value, kind, []))
    group[2].append((locator, num_outputs, index, d.tensor_name, d.dtype_enum,
                     bool(d.is_asset_filepath)))
  if not packed:
    return None
  s = save.operation_def

  def build(value):
    lists = [nodes.apply_operation(PackedTensorBindings, value(source), source=kind,
                                   entries=tuple(entries),
                                   label=f'PackedTensorBindings[{s.label}][{i}]')
             for i, (source, kind, entries) in enumerate(packed.values())]
    return nodes.apply_operation(
        PackedCreateSavedModel, *[value(b) for b in kept], *lists,
        table_initializers=s.table_initializers, output_signature=s.output_signature,
        label=s.label)
  return build


# ---- the Beam stages ------------------------------------------------------------------------


def _outputs(outputs, num_outputs, locator):
  if len(outputs) != num_outputs:  # TF Transform's ExtractOutputs checks the same
    raise ValueError(f'Analyzer {locator} has {num_outputs} outputs but its implementation '
                     f'produced {len(outputs)} values')
  return outputs


def bindings_from_merge(merged, entries):
  """A packed merge's {analyzer: outputs} -> the entries' _TensorBinding values."""
  return [tft_impl._TensorBinding(_outputs(merged[key], num_outputs, key)[index], name, dtype,
                                  asset)
          for key, num_outputs, index, name, dtype, asset in entries]


def bindings_from_vocabularies(pairs, entries):
  """The packed vocabularies' [(index, (path, unpruned size, pruned size))] -> the entries'
  _TensorBinding values."""
  by_index = dict(pairs)
  return [tft_impl._TensorBinding(_outputs(by_index[i], num_outputs, i)[index], name, dtype,
                                  asset)
          for i, num_outputs, index, name, dtype, asset in entries]


def bind_all(unbound_dir, base_temp_dir, *bindings, final=False, config=None, job_process=None):
  """TF Transform's replacement of the unbound SavedModel's placeholders, with the lists of
  bindings flattened; returns the bound SavedModel's directory. The steps are those of TF
  Transform's _replace_tensors_with_constant_values, with TF Transform's own helpers. For the
  phase that makes the transform graph (`final`), the graph and session then also give the
  graph's schema, as TF Transform's ComputeDeferredMetadata would by loading the bound graph
  once more (write_deferred_schema); and where this runs in the process that built the job
  (`job_process`, its transform_graph.PROCESS_TOKEN), the session, made with TF Transform's
  `config` for its sessions, is kept for the transform (pipelines/warm_session.py), and the
  child process that will rewrite a large graph as TF2 is started first
  (transform_graph.prepare_child)."""
  import tensorflow as tf
  from tensorflow_transform.saved import saved_transform_io

  flat = []
  for b in bindings:
    flat.extend(b if isinstance(b, list) else [b])
  warm = final and job_process == transform_graph.PROCESS_TOKEN
  if warm and transform_graph.is_large(unbound_dir):
    transform_graph.prepare_child()  # the rewrite's child imports while this binds
  with tf.compat.v1.Graph().as_default() as graph:
    replacements = tft_impl._get_tensor_replacement_map(graph, *flat)
    session = tf.compat.v1.Session(graph=graph, config=config if warm else None)
    kept = False
    try:
      temp_dir = tft_beam_common.get_unique_temp_path(base_temp_dir)
      inputs, outputs = saved_transform_io.partially_apply_saved_transform_internal(
          unbound_dir, {}, replacements)
      session.run(tf.compat.v1.global_variables_initializer())
      saved_transform_io.write_saved_transform_from_session(session, inputs, outputs, temp_dir)
      if final:
        tables_ready = write_deferred_schema(temp_dir, outputs, graph, session)
        if warm:
          kept = warm_session.keep(temp_dir, graph, session, inputs, outputs, config,
                                   tables_ready)
    finally:
      if not kept:
        session.close()
  return temp_dir


def deferred_schema_path(saved_model_dir):
  """Where bind_all leaves the schema of the transform graph in `saved_model_dir` (beside it, in
  TF Transform's temp dir; the transform graph's own directory is left as TF Transform wrote
  it)."""
  return saved_model_dir.rstrip('/') + '.deferred_schema.pb'


def write_deferred_schema(saved_model_dir, outputs, graph, session):
  """TF Transform's _infer_metadata_from_saved_model_v1 on the graph and session that wrote
  `saved_model_dir`: its tables initialized, then TF Transform's infer_feature_schema of the
  outputs. A schema that cannot be computed here is left to TF Transform's own step. Returns
  whether the session's tables were initialized."""
  import tensorflow as tf
  from tensorflow_transform import schema_inference

  try:
    session.run(tf.compat.v1.tables_initializer())
  except Exception:  # TF Transform's own step computes it, or reports why it cannot
    return False
  try:
    schema = schema_inference.infer_feature_schema(outputs, graph, session)
  except Exception:  # as above
    return True
  path = deferred_schema_path(saved_model_dir)
  with tf.io.gfile.GFile(path + '.partial', 'wb') as f:
    f.write(schema.SerializeToString())
  tf.io.gfile.rename(path + '.partial', path, overwrite=True)
  return True


def infer_metadata_from_saved_model(saved_model_dir, use_tf_compat_v1):
  """TF Transform's ComputeDeferredMetadata step: the schema bind_all computed where it did,
  read; TF Transform's own _infer_metadata_from_saved_model (which loads the graph into a new
  session, 2 to 5 s on a 300-column graph here) everywhere else."""
  import tensorflow as tf
  from tensorflow_metadata.proto.v0 import schema_pb2
  from tensorflow_transform.tf_metadata import dataset_metadata

  path = deferred_schema_path(saved_model_dir)
  if use_tf_compat_v1 and tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path, 'rb') as f:
      return dataset_metadata.DatasetMetadata(schema_pb2.Schema.FromString(f.read()))
  return _TFT_INFER_METADATA(saved_model_dir, use_tf_compat_v1)


_TFT_INFER_METADATA = getattr(tft_impl, '_infer_metadata_from_saved_model', None)


def install_deferred_metadata(enabled):
  """Has TF Transform's ComputeDeferredMetadata read the schema bind_all computed (enabled), or
  always compute it itself (not)."""
  tft_impl._infer_metadata_from_saved_model = (
      infer_metadata_from_saved_model if enabled else _TFT_INFER_METADATA)


class _PackedTensorBindingsImpl(beam.PTransform):

  def __init__(self, operation, extra_args):
    super().__init__()
    self._source = operation.source
    self._entries = operation.entries

  def expand(self, inputs):
    (source,) = inputs
    if self._source == FROM_MERGE:
      return source | 'Bind' >> beam.Map(bindings_from_merge, self._entries)
    return (source
            | 'Gather' >> beam.combiners.ToList()
            | 'Bind' >> beam.Map(bindings_from_vocabularies, self._entries))


class _PackedCreateSavedModelImpl(beam.PTransform):

  def __init__(self, operation, extra_args):
    super().__init__()
    self._unbound = tft_impl._CreateSavedModelImpl(operation, extra_args)
    self._base_temp_dir = extra_args.base_temp_dir
    self._config = extra_args.tf_config  # what TF Transform's sessions are made with
    # TF Transform's label of the transform graph's CreateSavedModel (a phase's own are
    # CreateSavedModelForAnalyzerInputs[...]): the one whose schema is the metadata.
    self._final = operation.label == FINAL_LABEL

  def expand(self, inputs):
    pipeline = inputs[0].pipeline
    # With no inputs, TF Transform's implementation writes the unbound SavedModel and gives
    # its directory.
    unbound = pipeline | 'Unbound' >> self._unbound
    return unbound | 'BindTensors' >> beam.Map(
        bind_all, self._base_temp_dir, *[beam.pvalue.AsSingleton(p) for p in inputs],
        final=self._final, config=self._config, job_process=transform_graph.PROCESS_TOKEN)


tft_beam_common.register_ptransform(PackedTensorBindings)(_PackedTensorBindingsImpl)
tft_beam_common.register_ptransform(PackedCreateSavedModel)(_PackedCreateSavedModelImpl)
