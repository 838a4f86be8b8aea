"""The constants TF Transform's analyzers computed (bucket boundaries, z-score means and
variances, ...), read back from the transform SavedModel, where they are baked into the graph."""

import logging

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from tensorflow.core.protobuf import saved_model_pb2

from pipelines import output_dir, transform_graph

_LOG = logging.getLogger('pipelines')


def analyzer_constants(directory):
  """{transformed feature: {constant: values}}: the constants TF Transform's analyzers computed
  (bucket boundaries, means, variances, ...) that each output of the transform graph depends on.

  TF Transform bakes analyzer results into the transform SavedModel as captured constants of its
  serving signature; their names come from the ops that use them (`bucketize/apply_buckets`,
  `scale_to_z_score/sub`). This walks the signature's function graph from each output back to
  the captured constants it reads. It relies on how TF lays out a SavedModel, so anything
  unexpected yields {} (the report then says the constants were not found) rather than a failure.
  """
  try:
    return _analyzer_constants(output_dir.join(directory, 'transform_fn', 'saved_model.pb'))
  except Exception as e:
    _LOG.warning('report: analyzer constants not read from the transform graph: %s', e)
    return {}


def _analyzer_constants(path):
  model = saved_model_pb2.SavedModel()
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    model.ParseFromString(f.read())
  graph = model.meta_graphs[0]
  if transform_graph.TF1_SIGNATURE in graph.signature_def:  # graph mode's TF1 graph, as written
    return _graph_mode_constants(graph)
  objects = graph.object_graph_def
  constants = {n.name: n.attr['value'].tensor for n in graph.graph_def.node if n.op == 'Const'}
  functions = {f.signature.name: f for f in graph.graph_def.library.function}

  def child(node_id, name):
    return next(c.node_id for c in objects.nodes[node_id].children if c.local_name == name)

  signature = objects.nodes[child(child(0, 'signatures'), 'serving_default')]
  name = (signature.bare_concrete_function.concrete_function_name
          if signature.WhichOneof('kind') == 'bare_concrete_function'
          else signature.function.concrete_functions[0])
  concrete = objects.concrete_functions[name]
  outputs_spec = concrete.output_signature.dict_value.fields
  wrapper = functions[name]
  bound = list(concrete.bound_inputs)
  captured = {}  # the wrapper's argument name -> constant tensor proto
  for arg, node_id in zip(wrapper.signature.input_arg[-len(bound):] if bound else [], bound):
    node = objects.nodes[node_id]
    if node.WhichOneof('kind') == 'constant' and node.constant.operation in constants:
      captured[arg.name] = constants[node.constant.operation]
  call = next(n for n in wrapper.node_def if n.op in ('StatefulPartitionedCall',
                                                      'PartitionedCall'))
  inner = functions[call.attr['f'].func.name]
  inner_captured = {}  # the inner function's argument name -> constant tensor proto
  for arg, source in zip(inner.signature.input_arg, [i for i in call.input if i[0] != '^']):
    if source in captured:
      inner_captured[arg.name] = captured[source]
  nodes = {n.name: n for n in inner.node_def}
  # A dict's outputs are flattened in key order; a SparseTensor or RaggedTensor output is
  # several flat outputs (indices, values, shape; values and row splits).
  features = sorted(outputs_spec)
  widths = [_flat_components(outputs_spec[f]) for f in features]
  if sum(widths) != len(inner.signature.output_arg):
    raise ValueError('outputs do not match the signature')
  result, flat, bodies = {}, iter(inner.signature.output_arg), {}
  for feature, width in zip(features, widths):
    found, stack, seen = {}, [inner.ret[next(flat).name] for _ in range(width)], set()
    while stack:
      ref = stack.pop()
      name = ref.split(':')[0]
      body = _tf1_body(nodes.get(name), functions, bodies)
      key = ref if body is not None else name  # a call's outputs are walked one by one
      if key in seen:
        continue
      seen.add(key)
      if name in inner_captured:
        found[_constant_label(name)] = _tensor_values(inner_captured[name])
      elif body is not None:  # a graph-mode graph (pipelines/transform_graph): a pruned body
        index = int(ref.split(':')[2]) if ref.count(':') == 2 else 0
        found.update(_tf1_constants(bodies[body.signature.name],
                                    [body.ret[body.signature.output_arg[index].name]]))
      elif name in nodes:
        stack.extend(i for i in nodes[name].input if i[0] != '^')
    # Lookup defaults (-1 for a missing vocabulary entry) are constants of the graph, not
    # results of an analyzer.
    found = {k: v for k, v in sorted(found.items())
             if v is not None and 'default_value' not in k}
    if found:
      result[feature] = found
  return result


def _graph_mode_constants(graph):
  """analyzer_constants of a TF1 transform graph (TF Transform's graph mode, as it writes it)."""
  nodes = {n.name: n for n in graph.graph_def.node}
  result = {}
  outputs = graph.signature_def[transform_graph.TF1_SIGNATURE].outputs
  for feature, info in sorted(outputs.items()):
    found = _tf1_constants(nodes, transform_graph.components(info))
    if found:
      result[feature] = found
  return result


