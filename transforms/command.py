"""The life of a command (python -m pipelines.tabular, trainer.task, ...): its start-up (quiet
TensorFlow, --verbose), its flags' parser, how it ends (one line and an exit status), and the
garbage collector's settings while it runs. Imports neither Beam nor TensorFlow: both halves'
commands use it.

A command module calls `start()` before it imports anything heavy (its first lines, under
`if __name__ == '__main__':`), declares --verbose with `add_verbose_flag(parser)` and ends with
`main(run)`:

  exit 0    run(argv) returned
  exit 2    UserError (a mistake the user can fix): `error: <message>`, one line on stderr
  exit 1    InternalError: `internal error: <message>`; any other exception (a bug of the
            project): `internal error: <Type>: <first line>; this is a bug of the project, not
            of your input; full traceback in <file>`
  exit 130  interrupted (Ctrl-C)
"""

import argparse
import atexit
import gc
import glob
import io
import logging
import os
import re
import sys

from transforms.errors import InternalError, UserError

# Set to 1 (or pass --verbose) to see everything TensorFlow and Beam say: their C++ start-up
# lines and their Python loggers at INFO.
VERBOSE_ENV = 'TFT_PIPELINES_VERBOSE'

# Python loggers of the libraries: at WARNING unless verbose (the commands' own loggers,
# pipelines.* and trainer, stay at INFO: their lines are the progress a user wants to see).
LIBRARY_LOGGERS = ('apache_beam', 'tensorflow', 'absl', 'tensorflow_transform', 'tfx_bsl', 'h5py')

# Start-up lines TensorFlow's C++ side writes to stderr that say nothing a user can act on. Only
# these are kept off stderr (without --verbose); every other line, warnings and errors included,
# passes through unchanged. They are matched against whole lines (without the line end), `GLOG`
# being the prefix of an absl/glog line: severity, date, time (before absl's logging is set
# up, seconds since 1970), thread id, file:line].
GLOG = r'[IWEF]\d{4} [\d:.]+ +\d+ [\w.-]+:\d+\] '
BENIGN = (
    # absl's notice before its logging is set up; the lines it announces are judged by themselves
    r'WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$',
    # TF Transform's graph mode applies a transform graph in a TF1 session: once the SavedModel's
    # own initializer has filled the tables, it asks for tf.compat.v1.tables_initializer(), which
    # marks the table initializers as control dependencies (an attribute for TensorFlow's
    # bookkeeping); TensorFlow notes that the mark comes after the session ran them. Nothing is
    # run again or changed.
    GLOG + r"Operation '\{name:'[\w/.-]*InitializeTable\w*' .* was changed by setting "
           r'attribute after it was run by a session\.',
)
# While C++ INFO lines are hidden (TF_CPP_MIN_LOG_LEVEL >= 1, which start() sets unless the user
# set it): the INFO lines TensorFlow writes before its logging reads that variable (cudart_stub's
# "Could not find cuda drivers"), and the second line of the CPU-instructions notice.
BENIGN_INFO = (
    r'I\d{4} [\d:.]+ +\d+ [\w.-]+:\d+\] ',  # GLOG, INFO severity
    r'To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler '
    r'flags\.$',
)
# Only on a machine without a GPU (no /dev/nvidia* device, or CUDA_VISIBLE_DEVICES empty or -1),
# where TensorFlow's probe for one fails as it should: with a GPU these are real errors.
BENIGN_WITHOUT_GPU = (
    GLOG + r'Could not find cuda drivers on your machine, GPU will not be used\.',
    # CUDA libraries' plugins registered twice (TensorFlow's own duplicate registrations)
    GLOG + r'Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory for '
           r'plugin cu\w+ when one has already been registered',
    GLOG + r'computation placer already registered',
    GLOG + r'TF-TRT Warning: Could not find TensorRT',
    GLOG + r'failed call to cuInit: ',
    GLOG + r'(kernel driver does not appear to be running on this host|retrieving CUDA '
           r'diagnostic information for host|hostname: |libcuda reported version is|kernel '
           r'reported version is|no NVIDIA GPU device is present)',
)


def gpu_present():
  """Whether this machine shows TensorFlow a GPU (an NVIDIA device node, WSL's /dev/dxg)."""
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None and visible.strip() in ('', '-1'):
    return False
  return bool(glob.glob('/dev/nvidia*')) or os.path.exists('/dev/dxg')


def _cpp_info_hidden():
  try:
    return int(os.environ.get('TF_CPP_MIN_LOG_LEVEL', '0')) >= 1
  except ValueError:
    return True


