"""The serving SavedModel rewritten so that TFLite's built-in ops can run it.

TFLite's converter turns most of the exported graph into built-in ops, the vocabulary tables
included (HASHTABLE, HASHTABLE_FIND). What it cannot take, measured on the census model (TF 2.21):

  InitializeTableFromTextFileV2  TF Transform fills its vocabulary tables from the vocabulary
                    files. The converter keeps the tables but drops that initializer, and the
                    interpreter then refuses to look anything up ("hashtable need to be
                    initialized"). Replaced by LookupTableImportV2 of the table's keys and values
                    as constants (read by TensorFlow's own text-file initializer here, at export),
                    which the converter turns into HASHTABLE_IMPORT in the model's initializer.
  StringToHashBucketFast  with num_buckets=1 (one OOV bucket, what apply_vocabulary does by
                    default) every string goes to bucket 0: zeros of its shape. More buckets
                    hash strings, which no built-in does: refused.
  UpperBound, LowerBound  (bucketize, apply_buckets): the count of boundaries below each value,
                    as a broadcast comparison and a sum (NaN as TensorFlow places it).
  SparseToDense, Pad, PadV2 and ZerosLike of strings: the built-ins take numbers only. Done on
                    the positions of the strings (numbers), then a gather of the strings.
  the export's own reading rules (ServingModule, name scope CELL_RULES_SCOPE): their
                    StringStrip and their SelectV2 of strings (an NA value -> the feature's
                    default) pass values through: the TFLite model takes values as the
                    pipeline reads them (trimmed, a missing fixed-length string as its
                    default). A StringStrip of the preprocessing_fn stays (refused).

Each replacement is a small tf.function added to the SavedModel's function library and called by
the node it replaces, so the converter inlines it where the original op was; the rest of the
SavedModel (variables, assets, signatures, object graph) is copied unchanged. Public APIs and the
SavedModel protos only.
"""

import collections
import os
import shutil

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from trainer import tflite_strings
from trainer.graph_nodes import control_inputs, data_inputs

CELL_RULES_SCOPE = 'raw_cell_rules'  # trainer/export.py: the reading rules applied at serving
_CALLS = ('StatefulPartitionedCall', 'PartitionedCall')


def _upper_bound(out_type):
  def fn(sorted_inputs, values):
    # std::upper_bound: the number of boundaries <= v, which is K minus those above v; a NaN
    # value compares false with everything and lands past the last boundary, as in TensorFlow.
    size = tf.shape(sorted_inputs, out_type=out_type)[-1]
    above = tf.cast(tf.expand_dims(values, -1) < tf.expand_dims(sorted_inputs, -2), out_type)
    return size - tf.reduce_sum(above, axis=-1)
  return fn


def _lower_bound(out_type):
  def fn(sorted_inputs, values):
    below = tf.cast(tf.expand_dims(sorted_inputs, -2) < tf.expand_dims(values, -1), out_type)
    return tf.reduce_sum(below, axis=-1)
  return fn


def _import_node(node, function, name, handle, keys, values, control):
  """`node` (cleared) becomes LookupTableImportV2 of constant keys and values into `handle`."""
  for suffix, tensor in (('keys', keys), ('values', values)):
    const = function.node_def.add()
    const.name, const.op = f'{name}/{suffix}', 'Const'
    const.attr['dtype'].type = tensor.dtype.as_datatype_enum
    const.attr['value'].tensor.CopyFrom(tf.make_tensor_proto(tensor.numpy()))
  node.name, node.op = name, 'LookupTableImportV2'
  node.input.extend([handle, f'{name}/keys:output:0', f'{name}/values:output:0'] + control)
  node.attr['Tin'].type = keys.dtype.as_datatype_enum
  node.attr['Tout'].type = values.dtype.as_datatype_enum


def _read_output_as(function, name, old_arg, new_arg):
  """What in `function` (its nodes, its results) read node `name`'s output `old_arg` reads its
  `new_arg` instead (a FunctionDef names outputs as node:arg:index)."""
  old, new = f'{name}:{old_arg}:', f'{name}:{new_arg}:'
  for other in function.node_def:
    for i, ref in enumerate(other.input):
      if ref.startswith(old):
        other.input[i] = new + ref[len(old):]
  for key, ref in function.ret.items():
    if ref.startswith(old):
      function.ret[key] = new + ref[len(old):]


