"""The serving SavedModel's predict_raw made into a SavedModel that the TF.js converter takes and
whose every op the TF.js runtime runs (trainer/export_tfjs.py calls it; TensorFlow alone).

What stops tensorflowjs 4.22's converter (TensorFlow 2.19) on the export as it is, measured on
the census model, and what this module does about it:

  tables     TF Transform's layer restores its vocabulary tables as one resource whose
             initializer fills them all (InitializeTableFromTextFileV2 from the asset files,
             each table found by its shared name). The converter looks for one resource per
             table, finds none to match, freezes an empty initializer function and fails
             ("Failed to import metagraph"; its TF1 fallback then "Identity is not in graph").
             TF.js has no InitializeTableFromTextFileV2 either. Here each HashTableV2 of the
             frozen graph is exported from the loaded model (LookupTableExportV2, the table
             that the model's own HashTableV2 op finds by the same shared name) and becomes a
             tf.lookup.StaticHashTable of constants: the converter writes HashTableV2 and
             LookupTableImportV2 into the TF.js model's initializer graph, which the runtime
             runs once at load.
  strings    TF.js has no StringStrip, and kernels on strings for a few ops only (STRING_OPS).
             Each node below is replaced by ops TF.js runs on strings, with the same result:
               StringStrip            StaticRegexReplace of STRIP_PATTERN by '': leading and
                                      trailing runs of the six ASCII whitespaces, which are
                                      what TensorFlow strips
               ZerosLike              Fill(Shape(x), '')
               GatherV2 (axis 0)      GatherNd(params, ExpandDims(indices, -1))
               Pad, PadV2             per padded axis, a ConcatV2 with blocks of Fill('' or the
                                      constant value), the paddings being constants
The rest (LookupTableFindV2, LookupTableSizeV2, StringToHashBucketFast, SparseToDense,
UpperBound, GatherNd, Where, the Keras model) TF.js runs as it is. What it cannot run, `prepare`
refuses in one line naming the ops (an image model's DecodeImage, say).

The graph is predict_raw frozen (variables as constants, functions inlined, control flow
lowered: trainer/freezing.py), rewritten as a GraphDef, and imported into a new
tf.function beside the tables. Before it is written, it is run against the original signature
on a few made-up rows, which must give the same outputs.
"""

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, graph_pb2

from trainer import freezing
from trainer.graph_nodes import control_inputs
from transforms.errors import UserError

SIGNATURE = 'predict_raw'
STRING = tf.string.as_datatype_enum

# The ops that TF.js 4.22 runs on string tensors (tfjs-core's ops that take 'string_or_numeric',
# the converter's graph and control-flow executors, its string and hash-table ops). Any other op
# with a string input or output would fail in the runtime ("must be numeric tensor").
STRING_OPS = frozenset((
    'Const', 'Placeholder', 'PlaceholderWithDefault', 'Identity', 'IdentityN', 'Snapshot',
    'StopGradient', 'NoOp', 'Shape', 'ShapeN', 'Size', 'Rank', 'Reshape', 'ExpandDims', 'Squeeze',
    'EnsureShape', 'Slice', 'StridedSlice', 'GatherNd', 'SparseToDense', 'Tile', 'ConcatV2',
    'Concat', 'Pack', 'Unpack', 'Unique', 'Equal', 'NotEqual', 'Fill', 'Switch', 'Merge', 'Enter',
    'Exit', 'NextIteration', 'LoopCond', 'StaticRegexReplace', 'StringSplit', 'StringNGrams',
    'StringToHashBucketFast', 'HashTable', 'HashTableV2', 'LookupTableFind', 'LookupTableFindV2',
    'LookupTableImport', 'LookupTableImportV2', 'LookupTableSize', 'LookupTableSizeV2',
    'InitializeTable', 'InitializeTableV2'))

STRIP_PATTERN = rb'^[ \t\n\v\f\r]+|[ \t\n\v\f\r]+$'


