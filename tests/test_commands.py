"""Every command's lifecycle, as a user runs it (subprocesses): exit statuses 0 / 1 / 2 / 130, one
line on stderr for an error, TensorFlow's start-up chatter kept off stderr (unless --verbose)
while real warnings still reach it, and the TensorFlow-only half importing no Beam."""

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO
from transforms import command

NO_GPU = not command.gpu_present()
# Start-up lines of TensorFlow that a user of a machine without a GPU must not see by default.
NOISE = ('oneDNN', 'cuInit', 'cpu_feature_guard', 'cuda_platform', 'cudart_stub',
         'absl::InitializeLog', 'Could not find cuda drivers')
GLOG_LINE = re.compile(r'^[IWEF]\d{4} [\d:.]+ +\d+ [\w.-]+:\d+\] ', re.M)


def _env(**extra):
  """The environment a user has: none of the test session's TF_CPP_MIN_LOG_LEVEL (conftest)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', command.VERBOSE_ENV)}
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
  env.update(extra)
  return env


def _run(args, timeout=120, **env):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(**env), capture_output=True,
                        text=True, timeout=timeout)


def _python(code, *args, **env):
  return _run(['-c', textwrap.dedent(code), *args], **env)


def _assert_quiet(stderr):
  if NO_GPU:
    for word in NOISE:
      assert word not in stderr, stderr
  lines = [line for line in stderr.splitlines() if line.startswith(('INFO', 'WARNING'))]
  assert len(lines) == len(set(lines)), f'lines twice: {stderr}'


def test_the_filter_drops_only_the_listed_lines():
  drop = re.compile(command.benign_pattern(gpu=False, info_hidden=True))
  for line in (
      'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR',
      'I0000 00:00:1796153982.165574   29725 cudart_stub.cc:31] Could not find cuda drivers on '
      'your machine, GPU will not be used.',
      'I0000 00:00:1796153982.270022   29725 cpu_feature_guard.cc:227] This TensorFlow binary is '
      'optimized to use available CPU instructions in performance-critical operations.',
      'To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow '
      'with the appropriate compiler flags.',
      'E0000 00:00:1796154030.945684   31004 cuda_platform.cc:52] failed call to cuInit: '
      'INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)',
      'E0000 00:00:1796154030.945684   31004 cuda_dnn.cc:8310] Unable to register cuDNN factory: '
      'Attempting to register factory for plugin cuDNN when one has already been registered'):
    assert drop.match(line), line
  for line in (
      'W0000 00:00:1796154030.945684   31004 op_kernel.cc:1816] OP_REQUIRES failed at '
      'whole_file_read_ops.cc:116 : NOT_FOUND: /x; No such file or directory',
      'E1107 10:22:33.123456   31004 some_op.cc:52] a real error',
      'WARNING tensorflow: a warning of TensorFlow\'s Python side',
      'Traceback (most recent call last):',
      'error: --train x: no file matches; check the path or glob',
      'progress: analyzing the train split: train 32,561 rows'):
    assert not drop.match(line), line
  # With a GPU the failed probe is a real error; with C++ INFO lines asked for, they are kept.
  on_gpu = re.compile(command.benign_pattern(gpu=True, info_hidden=True))
  assert not on_gpu.match('E0000 00:00:1796154030.945684   31004 cuda_platform.cc:52] failed '
                          'call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: (303)')
  with_info = re.compile(command.benign_pattern(gpu=False, info_hidden=False))
  assert not with_info.match('I0000 00:00:1796153982.270022   29725 cpu_feature_guard.cc:227] '
                             'This TensorFlow binary is optimized')


def test_verbose_requested_before_argparse(monkeypatch):
  monkeypatch.delenv(command.VERBOSE_ENV, raising=False)
  assert command.verbose_requested(['--train', 'x', '--verbose'])
  assert not command.verbose_requested(['--train', 'x', '--', '--verbose'])
  assert not command.verbose_requested(['--train', 'x'])
  monkeypatch.setenv(command.VERBOSE_ENV, '1')
  assert command.verbose_requested([])
  monkeypatch.setenv(command.VERBOSE_ENV, '0')
  assert not command.verbose_requested([])


# How command.main ends each kind of run; no TensorFlow in these processes, so they are fast.
LIFECYCLE = '''
import os, sys
from transforms import command
from transforms.errors import InternalError, UserError
def run(argv):
  os.write(2, b'E0000 00:00:1796154030.945684   31004 cuda_platform.cc:52] failed call to '
              b'cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\\n')
  os.write(2, b'W0000 00:00:1796154030.945684   31004 op_kernel.cc:1816] a real warning\\n')
  os.write(2, b'written to fd 2 just before the end\\n')
  how = argv[0]
  if how == 'user':
    raise UserError('--train x: no file matches')
  if how == 'internal':
    raise InternalError('the staging area vanished; traceback in /tmp/kept.txt')
  if how == 'bug':
    raise RuntimeError('the first line\\nthe second line')
  if how == 'interrupt':
    raise KeyboardInterrupt
  print('done')
command.main(run)
'''


def _lifecycle(how, **env):
  """Runs LIFECYCLE; returns the process and its last line on stderr."""
  proc = _python(LIFECYCLE, how, **env)
  lines = proc.stderr.splitlines()
  if NO_GPU and command.VERBOSE_ENV not in env:
    assert not any('cuInit' in line for line in lines), proc.stderr
  # What reached fd 2 (through the filter) comes before the last line, in order, once.
  kept = [line for line in lines if 'cuInit' not in line]
  assert kept[:2] == ['W0000 00:00:1796154030.945684   31004 op_kernel.cc:1816] a real warning',
                      'written to fd 2 just before the end'], proc.stderr
  assert len(kept) == (2 if how == 'ok' else 3), proc.stderr
  return proc, lines[-1]


def test_statuses_and_last_lines():
  proc, last = _lifecycle('ok')
  assert proc.returncode == 0 and proc.stdout == 'done\n', proc.stderr
  proc, last = _lifecycle('user')
  assert proc.returncode == 2 and last == 'error: --train x: no file matches'
  proc, last = _lifecycle('internal')
  assert proc.returncode == 1
  assert last == 'internal error: the staging area vanished; traceback in /tmp/kept.txt'
  proc, last = _lifecycle('interrupt')
  assert proc.returncode == 130 and last == 'error: interrupted; nothing was published'
  proc, last = _lifecycle('bug')
  assert proc.returncode == 1
  m = re.fullmatch(r'internal error: RuntimeError: the first line; this is a bug of the project, '
                   r'not of your input; full traceback in (\S+-traceback-\S+\.txt)', last)
  assert m, last
  try:
    text = open(m.group(1)).read()
    assert 'Traceback (most recent call last)' in text and 'the second line' in text
    assert 'in run' in text and 'command: ' in text
  finally:
    os.remove(m.group(1))
  # Verbose (here from the environment): nothing filtered.
  proc, _ = _lifecycle('ok', **{command.VERBOSE_ENV: '1'})
  assert 'failed call to cuInit' in proc.stderr and proc.returncode == 0


def test_what_went_to_fd_2_survives_a_crash_and_a_ctrl_c():
  """The filter is a process of its own, outside the command's process group: a command killed
  outright still has its last lines passed on, and a Ctrl-C (to the whole group, at once) ends
  the command alone, with status 130 and its line after what it wrote before."""
  code = textwrap.dedent('''
      import os, signal, time
      from transforms import command
      command.start()
      def run(argv):
        os.write(2, b'W0000 00:00:1.2 1 x.cc:1] before the end\\n')
        if argv[0] == 'kill':
          os.kill(os.getpid(), signal.SIGKILL)
        print('ready', flush=True)
        time.sleep(60)
      command.main(run)
      ''')
  for how in ('kill', 'ctrl-c'):
    proc = subprocess.Popen([sys.executable, '-c', code, how], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if how == 'ctrl-c':
      assert proc.stdout.readline() == 'ready\n'
      os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if how == 'kill':
      assert proc.returncode == -signal.SIGKILL and err == (
          'W0000 00:00:1.2 1 x.cc:1] before the end\n'), err
    else:
      assert proc.returncode == 130 and err == ('W0000 00:00:1.2 1 x.cc:1] before the end\n'
                                                'error: interrupted; nothing was published\n'), err


def test_warnings_pass_once_and_start_up_lines_do_not():
  """TensorFlow loaded and used (its probe for a GPU fails here, at the first op): its start-up
  lines are dropped, while a Python warning, a TensorFlow warning and a C++ warning not on the
  list reach stderr once each, and the command's own INFO lines once."""
  proc = _python('''
      from transforms import command
      command.start()
      import logging, os, warnings
      import tensorflow as tf
      def run(argv):
        tf.reduce_sum(tf.constant([1.0, 2.0])).numpy()  # the first op: TF looks for a GPU
        warnings.warn('a warning of the project')
        tf.get_logger().warning('a warning of TensorFlow')
        tf.get_logger().info('an INFO line of TensorFlow')
        logging.getLogger('trainer').info('an INFO line of the command')
        os.write(2, b'W0000 00:00:1796154030.945684   31004 op_kernel.cc:1816] OP_REQUIRES '
                    b'failed: a C++ warning\\n')
      command.main(run)
      ''')
  assert proc.returncode == 0, proc.stderr
  _assert_quiet(proc.stderr)
  for line in ('UserWarning: a warning of the project',
               'WARNING tensorflow: a warning of TensorFlow',
               'INFO trainer: an INFO line of the command', 'OP_REQUIRES failed: a C++ warning'):
    assert proc.stderr.count(line) == 1, proc.stderr
  assert 'an INFO line of TensorFlow' not in proc.stderr