def _tf1_body(node, functions, bodies):
  """The function a call node of a TF2 graph calls, where it is a graph-mode graph's pruned
  body (its ops under TF Transform's `transform/` scope); None otherwise. `bodies` keeps, for
  each function looked at, its {name: NodeDef} if it is such a body and None if not."""
  if node is None or node.op not in ('StatefulPartitionedCall', 'PartitionedCall'):
    return None
  body = functions.get(node.attr['f'].func.name)
  if body is None:
    return None
  if body.signature.name not in bodies:
    bodies[body.signature.name] = ({n.name: n for n in body.node_def}
                                   if any(n.name.startswith('transform/') for n in body.node_def)
                                   else None)
  return body if bodies[body.signature.name] is not None else None


def _tf1_constants(nodes, starts):
  """{label: values} of the analyzer results that the tensors `starts` of a graph-mode graph
  (`nodes`: {name: NodeDef}) depend on. The results are Const nodes outside the `transform/`
  scope the preprocessing_fn's own ops are imported under; each is labelled after the op that
  reads it (as _constant_label names TF2's captures: `bucketize/apply_buckets`,
  `scale_to_z_score/sub_y`)."""
  found, stack, seen = {}, [s.split(':')[0] for s in starts], set()
  while stack:
    name = stack.pop()
    if name in seen or name not in nodes:
      continue
    seen.add(name)
    inputs = [i for i in nodes[name].input if i[0] != '^']
    for position, source in enumerate(inputs):
      source = source.split(':')[0]
      node = nodes.get(source)
      if node is not None and node.op == 'Const' and not source.startswith('transform/'):
        found[_reader_label(name, position)] = _tensor_values(node.attr['value'].tensor)
      else:
        stack.append(source)
  return {k: v for k, v in sorted(found.items()) if v is not None}


def _reader_label(reader, position):
  """The label of a constant read by op `reader` (`transform/scale_to_z_score/sub`) as its
  input `position`: `scale_to_z_score/sub_y`; under an apply_buckets scope,
  `bucketize/apply_buckets`."""
  path = reader.split('/')
  if path[0] == 'transform':
    path = path[1:]
  if 'apply_buckets' in path:
    return '/'.join(path[:path.index('apply_buckets') + 1])
  op = path[-1].split('_')[0].lower()
  return '/'.join(path[:-1] + [f'{op}_{"xyz"[min(position, 2)]}'])


def _flat_components(value):
  """How many flat tensors one output of a signature is (StructuredValue proto)."""
  if value.WhichOneof('kind') == 'type_spec_value':
    return value.type_spec_value.num_flat_components or 1
  return 1


def _constant_label(arg_name):
  """`bucketize_apply_buckets_5764` -> `bucketize/apply_buckets`; `scale_to_z_score_sub_y` ->
  `scale_to_z_score/sub_y` (the op that reads the constant)."""
  parts = arg_name.split('_')
  if parts[-1].isdigit():
    parts = parts[:-1]
  text = '_'.join(parts)
  for op in ('apply_buckets', 'sub_y', 'sqrt_x', 'truediv_y', 'mul_y', 'add_x', 'sub_x'):
    if text.endswith('_' + op):
      return text[:-len(op) - 1] + '/' + op
  return text


def _tensor_values(proto):
  """Numeric constants as a flat list of Python numbers; None for strings and resources."""
  dtype = proto.dtype
  fields = {1: 'float_val', 2: 'double_val', 3: 'int_val', 9: 'int64_val'}
  if dtype not in fields:
    return None
  shape = [d.size for d in proto.tensor_shape.dim]
  count = int(np.prod(shape)) if shape else 1
  if proto.tensor_content:
    numpy_type = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64}[dtype]
    values = np.frombuffer(proto.tensor_content, numpy_type).tolist()
  else:
    values = list(getattr(proto, fields[dtype]))
    if len(values) < count:  # a repeated last value is stored once
      values += values[-1:] * (count - len(values))
  return [float(v) if dtype in (1, 2) else int(v) for v in values]


_MEANINGS = {'sub_y': 'mean', 'sqrt_x': 'variance', 'apply_buckets': 'bucket boundaries'}


def constant_meaning(label):
  """What a constant is, from the op that reads it (scale_to_z_score subtracts the mean and
  takes the square root of the variance; bucketize compares with the boundaries)."""
  return _MEANINGS.get(label.rsplit('/', 1)[-1], '')


def bucket_boundaries(constants):
  """{transformed feature: boundaries} of the features that bucketize (the constants its
  apply_buckets op reads), from analyzer_constants' result."""
  return {feature: values for feature, found in constants.items()
          for name, values in found.items() if name.endswith('apply_buckets')}

