"""Fewer Beam stages where the analysis merges cached accumulators with new ones.

With an analyzer cache, TF Transform 1.21 gives every cached entry, every (span, analyzer), a
DecodeCache operation of its own, and flattens an analyzer's decoded entries with its new
accumulators (FlattenCache) before the merge: 10 cached spans of a 20-analyzer function are 200
Beam transforms, each built, pickled, translated and set up by the runner, and 20 flattens,
each a stage of its own on Beam's in-process runner, whatever their size. Two rewrites of TF
Transform's analysis graph (between analysis_graph_builder.build and the Beam stages,
pipelines/analysis_graph.py) cut them:
  - decode_together: each FlattenCache gets one DecodeCachedSpans in place of its DecodeCaches:
    one Map decoding that entry's records of every cached span, which analysis_cache.read_cache
    puts on one PCollection (under `TOGETHER`, an extra key of the cache dict that TF Transform
    hands to the operations' implementations and otherwise leaves alone). Only where the
    DecodeCaches of an entry are those of every span whose cache holds it (what read_cache puts
    together).
  - flatten_once: where TF Transform's packed merge of combiners flattens one AddKey per
    analyzer, each of a FlattenCache, the AddKeys take the FlattenCache's inputs and the one
    flatten takes them all (a key added to a union is the union of the keyed parts).
  - decode_each: every DecodeCache left (an entry of one span) becomes a DecodeCachedSpan, which
    decodes the records that read_cache puts on that span's output as one list per file (TF
    Transform's DecodeCache takes one record an element: read_cache gave each of the cache
    benchmark's 97,000 records a tagged output of its own, which nothing read once the entries
    are decoded together).
  - key_together (after flatten_once): the combiners' AddKeys of DecodeCachedSpans flattened
    into one merge become one DecodeCachedByKey, which decodes every combiner entry's records of
    every cached span (read_cache's EVERY_ENTRY) and keys each accumulator for the merge.
(pipelines/merge_packing.pack then packs the new span's hand-over to the same merge,
pipelines/vocabulary_packing.pack_merges the vocabularies' merges of cached and new counts, and
pipelines/span_counting.py the new spans' vocabulary counts and their cache entries.)
  - count_together (after pack_merges): the DecodeCachedSpans of the frequency vocabularies
    that one PackedVocabularyMerges merges become one CountCachedVocabularies, which counts
    every such entry's records of every cached span (EVERY_ENTRY) into the merge's sharded
    tables (a 300-column table's 100 vocabularies: a Beam transform or more each before).
A flatten is a union, so each merge sees the same multiset of accumulators; anything the
rewrites do not recognize stays as TF Transform built it.

On the way out, encode_together packs the new spans' cache entries: TF Transform gives each
combiner analyzer's accumulator of each span an ExtractFromDict and an EncodeCache of its own
(and analysis_cache.write_cache keyed each entry for its file in one more Map): per span, the
entries of one packed accumulate become one EncodeAccumulators, which encodes them all and keys
each by its cache entry key, under an EncodedTogether key of the span's output cache.
Together, 16 combiners of the cache benchmark went from about 180 Beam transforms to 4. They
build on private parts of TF Transform 1.21 (the DecodeCache and AddKey nodes, the Flatten of
beam_nodes), so pipelines/vocabulary.install switches them on where it switches on the other
rewrites.
"""

import collections
import struct

import apache_beam as beam
import tensorflow as tf
from apache_beam.transforms.window import GlobalWindows
from tensorflow_transform import analyzer_nodes, nodes
from tensorflow_transform.beam import analyzer_cache, beam_nodes
from tensorflow_transform.beam import common as tft_beam_common

from pipelines import analysis_graph, merge_packing, vocabulary_packing
from pipelines.analysis_graph import is_a, value_key

NEEDS = ((analyzer_nodes, 'DecodeCache'), (analyzer_nodes, 'EncodeCache'),
         (analyzer_nodes, 'AddKey'), (beam_nodes, 'Flatten'))

