"""The report's flags: the drift thresholds, and the Options they set."""

import argparse
import dataclasses

DEFAULT_NUMERIC_THRESHOLD = 0.1
DEFAULT_CATEGORICAL_THRESHOLD = 0.1


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
