"""The command line of a pipeline: the flags every pipeline takes, then Beam's. A flag that neither
knows is an error naming the closest known flag.

Beam itself only warns about such a flag ("Discarding unparseable args", once per options view,
so several times a run) and goes on without it: a misspelt --eval-fraction would silently give a
run without an eval split.
"""

import argparse
import difflib

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import report
from transforms.errors import UserError


def beam_flags():
  """Every flag of Beam's pipeline options (--runner, --direct_num_workers, --project, ...), and
  of the options classes a user module defined, as Beam itself collects them."""
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  seen = set()
  for cls in PipelineOptions.__subclasses__():
    if str(cls) not in seen:  # Beam picks one class per name too
      seen.add(str(cls))
      cls._add_argparse_args(parser)  # how Beam gathers them
  return parser


def parse(parser, argv):
  """(the command's args, Beam's flags) from `argv`; a flag neither knows is a UserError naming
  the closest flag either knows."""
  args, rest = parser.parse_known_args(argv)
  beam = beam_flags()
  _, unknown = beam.parse_known_args(rest)
  for arg in unknown:
    if arg == '--':
      break
    if not arg.startswith('-'):
      # A value with no flag before it that takes one: what --eval-fration 0.2 leaves behind
      # after the flag itself, which is reported first.
      raise UserError(f'{parser.prog}: unexpected argument {arg!r}; see --help')
    name = arg.split('=', 1)[0]
    known = [o for a in parser._actions for o in a.option_strings if o.startswith('--')]
    known += [o for a in beam._actions for o in a.option_strings]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f'did you mean {close[0]}?' if close else (
        'see --help for the flags of this command; any other flag must be one of Beam\'s '
        'pipeline options (--runner, --direct_num_workers, ...)')
    raise UserError(f'{parser.prog}: unknown flag {name}; {hint}')
  return args, rest


def add_split_flags(parser, what, inputs_help):
  """The flags every pipeline takes for its splits and its output. `what`: 'rows' or 'images'."""
  parser.add_argument('--train', required=True, nargs='+', action='extend',
                      help=f'{inputs_help} of the training split; may repeat')
  parser.add_argument('--eval', nargs='+', action='extend', default=None,
                      help='the same for the eval split, transformed with the train analysis')
  parser.add_argument('--eval-fraction', type=float, default=0.0,
                      help=f'with --train only: carve this share of {what} out as the eval split, '
                           'by a hash of each one\'s content (the same ones on every run)')
  add_output_flags(parser, what)
  parser.add_argument('--tracing', choices=('graph', 'tf2'), default='graph',
                      help='how TF Transform traces the preprocessing_fn: graph (default: its '
                           'graph mode, tf.compat.v1, once; a function that needs TF2 '
                           'behaviours gets them) or tf2 (TF2 behaviours, tf.function, four '
                           'times: slower). The outputs and the transform graph\'s format are '
                           'the same either way')
  parser.add_argument('--analysis-cache', default=None, metavar='DIR',
                      help='TF Transform\'s analyzer cache over runs: each --train input is a '
                           'span whose accumulators are kept in DIR; a rerun analyzes only new '
                           'or changed inputs (a changed preprocessing_fn, contract, reader flag '
                           'or version misses)')
  report.add_flags(parser)


def add_output_flags(parser, what):
  """The flags of a run's output: where, how it is sharded and compressed, the bad-row limit."""
  parser.add_argument('--output', required=True, help='output directory (local or gs://...)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a complete result already in --output')
  parser.add_argument('--num-shards', type=int, default=None,
                      help='TFRecord shards per split (default: one per 256 MiB of input)')
  parser.add_argument('--compression', choices=('gzip', 'none'), default='gzip')
  parser.add_argument('--max-bad-rows', default='1%', type=parse_max_bad_rows,
                      help=f'rejected {what} a split may have before the run fails: a count or a '
                           f'percentage of {what} read (default 1%%)')


def check_split_flags(parser, args):
  """Checks the flags of add_split_flags that depend on each other (args stays as parsed)."""
  if args.eval and args.eval_fraction:
    parser.error('give either --eval or --eval-fraction, not both')
  if not 0 <= args.eval_fraction < 1:
    parser.error(f'--eval-fraction {args.eval_fraction}: must be in [0, 1)')
  if args.num_shards is not None and args.num_shards < 1:
    parser.error(f'--num-shards {args.num_shards}: must be at least 1 (or leave it out)')


def parse_max_bad_rows(text):
  """'N' (a count) or 'P%' (a share of the rows read) -> (count or None, share or None)."""
  try:
    if text.endswith('%'):
      share = float(text[:-1]) / 100
      if not 0 <= share <= 1:
        raise ValueError
      return None, share
    count = int(text)
    if count < 0:
      raise ValueError
    return count, None
  except ValueError:
    raise UserError(f'--max-bad-rows {text!r}: give a count (e.g. 100) or a percentage of the '
                    'rows read (e.g. 0.5%)') from None