def _attr(value):
  if isinstance(value, attr_value_pb2.AttrValue):
    return value
  if isinstance(value, tf.DType):
    return attr_value_pb2.AttrValue(type=value.as_datatype_enum)
  if isinstance(value, bool):
    return attr_value_pb2.AttrValue(b=value)
  if isinstance(value, int):
    return attr_value_pb2.AttrValue(i=value)
  if isinstance(value, bytes):
    return attr_value_pb2.AttrValue(s=value)
  raise TypeError(f'no attribute for {value!r}')


class _Graph:
  """A GraphDef being rewritten: nodes added under names no other node has."""

  def __init__(self, source):
    self.graph_def = graph_pb2.GraphDef()
    self.graph_def.versions.CopyFrom(source.versions)
    self.graph_def.library.CopyFrom(source.library)
    self._names = {n.name for n in source.node}
    self.nodes = {n.name: n for n in source.node}

  def add(self, name, op, inputs=(), **attrs):
    unique, n = name, 0
    while unique in self._names:
      n += 1
      unique = f'{name}_{n}'
    self._names.add(unique)
    node = self.graph_def.node.add(name=unique, op=op, input=list(inputs))
    for key, value in attrs.items():
      node.attr[key].CopyFrom(_attr(value))
    return unique

  def const(self, name, value, dtype):
    return self.add(name, 'Const', dtype=dtype, value=attr_value_pb2.AttrValue(
        tensor=tf.make_tensor_proto(value, dtype)))

  def put(self, node, **changes):
    """`node` under its own name (its consumers unchanged), with `changes` to op and attrs."""
    new = self.graph_def.node.add()
    new.CopyFrom(node)
    if 'op' in changes:
      new.op = changes.pop('op')
    for key, value in changes.items():
      new.attr[key].CopyFrom(_attr(value))
    return new

  def constant(self, ref):
    """The value of a Const input, or None."""
    node = self.nodes.get(ref.lstrip('^').split(':')[0])
    if node is None or node.op != 'Const':
      return None
    return tf.make_ndarray(node.attr['value'].tensor)


def _string_typed(node):
  return any(v.type == STRING or STRING in v.list.type for v in node.attr.values())


def _rewrite_pad(graph, node, fill_value):
  """Pad(x, paddings) of strings: along each padded axis, blocks of `fill_value` concatenated
  before and after (their shape: x's, with that axis the padding's size)."""
  paddings = graph.constant(node.input[1])
  if paddings is None:
    raise UserError(f'{node.op} of strings with paddings computed at run time ({node.name})')
  current = node.input[0]
  rank = len(paddings)
  for axis, sides in enumerate(paddings):
    blocks = []
    for side, size in zip(('before', 'after'), sides):
      if size == 0:
        blocks.append(None)
        continue
      scope = f'{node.name}/tfjs_pad/{axis}_{side}'
      keep = np.ones(rank, np.int32)
      keep[axis] = 0
      grow = np.zeros(rank, np.int32)
      grow[axis] = size
      shape = graph.add(f'{scope}/shape_of', 'Shape', [current], T=tf.string, out_type=tf.int32)
      masked = graph.add(f'{scope}/masked', 'Mul', [shape, graph.const(
          f'{scope}/keep', keep, tf.int32)], T=tf.int32)
      shape = graph.add(f'{scope}/shape', 'AddV2', [masked, graph.const(
          f'{scope}/grow', grow, tf.int32)], T=tf.int32)
      blocks.append(graph.add(scope, 'Fill', [shape, fill_value], T=tf.string, index_type=tf.int32))
    if blocks == [None, None]:
      continue
    parts = [b for b in (blocks[0], current, blocks[1]) if b is not None]
    axis_node = graph.const(f'{node.name}/tfjs_pad/{axis}_axis', axis, tf.int32)
    current = graph.add(f'{node.name}/tfjs_pad/{axis}_concat', 'ConcatV2', parts + [axis_node],
                        N=len(parts), T=tf.string, Tidx=tf.int32)
  graph.graph_def.node.add(name=node.name, op='Identity', input=[current] + control_inputs(node),
                           attr={'T': _attr(tf.string)})