# The key of the cache dict under which read_cache puts, per cache entry key, the records of
# that entry of every cached span.
TOGETHER = analyzer_cache.DatasetKey('cached-spans-together')
# The key, in TOGETHER's cache, of (cache entry key, the records of one of its files) of every
# entry of every cached span, which read_cache puts there too.
EVERY_ENTRY = b'every-entry-of-every-span'


def missing():
  """The names of NEEDS that the installed TF Transform lacks."""
  return analysis_graph.missing(NEEDS)


class Shown:
  """How this module's operations show their fields in TF Transform's graph views: a cache
  entry key as '<bytes>', a tuple of entries by their number."""
  __slots__ = ()

  def get_field_str(self, field_name):
    if field_name == 'cache_key':
      return '<bytes>'
    if field_name == 'entries':
      return f'<{len(self.entries)} entries>'
    return super().get_field_str(field_name)


class DecodeCachedSpans(
    Shown,
    collections.namedtuple('DecodeCachedSpans', ['cache_key', 'coder', 'sum_counts', 'label']),
    nodes.OperationDef):
  """-> the decoded accumulators of entry `cache_key` of every cached span; with `sum_counts`
  (the entry holds a frequency vocabulary's (token, count) pairs, merged by a sum of counts),
  the integer counts of each token summed over the spans read together."""
  __slots__ = ()


class _DecodeFn(beam.DoFn):
  """The records of one entry file (a list) -> its decoded accumulators; summing integer
  counts per token across the bundle's files where `sum_counts` (a partial sum of what the
  merge sums: each token then crosses the runner once a bundle, not once a span; 10 spans of
  the cache benchmark hold 97,000 vocabulary records)."""

  def __init__(self, coder, sum_counts):
    self._coder = coder
    self._sum_counts = sum_counts
    self._sums = None

  def start_bundle(self):
    self._sums = collections.defaultdict(int)

  def process(self, records):
    if not self._sum_counts:
      yield from decode_records(records, self._coder)
      return
    sums = self._sums
    for accumulator in counted_records(records, self._coder):
      if type(accumulator[1]) is int:
        sums[accumulator[0]] += accumulator[1]
      else:
        yield accumulator

  def finish_bundle(self):
    for token, count in self._sums.items():
      yield GlobalWindows.windowed_value((token, count))
    self._sums = None


def counted_records(records, coder):
  """A vocabulary entry's records decoded as (token, value) pairs: integer counts by
  count_decoder where it reads them, any other record by the coder's own decode_cache."""
  count_of = count_decoder(coder)
  decode = coder.decode_cache
  for record in records:
    pair = count_of(record) if count_of is not None else None
    yield pair if pair is not None else tuple(decode(record))


def count_decoder(coder):
  """For TF Transform's vocabulary coder of string tokens, a decoder of its records that gives
  (token, count) where the value is an integer count and None for any other value (a weight, a
  weighted mean), which the coder's own decode_cache then reads; None for any other coder. The
  format is TF Transform 1.21's (_BaseKVCoder: two native int64 lengths, the token's bytes, the
  value's JSON; tests/test_cache_packing.py reads TF Transform's own encoding back). Its decode
  builds a struct format and parses JSON for each record, 6 us each here, which the cache
  benchmark's 97,000 vocabulary records paid on the critical path (0.6 s)."""
  if (type(coder) is not getattr(analyzer_nodes, '_VocabularyAccumulatorCoder', None) or
      getattr(coder, '_lengths_prefix_format', None) != 'qq' or
      getattr(coder, '_input_dtype', None) != tf.string):
    return None
  lengths = struct.Struct('qq')
  unpack, start = lengths.unpack_from, lengths.size

  def count_of(record):
    token_length, value_length = unpack(record)
    end = start + token_length
    value = record[end:end + value_length]
    # json.dumps of an int >= 0: its digits, which int() reads as json.loads would
    if value.isdigit() and len(record) == end + value_length:
      return record[start:end], int(value)
    return None
  return count_of