def benign_pattern(gpu=None, info_hidden=None):
  """The one regular expression (a string) of the lines the quiet start-up drops."""
  gpu = gpu_present() if gpu is None else gpu
  info_hidden = _cpp_info_hidden() if info_hidden is None else info_hidden
  patterns = BENIGN + (BENIGN_INFO if info_hidden else ()) + (() if gpu else BENIGN_WITHOUT_GPU)
  return '^(?:' + '|'.join(f'(?:{p})' for p in patterns) + ')'


def verbose_requested(argv=None):
  """--verbose among the arguments (before a `--`), or VERBOSE_ENV set (not 0/false/no).

  Read from sys.argv before argparse runs, because it decides what happens before TensorFlow is
  imported. The parsers declare the flag too (add_verbose_flag), so that --help lists it; an
  abbreviation (--verb) is only seen there, once TensorFlow has started."""
  for arg in sys.argv[1:] if argv is None else argv:
    if arg == '--':
      break
    if arg == '--verbose':
      return True
  return os.environ.get(VERBOSE_ENV, '').strip().lower() not in ('', '0', 'false', 'no')


# The filter of stderr: a small Python process (-I -S: the standard library only), so that what a
# crashing command wrote last still comes out. It reads the command's fd 2 through a pipe and
# writes every line that does not match the pattern (argv[1]) to the real stderr (its stdout),
# until every writer of the pipe (the command, and its children) has closed it. A pending line
# without its end is passed on after 50 ms of quiet. When it reads the marker (argv[2]) it has
# written everything before it, and says so with a byte on fd argv[3].
_FILTER_SOURCE = r'''
import os, re, select, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
  signal.signal(s, signal.SIG_IGN)  # they are for the command: this one ends at the pipe's end
drop, marker, ack = re.compile(sys.argv[1].encode()), sys.argv[2].encode(), int(sys.argv[3])
line = re.compile(rb'[^\r\n]*(?:\r\n|\n|\r)')
def out(data):
  while data:
    try:
      data = data[os.write(1, data):]
    except InterruptedError:
      continue
    except OSError:  # stderr is gone: nothing more can be said on it
      return
def lines(data, final):
  kept, end = [], 0
  for m in line.finditer(data):
    end = m.end()
    if not drop.match(m.group().rstrip(b'\r\n')):
      kept.append(m.group())
  tail = data[end:]
  if final and tail:
    if not drop.match(tail):
      kept.append(tail)
    tail = b''
  out(b''.join(kept))
  return tail
pending = b''
while True:
  try:
    ready = select.select([0], [], [], 0.05 if pending else None)[0]
    chunk = os.read(0, 65536) if ready else None
  except InterruptedError:
    continue
  except OSError:
    chunk = b''
  if chunk is None:
    pending = lines(pending, final=True)
    continue
  if not chunk:
    lines(pending, final=True)
    break
  pending += chunk
  while marker in pending:
    before, pending = pending.split(marker, 1)
    lines(before, final=True)
    try:
      os.write(ack, b'.')
    except OSError:  # the command no longer waits
      pass
  pending = lines(pending, final=False)
'''


class _Quiet:
  """The running filter of fd 2 (see start)."""

  def __init__(self):
    import subprocess
    self.real = os.dup(2)  # the real stderr (not inherited by the command's children)
    read, write = os.pipe()
    self.ack, ack_write = os.pipe()
    self.marker = f'\x1e\x1ftft-pipelines-stderr-drain-{os.urandom(8).hex()}\x1f\x1e'
    try:
      self.proc = subprocess.Popen(
          [sys.executable, '-I', '-S', '-c', _FILTER_SOURCE, benign_pattern(), self.marker,
           str(ack_write)],
          stdin=read, stdout=self.real, stderr=self.real, pass_fds=(ack_write,),
          start_new_session=True)  # a Ctrl-C for the command, even at once, is not for it
    except BaseException:
      for fd in (self.real, write, self.ack):
        os.close(fd)
      raise
    finally:
      os.close(read)
      os.close(ack_write)
    # Python's own stderr writes to the real one directly: in order, never held, a terminal
    # still a terminal (isatty) for progress lines. fd 2 (TensorFlow's C++ logging, and the
    # command's child processes) goes through the filter.
    sys.stderr.flush()
    self.stderr = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(self.real, 'w', closefd=False)),
        encoding=sys.stderr.encoding, errors=sys.stderr.errors, line_buffering=True,
        write_through=True)
    sys.stderr = self.stderr
    os.dup2(write, 2)
    os.close(write)
    self.open = True

  def drain(self):
    """Returns once the filter has passed on everything written to fd 2 so far (or after 5 s)."""
    if not self.open:
      return
    import select
    try:
      os.write(2, self.marker.encode())
      if select.select([self.ack], [], [], 5.0)[0]:
        os.read(self.ack, 1)
    except OSError:
      pass

  def stop(self):
    """Drains, then points fd 2 at the real stderr again: nothing is filtered from here on. The
    filter itself ends when the last of the command's children that hold the pipe ends."""
    if not self.open:
      return
    self.drain()
    self.open = False
    try:
      os.dup2(self.real, 2)
    except OSError:
      pass