def _rewrite_strings(graph, node, counts):
  """Adds `node`, or what replaces it where TF.js cannot run it on strings."""
  op = node.op
  if op == 'StringStrip':
    graph.put(node, op='StaticRegexReplace', pattern=STRIP_PATTERN, rewrite=b'',
              replace_global=True)
  elif op == 'ZerosLike' and node.attr['T'].type == STRING:
    shape = graph.add(f'{node.name}/tfjs_shape', 'Shape', [node.input[0]], T=tf.string,
                      out_type=tf.int32)
    empty = graph.const(f'{node.name}/tfjs_empty', b'', tf.string)
    graph.graph_def.node.add(name=node.name, op='Fill',
                             input=[shape, empty] + control_inputs(node),
                             attr={'T': _attr(tf.string), 'index_type': _attr(tf.int32)})
  elif op == 'GatherV2' and node.attr['Tparams'].type == STRING:
    axis = graph.constant(node.input[2])
    batch_dims = node.attr['batch_dims'].i if 'batch_dims' in node.attr else 0
    if axis is None or int(axis) != 0 or batch_dims != 0:
      raise UserError(f'GatherV2 of strings along an axis other than 0 ({node.name})')
    minus_one = graph.const(f'{node.name}/tfjs_last', -1, tf.int32)
    indices = graph.add(f'{node.name}/tfjs_indices', 'ExpandDims', [node.input[1], minus_one],
                        T=node.attr['Tindices'], Tdim=tf.int32)
    graph.graph_def.node.add(name=node.name, op='GatherNd',
                             input=[node.input[0], indices] + control_inputs(node),
                             attr={'Tparams': _attr(tf.string),
                                   'Tindices': node.attr['Tindices']})
  elif op in ('Pad', 'PadV2') and node.attr['T'].type == STRING:
    fill = (node.input[2] if op == 'PadV2' else
            graph.const(f'{node.name}/tfjs_empty', b'', tf.string))
    _rewrite_pad(graph, node, fill)
  else:
    graph.put(node)
    return
  counts[op] = counts.get(op, 0) + 1


def _table_contents(node):
  """(keys, values) of the table a frozen HashTableV2 node names. Eager HashTableV2 with the
  node's container and shared name returns the resource the loaded model itself looks up."""
  shared_name = node.attr['shared_name'].s
  if not shared_name:
    raise UserError(f'vocabulary table {node.name} has no shared name to be found by')
  key_dtype, value_dtype = node.attr['key_dtype'].type, node.attr['value_dtype'].type
  handle = tf.raw_ops.HashTableV2(key_dtype=key_dtype, value_dtype=value_dtype,
                                  shared_name=shared_name, container=node.attr['container'].s,
                                  use_node_name_sharing=node.attr['use_node_name_sharing'].b)
  keys, values = tf.raw_ops.LookupTableExportV2(table_handle=handle, Tkeys=key_dtype,
                                                Tvalues=value_dtype)
  return keys.numpy(), values.numpy()


class _Tables(tf.Module):
  """The vocabulary tables as constants: {frozen HashTableV2 node name: StaticHashTable}."""

  def __init__(self, contents):
    super().__init__()
    self.names = sorted(contents)
    self.tables = [
        tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values),
                                  default_value=np.zeros((), values.dtype))
        for keys, values in (contents[n] for n in self.names)]


class Prepared:
  """What `prepare` made: the module to save, its signature, and what was done."""

  def __init__(self, module, function, inputs, outputs, rewrites, tables):
    self.module, self.function = module, function
    self.inputs, self.outputs = inputs, outputs  # {name: TensorSpec}, sorted output names
    self.rewrites, self.tables = rewrites, tables  # {op: nodes rewritten}, tables made constant

  def save(self, path):
    tf.saved_model.save(self.module, path, signatures={SIGNATURE: self.function})


def unsupported(nodes, runtime_ops):
  """The ops of `nodes` (NodeDefs, or dicts as in model.json) that the TF.js runtime cannot
  run: ['DecodeImage', 'SelectV2 on strings', ...], sorted."""
  found = set()
  for node in nodes:
    if isinstance(node, dict):
      op = node['op']
      strings = any(v.get('type') == 'DT_STRING' or 'DT_STRING' in v.get('list', {}).get('type', ())
                    for v in node.get('attr', {}).values())
    else:
      op, strings = node.op, _string_typed(node)
    if op not in runtime_ops:
      found.add(op)
    elif strings and op not in STRING_OPS:
      found.add(f'{op} on strings')
  return sorted(found)


