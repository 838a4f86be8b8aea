"""A local REST endpoint for an exported model that speaks TensorFlow Serving's REST API.

  python -m trainer.serve --model out/models/census [--host 127.0.0.1 --port 8501]
  curl -d '{"instances": [{"age": 39, "workclass": "State-gov", ...}]}' \\
      http://127.0.0.1:8501/v1/models/census:predict

--model is the model's base directory (TensorFlow Serving's --model_base_path): its newest
numbered version is served under the directory's name, and a newer one is swapped in as it lands
(trainer.model_watcher). TensorFlow Serving's gRPC API is served too, on --grpc-port
(trainer.grpc_service). Clients written for TensorFlow Serving work
unchanged: GET /v1/models/NAME[/versions/V] (status), GET .../metadata (signatures), POST
/v1/models/NAME[/versions/V]:predict with "instances" (rows) or "inputs" (columns), binary values
as {"b64": ...}, errors as {"error": "..."}. Beyond TensorFlow Serving, objects of raw feature
values sent to serving_default are encoded as Examples here (trainer.serving's rules: '' and NA
values are missing, FixedLen defaults apply), so JSON clients need not build Examples.

Requests that arrive together for the same signature run as one model call (one thread runs the
model; it waits up to --batch-timeout-ms for requests still being read), then the results are split
back. Needs TensorFlow alone, like trainer.serving.

The parts, one concern each: trainer.served_model (the model directory's newest version and its
signatures), trainer.rest_codec (TF Serving's JSON <-> the signatures' arrays), trainer.batching
(concurrent requests merged into model calls), trainer.http_server (the routes),
trainer.grpc_service (the gRPC services) and trainer.model_watcher (new versions); this module is
the command that puts them together.
"""

import argparse
import signal
import threading
import time

if __name__ == '__main__':  # the command: quiet start-up, before TensorFlow is imported
  from transforms import command
  command.start()

from trainer import grpc_service
from trainer.batching import Batcher
from trainer.http_server import Server
from trainer.model_watcher import Watcher
from trainer.served_model import Current, ServedModel
from transforms import command
from transforms.errors import UserError


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
  p.add_argument('--grpc-port', type=int, default=8500,
                 help='TensorFlow Serving\'s gRPC API (PredictionService, ModelService) on this '
                      'port of --host (default 8500; 0: any free port; -1: none)')
  p.add_argument('--file-system-poll-wait-seconds', type=float, default=2.0,
                 help='how often --model is looked at for a new version, which is loaded and '
                      'swapped in without dropping requests (default 2; 0: never, as '
                      'TensorFlow Serving\'s --file_system_poll_wait_seconds)')
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
  if not -1 <= args.grpc_port <= 65535:
    p.error(f'--grpc-port {args.grpc_port}: must be 0..65535, or -1 for none')
  for flag in ('max_body_bytes', 'max_batch_size'):
    if getattr(args, flag) < 1:
      p.error(f'--{flag.replace("_", "-")} must be at least 1')
  if args.file_system_poll_wait_seconds < 0:
    p.error('--file-system-poll-wait-seconds must be 0 or more')
  if args.batch_timeout_ms < 0:
    p.error('--batch-timeout-ms must be 0 or more')
  return args


def serve(args, stop):
  """Binds (first: a taken port fails before the model loads), loads the model, serves until
  `stop` (a threading.Event) is set, then lets requests in progress finish and closes."""
  try:
    server = Server((args.host, args.port), args.max_body_bytes, args.verbose)
  except OSError as e:
    raise UserError(f'--host {args.host} --port {args.port}: cannot listen there '
                    f'({e.strerror or e}); choose another port or host') from None
  try:
    served = ServedModel(args.model, args.model_name)
  except BaseException:
    server.server_close()
    raise
  batcher = Batcher(served, args.max_batch_size, args.batch_timeout_ms / 1000)
  current = Current(served)
  grpc_server = None
  if args.grpc_port >= 0:
    try:
      grpc_server, grpc_port = grpc_service.make_server(args.host, args.grpc_port, current,
                                                        batcher)
    except OSError as e:
      batcher.stop()
      server.server_close()
      raise UserError(f'--host {args.host} --grpc-port {args.grpc_port}: cannot listen there '
                      f'({e}); choose another port, or --grpc-port -1 for none') from None
  server.current, server.batcher = current, batcher
  thread = threading.Thread(target=server.serve_forever, name='http', daemon=True)
  thread.start()
  print(f'serving {served.name} version {served.version} on {server.url()}', flush=True)
  if grpc_server is not None:
    print(f'gRPC: serving {served.name} version {served.version} on {args.host}:{grpc_port} '
          '(TensorFlow Serving\'s PredictionService and ModelService)', flush=True)
  watcher = Watcher(args.model, current, args.file_system_poll_wait_seconds).start()
  while not stop.wait(1.0):
    pass
  watcher.stop()
  server.shutdown()  # no new connections; requests in progress finish (10 s at most)
  stopped = grpc_server.stop(grace=10) if grpc_server is not None else None
  deadline = time.monotonic() + 10
  while server.active and time.monotonic() < deadline:
    time.sleep(0.01)
  if stopped is not None:
    stopped.wait(max(0.0, deadline - time.monotonic()))
  batcher.stop()
  server.server_close()
  print(f'stopped serving {current.served.name}: {batcher.requests} predict requests in '
        f'{batcher.calls} model calls', flush=True)


def run(argv):
  """Serves until SIGINT or SIGTERM (each sets the stop event: requests in progress finish, then
  the last line counts them); a model or an address it cannot use is a UserError."""
  args = parse_args(argv)
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  serve(args, stop)


def main(argv=None):
  """The command's lifecycle (transforms.command): user errors in one line and exit 2, exit 0
  once stopped. argv: the flags, when not called from the command line (a test's subprocess)."""
  command.main(lambda cli_argv: run(cli_argv if argv is None else argv))


if __name__ == '__main__':
  main()
