"""A local REST endpoint for an exported model that speaks TensorFlow Serving's REST API.

  python -m trainer.serve --model out/models/census [--host 127.0.0.1 --port 8501]
  curl -d '{"instances": [{"age": 39, "workclass": "State-gov", ...}]}' \\
      http://127.0.0.1:8501/v1/models/census:predict

--model is the model's base directory (TensorFlow Serving's --model_base_path): its newest
numbered version is served under the directory's name. Clients written for TensorFlow Serving work
unchanged: GET /v1/models/NAME[/versions/V] (status), GET .../metadata (signatures), POST
/v1/models/NAME[/versions/V]:predict with "instances" (rows) or "inputs" (columns), binary values
as {"b64": ...}, errors as {"error": "..."}. Beyond TensorFlow Serving, objects of raw feature
values sent to serving_default are encoded as Examples here (trainer.serving's rules: '' and NA
values are missing, FixedLen defaults apply), so JSON clients need not build Examples.

Requests that arrive together for the same signature run as one model call (one thread runs the
model; it waits up to --batch-timeout-ms for requests still being read), then the results are split
back. Needs TensorFlow alone, like trainer.serving.
"""

import argparse
import base64
import binascii
import collections
import concurrent.futures
import http.server
import json
import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402

from trainer import serving  # noqa: E402

DEFAULT_SIGNATURE = 'serving_default'
REQUEST_KEYS = ('signature_name', 'instances', 'inputs')


class ApiError(Exception):
  """A request answered with TensorFlow Serving's error reply: {"error": message}, HTTP status."""

  def __init__(self, status, message):
    super().__init__(message)
    self.status = status


# ---- the model ---------------------------------------------------------------------------------


def signature_metadata(version_dir):
  """The SignatureDefs of the SavedModel's serving graph as TensorFlow Serving prints them (proto
  field names, enum names, int64 as strings, fields at their defaults included)."""
  proto = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(os.path.join(version_dir, 'saved_model.pb'), 'rb') as f:
    proto.ParseFromString(f.read())
  graph = next((g for g in proto.meta_graphs if 'serve' in g.meta_info_def.tags),
               proto.meta_graphs[0])
  return {name: json_format.MessageToDict(sig, always_print_fields_with_no_presence=True,
                                          preserving_proto_field_name=True)
          for name, sig in sorted(graph.signature_def.items())}


class ServedModel:
  """One version of one model: its signatures' input specs, and trainer.serving's Model for the
  raw-row encoding."""

  def __init__(self, model_dir, name=None):
    path = serving.newest_version(model_dir)
    version = os.path.basename(os.path.normpath(path))
    if not version.isdigit():
      raise serving.ServingError(f'--model {model_dir}: give the model\'s base directory, the one '
                                 'that holds numbered version directories (1/, 2/, ...)')
    self.version = str(int(version))
    base = os.path.dirname(os.path.normpath(path))
    self.name = name or os.path.basename(base)
    self.model = serving.Model(path)
    self.signatures = dict(self.model.signatures)
    self.input_specs = {k: s.structured_input_signature[1] for k, s in self.signatures.items()}
    self.metadata = {'model_spec': {'name': self.name, 'signature_name': '',
                                    'version': self.version},
                     'metadata': {'signature_def': {'signature_def': signature_metadata(path)}}}

  def call(self, signature, inputs):
    """Runs a signature on {input: numpy array} -> {output: numpy array}; bad data -> 400."""
    specs = self.input_specs[signature]
    try:
      tensors = {n: tf.constant(v, dtype=specs[n].dtype) for n, v in inputs.items()}
      outputs = self.signatures[signature](**tensors)
    except tf.errors.InvalidArgumentError as e:
      raise ApiError(400, serving.tf_error_detail(e)) from None
    except tf.errors.OpError as e:
      raise ApiError(500, serving.tf_error_detail(e)) from None
    return {k: serving.to_numpy(v) for k, v in outputs.items()}


# ---- JSON request -> tensors -------------------------------------------------------------------


def _is_b64(value):
  return isinstance(value, dict) and set(value) == {'b64'}


