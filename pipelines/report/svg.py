"""The report's charts as inline SVG: histograms of numeric features, bars of the top values of
string features, each split's share of its values. Built as markup (formatting.Html): every
value written into it, a feature's values and split names included, is escaped."""

from pipelines import statistics
from pipelines.report.formatting import Html, escape, number, percent

COLORS = {'train': '#3b6fb6', 'eval': '#e8772e'}


def color(split):
  return COLORS.get(split, '#888')


def histogram_svg(histograms, width, height, max_bins):
  """Histograms of each split's share of values on common bins, as inline SVG: the first split
  as bars, the others as outlines over them (overlaid bars would mix their colours). None where
  no split has values."""
  present = {s: h for s, h in histograms.items() if h is not None}
  if not present:
    return None
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

  parts = [Html('<svg width="{0}" height="{1}" viewBox="0 0 {0} {1}" '
                'xmlns="http://www.w3.org/2000/svg" role="img">').format(width, height),
           Html('<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#edf0f3"/>').format(
               left, pad, width - pad, pad),
           Html('<line x1="{0}" y1="{1:.1f}" x2="{2}" y2="{1:.1f}" stroke="#edf0f3"/>').format(
               left, pad + plot_h / 2, width - pad),
           Html('<text x="{}" y="{}" text-anchor="end">{}</text>').format(
               left - 5, pad + 4, percent(top)),
           Html('<text x="{}" y="{:.1f}" text-anchor="end">{}</text>').format(
               left - 5, pad + plot_h / 2 + 4, percent(top / 2)),
           Html('<text x="{}" y="{}" text-anchor="end">0</text>').format(left - 5, base + 4)]
  # The bars are written with f-strings, not Html.format: a 300-column report has some 30,000
  # of them (1.9 s of its 4 s here). Numbers need no escaping; the split's name and colour, and
  # the edges' labels, are escaped once each.
  labels = [escape(number(edge)) for edge in edges]
  for n, (split, values) in enumerate(shares.items()):
    counts = aligned[split].counts
    name, fill = escape(split), escape(color(split))
    if n == 0:
      for i, share in enumerate(values.tolist()):
        if share:
          top_y = y(share)
          parts.append(Html(
              f'<rect x="{left + i * bar + 0.5:.1f}" y="{top_y:.1f}" '
              f'width="{max(1.0, bar - 1):.1f}" height="{max(1.0, base - top_y):.1f}" '
              f'fill="{fill}" fill-opacity="0.75"><title>{name} [{labels[i]}, {labels[i + 1]}): '
              f'{int(counts[i]):,} ({share:.1%})</title></rect>'))
      continue
    points = [f'{left:.1f},{base:.1f}']
    for i, share in enumerate(values):
      points += [f'{left + i * bar:.1f},{y(share):.1f}',
                 f'{left + (i + 1) * bar:.1f},{y(share):.1f}']
    points.append(f'{left + bins * bar:.1f},{base:.1f}')
    parts.append(Html('<polyline points="{}" fill="none" stroke="{}" stroke-width="2" '
                      'stroke-linejoin="round"/>').format(' '.join(points), color(split)))
  parts.append(Html('<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="#9aa5b1"/>').format(
      left, base, width - pad))
  for i in sorted({0, bins // 2, bins}):
    anchor = 'start' if i == 0 else 'end' if i == bins else 'middle'
    parts.append(Html('<text x="{:.1f}" y="{}" text-anchor="{}">{}</text>').format(
        left + i * bar, height - 4, anchor, number(edges[i])))
  parts.append(Html('</svg>'))
  return Html('').join(parts)


def bars_svg(counts, values, width):
  """Horizontal bars: each top value's share of all values, one bar per split."""
  splits = list(counts)
  step = 11  # one bar and its label per split
  row = step * len(splits) + 8
  label_w, pad = 150, 46
  height = row * len(values) + 6
  top = max([c.get(v, 0) / max(1, total) for c, total in counts.values() for v in values] or [1])
  top = top or 1.0
  plot_w = width - label_w - pad
  parts = [Html('<svg width="{0}" height="{1}" viewBox="0 0 {0} {1}" '
                'xmlns="http://www.w3.org/2000/svg" role="img">').format(width, height)]
  for i, value in enumerate(values):
    y = i * row + 4
    text = value if len(value) <= 24 else value[:23] + '…'
    parts.append(Html('<text x="{}" y="{:.1f}" text-anchor="end">{}</text>').format(
        label_w - 6, y + row / 2 + 2, text))
    for j, split in enumerate(splits):
      c, total = counts[split]
      share = c.get(value, 0) / max(1, total)
      w = max(1.0, share / top * plot_w) if share else 0
      parts.append(Html('<rect x="{}" y="{:.1f}" width="{:.1f}" height="9" fill="{}"><title>'
                        '{} {}: {} ({:.1%})</title></rect>').format(
                            label_w, y + j * step, w, color(split), split, value,
                            number(c.get(value, 0)), share))
      parts.append(Html('<text x="{:.1f}" y="{:.1f}">{:.1%}</text>').format(
          label_w + w + 4, y + j * step + 8.5, share))
  parts.append(Html('</svg>'))
  return Html('').join(parts)
