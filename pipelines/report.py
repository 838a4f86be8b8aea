"""DIR/report.html and DIR/statistics/summary.json, written when a run publishes (before the
manifest): what the run read, wrote and rejected, each raw feature's distribution beside its
transformed features', drift between train and eval, vocabularies, the transform's analyzer
constants (bucket boundaries, z-score means and variances), dead letters and, for image runs,
sample images and per-channel statistics.

Everything comes from what the run already produced: the manifest, the statistics files that
pipelines/statistics.py computed inside the pipeline, the transform output and the first lines of the
dead-letter files. Nothing re-reads the data, so a report costs the same for 1,000 rows as for
1,000,000. The page is one self-contained file (inline CSS and SVG, images as base64 PNGs, no
scripts), so it opens offline and can be mailed. Every number it shows carries its exact value in
a data- attribute (data-stat, data-manifest, data-drift, data-vocab, data-constant), which the
tests compare with the manifest and the statistics files.
"""

import argparse
import dataclasses
import base64
import html
import json
import logging
import math

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from tensorflow.core.protobuf import saved_model_pb2

from pipelines import output_dir, statistics
from pipelines.sinks import dead_letters as dead_letter_files

REPORT = 'report.html'
SUMMARY = 'statistics/summary.json'
DEFAULT_NUMERIC_THRESHOLD = 0.1
DEFAULT_CATEGORICAL_THRESHOLD = 0.1
TOP_SHOWN = 10  # top values in charts and tables
SAMPLE_IMAGES = 12
_LOG = logging.getLogger('pipelines')
_COLORS = {'train': '#3b6fb6', 'eval': '#e8772e'}
_PNG = b'\x89PNG\r\n\x1a\n'
_JPEG = b'\xff\xd8\xff'


# ---- flags -----------------------------------------------------------------------------------


def _share(text):
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not 0 <= value <= 1:
    raise argparse.ArgumentTypeError(f'{text!r}: give a number between 0 and 1')
  return value


def add_flags(parser):
  parser.add_argument('--drift-numeric-threshold', type=_share, default=DEFAULT_NUMERIC_THRESHOLD,
                      help='a numeric feature drifts when the Jensen-Shannon divergence (base 2) '
                           'of its train and eval histograms exceeds this (default '
                           f'{DEFAULT_NUMERIC_THRESHOLD})')
  parser.add_argument('--drift-categorical-threshold', type=_share,
                      default=DEFAULT_CATEGORICAL_THRESHOLD,
                      help='a string feature drifts when the L-infinity distance of its train and '
                           'eval value shares exceeds this (default '
                           f'{DEFAULT_CATEGORICAL_THRESHOLD})')


@dataclasses.dataclass(frozen=True)
class Options:
  """What the report's flags set: the drift thresholds."""
  numeric_threshold: float = DEFAULT_NUMERIC_THRESHOLD
  categorical_threshold: float = DEFAULT_CATEGORICAL_THRESHOLD

  @classmethod
  def from_args(cls, args):
    return cls(args.drift_numeric_threshold, args.drift_categorical_threshold)


# ---- what the report shows, as plain data (also written as statistics/summary.json) ----------


def feature_summary(feature):
  """One FeatureNameStatistics -> a plain dict of the numbers the report shows."""
  kind = statistics.Stats.Type.Name(feature.type)
  if feature.HasField('num_stats'):
    s = feature.num_stats
    common = s.common_stats
    histogram = s.histograms[0] if s.histograms else None
    summary = {
        'type': kind, 'count': common.num_non_missing, 'missing': common.num_missing,
        'num_values': common.tot_num_values,
        'min': s.min, 'max': s.max, 'mean': s.mean, 'std_dev': s.std_dev, 'median': s.median,
        'zeros': s.num_zeros,
        'nan': histogram.num_nan if histogram else 0,
        'histogram': [[b.low_value, b.high_value, int(b.sample_count)]
                      for b in histogram.buckets] if histogram else [],
    }
    if not common.tot_num_values - summary['nan']:
      for key in ('min', 'max', 'mean', 'std_dev', 'median'):
        summary[key] = None
    return summary
  if feature.HasField('bytes_stats'):
    s = feature.bytes_stats
    return {'type': kind, 'count': s.common_stats.num_non_missing,
            'missing': s.common_stats.num_missing, 'num_values': s.common_stats.tot_num_values,
            'distinct': s.unique, 'avg_bytes': s.avg_num_bytes, 'min_bytes': s.min_num_bytes,
            'max_bytes': s.max_num_bytes}
  s = feature.string_stats
  return {'type': kind, 'count': s.common_stats.num_non_missing,
          'missing': s.common_stats.num_missing, 'num_values': s.common_stats.tot_num_values,
          'distinct': s.unique, 'avg_length': s.avg_length,
          'top': [[b.label, b.sample_count] for b in s.rank_histogram.buckets]}


def _histogram(summary):
  if not summary or not summary.get('histogram'):
    return None
  return statistics.AlignedHistogram.from_buckets(summary['histogram'])


def drift(train, evaluate, numeric_threshold, categorical_threshold):
  """{feature: measure, value, threshold, drifting} for the raw features both splits have."""
  result = {}
  for name in sorted(set(train) & set(evaluate)):
    a, b = train[name], evaluate[name]
    if a['type'] in ('INT', 'FLOAT') and b['type'] in ('INT', 'FLOAT'):
      ha, hb = _histogram(a), _histogram(b)
      if ha is None or hb is None:
        continue
      ha, hb = statistics.AlignedHistogram.common([ha, hb], max_bins=4096)
      measure, value = 'Jensen-Shannon divergence', statistics.jensen_shannon(ha.counts, hb.counts)
      threshold = numeric_threshold
    elif a['type'] == 'STRING' and b['type'] == 'STRING':
      if is_identifier(a) and is_identifier(b):
        continue  # file names, ids: every value new, nothing to compare
      measure = 'L-infinity distance'
      value = statistics.l_infinity(dict(a['top']), a['num_values'], dict(b['top']), b['num_values'])
      threshold = categorical_threshold
    else:
      continue
    if value is not None:
      result[name] = {'measure': measure, 'value': value, 'threshold': threshold,
                      'drifting': value > threshold}
  return result