_QUIET = None  # the filter, while one runs
_STARTED = False
_VERBOSE = False


def start(argv=None):
  """The command's first step, before TensorFlow or Beam is imported (a command module's first
  lines, under `if __name__ == '__main__':`; main() calls it too, for a command that did not).

  Turns the garbage collector off while the modules load (see _settle), sets up Python logging
  (each line once: the root's handler, before TensorFlow's logger can add its own) and, unless
  --verbose or VERBOSE_ENV (verbose_requested), keeps TensorFlow's start-up chatter off stderr:
  TF_CPP_MIN_LOG_LEVEL=1 (C++ INFO lines hidden; warnings and errors are not; a value the user
  set is kept), and fd 2 goes through a filter that drops the lines of BENIGN, BENIGN_INFO and,
  on a machine without a GPU, BENIGN_WITHOUT_GPU, and passes every other line on unchanged."""
  global _STARTED, _VERBOSE, _QUIET
  if _STARTED:
    return
  _STARTED = True
  gc.disable()
  _VERBOSE = verbose_requested(argv)
  if not _VERBOSE:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
    try:
      os.fstat(2)
      _QUIET = _Quiet()
    except Exception:  # no stderr, or no filter: say everything
      _QUIET = None
    else:
      atexit.register(_QUIET.stop)
  _configure_logging()


# Library warnings about what the pipelines chose on purpose: TF Transform's graph mode (see
# pipelines/job.build) and the TF1 SavedModel it writes (deprecated TF1 helpers, TF Transform's
# own graph collections that a TF1 MetaGraph cannot hold; on loading it to rewrite it as a TF2
# one, pipelines/transform_graph, its vocabulary files' collection, which a TF2 load keeps as
# assets). Hidden unless --verbose.
BENIGN_LOG_RECORDS = (
    r'Tensorflow Transform is running in tf\.compat\.v1 mode',
    r'From .*: (build|get)_tensor_(info|from_tensor_info) \(from '
    r'tensorflow\.python\.saved_model\.utils_impl\) is deprecated',
    r'Expected binary or unicode string, got type_url: "type\.googleapis\.com/'
    r'tensorflow\.AssetFileDef"',
    r'Issue encountered when serializing tft_',
)
_BENIGN_RECORD = re.compile('|'.join(BENIGN_LOG_RECORDS))


def _not_benign(record):
  return _VERBOSE or not _BENIGN_RECORD.match(record.getMessage())


def _configure_logging():
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  for name in LIBRARY_LOGGERS:
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if _VERBOSE else logging.WARNING)
    if _not_benign not in logger.filters:
      logger.addFilter(_not_benign)
    # TensorFlow's logger adds a handler of its own when it is made before the root has one (a
    # module that imported TensorFlow before start): every line twice, with the root's.
    for handler in list(logger.handlers):
      if type(handler) is logging.StreamHandler:
        logger.removeHandler(handler)


def _go_verbose():
  """--verbose seen only by the parser (an abbreviation): stop filtering, libraries at INFO."""
  global _VERBOSE
  if not _STARTED or _VERBOSE:
    return
  _VERBOSE = True
  if _QUIET is not None:
    _QUIET.stop()
  _configure_logging()


class _VerboseAction(argparse.Action):

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, True)
    _go_verbose()


def add_verbose_flag(parser):
  """--verbose, for every command's parser (start() has already acted on it)."""
  parser.add_argument(
      '--verbose', action=_VerboseAction, nargs=0, default=False,
      help='show everything TensorFlow and Beam log: their C++ start-up lines and their INFO '
           f'lines (also: {VERBOSE_ENV}=1)')