@tft_beam_common.register_ptransform(DecodeCachedSpans)
class _DecodeCachedSpansImpl(beam.PTransform):

  def __init__(self, operation, extra_args):
    super().__init__()
    self._files = extra_args.cache_pcoll_dict[TOGETHER].get(operation.cache_key)
    self._coder = operation.coder
    self._sum_counts = operation.sum_counts

  def expand(self, pbegin):
    del pbegin  # the records come from the cache's read, a list of them per file
    return self._files | 'Decode' >> beam.ParDo(_DecodeFn(self._coder, self._sum_counts))


def decode_together(leaves, graph_mode, cache_dict):
  """The analysis graph under `leaves` with each FlattenCache's DecodeCaches of an entry, one
  per cached span holding it, replaced by one DecodeCachedSpans. `cache_dict`: the cache dict
  TF Transform's build was given; without its TOGETHER key nothing changes. (`graph_mode`:
  as the other rewrites are called; the same either way.)"""
  del graph_mode
  together = (cache_dict or {}).get(TOGETHER)
  if together is None:
    return leaves
  holders = collections.defaultdict(set)  # cache entry key -> the dataset keys holding it
  for dataset_key, dataset_cache in cache_dict.items():
    if dataset_key != TOGETHER:
      for cache_key in dataset_cache.keys():
        holders[cache_key].add(dataset_key)

  def rebuilt(op, consumers):
    decodes = collections.defaultdict(list)  # cache entry key -> input positions
    for at, value in enumerate(op.inputs):
      if is_a(value.parent_operation, analyzer_nodes.DecodeCache):
        decodes[value.parent_operation.operation_def.cache_key].append(at)
    packable = {key: at for key, at in decodes.items()
                if together.get(key) is not None and
                {op.inputs[i].parent_operation.operation_def.dataset_key for i in at} ==
                holders[key] and len(at) == len(holders[key])}
    # What a frequency vocabulary's merge sums can be summed before.
    sums = all(is_a(c, analyzer_nodes.VocabularyMerge) and
               c.operation_def.vocab_ordering_type == vocabulary_packing.FREQUENCY
               for c in consumers[value_key(op.outputs[0])])
    return _repacked(op, packable, sums) if packable else None

  return _rewrite_flattens(leaves, rebuilt)


def _rewrite_flattens(leaves, rebuilt):
  """The graph under `leaves` with each one-output Flatten `op` for which `rebuilt(op,
  consumers)` gives a rebuild (for analysis_graph.substitute) rebuilt by it."""
  ops, consumers = analysis_graph.operations(leaves)
  replacements = {}
  for op in ops.values():
    if is_a(op, beam_nodes.Flatten) and op.operation_def.num_outputs == 1:
      rebuild = rebuilt(op, consumers)
      if rebuild is not None:
        replacements[value_key(op.outputs[0])] = rebuild
  if not replacements:
    return leaves
  return analysis_graph.substitute(leaves, replacements)


def _repacked(flatten, packable, sum_counts):
  """For analysis_graph.substitute: `flatten` rebuilt with the inputs of each entry of
  `packable` (cache entry key -> input positions) in one DecodeCachedSpans."""

  def rebuild(value):
    replaced = {i for at in packable.values() for i in at}
    inputs = [value(v) for i, v in enumerate(flatten.inputs) if i not in replaced]
    for n, (key, at) in enumerate(sorted(packable.items())):
      coder = flatten.inputs[at[0]].parent_operation.operation_def.coder
      inputs.append(nodes.apply_operation(
          DecodeCachedSpans, cache_key=key, coder=coder, sum_counts=sum_counts,
          label=f'DecodeCachedSpans[{flatten.operation_def.label}][{n}]'))
    (output,) = nodes.OperationNode(flatten.operation_def, tuple(inputs)).outputs
    return output

  return rebuild


class DecodeCachedSpan(
    Shown, collections.namedtuple('DecodeCachedSpan', ['dataset_key', 'cache_key', 'coder',
                                                        'label']),
    nodes.OperationDef):
  """-> the decoded accumulators of entry `cache_key` of the cached span `dataset_key`, whose
  records read_cache puts on that entry's output as one list per file."""
  __slots__ = ()


def decode_records(records, coder):
  return [coder.decode_cache(record) for record in records]


