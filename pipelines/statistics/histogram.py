"""AlignedHistogram: exact counts in at most MAX_BINS power-of-two-wide bins that merge exactly
(see the package docstring), and the drift measures over such histograms and value counts."""

import math

import numpy as np
from tensorflow_metadata.proto.v0 import statistics_pb2

MAX_BINS = 64
FLOAT_MIN_EXPONENT = -1000  # far above float64's subnormals, where ldexp stops being exact


class AlignedHistogram:
  """Exact counts in equal-width bins [k * 2**exponent, (k + 1) * 2**exponent) for k in
  start .. start + len(counts) - 1; see the module docstring."""

  __slots__ = ('exponent', 'start', 'counts')

  def __init__(self, exponent, start, counts):
    self.exponent = int(exponent)
    self.start = int(start)
    self.counts = np.asarray(counts, np.int64)

  @staticmethod
  def exponent_for(lo, hi, min_exponent, max_bins=MAX_BINS):
    """The smallest exponent (at least min_exponent: 0 for integers, one integer per bin at
    most) whose aligned bins cover [lo, hi] in at most max_bins bins."""
    if hi > lo:
      exponent = math.ceil(math.log2(hi / 2 - lo / 2)) + 1 - int(math.log2(max_bins))
    else:  # one value: any width holds it; a narrow one leaves room for what merges bring
      exponent = math.frexp(abs(lo))[1] - 10 if lo else -20
    exponent = max(exponent, min_exponent)
    while math.floor(math.ldexp(hi, -exponent)) - math.floor(math.ldexp(lo, -exponent)) >= max_bins:
      exponent += 1
    return exponent

  def counts_at(self, exponent, start, length):
    """This histogram's counts in the `length` bins of 2**exponent from bin `start` (a range
    that holds all of them, at an exponent no smaller than this one's)."""
    coarse = self.coarsen(exponent)
    counts = np.zeros(length, np.int64)
    counts[coarse.start - start:coarse.start - start + len(coarse.counts)] = coarse.counts
    return counts

  @property
  def width(self):
    return math.ldexp(1.0, self.exponent)

  def edges(self):
    """The len(counts) + 1 bin edges (exact: multiples of a power of two)."""
    return [math.ldexp(k, self.exponent)
            for k in range(self.start, self.start + len(self.counts) + 1)]

  def coarsen(self, exponent):
    """The same counts in bins 2**(exponent - self.exponent) times wider (floor division of the
    bin index: neighbouring bins merge, nothing is split)."""
    shift = exponent - self.exponent
    if shift <= 0:
      return self
    index = (self.start + np.arange(len(self.counts), dtype=np.int64)) >> shift
    start = self.start >> shift
    counts = np.bincount(index - start, weights=self.counts).astype(np.int64)
    return AlignedHistogram(exponent, start, counts)

  @staticmethod
  def common(histograms, max_bins=MAX_BINS):
    """The histograms brought onto one set of bins: the widest width of them, doubled further
    while the union of their ranges takes more than max_bins bins."""
    exponent = max(h.exponent for h in histograms)
    while True:
      aligned = [h.coarsen(exponent) for h in histograms]
      start = min(h.start for h in aligned)
      stop = max(h.start + len(h.counts) for h in aligned)
      if stop - start <= max_bins:
        break
      exponent += 1
    return [AlignedHistogram(exponent, start, h.counts_at(exponent, start, stop - start))
            for h in aligned]

  def merge(self, other, max_bins=MAX_BINS):
    a, b = AlignedHistogram.common([self, other], max_bins)
    return AlignedHistogram(a.exponent, a.start, a.counts + b.counts)

  @classmethod
  def from_buckets(cls, buckets):
    """Back from the (low, high, count) buckets of a histogram this class wrote (its edges are
    multiples of a power of two)."""
    low, high, _ = buckets[0]
    _, exponent = math.frexp(high - low)
    exponent -= 1  # frexp's mantissa is in [0.5, 1)
    return cls(exponent, round(math.ldexp(low, -exponent)), [int(c) for _, _, c in buckets])

  def to_proto(self, histogram):
    edges = self.edges()
    histogram.type = statistics_pb2.Histogram.STANDARD
    for i, count in enumerate(self.counts):
      histogram.buckets.add(low_value=edges[i], high_value=edges[i + 1], sample_count=int(count))

  def median(self, integer, zeros=0, minimum=-math.inf, maximum=math.inf):
    """The median, interpolated linearly within its bin (exact for one-integer-wide bins, the
    nearest integer for wider bins of integers), within [minimum, maximum]. `zeros`, the exact
    count of values equal to 0, makes it exact where the median is one of them in a bin that
    0 bounds (count-like features, mostly 0: a capital gain).
    """
    total = int(self.counts.sum())
    cumulative = np.cumsum(self.counts)
    k = int(np.searchsorted(cumulative, total / 2))
    before = int(cumulative[k - 1]) if k else 0
    low = max(math.ldexp(self.start + k, self.exponent), minimum)
    high = min(low + self.width, maximum)
    if integer and self.exponent == 0:
      return low
    rank, count = total / 2 - before, int(self.counts[k])
    # Bin edges are multiples of the width, so the zeros all lie in the bin that starts at 0,
    # before its values in (0, high).
    if zeros and low == 0 < high:
      if rank <= zeros:
        return 0.0
      rank, count = rank - zeros, count - zeros
    median = low + (high - low) * rank / count
    return float(round(median)) if integer else median


# ---- drift measures --------------------------------------------------------------------------


def jensen_shannon(p_counts, q_counts):
  """Jensen-Shannon divergence (base 2: 0 for equal distributions, 1 for disjoint ones) of two
  count vectors over the same bins."""
  p = np.asarray(p_counts, np.float64)
  q = np.asarray(q_counts, np.float64)
  if not p.sum() or not q.sum():
    return None
  p, q = p / p.sum(), q / q.sum()
  m = (p + q) / 2

  def kl(a):
    nonzero = a > 0
    return float(np.sum(a[nonzero] * np.log2(a[nonzero] / m[nonzero])))

  return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def l_infinity(p_counts, p_total, q_counts, q_total):
  """L-infinity distance of two categorical distributions: the largest difference, over every
  value either side counted, between the value's shares of all values of each side."""
  if not p_total or not q_total:
    return None
  values = set(p_counts) | set(q_counts)
  return max((abs(p_counts.get(v, 0) / p_total - q_counts.get(v, 0) / q_total) for v in values),
             default=0.0)