class Refused(ValueError):
  """The graph has an op this rewrite cannot turn into built-ins (the message says which)."""


class _Rewriter:

  def __init__(self, saved_model, saved_model_dir):
    self._meta = saved_model.meta_graphs[0]
    self._dir = saved_model_dir
    self._library = self._meta.graph_def.library
    self._functions = {f.signature.name: f for f in self._library.function}
    self._added = {}  # key -> FunctionDef name
    self.replaced = collections.Counter()  # what was rewritten -> how many nodes

  # --- replacements as library functions -------------------------------------------------

  def _function(self, key, python_fn, specs):
    if key not in self._added:
      concrete = tf.function(python_fn, autograph=False).get_concrete_function(*specs)
      graph_def = concrete.graph.as_graph_def()
      for fdef in [*graph_def.library.function, concrete.function_def]:
        if fdef.signature.name not in self._functions:
          self._library.function.add().CopyFrom(fdef)
          self._functions[fdef.signature.name] = fdef
      self._added[key] = concrete.function_def.signature.name
    return self._functions[self._added[key]]

  def call(self, function, node, key, python_fn, dtypes, inputs, output_arg):
    """`node` becomes a call of python_fn over `inputs` (dtypes: theirs), its control inputs
    kept, and what read its output `output_arg` reads the call's."""
    callee = self._function(key, python_fn, [tf.TensorSpec(None, d) for d in dtypes])
    control = control_inputs(node)
    name = node.name
    node.Clear()
    node.name, node.op = name, callee.signature.name
    node.input.extend(list(inputs) + control)
    _read_output_as(function, name, output_arg, callee.signature.output_arg[0].name)

  def _call(self, node, key, python_fn, dtypes, output_arg, function):
    inputs = data_inputs(node)[:len(dtypes)]
    self.call(function, node, key, python_fn, dtypes, inputs, output_arg)

  def _rewrite_node(self, node, function):
    op = node.op

    def attr(name, default=None):  # SavedModels leave out attributes at their default
      return node.attr[name] if name in node.attr else default

    string = tf.string.as_datatype_enum
    if op == 'StringToHashBucketFast':
      if attr('num_buckets').i != 1:
        return False
      self._call(node, op, tflite_strings.zero_bucket, [tf.string], 'output', function)
    elif op in ('UpperBound', 'LowerBound'):
      dtype = tf.as_dtype(attr('T').type)
      out = tf.as_dtype(attr('out_type').type) if attr('out_type') else tf.int32
      make = _upper_bound if op == 'UpperBound' else _lower_bound
      self._call(node, (op, dtype, out), make(out), [dtype, dtype], 'output', function)
    elif op == 'ZerosLike' and attr('T').type == string:
      # compared only (tf.sparse.from_dense): '' broadcasts as the zeros did
      name = node.name
      node.Clear()
      node.name, node.op = name, 'Const'
      node.attr['dtype'].type = string
      node.attr['value'].tensor.CopyFrom(tf.make_tensor_proto('', tf.string))
      _read_output_as(function, name, 'y', 'output')
    elif op == 'InitializeTableFromTextFileV2':
      self._import_table(node, function)
    else:
      return False
    self.replaced[op] += 1
    return True

  # --- vocabulary tables -------------------------------------------------------------------

  def _bindings(self):
    """{(function name, arg name): object graph node} for every function argument that is
    bound to an asset or a resource, followed down through call nodes."""
    graph = self._meta.object_graph_def
    bound = {}
    for name, concrete in graph.concrete_functions.items():
      fdef = self._functions.get(name)
      if fdef is None or not concrete.bound_inputs:
        continue
      args = fdef.signature.input_arg
      first = len(args) - len(concrete.bound_inputs)  # captures come after the call's inputs
      for arg, node_id in zip(args[first:], concrete.bound_inputs):
        bound[(name, arg.name)] = node_id
    pending = list(bound)
    while pending:
      caller, arg = pending.pop()
      for node in self._functions[caller].node_def:
        if node.op not in _CALLS and node.op not in self._functions:
          continue
        callee = node.attr['f'].func.name if node.op in _CALLS else node.op
        if callee not in self._functions:
          continue
        for i, ref in enumerate(data_inputs(node)):
          if ref == arg:
            key = (callee, self._functions[callee].signature.input_arg[i].name)
            if key not in bound:
              bound[key] = bound[(caller, arg)]
              pending.append(key)
    return bound

  def _asset_path(self, function, ref):
    if ':' not in ref:  # an argument of the function
      node_id = self._bound.get((function.signature.name, ref))
      if node_id is not None:
        node = self._meta.object_graph_def.nodes[node_id]
        if node.WhichOneof('kind') == 'asset':
          asset = self._meta.asset_file_def[node.asset.asset_file_def_index]
          return os.path.join(self._dir, 'assets', asset.filename)
      return None
    source = next((n for n in function.node_def if n.name == ref.split(':')[0]), None)
    if source is not None and source.op == 'Const':  # a TF1 graph's literal path
      literal = tf.make_ndarray(source.attr['value'].tensor)
      path = os.path.join(self._dir, 'assets', os.path.basename(literal.item().decode()))
      return path if os.path.exists(path) else None
    return None

  def _table_types(self, function, ref):
    name = ref.split(':')[0]
    source = next((n for n in function.node_def if n.name == name), None)
    if source is None and ':' not in ref:  # a resource captured by the initializer
      node_id = self._bound.get((function.signature.name, ref))
      creator = None
      if node_id is not None:
        for child in self._meta.object_graph_def.nodes[node_id].children:
          if child.local_name == '_create_resource':
            names = self._meta.object_graph_def.nodes[child.node_id].function.concrete_functions
            creator = self._functions.get(names[0]) if names else None
      source = next((n for n in creator.node_def if n.op == 'HashTableV2'), None) \
          if creator is not None else None
    if source is None or source.op != 'HashTableV2':
      return None
    return tf.as_dtype(source.attr['key_dtype'].type), tf.as_dtype(source.attr['value_dtype'].type)

  def _import_table(self, node, function):
    handle, filename = data_inputs(node)[:2]
    path, types = self._asset_path(function, filename), self._table_types(function, handle)
    if path is None or types is None:
      raise Refused(f'a vocabulary table ({node.name}) whose file or types cannot be found in '
                    'the SavedModel')
    key_dtype, value_dtype = types
    attr = node.attr
    vocab_size = attr['vocab_size'].i if 'vocab_size' in attr else -1
    delimiter = attr['delimiter'].s.decode() if 'delimiter' in attr else '\t'
    offset = attr['offset'].i if 'offset' in attr else 0
    # TensorFlow's own text-file initializer reads the file, eagerly, into a table of its own
    # (anonymous: an eager table with no name would be shared, and initialized only once)
    table = tf.lookup.StaticHashTable(
        tf.lookup.TextFileInitializer(
            path, key_dtype, attr['key_index'].i, value_dtype, attr['value_index'].i,
            vocab_size=None if vocab_size < 0 else vocab_size, delimiter=delimiter,
            value_index_offset=offset),
        default_value=tf.zeros([], value_dtype), experimental_is_anonymous=True)
    keys, values = table.export()
    table = self._table_identity(function, handle)
    if table is not None:
      self._contents[table] = (keys, values)
    control = control_inputs(node)
    name = node.name
    node.Clear()
    _import_node(node, function, name, handle, keys, values, control)

  def _table_identity(self, function, handle):
    """What names one table across functions: a TF1 table's shared name, or the object graph
    node of a TF2 table that the function's argument is bound to."""
    if ':' not in handle:
      node_id = self._bound.get((function.signature.name, handle))
      return ('resource', node_id) if node_id is not None else None
    source = next((n for n in function.node_def if n.name == handle.split(':')[0]), None)
    if source is not None and source.op == 'HashTableV2' and source.attr['shared_name'].s:
      return ('shared', source.attr['shared_name'].s)
    return None

  def _import_where_used(self, function):
    """The converter keeps a table's initializer only where it can follow the table from it to
    the lookups (measured: not for TF Transform's tables, shared by name between the initializer
    function and the lookups' functions, nor for a table initialized from a file). So each table
    the serving functions use is filled there, from constants, where its handle appears (the
    interpreter's HASHTABLE_IMPORT fills a table once), and every use of the handle waits for
    that."""
    handles = [f'{n.name}:table_handle:0' for n in function.node_def if n.op == 'HashTableV2']
    handles += [a.name for a in function.signature.input_arg if a.type == tf.resource]
    for handle in handles:
      table = self._table_identity(function, handle)
      if table not in self._contents:
        continue
      keys, values = self._contents[table]
      imported = function.node_def.add()
      name = f'{handle.split(":")[0]}/tflite_import'
      _import_node(imported, function, name, handle, keys, values, [])
      for other in function.node_def:
        if other is not imported and handle in other.input:
          other.input.append(f'^{imported.name}')

  def _drop_cell_rules(self, function):
    """The export's reading rules, which a TFLite model's caller applies (trimmed strings, a
    missing value of a fixed-length string feature given as its default): their StringStrip
    and their SelectV2 of strings (NA -> the default) pass their value through. TFLite has no
    built-in for the first, and the second's strings leave the function into the transform."""
    for node in function.node_def:
      if not (node.name.startswith(CELL_RULES_SCOPE + '/') or f'/{CELL_RULES_SCOPE}/' in node.name):
        continue
      data = data_inputs(node)
      if node.op == 'StringStrip':
        value = data[0]
      elif node.op in ('SelectV2', 'Select') and node.attr['T'].type == tf.string.as_datatype_enum:
        value = data[1]
      else:
        continue
      self.replaced[f'{node.op} of the reading rules'] += 1
      control = control_inputs(node)
      name = node.name
      node.Clear()
      node.name, node.op = name, 'Identity'
      node.input.extend([value] + control)
      node.attr['T'].type = tf.string.as_datatype_enum

  def _signature_functions(self, signature):
    """The functions a signature runs: its own and all they call."""
    graph = self._meta.object_graph_def
    signatures = next(c.node_id for c in graph.nodes[0].children if c.local_name == 'signatures')
    found = next((c.node_id for c in graph.nodes[signatures].children
                  if c.local_name == signature), None)
    if found is None:
      raise Refused(f'the SavedModel has no {signature} signature (exported by an older '
                    'trainer? export it again)')
    node = graph.nodes[found]
    kind = node.WhichOneof('kind')
    names = [node.bare_concrete_function.concrete_function_name] if kind == \
        'bare_concrete_function' else list(node.function.concrete_functions)
    reached, pending = set(), names
    while pending:
      name = pending.pop()
      if name in reached or name not in self._functions:
        continue
      reached.add(name)
      for n in self._functions[name].node_def:
        if n.op in self._functions:
          pending.append(n.op)
        for value in n.attr.values():
          pending.extend([value.func.name] if value.HasField('func') else
                         [f.name for f in value.list.func])
    return reached

  def rewrite(self, signature):
    self._bound = self._bindings()
    regions = tflite_strings.StringRegions(self)
    serving = self._signature_functions(signature)
    self._contents = {}  # a table's identity (_table_identity) -> its (keys, values)
    for function in list(self._library.function):  # the initializers first
      if function.signature.name not in serving:
        for node in list(function.node_def):
          if node.op == 'InitializeTableFromTextFileV2':
            self._rewrite_node(node, function)
    for function in list(self._library.function):
      if function.signature.name in serving:
        self._drop_cell_rules(function)
        regions.rewrite(function)
        for node in list(function.node_def):
          self._rewrite_node(node, function)
        self._import_where_used(function)
    if regions.rewritten:
      self.replaced['string merges (on positions)'] = regions.rewritten
    for node in self._meta.graph_def.node:  # the outer graph (TF1 SavedModels)
      if node.op == 'InitializeTableFromTextFileV2':
        raise Refused('a vocabulary table initialized outside a function (a TF1 SavedModel)')


def rewrite_saved_model(saved_model_dir, output_dir, signature='predict_raw'):
  """Writes the rewritten copy of `saved_model_dir` to `output_dir` (what `signature` runs, and
  the tables' initializers); returns {op: count}."""
  saved_model = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(os.path.join(saved_model_dir, 'saved_model.pb'), 'rb') as f:
    saved_model.ParseFromString(f.read())
  rewriter = _Rewriter(saved_model, saved_model_dir)
  rewriter.rewrite(signature)
  # the rewritten graph beside the variables and assets it reads; not the rest of the version
  # directory (its own fingerprint, which is of the original graph, nor other exports in it)
  os.makedirs(output_dir)
  for part in ('variables', 'assets'):
    if os.path.isdir(os.path.join(saved_model_dir, part)):
      shutil.copytree(os.path.join(saved_model_dir, part), os.path.join(output_dir, part))
  with open(os.path.join(output_dir, 'saved_model.pb'), 'wb') as f:
    f.write(saved_model.SerializeToString())
  return dict(rewriter.replaced)
