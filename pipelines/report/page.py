"""The page: what templates/report.html.j2 shows, built from the manifest, the summary, dead
letters and sample images as plain values (rows, cells, charts), and rendered with every value
escaped (autoescape; a value undefined in the template is an error, not an empty string)."""

import base64
import dataclasses
import functools
import json

import jinja2

from pipelines import statistics
from pipelines.report import formatting, svg
from pipelines.report.constants import constant_meaning
from pipelines.report.summary import (
  TOP_SHOWN,
  aligned_histogram,
  derived_features,
  exact_top,
  is_constant,
  is_identifier,
  ordered_splits,
)

TEMPLATE = 'report.html.j2'
_LABELS = {'std_dev': 'std dev', 'num_values': 'values', 'avg_bytes': 'avg bytes',
           'min_bytes': 'min bytes', 'max_bytes': 'max bytes', 'avg_length': 'avg length',
           'distinct': 'distinct (est.)', 'median': 'median (est.)'}
_SAMPLES = (('raw', 'A random sample of raw images (train, as read; labels)'),
            ('transformed', 'A random sample of transformed images (train, after decode and '
                            'resize; label ids)'))


def render(manifest, summary, directory, dead_letters, images):
  """The page of a run: `dead_letters` {split: {kind: [(where, reason, record)]}}, `images` what
  images.sample_images returns (None for a tabular run)."""
  return _environment().get_template(TEMPLATE).render(
      context(manifest, summary, directory, dead_letters, images))


@functools.cache
def _environment():
  # Every value the template writes goes through finalize, formatting.escape, and comes out as
  # markup that autoescape leaves as it is: escaped with the spelling report.html has always had
  # (formatting.Html). Without finalize, autoescape would escape the same characters.
  environment = jinja2.Environment(
      loader=jinja2.PackageLoader('pipelines.report', 'templates'), autoescape=True,
      undefined=jinja2.StrictUndefined, finalize=formatting.escape, trim_blocks=True,
      lstrip_blocks=True, keep_trailing_newline=True)
  environment.filters.update(number=formatting.number, exact=formatting.exact,
                             short_list=formatting.short_list, json=json.dumps,
                             meaning=constant_meaning)
  environment.globals.update(color=svg.color)
  return environment


def context(manifest, summary, directory, dead_letters, images):
  """The template's values: plain data and, for the charts, SVG markup."""
  splits = ordered_splits(manifest.splits)
  # An image run shows its images near the top: they say more than the pixel statistics.
  sections = [('summary', 'Summary'), ('drift', 'Drift')] + (
      [('images', 'Images')] if images else []) + [
          ('features', 'Features'), ('vocabularies', 'Vocabularies'),
          ('constants', 'Analyzer constants'), ('dead-letters', 'Dead letters')]
  elapsed = manifest.elapsed_seconds
  return {
      'directory': directory,
      'meta': {'pipeline': manifest.pipeline or '',
               'transforms': manifest.transforms or '',
               'run_id': manifest.run_id or '',
               'elapsed': elapsed, 'elapsed_exact': repr(elapsed),
               'versions': ', '.join(f'{k} {v}'
                                     for k, v in sorted((manifest.versions or {}).items()))},
      'sections': sections,
      'splits': splits,
      'summary': _summary(manifest, summary, splits),
      'drift': _drift(summary, splits),
      'images': _images(images),
      'features': _features(summary, splits, images),
      'vocabularies': _vocabularies(summary['vocabularies']),
      'constants': _constants(summary),
      'dead_letters': _dead_letters(manifest, dead_letters, splits),
  }


def _summary(manifest, summary, splits):
  counts = manifest.splits
  rows = [dict(dataclasses.asdict(counts[split]), split=split,
               kinds=', '.join(f'{k}: {v:,}' for k, v in counts[split].rejected_by_kind.items())
               or '–') for split in splits]
  drifting = manifest.statistics['drifting_features']
  measured = len(summary['drift']['features'])
  features = summary['features']
  tiles = [
      ('rows written', sum(counts[s].rows_written for s in splits),
       ' + '.join(f'{s} {counts[s].rows_written:,}' for s in splits)),
      ('rows rejected', sum(counts[s].rows_rejected for s in splits), 'see Dead letters below'),
      ('features', len(features['raw'][splits[0]]),
       f'{len(features["transformed"][splits[0]])} after the transform'),
      ('drifting features', len(drifting),
       (', '.join(drifting) if drifting else 'none') + f' of {measured} compared'
       if summary['drift']['compared'] else 'no eval split'),
  ]
  return {'rows': rows, 'tiles': tiles}


def _drift(summary, splits):
  """None without a split to compare with train; else the thresholds, the splits compared and
  the measured features, most drifting first."""
  d = summary['drift']
  if not d.get('compared'):
    return None
  return {'thresholds': d['thresholds'], 'compared': d['compared'], 'reference': d['reference'],
          'rows': sorted(d['features'].items(), key=lambda kv: -kv[1]['value'])}


# ---- features --------------------------------------------------------------------------------