@tft_beam_common.register_ptransform(DecodeCachedSpan)
class _DecodeCachedSpanImpl(beam.PTransform):

  def __init__(self, operation, extra_args):
    super().__init__()
    self._lists = extra_args.cache_pcoll_dict[operation.dataset_key].get(operation.cache_key)
    self._coder = operation.coder

  def expand(self, pbegin):
    del pbegin  # the records come from the cache's read, a list of them per file
    return self._lists | 'Decode' >> beam.FlatMap(decode_records, self._coder)


def decode_each(leaves, graph_mode, cache_dict):
  """The analysis graph under `leaves` with every DecodeCache replaced by a DecodeCachedSpan of
  the same entry. Only where `cache_dict` is read_cache's (its TOGETHER key): a span's entry
  there is a list of records per file."""
  del graph_mode
  if (cache_dict or {}).get(TOGETHER) is None:
    return leaves
  ops, _ = analysis_graph.operations(leaves)
  replacements = {}
  for op in ops.values():
    if is_a(op, analyzer_nodes.DecodeCache):
      d = op.operation_def
      replacements[value_key(op.outputs[0])] = (
          lambda value, d=d: nodes.apply_operation(
              DecodeCachedSpan, dataset_key=d.dataset_key, cache_key=d.cache_key,
              coder=d.coder, label=d.label))
  if not replacements:
    return leaves
  return analysis_graph.substitute(leaves, replacements)


def flatten_once(leaves, graph_mode, cache_dict):
  """The analysis graph under `leaves` with each Flatten of AddKeys of FlattenCaches (each the
  one consumer of the other) flattening AddKeys of the FlattenCaches' inputs instead."""
  del graph_mode, cache_dict

  def rebuilt(op, consumers):
    hoisted = {}  # input position -> (its AddKey's definition, the inner flatten's inputs)
    for at, value in enumerate(op.inputs):
      add_key = _sole_add_key(value, consumers)
      if add_key is None:
        continue
      inner = add_key.inputs[0]
      if (is_a(inner.parent_operation, beam_nodes.Flatten) and
          inner.parent_operation.operation_def.num_outputs == 1 and
          len(consumers[value_key(inner)]) == 1):
        hoisted[at] = (add_key.operation_def, inner.parent_operation.inputs)
    return _hoisted(op, hoisted) if hoisted else None

  return _rewrite_flattens(leaves, rebuilt)


def _sole_add_key(value, consumers):
  """The AddKey of one input whose output `value` is, where one operation alone reads it; None
  otherwise."""
  add_key = value.parent_operation
  if (is_a(add_key, analyzer_nodes.AddKey) and len(add_key.inputs) == 1 and
      len(consumers[value_key(value)]) == 1):
    return add_key
  return None


def _hoisted(flatten, hoisted):
  """For analysis_graph.substitute: `flatten` rebuilt with each input of `hoisted` (position ->
  (AddKey definition, the inputs of the flatten it keys)) replaced by an AddKey per input."""

  def rebuild(value):
    inputs = []
    for at, old in enumerate(flatten.inputs):
      if at not in hoisted:
        inputs.append(value(old))
        continue
      add_key, parts = hoisted[at]
      for n, part in enumerate(parts):
        (keyed,) = nodes.OperationNode(
            add_key._replace(label=f'{add_key.label}[{n}]'), (value(part),)).outputs
        inputs.append(keyed)
    (output,) = nodes.OperationNode(flatten.operation_def, tuple(inputs)).outputs
    return output

  return rebuild


class DecodeCachedByKey(
    Shown, collections.namedtuple('DecodeCachedByKey', ['entries', 'label']), nodes.OperationDef):
  """-> (key, decoded accumulator) of every record of each entry of `entries` ((cache entry key,
  its coder, the key its accumulators get), ...) of every cached span."""
  __slots__ = ()


class _DecodeByKeyFn(beam.DoFn):
  """(cache entry key, records) -> (key, decoded accumulator) of each record, for the entries
  it was given (the others: nothing)."""

  def __init__(self, entries):
    self._entries = {cache_key: (coder, key) for cache_key, coder, key in entries}

  def process(self, keyed_records):
    cache_key, records = keyed_records
    found = self._entries.get(cache_key)
    if found is not None:
      coder, key = found
      for record in records:
        yield key, coder.decode_cache(record)


