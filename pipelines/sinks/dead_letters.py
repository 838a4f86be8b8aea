"""Dead letters: the sink that writes rejected records to errors/<split>.jsonl, and the reading
of their first examples for the end-of-run summary and the report."""

import json
import logging

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

_LOG = logging.getLogger('pipelines')


class WriteErrors(beam.PTransform):
  """Dead-letter dicts -> one JSON-lines file; returns {kind: count}."""

  def __init__(self, path):
    super().__init__()
    self._path = path

  def expand(self, errors):
    _ = (errors
         | 'ToJson' >> beam.Map(lambda e: json.dumps(e, sort_keys=True, ensure_ascii=False))
         | 'WriteErrors' >> beam.io.WriteToText(self._path, num_shards=1, shard_name_template=''))
    return (errors
            | 'Kind' >> beam.Map(lambda e: e['kind'])
            | 'CountByKind' >> beam.combiners.Count.PerElement()
            | 'AsDict' >> beam.combiners.ToDict())


DEAD_LETTER_EXAMPLES = 3  # of each reason, in the summary
_EXCERPT = 80  # characters of a rejected record or reason shown
_SCAN_LINES = 100_000  # dead letters read at most to find the examples


def _shorten(text, limit=_EXCERPT):
  return text if len(text) <= limit else text[:limit - 3] + '...'


def dead_letter_examples(path, kinds, limit=DEAD_LETTER_EXAMPLES):
  """{kind: the first `limit` dead letters of that kind} from a dead-letter file, read only until
  every kind in `kinds` has its examples (or _SCAN_LINES lines: a reason first seen after that
  shows none)."""
  examples = {kind: [] for kind in kinds}
  try:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      for n, line in enumerate(f):
        if n >= _SCAN_LINES or all(len(e) >= limit for e in examples.values()):
          break
        if line.strip():
          letter = json.loads(line)
          found = examples.setdefault(letter.get('kind'), [])
          if len(found) < limit:
            found.append(letter)
  except Exception as e:  # the summary must not turn a finished run into a failed one
    _LOG.warning('cannot read dead-letter examples from %s: %s', path, e)
  return examples


def where(letter):
  """file:line of a CSV row; the file, and the key inside it, of an image."""
  if letter.get('line') is not None:
    return f'{letter["file"]}:{letter["line"]}'
  key = letter.get('key')
  return letter['file'] if key in (None, letter['file']) else f'{letter["file"]} [{key}]'


def _excerpt(letter):
  if letter.get('raw') is not None:  # escapes show line breaks, tabs and NUL bytes
    return '| ' + _shorten(repr(letter['raw'].rstrip('\r\n'))[1:-1])
  if letter.get('bytes') is not None:
    return f'({letter["bytes"]:,} bytes)'
  return None


def dead_letter_lines(rejected, errors_path, what='rows'):
  """The dead-letter summary from {split: {kind: count}}: per split with rejects, their count by
  reason, the first few of each reason (where, why, an excerpt) and the file holding them all."""
  lines = []
  for split, by_kind in rejected.items():
    if not by_kind:
      continue
    path = errors_path(split)
    lines.append(f'  {split}: {sum(by_kind.values()):,} {what} rejected, all of them in {path}')
    examples = dead_letter_examples(path, by_kind)
    for kind, n in sorted(by_kind.items(), key=lambda kv: (-kv[1], kv[0])):
      shown = len(examples.get(kind, []))
      lines.append(f'    {kind}: {n:,}' + (f' (first {shown})' if n > shown else ''))
      for letter in examples.get(kind, []):
        lines.append(f'      {where(letter)}: {_shorten(letter["reason"])}')
        excerpt = _excerpt(letter)
        if excerpt:
          lines.append(f'        {excerpt}')
  return lines