def _features(summary, splits, images):
  """A card per raw feature, with cards of the transformed features named after it; the
  transformed features named after none under `other` (None when there are none)."""
  raw = summary['features']['raw']
  transformed = summary['features']['transformed']
  groups = derived_features(list(raw[splits[0]]), list(transformed[splits[0]]))

  def per_split(stage, name):
    return {s: summary['features'][stage][s].get(name) for s in splits}

  def derived_card(name):
    values = per_split('transformed', name)
    present = [v for v in values.values() if v]
    if not present:
      return None
    # Small charts take half the bins: equal-width bins over values derived from integers
    # (z-scores of ages) would otherwise alternate full and empty.
    return {'name': name, 'type': present[0]['type'],
            'chart': _chart(values, 330, 110, statistics.MAX_BINS // 2, images),
            'table': _stats_table('transformed', name, values, compact=True),
            'constants': summary['analyzer_constants'].get(name, {})}

  cards = []
  for name in raw[splits[0]]:
    values = per_split('raw', name)
    cards.append({
        'name': name, 'type': next(v for v in values.values() if v)['type'],
        'drift': summary['drift']['features'].get(name),
        'table': _stats_table('raw', name, values),
        'chart': _chart(values, 600, 180, statistics.MAX_BINS, images),
        'derived': [c for c in map(derived_card, groups[name]) if c]})
  other = [c for c in map(derived_card, groups[None]) if c] if groups[None] else None
  return {'cards': cards, 'other': other}


def _stats_table(stage, name, per_split, compact=False):
  """The rows (label, statistic) of a feature's table of statistics, a column per split; with
  its top values for a string feature (not in compact tables, the transformed features')."""
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
  top = None
  if first['type'] == 'STRING' and not compact and not is_identifier(first):
    top = _top_table(per_split)
  return {'stage': stage, 'name': name, 'splits': list(per_split.items()),
          'rows': [(_LABELS.get(key, key), key) for key in keys], 'top': top}


def _top_table(per_split):
  """The first split's top values, with each split's count of them."""
  splits = [s for s, v in per_split.items() if v]
  # A value the sketch did not keep is absent (0) where the split's counts are exact.
  tops = {s: dict(per_split[s]['top']) for s in splits}
  absent = {s: 0 if exact_top(per_split[s]) else None for s in splits}
  ranked = [v for v, _ in per_split[splits[0]]['top'][:TOP_SHOWN]]
  return {'splits': splits,
          'rows': [(value, [(s, tops[s].get(value, absent[s])) for s in splits])
                   for value in ranked]}


def _chart(per_split, width, height, max_bins, images):
  """What the chart of a feature is: {'kind': svg, with the chart; constant, with the value;
  identifier; images; no values}, or None for none."""
  present = {s: v for s, v in per_split.items() if v}
  if not present:
    return None
  first = next(iter(present.values()))
  if is_constant(present.values()):
    return {'kind': 'constant', 'value': first['min']}
  if first['type'] in ('INT', 'FLOAT'):
    chart = svg.histogram_svg({s: aligned_histogram(v) for s, v in present.items()}, width,
                              height, max_bins)
    return {'kind': 'svg', 'svg': chart} if chart else {'kind': 'no values'}
  if first['type'] == 'STRING' and is_identifier(first):
    return {'kind': 'identifier'}
  if first['type'] == 'STRING':
    return {'kind': 'svg',
            'svg': svg.bars_svg({s: (dict(v['top']), v['num_values']) for s, v in present.items()},
                                [v for v, _ in first['top'][:TOP_SHOWN]], width)}
  if first['type'] == 'BYTES' and images:
    return {'kind': 'images'}
  return None


# ---- vocabularies, constants, images, dead letters -------------------------------------------


def _vocabularies(vocabularies):
  rows = []
  for name, v in vocabularies.items():
    oov = v['oov_share_eval']
    note = '' if v['oov_exact'] in (None, True) else ' (lower bound)'
    rows.append({'name': name, 'size': v['size'], 'oov': oov,
                 'shown': None if oov is None else f'{100 * oov:.2f}%{note}',
                 'note': v.get('oov_note') or '', 'feature': v.get('oov_feature') or '',
                 'top': ', '.join(v['top'])})
  return rows


def _constants(summary):
  """The bucket boundaries, and the other constants (the boundaries are those of bucketize)."""
  constants = summary['analyzer_constants']
  others = [(feature, constant_meaning(name), name, formatting.short_list(values))
            for feature, found in constants.items() for name, values in found.items()
            if not name.endswith('apply_buckets')]
  return {'found': bool(constants),
          'boundaries': [(f, b, json.dumps(b), ', '.join(formatting.number(x) for x in b))
                         for f, b in summary['bucket_boundaries'].items()],
          'others': others}


def _images(images):
  if not images:
    return None
  return {'channels': [(i, float(mean), float(std))
                       for i, (mean, std) in enumerate(images['channels'])],
          'samples': [(stage, title, [(caption, base64.b64encode(png).decode())
                                      for caption, png in images[stage]])
                      for stage, title in _SAMPLES]}


def _dead_letters(manifest, dead_letters, splits):
  """Per split: its count of rejected rows and, by kind (most frequent first), the first dead
  letters of the kind as (where, reason, the record's first 200 characters or None)."""
  result = []
  for split in splits:
    c = manifest.splits[split]
    examples = dead_letters.get(split, {})
    by_count = sorted(c.rejected_by_kind.items(), key=lambda kv: (-kv[1], kv[0]))
    kinds = [(kind, count, [(where, reason, str(raw)[:200] if raw else None)
                            for where, reason, raw in examples.get(kind, [])])
             for kind, count in by_count] if c.rows_rejected else []
    result.append({'split': split, 'rejected': c.rows_rejected, 'kinds': kinds})
  return result