def is_identifier(summary):
  """A string feature whose every value is distinct (keys, file names): no distribution."""
  return (summary['type'] == 'STRING' and summary['num_values'] >= 20 and
          summary['distinct'] >= 0.95 * summary['num_values'])


def _is_constant(summaries):
  return all(v['type'] in ('INT', 'FLOAT') and v['min'] == v['max'] for v in summaries)


def _exact_top(summary):
  """Whether a string feature's top-value counts are exact (the sketch kept every value)."""
  return sum(count for _, count in summary['top']) == summary['num_values']


# Train values of a raw feature count as the vocabulary's own tokens (its OOV share can then be
# read off the raw eval values) when at least this share of them are in the vocabulary.
RAW_TOKENS_MIN_SHARE = 0.9


def vocabularies(tft_output, vocab_names, raw, transformed=None):
  """{vocabulary: size, top values (with train counts), the share of eval values out of it}.

  The OOV share is the share of the eval split's values that the vocabulary maps to OOV ids.
  Where a transformed feature applies the vocabulary (`<name>_xf`, ints whose schema domain
  extends past the vocabulary's ids 0 .. size - 1: OOV buckets from `size` on, or a negative
  default), it is counted exactly from that feature's eval histogram, values not rows (so a
  multivalent feature counts tokens). Otherwise it is read off the eval values of the raw
  feature of the same name, but only when that feature's train values are the vocabulary's own
  tokens; a vocabulary of tokens derived from the cells (split on '|', words of a text) never
  holds a whole cell, and comparing cells would give a wrong number, so there is none
  (`oov_note` says why)."""
  transformed = transformed or {}
  domains = _int_domains(tft_output.transformed_metadata.schema)
  result = {}
  for name in vocab_names:
    values = [v.decode('utf-8', 'replace') if isinstance(v, bytes) else str(v)
              for v in tft_output.vocabulary_by_name(name)]
    entry = {'size': len(values), 'top': values[:TOP_SHOWN], 'raw_feature': None,
             'oov_share_eval': None, 'oov_exact': None, 'oov_feature': None, 'oov_note': None}
    known = set(values)
    train = raw.get('train', {}).get(name)
    evaluate = raw.get('eval', {}).get(name)
    raw_tokens = None  # whether the raw train values are the vocabulary's tokens
    if train and train['type'] == 'STRING':
      entry['raw_feature'] = name
      raw_tokens = _in_vocabulary_share(train, known) >= RAW_TOKENS_MIN_SHARE
    feature = f'{name}_xf'
    applied = _applies(domains.get(feature), len(values))
    if applied:
      ids = {split: by_name.get(feature) for split, by_name in transformed.items()}
      counts = _id_counts(ids.get('train'), len(values), len(entry['top']))
      if counts is not None:
        entry['top_train_counts'] = counts
      if 'eval' in transformed:
        share = _oov_share_of_ids(ids['eval'], len(values))
        if share is not None:
          entry.update(oov_share_eval=share, oov_exact=True, oov_feature=feature)
    if raw_tokens and 'top_train_counts' not in entry:
      by_value = dict(train['top'])
      entry['top_train_counts'] = [by_value.get(v) for v in entry['top']]
    if entry['oov_feature'] is None:
      if raw_tokens and evaluate and evaluate['type'] == 'STRING' and evaluate['num_values']:
        oov = sum(count for value, count in evaluate['top'] if value not in known)
        entry.update(oov_share_eval=oov / evaluate['num_values'], oov_exact=_exact_top(evaluate),
                     oov_feature=name)
      elif 'eval' not in raw:
        entry['oov_note'] = 'no eval split'
      elif raw_tokens is False:
        entry['oov_note'] = 'vocabulary of derived tokens'
      elif applied and ids.get('eval') and not ids['eval']['num_values']:
        entry['oov_note'] = 'no eval values'
      elif applied and ids.get('eval'):
        entry['oov_note'] = f'bins of {feature} too coarse'
      else:
        entry['oov_note'] = 'no feature to compare'
    result[name] = entry
  return result


def _in_vocabulary_share(summary, known):
  """The share of a string feature's values (those its top-values sketch kept) in `known`."""
  total = sum(count for _, count in summary['top'])
  return sum(count for value, count in summary['top'] if value in known) / total if total else 0.0


def _int_domains(schema):
  """{transformed feature (tensor) name: its schema int_domain}; a ragged or sparse tensor's
  domain is that of its values' column (`tags_xf$ragged_values`)."""
  domains = {f.name: f.int_domain for f in schema.feature if f.HasField('int_domain')}
  result = dict(domains)
  for sparse in schema.sparse_feature:
    if sparse.value_feature.name in domains:
      result.setdefault(sparse.name, domains[sparse.value_feature.name])
  for group in schema.tensor_representation_group.values():
    for name, representation in group.tensor_representation.items():
      kind = representation.WhichOneof('kind')
      column = {'dense_tensor': lambda r: r.dense_tensor.column_name,
                'varlen_sparse_tensor': lambda r: r.varlen_sparse_tensor.column_name,
                'sparse_tensor': lambda r: r.sparse_tensor.value_column_name,
                'ragged_tensor': lambda r: (r.ragged_tensor.feature_path.step[0]
                                            if r.ragged_tensor.feature_path.step else None),
                }.get(kind, lambda r: None)(representation)
      if column in domains:
        result.setdefault(name, domains[column])
  return result


def _applies(domain, size):
  """Whether ints of this schema domain are ids of a vocabulary of `size` entries with
  distinguishable OOV ids: the domain holds 0 .. size - 1 and extends past it (TF Transform
  records [0, size + num_oov_buckets - 1], or [min(0, default), max(size - 1, default)] without
  OOV buckets; a default among the vocabulary's ids would hide OOV values)."""
  if domain is None or not size or not (domain.HasField('min') and domain.HasField('max')):
    return False
  return domain.min <= 0 and domain.max >= size - 1 and (domain.min < 0 or domain.max >= size)


