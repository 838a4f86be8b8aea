"""Request batching: predict requests that arrive together for the same signature run as one model
call, and each gets its own rows of the outputs back.

One thread runs the model, so the server's request threads only read, decode and wait. It waits up
to the batch timeout for requests still being read; a request whose data fails the merged call is
answered on its own, so one bad request never fails the others.
"""

import collections
import concurrent.futures
import threading
import time

import numpy as np

from trainer.rest_codec import ApiError


class _Item:
  """A decoded request in the queue: its thread waits on `future` for its rows of the outputs."""

  __slots__ = ('served', 'signature', 'inputs', 'rows', 'future', 'arrived')

  def __init__(self, served, signature, inputs, rows):
    self.served, self.signature, self.inputs, self.rows = served, signature, inputs, rows
    self.future = concurrent.futures.Future()
    self.arrived = time.monotonic()


def _joins(item, first):
  """Whether `item` may run in one model call with `first`: the same version and signature."""
  return item.served is first.served and item.signature == first.signature


class Batcher:
  """One thread runs the model. It takes the oldest waiting request and, while other requests are
  still being read (so more may come), waits up to `timeout` for them; then the requests to the
  same signature, up to `max_rows` rows, run as one call whose outputs are split back."""

  def __init__(self, served, max_rows=256, timeout=0.002):
    self._served, self._max_rows, self._timeout = served, max_rows, timeout
    self._cond = threading.Condition()
    self._queue = collections.deque()
    self._arriving = 0  # requests being read and decoded, not yet queued
    self._stopping = False
    self.requests = self.calls = 0  # requests answered, model calls made: batching at work
    self._thread = threading.Thread(target=self._loop, name='batcher', daemon=True)
    self._thread.start()

  def arriving(self, delta):
    with self._cond:
      self._arriving += delta
      self._cond.notify_all()

  def submit(self, signature, inputs, rows, served=None):
    """Queues a decoded request (it no longer counts as arriving) and waits for its outputs.
    `served`: the model version it was decoded for (default: the one the Batcher was made
    with); only requests of one version run together, so a request that arrived before a new
    version was swapped in is answered by the version it was read for."""
    item = _Item(served or self._served, signature, inputs, rows)
    with self._cond:
      self._arriving -= 1
      if self._stopping:
        raise ApiError(503, 'the server is shutting down')
      self._queue.append(item)
      self.requests += 1
      self._cond.notify_all()
    return item.future.result()

  def stop(self):
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    self._thread.join()

  def _take(self):
    """The next batch: the oldest request and those that can join it (same signature)."""
    with self._cond:
      while not self._queue:
        if self._stopping:
          return None
        self._cond.wait()
      first = self._queue[0]
      if first.rows is not None:  # a request without rows runs alone: nothing to wait for
        deadline = first.arrived + self._timeout
        while self._arriving > 0 and not self._stopping:
          queued = sum(i.rows for i in self._queue if _joins(i, first) and i.rows)
          left = deadline - time.monotonic()
          if queued >= self._max_rows or left <= 0:
            break
          self._cond.wait(left)
      batch, rows = [], 0
      for item in list(self._queue):
        if item is first or (_joins(item, first) and item.rows is not None and
                             first.rows is not None and rows + item.rows <= self._max_rows):
          batch.append(item)
          rows += item.rows or 0
          self._queue.remove(item)
      return batch

  def _loop(self):
    while True:
      batch = self._take()
      if batch is None:
        return
      try:
        self._run(batch)
      except BaseException as e:  # never lose a request: whatever failed is its answer
        for item in batch:
          if not item.future.done():
            item.future.set_exception(e)

  def _run_one(self, item):
    self.calls += 1
    try:
      item.future.set_result(item.served.call(item.signature, item.inputs))
    except Exception as e:
      item.future.set_exception(e)

  def _run(self, batch):
    if len(batch) == 1:
      return self._run_one(batch[0])
    try:
      merged = {n: np.concatenate([i.inputs[n] for i in batch]) for n in batch[0].inputs}
      self.calls += 1
      outputs = batch[0].served.call(batch[0].signature, merged)
    except (ApiError, ValueError):  # one request's data fails the merged call: answer each alone
      for item in batch:
        self._run_one(item)
      return None
    total = sum(i.rows for i in batch)
    if any(v.shape[:1] != (total,) for v in outputs.values()):  # outputs not one row per input
      for item in batch:
        self._run_one(item)
      return None
    start = 0
    for item in batch:
      item.future.set_result({k: v[start:start + item.rows] for k, v in outputs.items()})
      start += item.rows
    return None
