"""The life of a command (python -m pipelines.tabular, trainer.task, ...): its flags' parser, how
it ends (user errors in one line and exit 2), and the garbage collector's settings while it runs.
Imports neither Beam nor TensorFlow: both halves' commands use it."""

import argparse
import atexit
import gc
import logging
import os
import sys

from transforms.errors import UserError

def main(run):
  """Runs `run(argv)` as a command: user errors end in one line on stderr and exit 2."""
  _settle(command=True)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  # TF and Beam log a lot at INFO; the pipeline's own progress lines are what a user wants to see.
  for noisy in ('apache_beam', 'tensorflow', 'absl', 'tensorflow_transform', 'tfx_bsl'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    run(sys.argv[1:])
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    _exit(2)
  except KeyboardInterrupt:
    print('error: interrupted; nothing was published', file=sys.stderr)
    _exit(130)
  _exit(0)


_COMMAND = False  # whether this process is one of the pipeline commands (main)


def _settle(command=False):
  """Keeps Python's cyclic garbage collector off the objects a command has made so far.

  The collector's full collections walk every object the process tracks, and a pipeline
  command tracks a great many that live as long as it does: TensorFlow's, Beam's and TF
  Transform's modules, then the pipeline's graph. In a 1M-row run, 9 full collections took
  1.8 s and all collections 2.1 s (gc.callbacks). The command modules turn the collector off
  while they import (their first lines); main() then moves what the imports made to the
  collector's permanent generation (gc.freeze) and turns it on again, and the pipeline's
  objects are moved there too just before the job runs (run_and_check). Collections then walk
  only what the job makes as it runs: 1.9 s -> 0.23 s of collections in a 1M-row run; 19.2 s
  -> 18.3 s (0.96x, 8 paired runs on a noisy machine), for about 20 MiB more peak memory
  (cycles among the kept objects that become garbage stay until the command ends). Only in a
  command: a process that imports these modules (tests, a notebook) keeps the collector as it
  is."""
  global _COMMAND  # pylint: disable=global-statement
  _COMMAND = _COMMAND or command
  if _COMMAND:
    gc.freeze()
    gc.enable()


def settle_before_run():
  """See _settle: called with the pipeline built, before it runs."""
  _settle()


def _exit(status):
  """Ends the command once its work is done (published, or failed and said why).

  The interpreter's own teardown after a run (freeing TensorFlow's and Beam's modules and
  objects one by one) took about 1.6 s of every command's wall time, measured on the 2-core
  machine of benchmarks/RESULTS.md, and does nothing a finished command needs. The exit handlers
  (logging's flush among them) still run, and the output streams are flushed; then the process
  ends without the teardown."""
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
      pass
  os._exit(status)  # pylint: disable=protected-access


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are UserErrors, so tests and `main` see them the same way."""

  def error(self, message):
    raise UserError(f'{self.prog}: {message}')
