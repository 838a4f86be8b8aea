"""The HTTP side of the server: TensorFlow Serving's REST routes (status, metadata, predict), the
request body's limits, and every reply as JSON, errors included.

A threading HTTP/1.1 server (keep-alive, one thread a connection). The model, the codec and the
batcher are given to it (Server.served, Server.batcher, trainer.rest_codec): it only routes and
reads and writes bytes.
"""

import http.server
import json
import re
import socket
import socketserver
import threading
import time

from trainer.rest_codec import ApiError, format_outputs, parse_request

_PATH = re.compile(r'/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?'
                   r'(?P<verb>/metadata|:[A-Za-z]+)?/?')


class Handler(http.server.BaseHTTPRequestHandler):
  """TensorFlow Serving's REST routes; every reply is JSON."""

  protocol_version = 'HTTP/1.1'  # keep-alive: a client reuses its connection
  server_version = 'trainer.serve'
  disable_nagle_algorithm = True  # small replies go out at once, not after a delayed ACK
  timeout = 60  # a client that stops sending mid-request releases its thread

  def do_GET(self):
    self._dispatch()

  def do_POST(self):
    self._dispatch()

  def log_message(self, format, *args):
    if self.server.verbose:  # every request's line only when asked for
      super().log_message(format, *args)

  def log_error(self, format, *args):
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
    except Exception as e:
      status, reply = 500, {'error': f'internal error: {type(e).__name__}: {e}'}
    finally:
      with server.active_lock:
        server.active -= 1
    self._reply(status, reply)

  def _route(self):
    served = self.server.current.served  # once: the whole request sees one version
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
      return format_outputs(batcher.submit(signature, inputs, rows, served), fmt)
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
  """Handler's server: one thread a connection; `served` and `batcher` are set by the command
  once the model is loaded (binding comes first, so a taken port fails before a slow load)."""

  daemon_threads = True  # idle keep-alive connections do not hold up a shutdown
  request_queue_size = 1024  # listen backlog: socketserver's 5 resets a burst of new clients
  allow_reuse_address = True

  def __init__(self, address, max_body_bytes, verbose=False):
    if ':' in address[0]:
      self.address_family = socket.AF_INET6
    super().__init__(address, Handler)
    # Set once the model is loaded, before serve_forever: the served_model.Current holding the
    # version served (swapped by the model watcher), and the Batcher.
    self.current = self.batcher = None
    self.max_body_bytes, self.verbose = max_body_bytes, verbose
    self.active, self.active_lock = 0, threading.Lock()

  def server_bind(self):
    """TCPServer's bind, without HTTPServer's reverse DNS lookup of the host (slow offline)."""
    socketserver.TCPServer.server_bind(self)
    self.server_name, self.server_port = self.server_address[:2]

  def url(self):
    host, port = self.server_address[:2]
    return f'http://[{host}]:{port}' if ':' in host else f'http://{host}:{port}'