class _EveryEntryImpl(beam.PTransform):
  """An operation of `entries` over read_cache's records of every entry: a ParDo of `_FN`."""
  _FN = None

  def __init__(self, operation, extra_args):
    super().__init__()
    self._records = extra_args.cache_pcoll_dict[TOGETHER].get(EVERY_ENTRY)
    self._entries = operation.entries

  def expand(self, pbegin):
    del pbegin  # the records come from the cache's read
    return self._records | 'FromEveryEntry' >> beam.ParDo(type(self)._FN(self._entries))


def _reads_every_entry(cache_dict):
  together = (cache_dict or {}).get(TOGETHER)
  return together is not None and together.get(EVERY_ENTRY) is not None


@tft_beam_common.register_ptransform(DecodeCachedByKey)
class _DecodeCachedByKeyImpl(_EveryEntryImpl):
  _FN = _DecodeByKeyFn


def key_together(leaves, graph_mode, cache_dict):
  """The analysis graph under `leaves` with each Flatten's inputs that are AddKeys of combiner
  DecodeCachedSpans (each the one consumer of the other) replaced by one DecodeCachedByKey.
  Without read_cache's EVERY_ENTRY in `cache_dict` nothing changes."""
  del graph_mode
  if not _reads_every_entry(cache_dict):
    return leaves

  def rebuilt(op, consumers):
    found = {}  # input position -> (cache entry key, coder, key)
    for at, value in enumerate(op.inputs):
      add_key = _sole_add_key(value, consumers)
      if add_key is None:
        continue
      decoded = add_key.inputs[0]
      decode = decoded.parent_operation
      if (is_a(decode, DecodeCachedSpans) and not decode.operation_def.sum_counts and
          len(consumers[value_key(decoded)]) == 1):
        found[at] = (decode.operation_def.cache_key, decode.operation_def.coder,
                     add_key.operation_def.key)
    return _keyed(op, found) if found else None

  return _rewrite_flattens(leaves, rebuilt)


def _keyed(flatten, found):
  """For analysis_graph.substitute: `flatten` with the inputs of `found` (position -> (cache
  entry key, coder, key)) replaced by one DecodeCachedByKey."""

  def rebuild(value):
    inputs = [value(v) for i, v in enumerate(flatten.inputs) if i not in found]
    inputs.append(_packed(DecodeCachedByKey, found, flatten.operation_def.label))
    (output,) = nodes.OperationNode(flatten.operation_def, tuple(inputs)).outputs
    return output

  return rebuild


def _packed(packed, found, label):
  """One operation `packed` of the entries of `found` (position -> (cache entry key, ...)), by
  cache entry key, named after the operation whose inputs it replaces (`label`)."""
  return nodes.apply_operation(
      packed, entries=tuple(sorted(found.values(), key=lambda e: e[0])),
      label=f'{packed.__name__}[{label}]')


class EncodedTogether(collections.namedtuple('EncodedTogether', ['entries'])):
  """The key, in a span's output cache, of (cache entry key, encoded accumulator) pairs of the
  cache entries `entries` (their keys, in order): one EncodeAccumulators' output."""
  __slots__ = ()


class EncodeAccumulators(
    Shown, collections.namedtuple('EncodeAccumulators', ['entries', 'label']), nodes.OperationDef):
  """A packed accumulate's dict -> (cache entry key, encoded accumulator) for each (name in the
  dict, cache entry key, coder) of `entries`."""
  __slots__ = ()


def encode_accumulators(accumulated, entries):
  return [(cache_key, coder.encode_cache(accumulated[name]))
          for name, cache_key, coder in entries]


@tft_beam_common.register_ptransform(EncodeAccumulators)
class _EncodeAccumulatorsImpl(beam.PTransform):

  def __init__(self, operation, extra_args):
    super().__init__()
    self._entries = operation.entries

  def expand(self, inputs):
    (accumulated,) = inputs
    return accumulated | 'EncodeAndKey' >> beam.FlatMap(encode_accumulators, self._entries)


