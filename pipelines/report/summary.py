"""What the report shows, as plain data: the summary that statistics/summary.json holds and the
page is rendered from. Per split and stage (raw, transformed), each feature's numbers from the
statistics files; drift between train and eval; each vocabulary's size, top values and the
share of eval values out of it; the analyzer constants (pipelines/report/constants.py)."""

from apache_beam.io.filesystems import FileSystems
from tensorflow_metadata.proto.v0 import statistics_pb2

from pipelines import output_dir, statistics
from pipelines.report.constants import bucket_boundaries

TOP_SHOWN = 10  # top values in charts and tables
# Train values of a raw feature count as the vocabulary's own tokens (its OOV share can then be
# read off the raw eval values) when at least this share of them are in the vocabulary.
RAW_TOKENS_MIN_SHARE = 0.9


def summarize(datasets, tft_output, vocab_names, constants, thresholds, compared='eval',
              reference='train', reference_split='train'):
  """The summary of a run from its statistics ({stage: {split: DatasetFeatureStatistics}}), its
  transform output, the names of its vocabularies and its analyzer constants. `thresholds` are
  the drift thresholds ({'numeric_js': ..., 'categorical_linf': ...}). Drift and OOV shares are
  measured on split `compared` against the train split (eval, in a run that analyzed; a
  transform-only run compares its new data with the train statistics of the run whose transform
  it applies: `reference_split` is their key in `datasets`, `reference` what the page calls
  them)."""
  features = {stage: {split: {f.path.step[0]: feature_summary(f) for f in dataset.features}
                      for split, dataset in by_split.items()}
              for stage, by_split in datasets.items()}
  num_examples = {stage: {split: dataset.num_examples for split, dataset in by_split.items()}
                  for stage, by_split in datasets.items()}
  raw = features['raw']
  measured = compared in raw and reference_split in raw
  drifts = (drift(raw[reference_split], raw[compared], thresholds['numeric_js'],
                  thresholds['categorical_linf']) if measured else {})
  return {
      'num_examples': num_examples,
      'features': features,
      'drift': {'thresholds': thresholds, 'features': drifts,
                'compared': compared if measured else None, 'reference': reference},
      'vocabularies': vocabularies(tft_output, vocab_names, raw, features['transformed'],
                                   compared),
      'analyzer_constants': constants,
      'bucket_boundaries': bucket_boundaries(constants),
  }


def ordered_splits(splits):
  """Splits as the report lists them: train first."""
  return sorted(splits, key=lambda split: (split != 'train', split))


# ---- features and drift ----------------------------------------------------------------------


def feature_summary(feature):
  """One FeatureNameStatistics -> a plain dict of the numbers the report shows."""
  kind = statistics_pb2.FeatureNameStatistics.Type.Name(feature.type)
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


def aligned_histogram(summary):
  """A numeric feature's histogram as a statistics.AlignedHistogram, or None without values."""
  if not summary or not summary.get('histogram'):
    return None
  return statistics.AlignedHistogram.from_buckets(summary['histogram'])


def drift(train, evaluate, numeric_threshold, categorical_threshold):
  """{feature: measure, value, threshold, drifting} for the raw features both splits have."""
  result = {}
  for name in sorted(set(train) & set(evaluate)):
    a, b = train[name], evaluate[name]
    if a['type'] in ('INT', 'FLOAT') and b['type'] in ('INT', 'FLOAT'):
      ha, hb = aligned_histogram(a), aligned_histogram(b)
      if ha is None or hb is None:
        continue
      ha, hb = statistics.AlignedHistogram.common([ha, hb], max_bins=4096)
      measure, value = 'Jensen-Shannon divergence', statistics.jensen_shannon(ha.counts, hb.counts)
      threshold = numeric_threshold
    elif a['type'] == 'STRING' and b['type'] == 'STRING':
      if is_identifier(a) and is_identifier(b):
        continue  # file names, ids: every value new, nothing to compare
      measure = 'L-infinity distance'
      value = statistics.l_infinity(dict(a['top']), a['num_values'], dict(b['top']),
                                    b['num_values'])
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


def is_constant(summaries):
  """Whether one feature's summaries (one per split) are numeric and of one value: no chart."""
  return all(v['type'] in ('INT', 'FLOAT') and v['min'] == v['max'] for v in summaries)


def exact_top(summary):
  """Whether a string feature's top-value counts are exact (the sketch kept every value)."""
  return sum(count for _, count in summary['top']) == summary['num_values']


def derived_features(raw_names, transformed_names):
  """{raw feature: [transformed features named after it]} by the `<raw>_...` naming convention
  (age -> age_xf, age_bucket_xf); transformed features that match no raw feature under None."""
  result = {name: [] for name in raw_names}
  result[None] = []
  for t in sorted(transformed_names):
    matches = [r for r in raw_names if t == r or t.startswith(r + '_')]
    result[max(matches, key=len) if matches else None].append(t)
  return result


# ---- vocabularies ----------------------------------------------------------------------------


def vocabulary_names(directory):
  """The vocabularies of the transform output in `directory` (its assets), sorted."""
  assets = output_dir.join(directory, 'transform_fn', 'assets')
  if not FileSystems.exists(assets):
    return []
  found = FileSystems.match([output_dir.join(assets, '*')])[0].metadata_list
  return sorted(m.path[len(assets) + 1:] for m in found)


def vocabularies(tft_output, vocab_names, raw, transformed=None, compared='eval'):
  """{vocabulary: size, top values (with train counts), the share of eval values out of it}.

  The OOV share is the share of the eval split's values (split `compared`'s; the field keeps its
  name) that the vocabulary maps to OOV ids.
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
    evaluate = raw.get(compared, {}).get(name)
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
      if compared in transformed:
        share = _oov_share_of_ids(ids[compared], len(values))
        if share is not None:
          entry.update(oov_share_eval=share, oov_exact=True, oov_feature=feature)
    if raw_tokens and 'top_train_counts' not in entry:
      by_value = dict(train['top'])
      entry['top_train_counts'] = [by_value.get(v) for v in entry['top']]
    if entry['oov_feature'] is None:
      if raw_tokens and evaluate and evaluate['type'] == 'STRING' and evaluate['num_values']:
        oov = sum(count for value, count in evaluate['top'] if value not in known)
        entry.update(oov_share_eval=oov / evaluate['num_values'], oov_exact=exact_top(evaluate),
                     oov_feature=name)
      elif compared not in raw:
        entry['oov_note'] = f'no {compared} split'
      elif raw_tokens is False:
        entry['oov_note'] = 'vocabulary of derived tokens'
      elif applied and ids.get(compared) and not ids[compared]['num_values']:
        entry['oov_note'] = f'no {compared} values'
      elif applied and ids.get(compared):
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
  histogram = aligned_histogram(summary) if summary and summary['type'] == 'INT' else None
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
  histogram = aligned_histogram(summary)
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