def _b64(value, where):
  if not isinstance(value['b64'], str):
    raise ApiError(400, f'{where}: the "b64" value must be a base64 string')
  try:
    return base64.b64decode(value['b64'], validate=True)
  except (binascii.Error, ValueError):
    raise ApiError(400, f'{where}: the "b64" value is not valid base64') from None


def _scalar(value, dtype, where):
  """One JSON leaf -> a Python value of the input's dtype, or a 400 naming where it is."""
  if _is_b64(value):
    if dtype != tf.string:
      raise ApiError(400, f'{where}: {{"b64": ...}} is for string inputs; this one is {dtype.name}')
    return _b64(value, where)
  if dtype == tf.string:
    if isinstance(value, str):
      return value.encode()
  elif dtype == tf.bool:
    if isinstance(value, bool):
      return value
  elif dtype.is_integer:
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
      if dtype.min <= value <= dtype.max:
        return value
      raise ApiError(400, f'{where}: {value} is out of the range of {dtype.name}')
  elif dtype.is_floating:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      try:
        return float(value)
      except OverflowError:  # an integer too large for a double; 1e999 parses as Infinity
        raise ApiError(400, f'{where}: {value} is out of the range of {dtype.name}') from None
  else:
    raise ApiError(400, f'{where}: inputs of type {dtype.name} are not supported here')
  kind = {tf.string: 'a string or {"b64": ...}', tf.bool: 'true or false'}.get(
      dtype, 'an integer' if dtype.is_integer else 'a number')
  raise ApiError(400, f'{where}: {json.dumps(value)[:100]} is not of type {dtype.name} '
                      f'(expected {kind})')


def _nested(value, dtype, where):
  """A JSON value (nested lists) -> (converted nested lists, shape); ragged lists are refused."""
  if not isinstance(value, list):
    return _scalar(value, dtype, where), ()
  items = [_nested(v, dtype, where) for v in value]
  shapes = {shape for _, shape in items}
  if len(shapes) > 1:
    raise ApiError(400, f'{where}: lists of different lengths (a tensor must be rectangular)')
  return [v for v, _ in items], (len(items),) + (shapes.pop() if shapes else ())


def _check_shape(shape, spec_shape, where):
  """The value's shape against the signature's ([-1] where any size fits)."""
  if spec_shape.rank is None:
    return
  want = spec_shape.as_list()
  if len(shape) != len(want) or any(w is not None and w != g for w, g in zip(want, shape)):
    raise ApiError(400, f'{where}: a value of shape {list(shape)} where the signature takes '
                        f'shape {[-1 if w is None else w for w in want]}')


def _array(values, dtype):
  try:
    return np.array(values, dtype=object if dtype == tf.string else dtype.as_numpy_dtype)
  except ValueError:
    raise ApiError(400, 'instances: an input has different shapes in different instances') \
        from None


def _instances(values, spec, name):
  """The values of one input across the instances -> one numpy array (instances stacked)."""
  converted = []
  for i, value in enumerate(values):
    where = f'instance {i}, input {name!r}'
    c, shape = _nested(value, spec.dtype, where)
    _check_shape(shape, spec.shape[1:], where)
    converted.append(c)
  return _array(converted, spec.dtype)


def _column(value, spec, name):
  """One input's whole tensor (columnar format) -> numpy array."""
  converted, shape = _nested(value, spec.dtype, f'input {name!r}')
  _check_shape(shape, spec.shape, f'input {name!r}')
  return _array(converted, spec.dtype)


def _named(obj, specs, where):
  """An object of named inputs must hold every input of the signature and nothing else."""
  missing, unknown = sorted(set(specs) - set(obj)), sorted(set(obj) - set(specs))
  problems = ([f'missing input(s) {missing}'] if missing else []) + (
      [f'unknown input(s) {unknown}'] if unknown else [])
  if problems:
    raise ApiError(400, f'{where}: {"; ".join(problems)}; the signature takes {sorted(specs)}')


