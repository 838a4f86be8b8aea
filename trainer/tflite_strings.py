"""String merges rewritten as merges of positions, for TFLite's built-in ops.

TFLite's built-ins move strings around (GATHER, GATHER_ND, RESHAPE, SLICE, TILE, FILL) and
compare or look them up (EQUAL, HASHTABLE_FIND), but none puts strings of two tensors into one
(no CONCATENATION, SELECT_V2, PAD or SPARSE_TO_DENSE of strings, measured on TF 2.21). TF
Transform and the serving code do that often: a sparse feature densified with '' for the missing
values (SparseToDense), padded (Pad), or a missing value replaced by a default (SelectV2).

Such a merge only matters to what reads its strings, and within one function what reads them is
nearly always a lookup: a vocabulary table, an OOV bucket, a comparison with a constant. So the
region of strings that starts at a merge is computed on positions instead: every string tensor
that enters the region (a source: a merge's values, its default, Pad's '') gets a range of
integer positions in one virtual list U = source 1 ++ source 2 ++ ...; merges and the shape ops
between them run on those positions (built-ins for integers), and each lookup at the end of the
region becomes the lookup of every source (built-ins again), concatenated as numbers, gathered
at the positions. The values are those of the original graph: lookup(merge(a, b)) is
merge(lookup(a), lookup(b)) for an element-wise lookup.

What the region pass refuses (Unsupported): a region that leaves its function, or that reaches an
op which is neither a shape op, a merge nor an element-wise lookup.
"""

import tensorflow as tf

from trainer.graph_nodes import data_inputs

STRING = tf.string.as_datatype_enum
POSITION = tf.int32
MERGES = ('SparseToDense', 'Pad', 'PadV2', 'SelectV2', 'Select', 'ZerosLike')
# ops that move their first input's elements: on positions they move the positions
SHAPE_OPS = {'Identity': 'T', 'Reshape': 'T', 'Slice': 'T', 'StridedSlice': 'T',
             'ExpandDims': 'T', 'Squeeze': 'T', 'GatherV2': 'Tparams', 'GatherNd': 'Tparams',
             'Transpose': 'T', 'Tile': 'T'}
SINKS = {'LookupTableFindV2': 'values', 'StringToHashBucketFast': 'output', 'Equal': 'z',
         'NotEqual': 'z'}
_OUTPUT = {'SparseToDense': 'dense', 'Pad': 'output', 'PadV2': 'output', 'SelectV2': 'output',
           'Select': 'output', 'ZerosLike': 'y'}


class Unsupported(ValueError):
  pass


def _is_string(node, name):
  return name in node.attr and node.attr[name].type == STRING


def zero_bucket(x):
  """StringToHashBucketFast with one bucket: every string in bucket 0."""
  return tf.zeros(tf.shape(x), tf.int64)


def _string_merge(node):
  return node.op in MERGES and _is_string(node, 'T')


def _offsets(sources):
  offsets, total = [], tf.constant(0, POSITION)
  for source in sources:
    offsets.append(total)
    total = total + tf.size(source, out_type=POSITION)
  return offsets


def _positions_of(sources, offsets, j):
  source = sources[j]
  count = tf.size(source, out_type=POSITION)
  return offsets[j] + tf.reshape(tf.range(count), tf.shape(source))