def encode_together(cache, leaves=None):
  """TF Transform's output cache value nodes ({dataset key: {cache entry key: ValueNode}}) with,
  per span, the entries that are an EncodeCache of one key of a packed accumulate's dict
  replaced by one EncodeAccumulators of that dict per packed accumulate, under an
  EncodedTogether key; the other entries as they were. None stays None. (`leaves`: the
  rewritten analysis graph's, as the output cache's rewrites are called; unused.)"""
  del leaves
  return encoded_in_groups(cache, merge_packing.from_packed_accumulate, EncodeAccumulators)


def encoded_in_groups(cache, source_of, packed):
  """The output cache value nodes `cache` with, per span, the entries that are an EncodeCache of
  a value for which `source_of(value)` gives (source ValueNode, name) replaced by one operation
  `packed` of each source, of entries ((name, cache entry key, coder), ...), under an
  EncodedTogether key naming those entries; the other entries as they were. None stays None."""
  if cache is None:
    return None
  result = {}
  for dataset_key, entries in cache.items():
    groups, kept = {}, {}  # the source's value key -> (the source, [(name, cache key, coder)])
    for cache_key, node in entries.items():
      encode = node.parent_operation
      source = (is_a(encode, analyzer_nodes.EncodeCache) and len(encode.inputs) == 1 and
                source_of(encode.inputs[0]))
      if source:
        value, name = source
        group = groups.setdefault(value_key(value), (value, []))
        group[1].append((name, cache_key, encode.operation_def.coder))
      else:
        kept[cache_key] = node
    for n, (value, members) in enumerate(groups.values()):
      members.sort(key=lambda member: member[1])
      kept[EncodedTogether(tuple(member[1] for member in members))] = nodes.apply_operation(
          packed, value, entries=tuple(members),
          label=f'{packed.__name__}[{dataset_key.key}][{n}]')
    result[dataset_key] = kept
  return result


class CountCachedVocabularies(
    Shown, collections.namedtuple('CountCachedVocabularies', ['entries', 'label']),
    nodes.OperationDef):
  """-> ((owner, shard), {token: count}) tables of the counts of each entry of `entries`
  ((cache entry key, coder, owner), ...: a frequency vocabulary's counts) of every cached span,
  summed per bundle, as vocabulary_packing's PackedVocabularyMerges takes a KEYED input."""
  __slots__ = ()


class _CountCachedFn(vocabulary_packing.BundleTables):
  """(cache entry key, records) -> the tables of the entries it was given (the others:
  nothing). Integer counts read with count_decoder where it can, any other record with the
  coder's own decode_cache; summed as the merge sums them."""

  def __init__(self, entries):
    self._entries = {cache_key: (coder, owner) for cache_key, coder, owner in entries}

  def process(self, keyed_records):
    cache_key, records = keyed_records
    found = self._entries.get(cache_key)
    if found is None:
      return
    coder, owner = found
    yield from self._add(owner, counted_records(records, coder)) or ()


@tft_beam_common.register_ptransform(CountCachedVocabularies)
class _CountCachedVocabulariesImpl(_EveryEntryImpl):
  _FN = _CountCachedFn


def count_together(leaves, graph_mode, cache_dict):
  """The analysis graph under `leaves` with each PackedVocabularyMerges' inputs that are
  DecodeCachedSpans of summed counts (each read by it alone) replaced by one KEYED input, a
  CountCachedVocabularies of their entries. Without read_cache's EVERY_ENTRY nothing changes."""
  del graph_mode
  if not _reads_every_entry(cache_dict):
    return leaves

  def found_in(value, owner, consumers):  # -> (cache entry key, coder, owner)
    decode = value.parent_operation
    if (is_a(decode, DecodeCachedSpans) and decode.operation_def.sum_counts and
        len(consumers[value_key(value)]) == 1):
      return decode.operation_def.cache_key, decode.operation_def.coder, owner
    return None

  def counted(value, found, label):
    del value
    return [_packed(CountCachedVocabularies, found, label)]

  return vocabulary_packing.with_keyed_inputs(leaves, found_in, counted)