def _raw_rows(served, rows):
  """Objects of raw feature values -> serialized Examples, by trainer.serving's rules."""
  decoded = []
  for i, row in enumerate(rows):
    for k, v in row.items():
      if isinstance(v, dict) and not _is_b64(v):
        raise ApiError(400, f'instance {i}, feature {k!r}: an object that is not {{"b64": ...}}')
    decoded.append({k: _b64(v, f'instance {i}, feature {k!r}') if _is_b64(v) else v
                    for k, v in row.items()})
  m = served.model
  try:
    examples = serving.to_examples(decoded, m.raw_types, m.csv_columns, m.na_values, m.required,
                                   m.label_key)
  except serving.ServingError as e:
    raise ApiError(400, str(e).replace('row ', 'instance ', 1)) from None
  return {'examples': _array(examples, tf.string)}


def _wants_raw_rows(signature, specs, objects):
  """Objects of raw features sent to serving_default (whose one input is 'examples')."""
  return (signature == DEFAULT_SIGNATURE and set(specs) == {'examples'} and objects and
          all(isinstance(o, dict) and not _is_b64(o) and set(o) != {'examples'} for o in objects))


def parse_request(served, request):
  """A predict request body -> (signature, {input: numpy array}, rows or None, 'row'|'columnar').

  rows is the shared 0-th dimension of every input (None when they do not share one: such a
  request runs on its own, never merged with others)."""
  if not isinstance(request, dict):
    raise ApiError(400, 'the request body must be a JSON object with "instances" or "inputs"')
  unknown = sorted(set(request) - set(REQUEST_KEYS))
  if unknown:
    raise ApiError(400, f'unknown key(s) {unknown} in the request; it takes {list(REQUEST_KEYS)}')
  signature = request.get('signature_name', DEFAULT_SIGNATURE)
  if not isinstance(signature, str):
    raise ApiError(400, '"signature_name" must be a string')
  if signature not in served.signatures:
    raise ApiError(400, f'Serving signature name: "{signature}" not found in signature def; '
                        f'the model has {sorted(served.signatures)}')
  specs = served.input_specs[signature]
  if ('instances' in request) == ('inputs' in request):
    raise ApiError(400, "Missing 'inputs' or 'instances' key" if 'inputs' not in request else
                   "'instances' and 'inputs' cannot both be given: choose the row or the "
                   'columnar format')
  if 'instances' in request:
    instances = request['instances']
    if not isinstance(instances, list) or not instances:
      raise ApiError(400, '"instances" must be a non-empty list, one item per instance')
    if _wants_raw_rows(signature, specs, instances):
      return signature, _raw_rows(served, instances), len(instances), 'row'
    columns = {name: [] for name in specs}
    for i, instance in enumerate(instances):
      if isinstance(instance, dict) and not _is_b64(instance):
        _named(instance, specs, f'instance {i}')
        for name in specs:
          columns[name].append(instance[name])
      elif len(specs) == 1:
        columns[next(iter(specs))].append(instance)
      else:
        raise ApiError(400, f'instance {i}: the signature takes several inputs, so each '
                            f'instance must be an object with {sorted(specs)}')
    inputs = {n: _instances(v, specs[n], n) for n, v in columns.items()}
    return signature, inputs, len(instances), 'row'
  given = request['inputs']
  if isinstance(given, dict) and not _is_b64(given):
    if _wants_raw_rows(signature, specs, [given]):
      if not all(isinstance(v, list) for v in given.values()) or \
         len({len(v) for v in given.values()}) != 1:
        raise ApiError(400, 'inputs: raw feature columns must be lists of one length')
      rows = [dict(zip(given, values)) for values in zip(*given.values())]
      return signature, _raw_rows(served, rows), len(rows), 'columnar'
    _named(given, specs, 'inputs')
  elif len(specs) == 1:
    given = {next(iter(specs)): given}
  else:
    raise ApiError(400, f'inputs: the signature takes several inputs, so "inputs" must be an '
                        f'object with {sorted(specs)}')
  inputs = {n: _column(v, specs[n], n) for n, v in given.items()}
  sizes = {v.shape[0] if v.ndim else None for v in inputs.values()}
  rows = sizes.pop() if len(sizes) == 1 else None
  return signature, inputs, rows or None, 'columnar'