class _Region:
  """One connected region of merged strings in a function."""

  def __init__(self, function):
    self.function = function
    self.nodes = {n.name: n for n in function.node_def}
    self.consumers = {}
    for n in function.node_def:
      for position, ref in enumerate(data_inputs(n)):
        self.consumers.setdefault(ref.split(':')[0], []).append((n, position))
    self.members = {}  # node name -> node whose first output is positions
    self.sinks = {}
    self.sources = []  # refs of the string tensors entering the region, in U's order

  def source(self, ref):
    if ref not in self.sources:
      self.sources.append(ref)
    return self.sources.index(ref)

  def grow(self, start):
    pending = [start]
    while pending:
      node = pending.pop()
      if node.name in self.members:
        continue
      self.members[node.name] = node
      if node.name in [r.split(':')[0] for r in self.function.ret.values()]:
        raise Unsupported(f'strings merged by {node.op} ({node.name}) leave their function')
      for consumer, position in self.consumers.get(node.name, []):
        if consumer.op in SHAPE_OPS and position == 0 or _string_merge(consumer):
          pending.append(consumer)
        elif consumer.op in SINKS:
          self.sinks[consumer.name] = consumer
        else:
          raise Unsupported(f'strings merged by {node.op} ({node.name}) reach {consumer.op} '
                            f'({consumer.name}), which TFLite has no built-in for on strings')

  def in_region(self, ref):
    return ref.split(':')[0] in self.members

  def collect_sources(self):
    for node in self.members.values():
      if _string_merge(node):
        for ref in self._string_inputs(node):
          if not self.in_region(ref):
            self.source(ref)
    for sink in self.sinks.values():
      if sink.op in ('Equal', 'NotEqual'):
        a, b = data_inputs(sink)[:2]
        if self.in_region(a) and self.in_region(b):
          raise Unsupported(f'{sink.op} ({sink.name}) compares two merged string tensors')

  @staticmethod
  def _string_inputs(node):
    data = data_inputs(node)
    if node.op == 'SparseToDense':
      return data[2:4]
    if node.op in ('Pad', 'PadV2'):
      return [data[0]] + data[2:3]
    if node.op in ('SelectV2', 'Select'):
      return data[1:3]
    return []  # ZerosLike: only the shape of its input


