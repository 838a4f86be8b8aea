"""Dataset statistics computed inside the Beam pipeline, per split, of the raw and the transformed
RecordBatches; stored as tensorflow_metadata's DatasetFeatureStatisticsList (what TFDV and Facets
read) in DIR/statistics/<split>_raw.pb and <split>_transformed.pb.

TensorFlow Data Validation would be the natural library, but no release of it installs beside
TF 2.21 / TFT 1.21, so this module computes the same kind of statistics with one CombineFn over
RecordBatches. Every statistic is updated once per batch with vectorized numpy / Arrow / tfx_bsl
calls over whole columns (never per row), and every accumulator has a bounded size:

  numeric features  count, missing, values per row, min, max, zeros, NaN, mean and standard
                    deviation (population, merged with Chan's formula: exact up to float64
                    rounding), and an equal-width histogram (AlignedHistogram, below);
  string features   count, missing, distinct values (tfx_bsl's KmvSketch), top values and their
                    counts (exact while a feature has at most EXACT_VALUES distinct values, so
                    the same in every run whatever the order of batches and merges; beyond,
                    tfx_bsl's MisraGriesSketch, whose result depends on that order), average
                    length, invalid UTF-8 count;
                    features whose values are mostly not UTF-8 (encoded images) become BYTES
                    statistics (distinct values, min/avg/max bytes).

The histogram: equal-width bins need the value range, which one pass only knows at its end.
tfx_bsl's QuantilesSketch would give quantiles to interpolate bins from, but costs 0.6 ms per 8,192
values (measured: 15 times the rest of a numeric feature's statistics, 10% of a 1M-row run), and
its interpolated counts are approximate. AlignedHistogram instead keeps exact counts in at most
MAX_BINS bins whose width is a power of two and whose edges are multiples of the width: when values
fall outside the range the bins cover, the width doubles and each pair of neighbouring bins merges
into one, exactly. Two such histograms (two batches, two workers, train and eval) are brought to
the larger width the same way, so every merge is exact and train and eval always have common bins
for the drift measure. The median is interpolated within its bin (off by at most one bin width).

Each CombineFn also keeps a uniform random sample of SAMPLE_ROWS rows (at most SAMPLE_BYTES), for
the report's sample images; it is staged beside the run, not published.

The package: histogram.py (AlignedHistogram and the drift measures, which the report reuses),
accumulators.py (each feature's statistics, the CombineFn and its sample), files.py (where the
files go, writing them in the pipeline and reading them back).
"""

from pipelines.statistics.accumulators import MAX_BINS, SAMPLE_BYTES, SAMPLE_ROWS, StatisticsFn
from pipelines.statistics.files import (
  STAGES,
  WriteStatistics,
  read_sample,
  read_statistics,
  sample_path,
  statistics_path,
)
from pipelines.statistics.histogram import AlignedHistogram, jensen_shannon, l_infinity

__all__ = ['AlignedHistogram', 'MAX_BINS', 'SAMPLE_BYTES', 'SAMPLE_ROWS', 'STAGES',
           'StatisticsFn', 'WriteStatistics', 'jensen_shannon', 'l_infinity', 'read_sample',
           'read_statistics', 'sample_path', 'statistics_path']