# ---- tensors -> JSON reply ---------------------------------------------------------------------


def _jsonable(value, binary):
  if isinstance(value, np.ndarray):  # a row of a variable-length output
    value = value.tolist()
  if isinstance(value, list):
    return [_jsonable(v, binary) for v in value]
  if isinstance(value, bytes):
    if not binary:
      try:
        return value.decode()
      except UnicodeDecodeError:
        pass
    return {'b64': base64.b64encode(value).decode()}
  return value


def format_outputs(outputs, fmt):
  """TensorFlow Serving's reply: rows -> {"predictions": [...]}, columns -> {"outputs": ...};
  one output is given without its name. Outputs named *_bytes are base64, as TF Serving does."""
  lists = {k: _jsonable(v.tolist(), k.endswith('_bytes')) for k, v in sorted(outputs.items())}
  if fmt == 'columnar':
    return {'outputs': next(iter(lists.values())) if len(lists) == 1 else lists}
  if len(lists) == 1:
    return {'predictions': next(iter(lists.values()))}
  n = len(next(iter(lists.values())))
  return {'predictions': [{k: v[i] for k, v in lists.items()} for i in range(n)]}


# ---- batching ----------------------------------------------------------------------------------


class _Item:
  __slots__ = ('signature', 'inputs', 'rows', 'future', 'arrived')

  def __init__(self, signature, inputs, rows):
    self.signature, self.inputs, self.rows = signature, inputs, rows
    self.future = concurrent.futures.Future()
    self.arrived = time.monotonic()


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

  def submit(self, signature, inputs, rows):
    """Queues a decoded request (it no longer counts as arriving) and waits for its outputs."""
    item = _Item(signature, inputs, rows)
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
          queued = sum(i.rows for i in self._queue if i.signature == first.signature and i.rows)
          left = deadline - time.monotonic()
          if queued >= self._max_rows or left <= 0:
            break
          self._cond.wait(left)
      batch, rows = [], 0
      for item in list(self._queue):
        if item is first or (item.signature == first.signature and item.rows is not None and
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
      item.future.set_result(self._served.call(item.signature, item.inputs))
    except Exception as e:  # pylint: disable=broad-except
      item.future.set_exception(e)

  def _run(self, batch):
    if len(batch) == 1:
      return self._run_one(batch[0])
    try:
      merged = {n: np.concatenate([i.inputs[n] for i in batch]) for n in batch[0].inputs}
      self.calls += 1
      outputs = self._served.call(batch[0].signature, merged)
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


# ---- HTTP --------------------------------------------------------------------------------------

_PATH = re.compile(r'/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?'
                   r'(?P<verb>/metadata|:[A-Za-z]+)?/?')


class Handler(http.server.BaseHTTPRequestHandler):
  """TensorFlow Serving's REST routes; every reply is JSON."""

  protocol_version = 'HTTP/1.1'  # keep-alive: a client reuses its connection
  server_version = 'trainer.serve'
  disable_nagle_algorithm = True  # small replies go out at once, not after a delayed ACK
  timeout = 60  # a client that stops sending mid-request releases its thread

  def do_GET(self):  # noqa: N802 (http.server's naming)
    self._dispatch()

  def do_POST(self):  # noqa: N802
    self._dispatch()

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    if self.server.verbose:  # every request's line only when asked for
      super().log_message(format, *args)

  def log_error(self, format, *args):  # pylint: disable=redefined-builtin
    super().log_message(format, *args)  # always

  def send_error(self, code, message=None, explain=None):
    """http.server's own errors (bad request lines, unknown methods) in TF Serving's shape."""
    self.close_connection = True
    self._reply(code, {'error': message or explain or http.HTTPStatus(code).phrase})

  def _reply(self, status, obj):
    body = json.dumps(obj).encode()
    self.send_response(status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    if self.close_connection:
      self.send_header('Connection', 'close')
    try:
      self.end_headers()
      if self.command != 'HEAD':
        self.wfile.write(body)
    except OSError:  # the client has gone: nobody to tell
      self.close_connection = True
    if status in (500, 503):
      self.log_error('%s %s -> %d %s', self.command, getattr(self, 'path', ''), status,
                     obj.get('error'))

  def _dispatch(self):
    server = self.server
    with server.active_lock:
      server.active += 1
    try:
      status, reply = 200, self._route()
    except ApiError as e:
      status, reply = e.status, {'error': str(e)}
    except RecursionError:
      status, reply = 400, {'error': 'the request JSON is nested too deeply'}
    except Exception as e:  # pylint: disable=broad-except
      status, reply = 500, {'error': f'internal error: {type(e).__name__}: {e}'}
    finally:
      with server.active_lock:
        server.active -= 1
    self._reply(status, reply)

  def _route(self):
    served = self.server.served
    path = self.path.split('?', 1)[0]
    match = _PATH.fullmatch(path)
    if not match:
      raise ApiError(404, f'Malformed request: {self.command} {path}; the routes are '
                          '/v1/models/NAME[/versions/V][/metadata|:predict]')
    name, version, verb = match['name'], match['version'], match['verb']
    if name != served.name or (version is not None and version != served.version):
      wanted = f'Specific({name}, {version})' if version is not None else f'Latest({name})'
      raise ApiError(404, f'Servable not found for request: {wanted}; this server serves '
                          f'{served.name} version {served.version}')
    if verb in (None, '/', '/metadata'):
      if self.command != 'GET':
        raise ApiError(405, f'{path} takes GET, not {self.command}')
      if verb == '/metadata':
        return served.metadata
      return {'model_version_status': [{'version': served.version, 'state': 'AVAILABLE',
                                        'status': {'error_code': 'OK', 'error_message': ''}}]}
    if verb in (':classify', ':regress'):
      raise ApiError(501, f'{verb[1:]} is not implemented by this server; use :predict')
    if verb != ':predict':
      raise ApiError(404, f'Malformed request: {self.command} {path}; unknown verb {verb}')
    if self.command != 'POST':
      raise ApiError(405, f'{path} takes POST, not {self.command}')
    return self._predict(served)

  def _predict(self, served):
    batcher = self.server.batcher
    batcher.arriving(+1)
    queued = False
    try:
      body = self._read_body()
      try:
        request = json.loads(body)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f'JSON Parse error: {e}') from None
      signature, inputs, rows, fmt = parse_request(served, request)
      queued = True
      return format_outputs(batcher.submit(signature, inputs, rows), fmt)
    finally:
      if not queued:
        batcher.arriving(-1)

  def _read_body(self):
    """The body, after its Content-Length is checked against the limit (before reading it)."""
    if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
      self.close_connection = True
      raise ApiError(411, 'chunked request bodies are not accepted; send a Content-Length')
    length = self.headers.get('Content-Length')
    if length is None:
      self.close_connection = True
      raise ApiError(411, 'a POST needs a Content-Length header')
    if not length.strip().isdigit():
      self.close_connection = True
      raise ApiError(400, f'Content-Length {length!r} is not a number of bytes')
    length, limit = int(length), self.server.max_body_bytes
    if length > limit:
      self.close_connection = True
      self._discard_soon()
      raise ApiError(413, f'the request body of {length} bytes exceeds the limit of {limit} '
                          'bytes (--max-body-bytes)')
    body = self.rfile.read(length)
    if len(body) != length:
      self.close_connection = True
      raise ApiError(400, f'the body ended after {len(body)} of {length} bytes')
    return body

  def _discard_soon(self):
    """After the 413 goes out, read and drop what the client is still sending, for a second at
    most: closing a socket with unread data resets it, and the client may lose the reply."""
    connection = self.connection

    def drain():
      deadline = time.monotonic() + 1.0
      try:
        connection.shutdown(socket.SHUT_WR)
        while time.monotonic() < deadline:
          connection.settimeout(max(deadline - time.monotonic(), 0.01))
          if not connection.recv(65536):
            break
      except OSError:
        pass
    self._after_reply = drain

  def finish(self):
    super().finish()
    drain = getattr(self, '_after_reply', None)
    if drain:
      drain()


class Server(http.server.ThreadingHTTPServer):
  daemon_threads = True  # idle keep-alive connections do not hold up a shutdown
  request_queue_size = 1024  # listen backlog: socketserver's 5 resets a burst of new clients
  allow_reuse_address = True

  def __init__(self, address, max_body_bytes, verbose=False):
    if ':' in address[0]:
      self.address_family = socket.AF_INET6
    super().__init__(address, Handler)
    self.served = self.batcher = None  # set once the model is loaded, before serve_forever
    self.max_body_bytes, self.verbose = max_body_bytes, verbose
    self.active, self.active_lock = 0, threading.Lock()

  def server_bind(self):
    """TCPServer's bind, without HTTPServer's reverse DNS lookup of the host (slow offline)."""
    socketserver.TCPServer.server_bind(self)
    self.server_name, self.server_port = self.server_address[:2]

  def url(self):
    host, port = self.server_address[:2]
    return f'http://[{host}]:{port}' if ':' in host else f'http://{host}:{port}'


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog='python -m trainer.serve', description=__doc__.split('\n')[0],
      epilog='The server listens on the loopback interface only unless --host says otherwise: '
             'other hosts reach it only with --host 0.0.0.0 (or an address of this machine). '
             'It has no authentication and no TLS: put it behind a proxy that adds them before '
             'exposing it.')
  p.add_argument('--model', required=True,
                 help='model base directory holding numbered versions (MODEL_DIR/NAME); the '
                      'newest is served')
  p.add_argument('--model-name', default=None, help='name in the URLs (default: the basename of '
                                                    '--model)')
  p.add_argument('--host', default='127.0.0.1',
                 help='address to listen on (default 127.0.0.1: this machine only)')
  p.add_argument('--port', type=int, default=8501, help='default 8501 (0: any free port)')
  p.add_argument('--max-body-bytes', type=int, default=64 << 20,
                 help='larger request bodies are refused with 413 (default 64 MiB)')
  p.add_argument('--max-batch-size', type=int, default=256,
                 help='rows of concurrent requests merged into one model call (default 256)')
  p.add_argument('--batch-timeout-ms', type=float, default=2.0,
                 help='how long a call waits for requests still being read (default 2)')
  p.add_argument('--verbose', action='store_true', help='log every request')
  args = p.parse_args(argv)
  if not 0 <= args.port <= 65535:
    p.error(f'--port {args.port}: must be 0..65535')
  for flag in ('max_body_bytes', 'max_batch_size'):
    if getattr(args, flag) < 1:
      p.error(f'--{flag.replace("_", "-")} must be at least 1')
  if args.batch_timeout_ms < 0:
    p.error('--batch-timeout-ms must be 0 or more')
  return args