def _id_counts(summary, size, first):
  """The counts of ids 0 .. first - 1 from an id feature's histogram (one id per bin), or None."""
  histogram = _histogram(summary) if summary and summary['type'] == 'INT' else None
  if histogram is None or histogram.exponent != 0:
    return None
  return [int(histogram.counts[i - histogram.start])
          if 0 <= i - histogram.start < len(histogram.counts) else 0 for i in range(first)]


def _oov_share_of_ids(summary, size):
  """The share of an id feature's values outside 0 .. size - 1 (OOV bucket ids, a negative
  default), exact from its aligned histogram; None where it has no values or a bin holds values
  on both sides of `size`. (0 is always a bin edge: edges are multiples of the bin width.)"""
  if not summary or summary['type'] != 'INT' or not summary['num_values']:
    return None
  histogram = _histogram(summary)
  if histogram is None or int(histogram.counts.sum()) != summary['num_values']:
    return None
  edges = histogram.edges()
  below = sum(int(c) for c, high in zip(histogram.counts, edges[1:]) if high <= 0)
  if summary['max'] < size:
    above = 0
  elif summary['min'] >= size:
    above = summary['num_values']
  else:
    above = 0
    for count, low, high in zip(histogram.counts, edges, edges[1:]):
      if low >= size:
        above += int(count)
      elif high > size and count:
        return None  # ids below and at/above `size` share this bin
  return (below + above) / summary['num_values']


def _vocabulary_names(directory):
  assets = output_dir.join(directory, 'transform_fn', 'assets')
  if not FileSystems.exists(assets):
    return []
  found = FileSystems.match([output_dir.join(assets, '*')])[0].metadata_list
  return sorted(m.path[len(assets) + 1:] for m in found)


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
  except Exception as e:  # pylint: disable=broad-except
    _LOG.warning('report: analyzer constants not read from the transform graph: %s', e)
    return {}


def _analyzer_constants(path):
  model = saved_model_pb2.SavedModel()
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    model.ParseFromString(f.read())
  graph = model.meta_graphs[0]
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
  result, flat = {}, iter(inner.signature.output_arg)
  for feature, width in zip(features, widths):
    found, stack, seen = {}, [inner.ret[next(flat).name] for _ in range(width)], set()
    while stack:
      name = stack.pop().split(':')[0]
      if name in seen:
        continue
      seen.add(name)
      if name in inner_captured:
        found[_constant_label(name)] = _tensor_values(inner_captured[name])
      elif name in nodes:
        stack.extend(i for i in nodes[name].input if i[0] != '^')
    # Lookup defaults (-1 for a missing vocabulary entry) are constants of the graph, not
    # results of an analyzer.
    found = {k: v for k, v in sorted(found.items())
             if v is not None and 'default_value' not in k}
    if found:
      result[feature] = found
  return result


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
  return {feature: values for feature, found in constants.items()
          for name, values in found.items() if name.endswith('apply_buckets')}


def derived_features(raw_names, transformed_names):
  """{raw feature: [transformed features named after it]} by the `<raw>_...` naming convention
  (age -> age_xf, age_bucket_xf); transformed features that match no raw feature under None."""
  result = {name: [] for name in raw_names}
  result[None] = []
  for t in sorted(transformed_names):
    matches = [r for r in raw_names if t == r or t.startswith(r + '_')]
    result[max(matches, key=len) if matches else None].append(t)
  return result


# ---- writing ---------------------------------------------------------------------------------


def write_report(out, manifest, options):
  """Writes statistics/summary.json and report.html into the staged output of `out` (an
  output_dir.OutputDir) and returns the manifest with both, and the statistics files, listed."""
  import tensorflow_transform as tft  # pylint: disable=import-outside-toplevel
  splits = _ordered(manifest['splits'])
  files = {split: {stage: f'statistics/{split}_{stage}.pb' for stage in statistics.STAGES}
           for split in splits}
  datasets = {stage: {split: statistics.read_statistics(statistics.statistics_path(out.out, split, stage))
                      for split in splits} for stage in statistics.STAGES}
  features = {stage: {split: {f.path.step[0]: feature_summary(f) for f in dataset.features}
                      for split, dataset in by_split.items()}
              for stage, by_split in datasets.items()}
  num_examples = {stage: {split: dataset.num_examples for split, dataset in by_split.items()}
                  for stage, by_split in datasets.items()}
  tft_output = tft.TFTransformOutput(out.out)
  constants = analyzer_constants(out.out)
  thresholds = {'numeric_js': options.numeric_threshold,
                'categorical_linf': options.categorical_threshold}
  drifts = (drift(features['raw']['train'], features['raw']['eval'], thresholds['numeric_js'],
                  thresholds['categorical_linf']) if 'eval' in splits else {})
  summary = {
      'num_examples': num_examples,
      'features': features,
      'drift': {'thresholds': thresholds, 'features': drifts},
      'vocabularies': vocabularies(tft_output, _vocabulary_names(out.out), features['raw'],
                                   features['transformed']),
      'analyzer_constants': constants,
      'bucket_boundaries': bucket_boundaries(constants),
  }
  output_dir.write_text(output_dir.join(out.out, SUMMARY),
                     json.dumps(summary, indent=1, sort_keys=True) + '\n')
  manifest = dict(manifest, statistics={
      'files': files, 'summary': SUMMARY,
      'drifting_features': sorted(k for k, v in drifts.items() if v['drifting'])}, report=REPORT)
  samples = {split: {stage: statistics.read_sample(statistics.sample_path(out.staging, split, stage))
                     for stage in statistics.STAGES} for split in splits}
  dead_letters = {}  # {split: {kind: [(where, reason, record)]}}, as the printed summary has them
  for split, c in manifest['splits'].items():
    if c['rows_rejected']:
      examples = dead_letter_files.dead_letter_examples(out.errors_path(split), c['rejected_by_kind'])
      dead_letters[split] = {kind: [(dead_letter_files.where(e), e.get('reason', ''), e.get('raw')) for e in found]
                             for kind, found in examples.items()}
  page = _Page(manifest, summary, out.directory, dead_letters,
               _images(samples, tft_output, manifest))
  output_dir.write_text(output_dir.join(out.out, REPORT), page.render())
  return manifest


