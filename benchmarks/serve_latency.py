"""Latency and throughput of `python -m trainer.serve` over HTTP and gRPC against the SavedModel
in-process.

  .venv/bin/python benchmarks/serve_latency.py [--model out/models/census] [--clients 16]
      [--requests 2000] [--rows-per-request 1]

The same raw Adult test rows (JSON objects of the 14 raw features, --rows-per-request a request)
go to each contender:

- in-process: trainer.serving.Model.predict(rows) in this process (Examples built in Python,
  then the serving_default signature), from 1 thread and from --clients threads;
- HTTP: POST /v1/models/census:predict {"instances": rows} to the server in a subprocess, from 1
  client and from --clients concurrent clients (threads here, each with its own keep-alive
  connection), with the server's default batching and with batching off (--max-batch-size 1);
- gRPC: TensorFlow Serving's PredictionService.Predict through the official
  tensorflow-serving-api stubs (a channel per client), the rows as serialized tf.train.Examples
  (what TF Serving's gRPC clients send; built before timing, as the HTTP bodies are), from 1
  client and from --clients clients, with the default batching.

Every client sends --requests requests (after 50 of warm-up), each waiting for its reply before the
next. Latency is per request, as the client sees it; throughput is requests answered per second of
the whole run. Without --model, a model is made first: the tabular pipeline on the Adult data and
300 training steps (about a minute). Client and server share this machine's cores.
"""

import argparse
import csv
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ADULT_TEST = os.path.join(ROOT, 'data', 'adult', 'adult.test')
FEATURES = ('age', 'workclass', 'fnlwgt', 'education', 'education_num', 'marital_status',
            'occupation', 'relationship', 'race', 'sex', 'capital_gain', 'capital_loss',
            'hours_per_week', 'native_country')
NUMERIC = {'age', 'fnlwgt', 'education_num', 'capital_gain', 'capital_loss', 'hours_per_week'}


def make_model(workdir):
  """The tabular pipeline on the Adult data, a short training run, the export's base directory."""
  py = sys.executable
  subprocess.run([py, '-m', 'pipelines.tabular', '--transforms', 'transforms.census', '--train',
                  os.path.join(ROOT, 'data', 'adult', 'adult.data'), '--eval', ADULT_TEST,
                  '--output', os.path.join(workdir, 'tft')], cwd=ROOT, check=True)
  subprocess.run([py, '-m', 'trainer.task', '--transformed', os.path.join(workdir, 'tft'),
                  '--model-dir', os.path.join(workdir, 'models'), '--max-steps', '300'],
                 cwd=ROOT, check=True)
  return os.path.join(workdir, 'models', 'census')


def adult_rows(n):
  with open(ADULT_TEST, newline='') as f:
    lines = [r for r in csv.reader(f, skipinitialspace=True) if len(r) == 15][:n]
  return [{k: int(v) if k in NUMERIC else v for k, v in zip(FEATURES, line)} for line in lines]


def run_clients(clients, requests, send):
  """`clients` threads, each `requests` sequential calls of send(state, i) after a warm-up ->
  (latencies in s, wall time of the measured part)."""
  latencies = [[] for _ in range(clients)]
  start = threading.Barrier(clients + 1)
  done = threading.Barrier(clients + 1)

  def client(c):
    state = {}
    for i in range(50):
      send(state, c * 7919 + i)
    start.wait()
    for i in range(requests):
      t = time.perf_counter()
      send(state, c * 7919 + i)
      latencies[c].append(time.perf_counter() - t)
    done.wait()
    if 'conn' in state:
      state['conn'].close()

  threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
  for t in threads:
    t.start()
  start.wait()
  t0 = time.perf_counter()
  done.wait()
  wall = time.perf_counter() - t0
  return np.concatenate([np.array(x) for x in latencies]), wall


def http_sender(port, bodies):
  def send(state, i):
    conn = state.get('conn')
    if conn is None:
      conn = state['conn'] = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    conn.request('POST', '/v1/models/census:predict', bodies[i % len(bodies)],
                  {'Content-Type': 'application/json'})
    reply = conn.getresponse()
    data = reply.read()
    if reply.status != 200:
      raise RuntimeError(data[:300])
    json.loads(data)
  return send


def grpc_sender(address, requests):
  def send(state, i):
    stub = state.get('stub')
    if stub is None:
      import grpc
      from tensorflow_serving.apis import prediction_service_pb2_grpc
      stub = state['stub'] = prediction_service_pb2_grpc.PredictionServiceStub(
          grpc.insecure_channel(address))
    stub.Predict(requests[i % len(requests)], 60)
  return send


def grpc_requests(model, requests):
  import tensorflow as tf
  from tensorflow_serving.apis import predict_pb2

  from trainer import serving
  result = []
  for rows in requests:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = 'census'
    examples = serving.to_examples(rows, model.raw_types, model.csv_columns, model.na_values,
                                   model.required, model.label_key)
    request.inputs['examples'].CopyFrom(tf.make_tensor_proto(examples, dtype=tf.string))
    result.append(request)
  return result