def serve(args, stop):
  """Binds (first: a taken port fails before the model loads), loads the model, serves until
  `stop` (a threading.Event) is set, then lets requests in progress finish and closes."""
  try:
    server = Server((args.host, args.port), args.max_body_bytes, args.verbose)
  except OSError as e:
    raise serving.ServingError(f'--host {args.host} --port {args.port}: cannot listen there '
                               f'({e.strerror or e}); choose another port or host') from None
  try:
    served = ServedModel(args.model, args.model_name)
  except BaseException:
    server.server_close()
    raise
  batcher = Batcher(served, args.max_batch_size, args.batch_timeout_ms / 1000)
  server.served, server.batcher = served, batcher
  thread = threading.Thread(target=server.serve_forever, name='http', daemon=True)
  thread.start()
  print(f'serving {served.name} version {served.version} on {server.url()}', flush=True)
  while not stop.wait(1.0):
    pass
  server.shutdown()  # no new connections; requests in progress finish (10 s at most)
  deadline = time.monotonic() + 10
  while server.active and time.monotonic() < deadline:
    time.sleep(0.01)
  batcher.stop()
  server.server_close()
  print(f'stopped serving {served.name}: {batcher.requests} predict requests in {batcher.calls} '
        'model calls', flush=True)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  try:
    serve(args, stop)
  except serving.ServingError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