def main(run, name=None):
  """Runs `run(argv)` as a command and ends the process with its status (see the module's
  docstring); `name` (default: the running module's) names the traceback file of a bug."""
  start()
  _settle(command=True)
  _configure_logging()
  try:
    run(sys.argv[1:])
  except UserError as e:
    _end(2, f'error: {e}')
  except InternalError as e:
    _end(1, f'internal error: {e}')
  except KeyboardInterrupt:
    _end(130, 'error: interrupted; nothing was published')
  except SystemExit as e:  # argparse's --help (0), or a sys.exit in the run
    if e.code is None or isinstance(e.code, int):
      _end(e.code or 0)
    else:
      _end(1, str(e.code))
  except Exception as e:
    _end(1, _bug(e, name))
  _end(0)


def _end(status, line=None):
  if _QUIET is not None:
    _QUIET.drain()  # what went to fd 2 before comes before the last line
  if line is not None:
    _say_last(line)
  _exit(status)


def _say_last(line):
  """Prints the command's last line and keeps it the last: threads still running (a gRPC
  server's reporting a worker lost a moment ago, Beam's job service logging its failure) would
  print their tracebacks after it. From here on what anything else writes to stderr (the real
  one, or fd 2 and its filter) goes to /dev/null; the line goes to a copy of the real stderr."""
  try:
    sys.stderr.flush()
  except (AttributeError, OSError, ValueError):
    pass
  real = _QUIET.real if _QUIET is not None else 2
  try:
    mine = os.dup(real)
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in {real, 2}:
      os.dup2(devnull, fd)
  except OSError:  # no stderr to take over: say it as before
    print(line, file=sys.stderr, flush=True)
    return
  encoding = getattr(sys.__stderr__, 'encoding', None) or 'utf-8'
  try:
    os.write(mine, (line + '\n').encode(encoding, errors='replace'))
  except OSError:  # stderr is gone: nothing more can be said on it
    pass


def _command_name(name=None):
  if name is None:
    spec = getattr(sys.modules.get('__main__'), '__spec__', None)
    name = spec.name if spec is not None and spec.name else os.path.basename(sys.argv[0] or '')
    name = name[:-3] if name.endswith('.py') else name
  return re.sub(r'[^\w.-]', '_', name) if name and name != '-c' else 'python'


def _bug(error, name=None):
  """The one line of an exception that is a bug of the project; its traceback goes to a file
  (printed instead, above the line, when no file can be written)."""
  import tempfile
  import traceback
  text = ''.join(traceback.format_exception(type(error), error, error.__traceback__))
  first = next((line.strip() for line in str(error).splitlines() if line.strip()), '')
  what = f'{type(error).__name__}: {first}' if first else type(error).__name__
  prefix = f'internal error: {what}; this is a bug of the project, not of your input'
  try:
    fd, path = tempfile.mkstemp(prefix=f'{_command_name(name)}-traceback-', suffix='.txt')
    with os.fdopen(fd, 'w') as f:
      f.write(f'command: {" ".join([sys.executable] + sys.argv)}\n\n{text}')
  except OSError as e:
    print(text, end='', file=sys.stderr)
    return f'{prefix}; full traceback above (no file for it: {e})'
  return f'{prefix}; full traceback in {path}'


_COMMAND = False  # whether this process is one of the pipeline commands (main)


def _settle(command=False):
  """Keeps Python's cyclic garbage collector off the objects a command has made so far.

  The collector's full collections walk every object the process tracks, and a pipeline
  command tracks a great many that live as long as it does: TensorFlow's, Beam's and TF
  Transform's modules, then the pipeline's graph. In a 1M-row run, 9 full collections took
  1.8 s and all collections 2.1 s (gc.callbacks). The command modules turn the collector off
  while they import (start(), their first lines); main() then moves what the imports made to the
  collector's permanent generation (gc.freeze) and turns it on again, and the pipeline's
  objects are moved there too just before the job runs (run_and_check). Collections then walk
  only what the job makes as it runs: 1.9 s -> 0.23 s of collections in a 1M-row run; 19.2 s
  -> 18.3 s (0.96x, 8 paired runs on a noisy machine), for about 20 MiB more peak memory
  (cycles among the kept objects that become garbage stay until the command ends). Only in a
  command: a process that imports these modules (tests, a notebook) keeps the collector as it
  is."""
  global _COMMAND
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
  (logging's flush among them, and the stderr filter's drain) still run, and the output streams
  are flushed; then the process ends without the teardown."""
  atexit._run_exitfuncs()
  for stream in (sys.stdout, sys.stderr, sys.__stderr__):
    try:
      stream.flush()
    except (AttributeError, OSError, ValueError):  # a closed pipe: nothing more can be said on it
      pass
  if _QUIET is not None:
    _QUIET.stop()
  os._exit(status)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are UserErrors, so tests and `main` see them the same way."""

  def error(self, message):
    raise UserError(f'{self.prog}: {message}')
