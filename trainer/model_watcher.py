"""Live model updates: the server's model base directory polled for new versions, as TensorFlow
Serving's file-system source polls its --model_base_path.

Every --file-system-poll-wait-seconds the newest numbered version is looked for. When it is not
the one served, it is loaded beside the current one, and only once it has loaded is it swapped in
(served_model.Current): requests already in flight finish on the version that read them, new ones
go to the new version, none is dropped or failed. A version that does not load (half-copied,
broken) is reported in one line on stderr and the current one keeps serving; it is tried again
once its files change. A removed newest version gives way to the newest that is left, as in TF
Serving's latest-version policy.
"""

import os
import sys
import threading

import tensorflow as tf

from trainer import serving
from trainer.served_model import ServedModel


def _fingerprint(path):
  """What changes when a version directory's files change: their names, sizes and times."""
  found = []
  for directory, _, files in tf.io.gfile.walk(path):
    for name in files:
      stat = tf.io.gfile.stat(os.path.join(directory, name))
      found.append((os.path.join(directory, name), stat.length, stat.mtime_nsec))
  return tuple(sorted(found))


class Watcher:
  """Polls `base` every `seconds` (a thread) and swaps new versions into `current`."""

  def __init__(self, base, current, seconds):
    self._base, self._current, self._seconds = base, current, seconds
    self._failed = {}  # version -> the fingerprint of its files when it failed to load
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name='model-watcher', daemon=True)

  def start(self):
    if self._seconds > 0:
      self._thread.start()
    return self

  def stop(self):
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join()

  def _loop(self):
    while not self._stop.wait(self._seconds):
      try:
        self.poll()
      except Exception as e:  # a file system hiccup: tell, and poll again next time
        print(f'model watcher: {self._base}: {type(e).__name__}: {e}', file=sys.stderr,
              flush=True)

  def poll(self):
    """One look at the base directory; returns the version served afterwards."""
    served = self._current.served
    newest = max(serving.versions(self._base), default=None)
    if newest is None or str(newest) == served.version:
      return served.version
    path = os.path.join(self._base, str(newest))
    fingerprint = _fingerprint(path)
    if self._failed.get(newest) == fingerprint:
      return served.version
    try:
      new = ServedModel(path, served.name)
    except Exception as e:  # half-copied or broken: the current version keeps serving
      self._failed[newest] = fingerprint
      detail = str(e).strip().splitlines()[0] if str(e).strip() else ''
      print(f'model watcher: version {newest} of {served.name} cannot be loaded '
            f'({type(e).__name__}: {detail[:300]}); still serving version {served.version}',
            file=sys.stderr, flush=True)
      return served.version
    self._failed.pop(newest, None)
    self._current.served = new
    print(f'now serving {new.name} version {new.version} (was version {served.version})',
          flush=True)
    return new.version