def _ordered(splits):
  return sorted(splits, key=lambda split: (split != 'train', split))


# ---- sample images ---------------------------------------------------------------------------


def _images(samples, tft_output, manifest):
  """For image runs: {'raw': [(caption, png)], 'transformed': [...], 'channels': [...]}."""
  if manifest.get('pipeline') != 'images':
    return None
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  spec = tft_output.transformed_feature_spec()
  result = {'raw': [], 'transformed': [], 'channels': []}
  raw = samples.get('train', {}).get('raw')
  if raw is not None:
    for row in raw.slice(0, SAMPLE_IMAGES).to_pylist():
      data = (row.get('image') or [None])[0]
      if data and (data.startswith(_PNG) or data.startswith(_JPEG)):
        image = tf.io.decode_image(data, expand_animations=False)
        if max(image.shape[:2]) > 128:
          image = tf.cast(tf.image.resize(image, [128, 128], preserve_aspect_ratio=True,
                                          antialias=True), tf.uint8)
        result['raw'].append((_label(row.get('label')), tf.io.encode_png(image).numpy()))
    result['raw'].sort(key=lambda pair: pair[0])
  transformed = samples.get('train', {}).get('transformed')
  images = [k for k, v in spec.items() if len(getattr(v, 'shape', ())) == 3 and
            v.shape[-1] in (1, 3, 4)]
  if transformed is not None and images:
    key = images[0]
    shape = list(spec[key].shape)
    for row in transformed.slice(0, SAMPLE_IMAGES).to_pylist():
      pixels = np.clip(np.asarray(row[key]).reshape(shape), 0, 255).astype(np.uint8)
      label = row.get('label_xf')
      result['transformed'].append((_label(label), tf.io.encode_png(pixels).numpy()))
    result['transformed'].sort(key=lambda pair: int(pair[0]) if pair[0].lstrip('-').isdigit()
                               else 0)
    result['transformed'] = [(f'id {c}', png) for c, png in result['transformed']]
    first = transformed.slice(0, 1).to_pylist()
    prefix = key[:-len('_xf')] if key.endswith('_xf') else key
    if first and f'{prefix}_mean_xf' in first[0] and f'{prefix}_std_xf' in first[0]:
      result['channels'] = list(zip(first[0][f'{prefix}_mean_xf'],
                                    first[0][f'{prefix}_std_xf']))
  return result


def _label(value):
  while isinstance(value, list):
    value = value[0] if value else None
  if isinstance(value, bytes):
    return value.decode('utf-8', 'replace')
  return '' if value is None else str(value)


# ---- HTML ------------------------------------------------------------------------------------


def _fmt(value):
  """A number as the report prints it: integers in full, floats to 4 significant digits."""
  if value is None:
    return '–'
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, int):
    return f'{value:,}'
  if math.isnan(value) or math.isinf(value):
    return str(value)
  if value == int(value) and abs(value) < 1e15:
    return f'{int(value):,}'
  if abs(value) >= 1e4 and abs(value) < 1e15:
    return f'{value:,.1f}'
  if abs(value) >= 1e-3:
    return f'{value:.4g}'
  return f'{value:.3e}'


def _esc(text):
  return html.escape(str(text), quote=True)


def _num(attr, key, value, extra=''):
  """A table cell with a number: shown rounded, exact in the data- attribute."""
  exact = '' if value is None else repr(value) if not isinstance(value, bool) else str(value)
  return (f'<td class="n{extra}" data-{attr}="{_esc(key)}" data-value="{_esc(exact)}">'
          f'{_esc(_fmt(value))}</td>')


_CSS = """
:root { --train: #3b6fb6; --eval: #e8772e; --ink: #1f2933; --muted: #61707f; --line: #d9e0e7;
        --bg: #f5f7fa; --warn: #c0392b; --ok: #2e7d4f; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 "DejaVu Sans", "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--ink); background: var(--bg); }
header { background: #1f2f46; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 21px; font-weight: 600; }
header .meta { color: #c5d1de; font-size: 12.5px; }
header .meta span { margin-right: 18px; }
nav { padding: 8px 32px; background: #fff; border-bottom: 1px solid var(--line); font-size: 13px; }
nav a { margin-right: 16px; color: #2a5d9f; text-decoration: none; }
main { padding: 8px 32px 40px; max-width: 1400px; }
h2 { font-size: 17px; margin: 26px 0 10px; padding-bottom: 4px;
     border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 0; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 14px 16px;
        margin: 0 0 14px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 12px; }
.tile { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; }
.tile .big { font-size: 22px; font-weight: 600; }
.tile .small { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; }
th { background: #eef2f6; font-weight: 600; white-space: nowrap; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
.feature { display: grid; grid-template-columns: minmax(330px, 420px) 1fr; gap: 18px; }
.feature-head { display: flex; align-items: baseline; gap: 10px; margin-bottom: 8px; }
.type { font-size: 11px; color: var(--muted); border: 1px solid var(--line); border-radius: 3px;
        padding: 0 5px; }
.badge { font-size: 11.5px; border-radius: 10px; padding: 1px 9px; color: #fff;
         white-space: nowrap; }
.badge.warn { background: var(--warn); }
.badge.ok { background: var(--ok); }
.derived { margin-top: 10px; display: grid;
           grid-template-columns: repeat(auto-fill, minmax(300px, 1fr));
           gap: 10px; }
.derived .card { margin: 0; padding: 10px 12px; background: #fbfcfd; }
.legend { font-size: 12px; color: var(--muted); margin: 4px 0 8px; }
.legend i { display: inline-block; width: 11px; height: 11px; border-radius: 2px;
            margin: 0 4px -1px 10px; }
.muted { color: var(--muted); }
.mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px; }
.wrap { max-width: 560px; overflow-wrap: anywhere; }
.example { padding: 2px 0; overflow-wrap: anywhere; }
.example + .example { border-top: 1px dashed var(--line); }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.grid figure { margin: 0; text-align: center; font-size: 11.5px; color: var(--muted); }
.grid img { width: 84px; height: 84px; object-fit: contain; image-rendering: pixelated;
            border: 1px solid var(--line); background: #000; display: block; }
svg text { font-size: 10.5px; fill: #52606d; }
"""