class StringRegions:
  """Rewrites every string merge of `function` (a FunctionDef) with `library`'s calls."""

  def __init__(self, library):
    self._library = library
    self.rewritten = 0

  def rewrite(self, function):
    done = set()
    for node in list(function.node_def):
      if _string_merge(node) and node.name not in done:
        if node.op == 'ZerosLike' and self._only_compared(function, node):
          continue  # tflite_graph replaces it by ''
        region = _Region(function)
        region.grow(node)
        region.collect_sources()
        self._apply(region)
        done.update(region.members)

  @staticmethod
  def _only_compared(function, node):
    users = [n for n in function.node_def
             if any(r.split(':')[0] == node.name for r in data_inputs(n))]
    return users and all(n.op in ('Equal', 'NotEqual') for n in users)

  def _constant(self, function, name, value):
    const = function.node_def.add()
    const.name, const.op = name, 'Const'
    const.attr['dtype'].type = STRING
    const.attr['value'].tensor.CopyFrom(tf.make_tensor_proto(value, tf.string))
    return f'{name}:output:0'

  def _apply(self, region):
    function = region.function
    # Pad's constant and ZerosLike's '' are sources like any other
    for node in list(region.members.values()):
      if node.op == 'Pad' and _string_merge(node) or node.op == 'ZerosLike':
        region.source(self._constant(function, f'{node.name}/empty', ''))
    sources = list(region.sources)
    for node in list(region.members.values()):
      if _string_merge(node):
        self._merge(region, node, sources)
      else:  # a shape op: the same op on positions
        node.attr[SHAPE_OPS[node.op]].type = POSITION.as_datatype_enum
    for sink in region.sinks.values():
      self._sink(region, sink, sources)
    self.rewritten += len(region.members)

  def _merge(self, region, node, sources):
    data, op = data_inputs(node), node.op
    role = ['region' if region.in_region(r) else sources.index(r) if r in sources else None
            for r in data]
    name = node.name
    empty = sources.index(f'{name}/empty:output:0') if f'{name}/empty:output:0' in sources \
        else None
    validate = node.attr['validate_indices'].b if 'validate_indices' in node.attr else True

    def positions(value, j, srcs, offsets):
      return value if role[j] == 'region' else _positions_of(srcs, offsets, role[j])

    def fn(*args):
      own, srcs = args[:len(data)], args[len(data):]
      offsets = _offsets(srcs)
      if op == 'SparseToDense':
        indices, shape = own[0], own[1]
        values = positions(own[2], 2, srcs, offsets)
        default = offsets[role[3]] if role[3] != 'region' else tf.reshape(own[3], [])
        return tf.raw_ops.SparseToDense(sparse_indices=indices, output_shape=shape,
                                        sparse_values=values, default_value=default,
                                        validate_indices=validate)
      if op in ('Pad', 'PadV2'):
        fill = offsets[empty] if op == 'Pad' else (
            offsets[role[2]] if role[2] != 'region' else tf.reshape(own[2], []))
        return tf.pad(positions(own[0], 0, srcs, offsets), own[1], constant_values=fill)
      if op in ('SelectV2', 'Select'):
        return tf.where(own[0], positions(own[1], 1, srcs, offsets),
                        positions(own[2], 2, srcs, offsets))
      return tf.fill(tf.shape(own[0]), offsets[empty])  # ZerosLike

    dtypes = []
    for j in range(len(data)):
      if op == 'ZerosLike':
        dtypes.append(POSITION if role[0] == 'region' else tf.string)
      elif role[j] == 'region':
        dtypes.append(POSITION)
      elif (op == 'SparseToDense' and j >= 2) or (op in ('Pad', 'PadV2') and j in (0, 2)) \
          or (op in ('SelectV2', 'Select') and j >= 1):
        dtypes.append(tf.string)
      elif op == 'SelectV2' or op == 'Select':
        dtypes.append(tf.bool)
      elif op == 'SparseToDense':
        dtypes.append(tf.as_dtype(node.attr['Tindices'].type))
      else:
        dtypes.append(tf.as_dtype(node.attr['Tpaddings'].type) if 'Tpaddings' in node.attr
                      else tf.int32)
    self._library.call(function=region.function, node=node,
                       key=('merge', region.function.signature.name, node.name),
                       python_fn=fn, dtypes=dtypes + [tf.string] * len(sources),
                       inputs=data + sources, output_arg=_OUTPUT[op])

  def _sink(self, region, sink, sources):
    data, op = data_inputs(sink), sink.op
    if op == 'LookupTableFindV2':
      where, extra = 1, [data[0], data[2]]
      value = tf.as_dtype(sink.attr['Tout'].type)

      def apply(piece, extras):
        return tf.raw_ops.LookupTableFindV2(table_handle=extras[0], keys=piece,
                                            default_value=extras[1])
      extra_types = [tf.resource, value]
    elif op == 'StringToHashBucketFast':
      if sink.attr['num_buckets'].i != 1:
        raise Unsupported(f'StringToHashBucketFast ({sink.name}) hashes strings into '
                          f'{sink.attr["num_buckets"].i} buckets, which TFLite has no '
                          'built-in for')
      where, extra, extra_types = 0, [], []

      def apply(piece, extras):
        return zero_bucket(piece)
    else:  # Equal, NotEqual against a tensor outside the region
      where = 0 if region.in_region(data[0]) else 1
      extra, extra_types = [data[1 - where]], [tf.string]
      compare = tf.equal if op == 'Equal' else tf.not_equal

      def apply(piece, extras):
        # element-wise only where the other side is one string (a scalar or [1])
        other = tf.reshape(extras[0], [])
        return tf.cast(compare(piece, other), tf.int32)

    def fn(positions, *args):
      extras, srcs = args[:len(extra)], args[len(extra):]
      looked_up = tf.concat([apply(tf.reshape(s, [-1]), extras) for s in srcs], 0)
      result = tf.gather(looked_up, positions)
      return tf.cast(result, tf.bool) if op in ('Equal', 'NotEqual') else result

    self._library.call(function=region.function, node=sink,
                       key=('sink', region.function.signature.name, sink.name),
                       python_fn=fn,
                       dtypes=[POSITION] + extra_types + [tf.string] * len(sources),
                       inputs=[data[where]] + extra + sources, output_arg=SINKS[op])