def test_trainer_help_is_clean_and_the_tensorflow_half_imports_no_beam():
  proc = _python('''
      import atexit, runpy, sys
      def check():
        print('task imported beam:', 'apache_beam' in sys.modules)
        import trainer.serving
        print('serving imported beam:', 'apache_beam' in sys.modules)
      atexit.register(check)
      sys.argv = ['trainer.task', '--help']
      runpy.run_module('trainer.task', run_name='__main__', alter_sys=True)
      ''')
  assert proc.returncode == 0, proc.stderr
  assert '--verbose' in proc.stdout
  assert 'task imported beam: False' in proc.stdout, proc.stdout[-500:]
  assert 'serving imported beam: False' in proc.stdout, proc.stdout[-500:]
  assert proc.stderr == '' if NO_GPU else not GLOG_LINE.search(proc.stderr), proc.stderr


def test_a_user_error_is_one_line(tmp_path):
  proc = _run(['-m', 'pipelines.tabular', '--transforms', 'transforms.census', '--train',
               str(tmp_path / 'missing.csv'), '--output', str(tmp_path / 'out')])
  assert proc.returncode == 2
  assert proc.stderr.count('\n') == 1 and proc.stderr.startswith('error: --train '), proc.stderr


def test_verbose_shows_tensorflow_lines(tmp_path):
  proc = _run(['-m', 'trainer.predict', '--model', str(tmp_path / 'none'), '--input', 'x.csv',
               '--output', str(tmp_path / 'p.csv'), '--verbose'])
  assert proc.returncode == 2, proc.stderr
  assert GLOG_LINE.search(proc.stderr), proc.stderr  # TensorFlow's C++ lines, unfiltered
  last = proc.stderr.splitlines()[-1]
  assert last.startswith('error: ') and 'no SavedModel' in last, proc.stderr


def test_every_parser_declares_verbose(capsys):
  """--verbose is read before argparse (command.start); each parser declares it as well, for
  --help, and so that it is not taken for one of Beam's flags."""
  from pipelines import images, tabular
  from trainer import predict, task
  assert task.parse_args(['--transformed', 'x', '--model-dir', 'y', '--verbose'])
  for module in (tabular, images):
    args, beam_args = module.parse_args(['--transforms', 'transforms.census', '--train', 'x',
                                         '--output', 'y', '--verbose', '--runner', 'DirectRunner'])
    assert args.verbose and beam_args == ['--runner', 'DirectRunner']
  with pytest.raises(SystemExit):
    predict.run(['--help'])
  assert '--verbose' in capsys.readouterr().out