class _Page:
  """Renders the report from the manifest, the summary, dead letters and sample images."""

  def __init__(self, manifest, summary, directory, dead_letters, images):
    self.m = manifest
    self.s = summary
    self.directory = directory
    self.dead_letters = dead_letters
    self.images = images
    self.splits = _ordered(manifest['splits'])

  def render(self):
    # An image run shows its images near the top: they say more than the pixel statistics.
    body = [self._summary(), self._drift(), self._images(), self._features(),
            self._vocabularies(), self._constants(), self._dead_letters()]
    sections = [('summary', 'Summary'), ('drift', 'Drift')] + (
        [('images', 'Images')] if self.images else []) + [
            ('features', 'Features'), ('vocabularies', 'Vocabularies'),
            ('constants', 'Analyzer constants'), ('dead-letters', 'Dead letters')]
    nav = ''.join(f'<a href="#{i}">{t}</a>' for i, t in sections)
    m = self.m
    meta = [f'<span>pipeline <b>{_esc(m.get("pipeline", ""))}</b></span>',
            f'<span>transforms <b>{_esc(m.get("transforms", ""))}</b></span>',
            f'<span>run {_esc(m.get("run_id", ""))}</span>',
            f'<span>elapsed <b data-manifest="elapsed_seconds" '
            f'data-value="{_esc(repr(m.get("elapsed_seconds")))}">'
            f'{_esc(_fmt(m.get("elapsed_seconds")))} s</b></span>']
    versions = ', '.join(f'{k} {v}' for k, v in sorted(m.get('versions', {}).items()))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<title>Preprocessing report: {_esc(self.directory)}</title>'
        f'<style>{_CSS}</style></head><body>'
        f'<header><h1>Preprocessing report <span style="font-weight:400">'
        f'{_esc(self.directory)}</span></h1><div class="meta">{"".join(meta)}</div>'
        f'<div class="meta">{_esc(versions)}</div></header>'
        f'<nav>{nav}</nav><main>{"".join(body)}</main></body></html>\n')

  # -- summary

  def _summary(self):
    m = self.m
    rows = []
    for split in self.splits:
      c = m['splits'][split]
      kinds = ', '.join(f'{k}: {v:,}' for k, v in c.get('rejected_by_kind', {}).items()) or '–'
      rows.append(
          f'<tr><th>{_esc(split)}</th>'
          + _num('manifest', f'{split}/rows_read', c['rows_read'])
          + _num('manifest', f'{split}/rows_written', c['rows_written'])
          + _num('manifest', f'{split}/rows_rejected', c['rows_rejected'],
                 ' warn' if c['rows_rejected'] else '')
          + f'<td>{_esc(kinds)}</td>'
          + _num('manifest', f'{split}/num_shards', c.get('num_shards')) + '</tr>')
    drifting = m['statistics']['drifting_features']
    measured = len(self.s['drift']['features'])
    raw_features = len(self.s['features']['raw'][self.splits[0]])
    tiles = [
        ('rows written', sum(m['splits'][s]['rows_written'] for s in self.splits),
         ' + '.join(f'{s} {m["splits"][s]["rows_written"]:,}' for s in self.splits)),
        ('rows rejected', sum(m['splits'][s]['rows_rejected'] for s in self.splits),
         'see Dead letters below'),
        ('features', raw_features, f'{len(self.s["features"]["transformed"][self.splits[0]])} '
                                   'after the transform'),
        ('drifting features', len(drifting),
         (', '.join(drifting) if drifting else 'none') + f' of {measured} compared'
         if 'eval' in self.splits else 'no eval split'),
    ]
    tiles_html = ''.join(
        f'<div class="tile"><div class="small">{_esc(t)}</div><div class="big">{_esc(_fmt(v))}'
        f'</div><div class="small">{_esc(d)}</div></div>' for t, v, d in tiles)
    return (f'<h2 id="summary">Summary</h2><div class="cards">{tiles_html}</div>'
            '<div class="card" style="margin-top:12px"><table id="splits"><thead><tr>'
            '<th>split</th><th class="n">rows read</th><th class="n">written</th>'
            '<th class="n">rejected</th><th>rejected by kind</th><th class="n">shards</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')

  # -- drift

  def _drift(self):
    d = self.s['drift']
    if 'eval' not in self.splits:
      return '<h2 id="drift">Drift</h2><p class="muted">No eval split: nothing to compare.</p>'
    rows = []
    for name, entry in sorted(d['features'].items(), key=lambda kv: -kv[1]['value']):
      badge = ('<span class="badge warn">drifting</span>' if entry['drifting']
               else '<span class="badge ok">ok</span>')
      rows.append(
          f'<tr><td><a href="#f-{_esc(name)}">{_esc(name)}</a></td>'
          f'<td>{_esc(entry["measure"])}</td>'
          + _num('drift', f'{name}/value', entry['value'])
          + _num('drift', f'{name}/threshold', entry['threshold'])
          + f'<td data-drift="{_esc(name)}/drifting" data-value="{entry["drifting"]}">{badge}'
          '</td></tr>')
    t = d['thresholds']
    return (
        '<h2 id="drift">Drift: train vs eval</h2><div class="card">'
        '<p class="muted" style="margin-top:0">Numeric features: Jensen-Shannon divergence '
        '(base 2, 0 = same distribution, 1 = disjoint) of the train and eval histograms on '
        f'common bins, drifting above {_fmt(t["numeric_js"])} '
        '(<code>--drift-numeric-threshold</code>). String features: L-infinity distance, the '
        'largest difference in any value\'s share of all values, drifting above '
        f'{_fmt(t["categorical_linf"])} (<code>--drift-categorical-threshold</code>).</p>'
        '<table id="drift-table"><thead><tr><th>feature</th><th>measure</th>'
        '<th class="n">value</th><th class="n">threshold</th><th></th></tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table></div>')

  # -- features

  def _features(self):
    raw = self.s['features']['raw']
    transformed = self.s['features']['transformed']
    first = self.splits[0]
    groups = derived_features(list(raw[first]), list(transformed[first]))
    legend = ''.join(
        f'<i style="background:{_COLORS.get(s, "#888")}{"" if n == 0 else "; height:3px"}">'
        f'</i>{_esc(s)}' for n, s in enumerate(self.splits))
    cards = []
    for name in raw[first]:
      cards.append(self._feature_card(name, groups[name]))
    if groups[None]:
      derived = ''.join(self._derived_card(t) for t in groups[None])
      cards.append('<div class="card"><h3>Other transformed features</h3>'
                   f'<div class="derived">{derived}</div></div>')
    overlay = (f' (histograms: {_esc(first)} as bars, the others as outlines)'
               if len(self.splits) > 1 else '')
    return ('<h2 id="features">Features</h2><div class="legend">Charts show each split\'s share '
            f'of its values{overlay}:{legend}</div>' + ''.join(cards))

  def _per_split(self, stage, name):
    return {s: self.s['features'][stage][s].get(name) for s in self.splits}

  def _feature_card(self, name, derived):
    per_split = self._per_split('raw', name)
    first = next(v for v in per_split.values() if v)
    entry = self.s['drift']['features'].get(name)
    badge = ''
    if entry:
      badge = (f'<span class="badge {"warn" if entry["drifting"] else "ok"}">'
               f'{"drifting" if entry["drifting"] else "no drift"}: '
               f'{_esc(entry["measure"])} {_fmt(entry["value"])}</span>')
    table = self._stats_table('raw', name, per_split)
    chart = self._chart(per_split, 600, 180, statistics.MAX_BINS)
    derived_html = ''.join(self._derived_card(t) for t in derived)
    return (f'<div class="card" id="f-{_esc(name)}"><div class="feature-head"><h3>{_esc(name)}'
            f'</h3><span class="type">{_esc(first["type"])}</span>{badge}</div>'
            f'<div class="feature"><div>{table}</div><div>{chart}</div></div>'
            + (f'<div class="derived">{derived_html}</div>' if derived_html else '') + '</div>')

  def _derived_card(self, name):
    per_split = self._per_split('transformed', name)
    present = [v for v in per_split.values() if v]
    if not present:
      return ''
    table = self._stats_table('transformed', name, per_split, compact=True)
    constants = self.s['analyzer_constants'].get(name, {})
    notes = ''.join(
        f'<div class="muted wrap">{_esc(constant_meaning(k) or k)} '
        f'<span class="mono" title="{_esc(k)}" data-constant="{_esc(name)}/{_esc(k)}" '
        f'data-value="{_esc(json.dumps(v))}">{_esc(_short_list(v))}</span></div>'
        for k, v in constants.items())
    # Small charts take half the bins: equal-width bins over values derived from integers
    # (z-scores of ages) would otherwise alternate full and empty.
    return (f'<div class="card"><div class="feature-head"><h3>{_esc(name)}</h3>'
            f'<span class="type">{_esc(present[0]["type"])}</span></div>'
            f'{self._chart(per_split, 330, 110, statistics.MAX_BINS // 2)}{table}{notes}</div>')

  def _stats_table(self, stage, name, per_split, compact=False):
    first = next(v for v in per_split.values() if v)
    if first['type'] in ('INT', 'FLOAT'):
      keys = ['count', 'missing', 'min', 'max', 'mean', 'std_dev'] + (
          [] if compact else ['median', 'zeros'])
      if not compact and any(v and v['num_values'] != v['count'] for v in per_split.values()):
        keys.insert(2, 'num_values')
    elif first['type'] == 'BYTES':
      keys = ['count', 'missing', 'distinct', 'avg_bytes', 'min_bytes', 'max_bytes']
    else:
      keys = ['count', 'missing', 'distinct'] + ([] if compact else ['avg_length'])
    labels = {'std_dev': 'std dev', 'num_values': 'values', 'avg_bytes': 'avg bytes',
              'min_bytes': 'min bytes', 'max_bytes': 'max bytes', 'avg_length': 'avg length',
              'distinct': 'distinct (est.)', 'median': 'median (est.)'}
    head = ''.join(f'<th class="n">{_esc(s)}</th>' for s in per_split)
    rows = []
    for key in keys:
      cells = ''.join(
          _num('stat', f'{s}/{stage}/{name}/{key}', v.get(key)) if v else '<td></td>'
          for s, v in per_split.items())
      rows.append(f'<tr><th>{_esc(labels.get(key, key))}</th>{cells}</tr>')
    top = ''
    if first['type'] == 'STRING' and not compact and not is_identifier(first):
      top = self._top_table(stage, name, per_split)
    return (f'<table><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
            f'</table>{top}')

  def _top_table(self, stage, name, per_split):
    splits = [s for s, v in per_split.items() if v]
    # A value the sketch did not keep is absent (0) where the split's counts are exact.
    tops = {s: dict(per_split[s]['top']) for s in splits}
    absent = {s: 0 if _exact_top(per_split[s]) else None for s in splits}
    ranked = [v for v, _ in per_split[splits[0]]['top'][:TOP_SHOWN]]
    rows = []
    for rank, value in enumerate(ranked):
      cells = ''.join(_num('stat', f'{s}/{stage}/{name}/top/{rank}',
                           tops[s].get(value, absent[s]))
                      for s in splits)
      rows.append(f'<tr><td class="wrap" data-stat="{splits[0]}/{stage}/{_esc(name)}/top/{rank}'
                  f'/value" data-value="{_esc(value)}">{_esc(value)}</td>{cells}</tr>')
    head = ''.join(f'<th class="n">{_esc(s)} count</th>' for s in splits)
    return (f'<table style="margin-top:8px"><thead><tr><th>top values</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')

  # -- charts

  def _chart(self, per_split, width, height, max_bins):
    present = {s: v for s, v in per_split.items() if v}
    if not present:
      return ''
    first = next(iter(present.values()))
    if _is_constant(present.values()):
      return (f'<p class="muted">The same value, {_esc(_fmt(first["min"]))}, in every row of '
              'every split.</p>')
    if first['type'] in ('INT', 'FLOAT'):
      return _histogram_svg({s: _histogram(v) for s, v in present.items()}, width, height,
                            max_bins)
    if first['type'] == 'STRING' and is_identifier(first):
      return ('<p class="muted">Every value is distinct (an identifier such as a key or a file '
              'name): no distribution to show, and no drift measured.</p>')
    if first['type'] == 'STRING':
      return _bars_svg({s: (dict(v['top']), v['num_values']) for s, v in present.items()},
                       [v for v, _ in first['top'][:TOP_SHOWN]], width)
    if first['type'] == 'BYTES' and self.images:
      return '<p class="muted">Encoded images: see the sample under Images.</p>'
    return ''

  # -- vocabularies, constants

  def _vocabularies(self):
    vocabs = self.s['vocabularies']
    if not vocabs:
      return '<h2 id="vocabularies">Vocabularies</h2><p class="muted">None in this transform.</p>'
    rows = []
    for name, v in vocabs.items():
      oov = v['oov_share_eval']
      note = '' if v['oov_exact'] in (None, True) else ' (lower bound)'
      if oov is None:
        share = '<td class="n muted">–</td>'
        shown = f'<td class="muted">{_esc(v.get("oov_note") or "")}</td>'
      else:
        share = _num('vocab', f'{name}/oov_share_eval', oov)
        shown = (f'<td class="n">{_esc(f"{100 * oov:.2f}%{note}")}</td>')
      rows.append(
          f'<tr><td>{_esc(name)}</td>' + _num('vocab', f'{name}/size', v['size']) + share + shown
          + f'<td class="mono">{_esc(v.get("oov_feature") or "")}</td>'
          f'<td class="wrap">{_esc(", ".join(v["top"]))}</td></tr>')
    return ('<h2 id="vocabularies">Vocabularies</h2><div class="card"><table id="vocab-table">'
            '<thead><tr><th>vocabulary</th><th class="n">size</th><th class="n">OOV share of '
            'eval</th><th></th><th>counted on</th><th>top values (most frequent first)</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table><p class="muted">OOV share: '
            'the share of the eval split\'s values that the vocabulary maps to OOV ids. Counted '
            'on the transformed feature that applies it (<span class="mono">&lt;vocabulary&gt;'
            '_xf</span>), values not rows, so a multivalent feature counts its tokens and a '
            'missing value the transform maps to an OOV bucket counts too; else on the raw '
            'feature of the same name, where its values are the vocabulary\'s own tokens. None '
            '(–) where neither gives a right number: the raw cells of a vocabulary of derived '
            'tokens (split or tokenized) are never in it.</p></div>')

  def _constants(self):
    boundaries = self.s['bucket_boundaries']
    constants = self.s['analyzer_constants']
    parts = ['<h2 id="constants">Analyzer constants</h2><p class="muted">What TF Transform\'s '
             'analyzers computed over the train split, as baked into the transform graph.</p>']
    if not constants:
      parts.append('<p class="muted">None found in the transform graph.</p>')
      return ''.join(parts)
    if boundaries:
      rows = ''.join(
          f'<tr><td>{_esc(f)}</td><td class="n">{len(b) + 1}</td><td class="mono wrap" '
          f'data-constant="{_esc(f)}/boundaries" data-value="{_esc(json.dumps(b))}">'
          f'{_esc(", ".join(_fmt(x) for x in b))}</td></tr>' for f, b in boundaries.items())
      parts.append('<div class="card"><h3>Bucket boundaries</h3><table style="margin-top:6px">'
                   '<thead><tr><th>feature</th><th class="n">buckets</th><th>boundaries (a '
                   'value equal to a boundary goes to the upper bucket)</th></tr></thead>'
                   f'<tbody>{rows}</tbody></table></div>')
    rows = []
    for feature, found in constants.items():
      for name, values in found.items():
        if name.endswith('apply_buckets'):
          continue
        rows.append(f'<tr><td>{_esc(feature)}</td><td>{_esc(constant_meaning(name))}</td>'
                    f'<td class="mono">{_esc(name)}</td>'
                    f'<td class="mono wrap">{_esc(_short_list(values))}</td></tr>')
    if rows:
      parts.append('<div class="card"><h3>Other constants</h3><table style="margin-top:6px">'
                   '<thead><tr><th>feature</th><th>meaning</th><th>the op that reads it</th>'
                   f'<th>value</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>')
    return ''.join(parts)

  # -- images

  def _images(self):
    if not self.images:
      return ''
    parts = ['<h2 id="images">Images</h2>']
    channels = self.images['channels']
    if channels:
      rows = ''.join(
          f'<tr><th>{i}</th>' + _num('channel', f'{i}/mean', float(mean))
          + _num('channel', f'{i}/std', float(std)) + '</tr>'
          for i, (mean, std) in enumerate(channels))
      parts.append('<div class="card"><h3>Per-channel statistics of the train split</h3>'
                   '<p class="muted">Pixels / 255, from the transform output (what the model '
                   'normalizes with).</p><table><thead><tr><th>channel</th><th class="n">mean'
                   f'</th><th class="n">std</th></tr></thead><tbody>{rows}</tbody></table></div>')
    for stage, title in (('raw', 'A random sample of raw images (train, as read; labels)'),
                         ('transformed', 'A random sample of transformed images (train, after '
                                         'decode and resize; label ids)')):
      figures = ''.join(
          f'<figure><img alt="{_esc(caption)}" data-image="{stage}/{i}" src="data:image/png;'
          f'base64,{base64.b64encode(png).decode()}"><figcaption>{_esc(caption)}</figcaption>'
          '</figure>' for i, (caption, png) in enumerate(self.images[stage]))
      parts.append(f'<div class="card"><h3>{_esc(title)}</h3>'
                   f'<div class="grid" style="margin-top:8px">{figures}</div></div>')
    return ''.join(parts)

  # -- dead letters

  def _dead_letters(self):
    parts = ['<h2 id="dead-letters">Dead letters</h2>']
    for split in self.splits:
      c = self.m['splits'][split]
      if not c['rows_rejected']:
        parts.append(f'<div class="card"><h3>{_esc(split)}</h3><p class="muted">Nothing '
                     'rejected.</p></div>')
        continue
      examples = self.dead_letters.get(split, {})
      rows = []
      for kind, count in sorted(c['rejected_by_kind'].items(), key=lambda kv: (-kv[1], kv[0])):
        shown = ''.join(
            f'<div class="example"><span class="mono">{_esc(where)}</span>: {_esc(reason)}'
            + (f'<div class="mono muted wrap">{_esc(str(raw)[:200])}</div>' if raw else '')
            + '</div>' for where, reason, raw in examples.get(kind, []))
        rows.append(f'<tr><td>{_esc(kind)}</td>'
                    + _num('manifest', f'{split}/rejected/{kind}', count)
                    + f'<td class="wide">{shown}</td></tr>')
      parts.append(
          f'<div class="card"><h3>{_esc(split)}: {c["rows_rejected"]:,} rejected '
          f'<span class="muted" style="font-weight:400">(all of them in errors/{_esc(split)}'
          '.jsonl)</span></h3><table style="margin-top:8px; width:100%"><thead><tr><th>kind</th>'
          '<th class="n">count</th><th>the first of each kind: where, why, the record</th></tr>'
          f'</thead><tbody>{"".join(rows)}</tbody></table></div>')
    return ''.join(parts)


