"""How the page writes values: numbers rounded for reading and exact for data- attributes, and
the escaping of everything else, shared by the template (pipelines/report/page.py) and the SVG
charts (pipelines/report/svg.py)."""

import html
import math

import markupsafe


class Html(markupsafe.Markup):
  """Markup whose escaping writes quotes as html.escape does (&quot;, &#x27;; markupsafe writes
  &#34;, &#39;), the spelling report.html has always had, so that text searched for in the page
  (a dead letter's reason, by the tests) is found whichever wrote it. Formatting arguments and
  strings added or joined to it are escaped that way too; markup passes unchanged."""
  __slots__ = ()

  @classmethod
  def escape(cls, s):
    if hasattr(s, '__html__'):
      return cls(s.__html__())
    return cls(html.escape(str(s), quote=True))


def escape(value):
  """`value` as safe markup: text escaped, markup (a macro's output, an SVG chart) as it is.
  The template environment's finalize, so it escapes every value the template writes."""
  return Html.escape(value)


def number(value):
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


def exact(value):
  """The exact value of a number, for its data-value attribute (what the tests compare)."""
  if value is None:
    return ''
  return str(value) if isinstance(value, bool) else repr(value)


def short_list(values, limit=12):
  """The first `limit` values of a constant as `[a, b, ...]`: one can hold thousands."""
  shown = ', '.join(number(v) for v in values[:limit])
  return f'[{shown}{", ..." if len(values) > limit else ""}]'


def percent(share):
  """A chart's axis label: whole percents, one decimal below 10%."""
  return f'{share:.0%}' if share >= 0.1 else f'{share:.1%}'