def prepare(saved_model_dir, runtime_ops, source_signature=SIGNATURE):
  """Loads the export at `saved_model_dir` and returns a Prepared of its `source_signature`
  (written as SIGNATURE), or raises UserError naming what TF.js cannot run. `runtime_ops`: the
  TF op names the TF.js runtime executes."""
  saved_model = tf.saved_model.load(saved_model_dir)
  graph_def, inputs, outputs = freezing.frozen_signature(saved_model, source_signature)
  graph = _Graph(graph_def)
  rewrites, contents = {}, {}
  for node in graph_def.node:
    if node.op == 'HashTableV2':
      contents[node.name] = _table_contents(node)
      graph.graph_def.node.add(name=node.name, op='Placeholder',
                               attr={'dtype': _attr(tf.resource)})
    else:
      _rewrite_strings(graph, node, rewrites)
  # Functions left in the library (not inlined) are checked, not rewritten.
  library = [n for f in graph.graph_def.library.function for n in f.node_def]
  missing = unsupported([*graph.graph_def.node, *library], runtime_ops)
  if missing:
    raise UserError(f'the TF.js runtime cannot run {", ".join(missing)}')
  rewritten = graph.graph_def

  module = _Tables(contents)
  names = sorted(outputs)
  specs = {name: tf.TensorSpec(spec.shape, spec.dtype, name=name)
           for name, spec in inputs.items()}

  @tf.function(input_signature=[specs], autograph=False)
  def predict_raw(columns):
    feeds = {f'{name}:0': columns[name] for name in specs}
    for name, table in zip(module.names, module.tables):
      feeds[f'{name}:0'] = tf.identity(table.resource_handle)
    results = tf.graph_util.import_graph_def(rewritten, input_map=feeds, name='predict_raw',
                                             return_elements=[outputs[n] for n in names])
    return {name: tf.identity(t, name=name) for name, t in zip(names, results)}

  concrete = predict_raw.get_concrete_function()
  _same_outputs(saved_model.signatures[source_signature], concrete, specs, contents)
  return Prepared(module, concrete, specs, names, rewrites, len(contents))


def _made_up_columns(specs, contents, rows=6):
  """A few rows for the self-check: strings from the vocabularies (and '', and padded with
  spaces), small numbers."""
  words = [k for keys, _ in contents.values() for k in keys[:3] if isinstance(k, bytes)]
  words = words or [b'a']
  columns = {}
  for i, (name, spec) in enumerate(sorted(specs.items())):
    if spec.shape.rank and spec.shape.rank > 1:  # an image's pixels, say: a ramp of small values
      shape = [rows] + [d or 1 for d in spec.shape.as_list()[1:]]
      columns[name] = tf.constant((np.arange(np.prod(shape)) * 37 + i) % 256, spec.dtype,
                                  shape=shape)
      continue
    if spec.dtype == tf.string:
      values = [b'', b' ' + words[i % len(words)] + b' '] + [
          words[(i + 7 * r) % len(words)] for r in range(rows - 2)]
    elif spec.dtype == tf.bool:
      values = [r % 2 == 0 for r in range(rows)]
    else:
      values = [r * 3 + i for r in range(rows)]
    columns[name] = tf.constant(values, spec.dtype)
  return columns


def _same_outputs(original, rewritten, specs, contents):
  """The rewritten graph gives the original signature's outputs on made-up rows. Rows the model
  itself refuses (an image that does not decode) check nothing."""
  columns = _made_up_columns(specs, contents)
  try:
    expected = original(**columns)
  except (tf.errors.InvalidArgumentError, ValueError):
    return
  got = rewritten(columns)
  for name, value in expected.items():
    a, b = value.numpy(), got[name].numpy()
    same = (np.allclose(a, b, rtol=1e-6, atol=1e-6) if a.dtype.kind == 'f'
            else np.array_equal(a, b))
    if not same:
      raise AssertionError(f'the graph rewritten for TF.js gives other {name!r} than the '
                           f'SavedModel: {b!r} vs {a!r}')
