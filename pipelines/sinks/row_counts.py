"""The counts sink: rows read, written and rejected per split, computed in the pipeline."""

import json

import apache_beam as beam

from pipelines.output_dir import write_text


def _write_counts(path, rows_ok, written, rejected_by_kind):
  rejected = sum(rejected_by_kind.values())
  write_text(path, json.dumps({
      'rows_read': rows_ok + rejected,
      'rows_written': written,
      'rows_rejected': rejected,
      'rejected_by_kind': dict(sorted(rejected_by_kind.items())),
  }))


class WriteCounts(beam.PTransform):
  """Rows read, written and rejected for one split, computed in the pipeline itself (so any
  runner produces them) and saved for the manifest."""

  def __init__(self, path):
    super().__init__()
    self._path = path

  def expand(self, inputs):
    rows_ok, written, rejected_by_kind = inputs
    path = self._path
    return (rows_ok.pipeline
            | 'Once' >> beam.Create([path])
            | 'Save' >> beam.Map(_write_counts, beam.pvalue.AsSingleton(rows_ok),
                                 beam.pvalue.AsSingleton(written),
                                 beam.pvalue.AsSingleton(rejected_by_kind)))
