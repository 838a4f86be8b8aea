"""DIR/report.html and DIR/statistics/summary.json, written when a run publishes (before the
manifest): what the run read, wrote and rejected, each raw feature's distribution beside its
transformed features', drift between train and eval, vocabularies, the transform's analyzer
constants (bucket boundaries, z-score means and variances), dead letters and, for image runs,
sample images and per-channel statistics.

Everything comes from what the run already produced: the manifest, the statistics files that
pipelines/statistics/ computed inside the pipeline, the transform output and the first lines of
the dead-letter files. Nothing re-reads the data, so a report costs the same for 1,000 rows as for
1,000,000. The page is one self-contained file (inline CSS and SVG, images as base64 PNGs, no
scripts), so it opens offline and can be mailed. Every number it shows carries its exact value in
a data- attribute (data-stat, data-manifest, data-drift, data-vocab, data-constant), which the
tests compare with the manifest and the statistics files.

The package, one concern a module: flags (the drift thresholds), summary (what the report
shows, as plain data), constants (the analyzer constants, read from the transform graph),
images (sample images of image runs), svg (the charts), formatting (numbers and escaping), page
(the template's values, and rendering templates/report.html.j2) and write (reading a run's
outputs, writing the two files).
"""

from pipelines.report.flags import (
                                    DEFAULT_CATEGORICAL_THRESHOLD,
                                    DEFAULT_NUMERIC_THRESHOLD,
                                    Options,
                                    add_flags,
)
from pipelines.report.images import SAMPLE_IMAGES
from pipelines.report.summary import TOP_SHOWN
from pipelines.report.write import REPORT, SUMMARY, write_report

__all__ = ['DEFAULT_CATEGORICAL_THRESHOLD', 'DEFAULT_NUMERIC_THRESHOLD', 'Options', 'REPORT',
           'SAMPLE_IMAGES', 'SUMMARY', 'TOP_SHOWN', 'add_flags', 'write_report']