def start_server(model, extra):
  """The server in a subprocess -> (process, HTTP port, gRPC address)."""
  proc = subprocess.Popen([sys.executable, '-m', 'trainer.serve', '--model', model, '--port', '0',
                           '--grpc-port', '0'] + extra, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  line, grpc_line = proc.stdout.readline(), proc.stdout.readline()
  if not line.startswith('serving ') or not grpc_line.startswith('gRPC: serving '):
    raise RuntimeError(f'the server did not start: {line!r} {grpc_line!r}')
  return proc, int(line.rsplit(':', 1)[1]), grpc_line.split(' on ', 1)[1].split()[0]


def stop_server(proc):
  proc.terminate()
  out = proc.communicate(timeout=60)[0].strip()
  return out.splitlines()[-1] if out else ''


def summary(name, clients, latencies, wall, rows_per_request):
  n = len(latencies)
  return {'contender': name, 'clients': clients, 'requests': n,
          'p50_ms': float(np.percentile(latencies, 50) * 1e3),
          'p99_ms': float(np.percentile(latencies, 99) * 1e3),
          'requests_per_s': n / wall, 'rows_per_s': n * rows_per_request / wall}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default=None, help='model base directory (default: train one)')
  p.add_argument('--clients', type=int, default=16, help='concurrent clients (default 16)')
  p.add_argument('--requests', type=int, default=1000, help='requests per client')
  p.add_argument('--rows-per-request', type=int, default=1)
  p.add_argument('--server-flags', default='', help='more flags for the batching server, e.g. '
                                                   '"--batch-timeout-ms 5"')
  p.add_argument('--json', default=None, help='also write the results here')
  args = p.parse_args()

  workdir = tempfile.mkdtemp(prefix='serve_bench_')
  model_dir = args.model or make_model(workdir)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from trainer import serving
  model = serving.load_model(model_dir)
  k = args.rows_per_request
  rows = adult_rows(4000)
  requests = [[rows[(i * k + j) % len(rows)] for j in range(k)] for i in range(len(rows))]
  bodies = [json.dumps({'instances': r}).encode() for r in requests]
  # Same answers both ways, before anything is timed.
  protos = grpc_requests(model, requests)
  proc, port, grpc_address = start_server(model_dir, args.server_flags.split())
  try:
    import tensorflow as tf
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    check = grpc_sender(grpc_address, protos)
    for i in range(20):
      conn.request('POST', '/v1/models/census:predict', bodies[i])
      got = json.loads(conn.getresponse().read())['predictions']
      expected = model.predict(requests[i])['probabilities']
      np.testing.assert_allclose([g['probabilities'] for g in got], expected, atol=1e-6)
      state = {}
      check(state, i)
      reply = state['stub'].Predict(protos[i], 60)
      np.testing.assert_allclose(tf.make_ndarray(reply.outputs['probabilities']), expected,
                                 atol=1e-6)
    conn.close()

    def in_process(state, i):
      model.predict(requests[i % len(requests)])

    results = []
    for clients in (1, args.clients):
      lat, wall = run_clients(clients, args.requests, in_process)
      results.append(summary('in-process Model.predict', clients, lat, wall, k))
      lat, wall = run_clients(clients, args.requests, http_sender(port, bodies))
      results.append(summary('HTTP, batching (default)', clients, lat, wall, k))
      lat, wall = run_clients(clients, args.requests, grpc_sender(grpc_address, protos))
      results.append(summary('gRPC, batching (default)', clients, lat, wall, k))
    batching_line = stop_server(proc)
    proc, port, _ = start_server(model_dir, ['--max-batch-size', '1'])
    lat, wall = run_clients(args.clients, args.requests, http_sender(port, bodies))
    results.append(summary('HTTP, batching off', args.clients, lat, wall, k))
  finally:
    if proc.poll() is None:
      stop_server(proc)
    shutil.rmtree(workdir, ignore_errors=True)  # the model made here, if any

  import tensorflow as tf
  print(f'\n{time.strftime("%Y-%m-%d")}, {platform.node()}: {os.cpu_count()} CPUs, '
        f'{platform.processor() or platform.machine()}, Python {platform.python_version()}, '
        f'TF {tf.__version__}, GPU: {bool(tf.config.list_physical_devices("GPU"))}; '
        f'{args.requests} requests per client, {k} row(s) a request')
  print(f'server with batching: {batching_line}\n')
  print('| contender | clients | p50 ms | p99 ms | requests/s |')
  print('| --- | --- | --- | --- | --- |')
  for r in results:
    print(f'| {r["contender"]} | {r["clients"]} | {r["p50_ms"]:.2f} | {r["p99_ms"]:.2f} | '
          f'{r["requests_per_s"]:,.0f} |')
  base = {r['clients']: r for r in results if r['contender'].startswith('in-process')}
  print('\n| ratio server / in-process | p50 latency | throughput |')
  print('| --- | --- | --- |')
  for r in results:
    if r['contender'].startswith(('HTTP', 'gRPC')):
      b = base[r['clients']]
      print(f'| {r["contender"]}, {r["clients"]} client(s) | {r["p50_ms"] / b["p50_ms"]:.2f}x | '
            f'{r["requests_per_s"] / b["requests_per_s"]:.2f}x |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