def _short_list(values, limit=12):
  shown = ', '.join(_fmt(v) for v in values[:limit])
  return f'[{shown}{", ..." if len(values) > limit else ""}]'


def _histogram_svg(histograms, width, height, max_bins):
  """Histograms of each split's share of values on common bins, as inline SVG: the first split
  as bars, the others as outlines over them (overlaid bars would mix their colours)."""
  present = {s: h for s, h in histograms.items() if h is not None}
  if not present:
    return '<p class="muted">No values.</p>'
  aligned = dict(zip(present, statistics.AlignedHistogram.common(list(present.values()), max_bins)))
  first = next(iter(aligned.values()))
  bins = len(first.counts)
  shares = {s: h.counts / max(1, h.counts.sum()) for s, h in aligned.items()}
  top = max(float(v.max()) for v in shares.values()) or 1.0
  left, bottom, pad = 38, 18, 6
  plot_w, plot_h = width - left - pad, height - bottom - pad
  bar = plot_w / bins
  edges = first.edges()
  base = pad + plot_h

  def y(share):
    return base - share / top * plot_h

  parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'xmlns="http://www.w3.org/2000/svg" role="img">',
           f'<line x1="{left}" y1="{pad}" x2="{width - pad}" y2="{pad}" stroke="#edf0f3"/>',
           f'<line x1="{left}" y1="{pad + plot_h / 2:.1f}" x2="{width - pad}" '
           f'y2="{pad + plot_h / 2:.1f}" stroke="#edf0f3"/>',
           f'<text x="{left - 5}" y="{pad + 4}" text-anchor="end">{_percent(top)}</text>',
           f'<text x="{left - 5}" y="{pad + plot_h / 2 + 4:.1f}" text-anchor="end">'
           f'{_percent(top / 2)}</text>',
           f'<text x="{left - 5}" y="{base + 4}" text-anchor="end">0</text>']
  for n, (split, values) in enumerate(shares.items()):
    color = _COLORS.get(split, '#888')
    counts = aligned[split].counts
    if n == 0:
      for i, share in enumerate(values):
        if share:
          parts.append(
              f'<rect x="{left + i * bar + 0.5:.1f}" y="{y(share):.1f}" '
              f'width="{max(1.0, bar - 1):.1f}" height="{max(1.0, base - y(share)):.1f}" '
              f'fill="{color}" fill-opacity="0.75"><title>{_esc(split)} [{_fmt(edges[i])}, '
              f'{_fmt(edges[i + 1])}): {int(counts[i]):,} ({share:.1%})</title></rect>')
      continue
    points = [f'{left:.1f},{base:.1f}']
    for i, share in enumerate(values):
      points += [f'{left + i * bar:.1f},{y(share):.1f}',
                 f'{left + (i + 1) * bar:.1f},{y(share):.1f}']
    points.append(f'{left + bins * bar:.1f},{base:.1f}')
    parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{color}" '
                 'stroke-width="2" stroke-linejoin="round"/>')
  parts.append(f'<line x1="{left}" y1="{base}" x2="{width - pad}" y2="{base}" stroke="#9aa5b1"/>')
  for i in sorted({0, bins // 2, bins}):
    anchor = 'start' if i == 0 else 'end' if i == bins else 'middle'
    parts.append(f'<text x="{left + i * bar:.1f}" y="{height - 4}" text-anchor="{anchor}">'
                 f'{_esc(_fmt(edges[i]))}</text>')
  parts.append('</svg>')
  return ''.join(parts)


def _percent(share):
  return f'{share:.0%}' if share >= 0.1 else f'{share:.1%}'


def _bars_svg(counts, values, width):
  """Horizontal bars: each top value's share of all values, one bar per split."""
  splits = list(counts)
  step = 11  # one bar and its label per split
  row = step * len(splits) + 8
  label_w, pad = 150, 46
  height = row * len(values) + 6
  top = max([c.get(v, 0) / max(1, total) for c, total in counts.values() for v in values] or [1])
  top = top or 1.0
  plot_w = width - label_w - pad
  parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'xmlns="http://www.w3.org/2000/svg" role="img">']
  for i, value in enumerate(values):
    y = i * row + 4
    text = value if len(value) <= 24 else value[:23] + '…'
    parts.append(f'<text x="{label_w - 6}" y="{y + row / 2 + 2:.1f}" text-anchor="end">'
                 f'{_esc(text)}</text>')
    for j, split in enumerate(splits):
      c, total = counts[split]
      share = c.get(value, 0) / max(1, total)
      w = max(1.0, share / top * plot_w) if share else 0
      parts.append(f'<rect x="{label_w}" y="{y + j * step:.1f}" width="{w:.1f}" height="9" '
                   f'fill="{_COLORS.get(split, "#888")}"><title>{_esc(split)} {_esc(value)}: '
                   f'{_fmt(c.get(value, 0))} ({share:.1%})</title></rect>')
      parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + j * step + 8.5:.1f}">{share:.1%}'
                   '</text>')
  parts.append('</svg>')
  return ''.join(parts)
