"""`python -m trainer.serve` as a real subprocess on a loopback port, driven over real HTTP as a
TensorFlow Serving REST client would, its answers checked against the SavedModel called in-process
(trainer.serving.Model) on the same rows and images."""

import base64
import csv
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO
from tests.helpers import TENSORFLOW_ONLY
from trainer import serve, served_model, serving, train
from transforms.errors import UserError

SAMPLE_TEST = REPO / 'data' / 'fashion_mnist' / 'sample' / 'test'
MAX_BODY = 200_000


class ServerProcess:
  """The server started with `args`; .url waits for its start line."""

  def __init__(self, args, log, tensorflow_only=False):
    argv = ['--port', '0', '--grpc-port', '0', '--max-body-bytes', str(MAX_BODY)] + [
        str(a) for a in args]
    if tensorflow_only:  # as a serving machine would be: no TF Transform, tfx-bsl or Beam
      code = TENSORFLOW_ONLY + f'from trainer import serve\nserve.main({argv!r})\n'
      command = [sys.executable, '-c', code]
    else:
      command = [sys.executable, '-m', 'trainer.serve'] + argv
    self.log = log  # stderr goes to a file: a pipe nobody reads could fill and stall the server
    with open(log, 'w') as err:
      self.proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                                   text=True)
    self._url = None

  @property
  def url(self):
    if self._url is None:
      line = self.proc.stdout.readline()  # the start line, or '' if it died
      match = re.fullmatch(r'serving (\S+) version (\d+) on (http://127\.0\.0\.1:\d+)\n', line)
      assert match, (line, open(self.log).read()[-3000:])
      self.name, self.version, self._url = match.groups()
      line = self.proc.stdout.readline()
      match = re.fullmatch(r'gRPC: serving \S+ version \d+ on (127\.0\.0\.1:\d+) \(.*\)\n', line)
      assert match, (line, open(self.log).read()[-3000:])
      self.grpc = match.group(1)
    return self._url

  def stop(self, sig=signal.SIGTERM):
    """Stops the server with `sig` -> the rest of its stdout; it must exit with status 0 and
    have logged no error (no 5xx reply, no traceback)."""
    self.proc.send_signal(sig)
    out = self.proc.communicate(timeout=60)[0]
    log = open(self.log).read()
    assert self.proc.returncode == 0, log[-3000:]
    assert 'Traceback' not in log and '-> 5' not in log, log[-3000:]
    return out

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.communicate()


def run_clients(client, n):
  """client(i) for i in 0..n-1, each in a thread of its own, all started before any is joined."""
  threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)


def call(url, body=None, method=None, headers=None):
  """-> (HTTP status, decoded JSON reply); body: an object sent as JSON, or bytes as they are."""
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
  try:
    with urllib.request.urlopen(request, timeout=60) as reply:
      return reply.status, json.loads(reply.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def b64(data):
  return {'b64': base64.b64encode(data).decode()}


# ---- the tabular model -------------------------------------------------------------------------


@pytest.fixture(scope='module')
def census(trained, tmp_path_factory):
  """The server on the trained census model, its in-process twin and 40 raw test rows."""
  base = os.path.dirname(trained['path'])
  server = ServerProcess(['--model', base], tmp_path_factory.mktemp('logs') / 'census.log')
  with open(trained['test_csv'], newline='') as f:
    lines = [r for r in csv.reader(f, skipinitialspace=True) if len(r) == 15][:40]
  model = serving.load_model(base)
  types = model.raw_types
  # Raw rows as a JSON client has them: numbers as numbers, strings trimmed, '?' as it is.
  rows = [{k: int(v) if types[k] == tf.int64 else v
           for k, v in zip(('age', 'workclass', 'fnlwgt', 'education', 'education_num',
                            'marital_status', 'occupation', 'relationship', 'race', 'sex',
                            'capital_gain', 'capital_loss', 'hours_per_week', 'native_country'),
                           line)} for line in lines]
  yield {'server': server, 'model': model, 'rows': rows,
         'version': os.path.basename(serving.newest_version(base))}
  server.kill()


def assert_predictions(predictions, expected):
  """Row-format predictions (a list of objects) == the in-process result."""
  assert [sorted(p) for p in predictions] == [['class_ids', 'classes', 'probabilities']] * len(
      predictions)
  np.testing.assert_allclose([p['probabilities'] for p in predictions],
                             expected['probabilities'], atol=1e-6)
  assert [p['class_ids'] for p in predictions] == expected['class_ids'].tolist()
  assert [p['classes'] for p in predictions] == expected['classes'].tolist()


def test_status_and_metadata(census):
  server, version = census['server'], census['version']
  base = f'{server.url}/v1/models/census'
  status = {'model_version_status': [{'version': version, 'state': 'AVAILABLE',
                                      'status': {'error_code': 'OK', 'error_message': ''}}]}
  assert call(base) == (200, status)
  assert call(f'{base}/versions/{version}') == (200, status)
  code, meta = call(f'{base}/metadata')
  assert code == 200
  assert meta['model_spec'] == {'name': 'census', 'signature_name': '', 'version': version}
  defs = meta['metadata']['signature_def']['signature_def']
  # Independently of the server: the signatures as TensorFlow loads them.
  for name, signature in census['model'].signatures.items():
    specs = signature.structured_input_signature[1]
    assert sorted(defs[name]['inputs']) == sorted(specs)
    for key, spec in specs.items():
      info = defs[name]['inputs'][key]
      assert info['dtype'] == 'DT_' + spec.dtype.name.upper()
      assert info['tensor_shape'] == {'dim': [{'size': '-1', 'name': ''}], 'unknown_rank': False}
    assert sorted(defs[name]['outputs']) == sorted(signature.structured_outputs)
  probs = defs['serving_default']['outputs']['probabilities']
  assert probs['dtype'] == 'DT_FLOAT'
  assert [d['size'] for d in probs['tensor_shape']['dim']] == ['-1', '2']
  assert defs['serving_default']['method_name'] == 'tensorflow/serving/predict'


def test_predict_matches_the_model_in_process(census):
  """Every way of asking gives the in-process predictions of the same rows."""
  url = f'{census["server"].url}/v1/models/census:predict'
  rows, model = census['rows'], census['model']
  expected = model.predict(rows)
  assert set(expected['classes']) <= {'<=50K', '>50K'}
  # Objects of raw features to serving_default (encoded as Examples by the server).
  code, reply = call(url, {'instances': rows})
  assert code == 200 and list(reply) == ['predictions']
  assert_predictions(reply['predictions'], expected)
  # Beyond TF Serving's rules there: a VarLen feature absent or null reads as missing, like '?';
  # the label is ignored.
  unknown = dict(rows[0], workclass='?', occupation='?')
  sparse = dict(rows[0], workclass=None, income_bracket='>50K')
  del sparse['occupation']
  code, reply = call(url, {'instances': [unknown, sparse]})
  assert code == 200
  np.testing.assert_allclose([p['probabilities'] for p in reply['predictions']],
                             model.predict([unknown, unknown])['probabilities'], atol=1e-6)
  # The same objects to predict_raw, TF Serving's way: one named input per raw feature.
  code, reply = call(url, {'signature_name': 'predict_raw', 'instances': rows})
  assert code == 200
  assert_predictions(reply['predictions'], expected)
  # Columnar: one list per input -> {"outputs": {name: list}}.
  columns = {k: [r[k] for r in rows] for k in rows[0]}
  code, reply = call(url.replace('census:', f'census/versions/{census["version"]}:'),
                     {'signature_name': 'predict_raw', 'inputs': columns})
  assert code == 200 and sorted(reply['outputs']) == ['class_ids', 'classes', 'probabilities']
  np.testing.assert_allclose(reply['outputs']['probabilities'], expected['probabilities'],
                             atol=1e-6)
  assert reply['outputs']['classes'] == expected['classes'].tolist()
  # Serialized tf.train.Examples, built here from the rows, as {"b64": ...}.
  examples = [tf.train.Example(features=tf.train.Features(feature={
      k: tf.train.Feature(int64_list=tf.train.Int64List(value=[v])) if isinstance(v, int) else
      tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()] if v != '?' else []))
      for k, v in r.items()})).SerializeToString() for r in rows]
  code, reply = call(url, {'instances': [b64(e) for e in examples]})
  assert code == 200
  assert_predictions(reply['predictions'], expected)
  code, reply = call(url, {'signature_name': 'transform_features',
                           'inputs': {'examples': [b64(e) for e in examples[:5]]}})
  assert code == 200
  for key, value in model.transform(rows[:5]).items():
    np.testing.assert_allclose(reply['outputs'][key], value, atol=1e-6, err_msg=key)


BAD_REQUESTS = [
    # (name, path after /v1/models/, body, expected status, a part of the error message)
    ('malformed JSON', 'census:predict', b'{"instances": [', 400, 'JSON Parse error'),
    ('not an object', 'census:predict', [1, 2], 400, 'JSON object'),
    ('unknown model', 'nope:predict', {'instances': [1]}, 404,
     'Servable not found for request: Latest(nope)'),
    ('unknown version', 'census/versions/99:predict', {'instances': [1]}, 404,
     'Specific(census, 99)'),
    ('unknown signature', 'census:predict', {'signature_name': 'x', 'instances': [1]}, 400,
     'Serving signature name: "x" not found'),
    ('no inputs', 'census:predict', {'signature_name': 'predict_raw'}, 400,
     "Missing 'inputs' or 'instances' key"),
    ('both formats', 'census:predict', {'instances': [1], 'inputs': [1]}, 400, 'both'),
    ('empty instances', 'census:predict', {'instances': []}, 400, 'non-empty list'),
    ('unknown key', 'census:predict', {'instance': [1]}, 400, "unknown key(s) ['instance']"),
    ('missing input', 'census:predict', {'signature_name': 'predict_raw',
                                         'instances': [{'age': 30}]}, 400,
     "instance 0: missing input(s) ['capital_gain'"),
    ('columns lacking inputs', 'census:predict', {'signature_name': 'predict_raw', 'inputs': {
        'age': [30]}}, 400, "inputs: missing input(s) ['capital_gain'"),
    ('wrong raw value', 'census:predict', {'instances': [{'age': 'old'}]}, 400,
     "instance 0: feature 'age': 'old' is not a valid int64"),
    ('unknown raw feature', 'census:predict', {'instances': [{'agee': 3}]}, 400,
     "unknown feature(s) ['agee']"),
    ('bad base64', 'census:predict', {'instances': [{'b64': '%%%'}]}, 400, 'not valid base64'),
    ('not an Example', 'census:predict', {'instances': [b64(b'\x01\x02junk')]}, 400,
     'Could not parse example input'),
    ('a list for several inputs', 'census:predict',
     {'signature_name': 'predict_raw', 'instances': [[1]]},
     400, 'several inputs'),
    ('unknown path', '/v2/anything', None, 404, 'Malformed request: GET /v2/anything'),
    ('model labels', 'census/labels/stable', None, 404, 'Malformed request'),
    ('GET on predict', 'census:predict', None, 405, 'takes POST'),
    ('classify', 'census:classify', {'examples': [{}]}, 501, 'use :predict'),
]


@pytest.mark.parametrize('name,path,body,status,message', BAD_REQUESTS,
                         ids=[r[0] for r in BAD_REQUESTS])
def test_bad_requests_get_tf_serving_errors(census, name, path, body, status, message):
  url = census['server'].url + (path if path.startswith('/') else f'/v1/models/{path}')
  code, reply = call(url, body)
  assert (code, list(reply)) == (status, ['error']), (name, reply)
  assert isinstance(reply['error'], str) and message in reply['error'], (name, reply)


def test_types_are_checked_per_value(census):
  url = f'{census["server"].url}/v1/models/census:predict'
  row = dict(census['rows'][0], age='old')
  code, reply = call(url, {'signature_name': 'predict_raw', 'instances': [row]})
  assert code == 400
  assert reply['error'] == ('instance 0, input \'age\': "old" is not of type int64 (expected an '
                            'integer)')
  code, reply = call(url, {'signature_name': 'predict_raw',
                           'instances': [dict(census['rows'][0], sex=['Male', 'Female'])]})
  assert code == 400 and 'shape [2] where the signature takes shape []' in reply['error']


def test_oversized_bodies_are_refused_before_reading(census):
  host, port = census['server'].url[len('http://'):].split(':')
  # Only the headers: the 413 comes back although the promised body never does.
  conn = http.client.HTTPConnection(host, int(port), timeout=30)
  conn.putrequest('POST', '/v1/models/census:predict')
  conn.putheader('Content-Length', str(10 ** 12))
  conn.endheaders()
  reply = conn.getresponse()
  assert reply.status == 413
  assert json.loads(reply.read()) == {'error': f'the request body of {10 ** 12} bytes exceeds '
                                               f'the limit of {MAX_BODY} bytes (--max-body-bytes)'}
  conn.close()
  # A client that sends it all still reads the reply.
  code, reply = call(f'{census["server"].url}/v1/models/census:predict',
                     {'instances': ['x' * MAX_BODY]})
  assert code == 413 and 'exceeds the limit' in reply['error']
  # No Content-Length at all.
  sock = socket.create_connection((host, int(port)), timeout=30)
  sock.sendall(b'POST /v1/models/census:predict HTTP/1.1\r\nHost: x\r\n\r\n')
  assert sock.recv(100).startswith(b'HTTP/1.1 411')
  sock.close()


def test_50_concurrent_clients(census):
  """50 clients at once, each with its own rows: every answer is its rows' in-process result.
  Five of them send an Example that does not parse: they alone get a 400, even when their
  request was merged with others into one model call."""
  url = f'{census["server"].url}/v1/models/census:predict'
  rows, model = census['rows'], census['model']
  expected = model.predict(rows)
  barrier, results = threading.Barrier(50), {}

  def client(i):
    mine = [(i + j) % len(rows) for j in range(1 + i % 3)]
    body = ({'instances': [rows[k] for k in mine]} if i % 2 else
            {'signature_name': 'predict_raw', 'inputs': {
                key: [rows[k][key] for k in mine] for key in rows[0]}})
    if i % 10 == 3:
      body = {'instances': [{'examples': b64(b'\x01junk')}]}
    barrier.wait()
    results[i] = mine, call(url, body)

  run_clients(client, 50)
  assert len(results) == 50
  for i, (mine, (code, reply)) in results.items():
    if i % 10 == 3:
      assert code == 400 and 'Could not parse example input' in reply['error'], reply
      continue
    assert code == 200, reply
    probs = ([p['probabilities'] for p in reply['predictions']] if 'predictions' in reply else
             reply['outputs']['probabilities'])
    np.testing.assert_allclose(probs, expected['probabilities'][mine], atol=1e-6, err_msg=str(i))


# ---- TensorFlow Serving's gRPC API, through its official client stubs ------------------------


def _stubs(server):
  import grpc
  from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
  server.url  # noqa: B018 - waits for the start lines
  channel = grpc.insecure_channel(server.grpc)
  return (prediction_service_pb2_grpc.PredictionServiceStub(channel),
          model_service_pb2_grpc.ModelServiceStub(channel))


def _predict_request(examples, signature=None, version=None, name='census'):
  from tensorflow_serving.apis import predict_pb2
  request = predict_pb2.PredictRequest()
  request.model_spec.name = name
  if signature:
    request.model_spec.signature_name = signature
  if version is not None:
    request.model_spec.version.value = version
  request.inputs['examples'].CopyFrom(tf.make_tensor_proto(examples, dtype=tf.string))
  return request


def _examples(census, rows):
  model = census['model']
  return serving.to_examples(rows, model.raw_types, model.csv_columns, model.na_values,
                             model.required, model.label_key)


def test_grpc_predict_classify_equal_rest_and_in_process(census):
  from tensorflow_serving.apis import classification_pb2
  predictions, _ = _stubs(census['server'])
  rows, model = census['rows'], census['model']
  expected = model.predict(rows)
  examples = _examples(census, rows)
  reply = predictions.Predict(_predict_request(examples), 60)
  assert (reply.model_spec.name, reply.model_spec.version.value,
          reply.model_spec.signature_name) == ('census', int(census['version']), 'serving_default')
  outputs = {k: tf.make_ndarray(v) for k, v in reply.outputs.items()}
  np.testing.assert_allclose(outputs['probabilities'], expected['probabilities'], atol=1e-6)
  assert [c.decode() for c in outputs['classes']] == expected['classes'].tolist()
  code, rest = call(f'{census["server"].url}/v1/models/census:predict', {'instances': rows})
  assert code == 200
  np.testing.assert_allclose(outputs['probabilities'],
                             [p['probabilities'] for p in rest['predictions']], atol=1e-6)
  # predict_raw over gRPC: one tensor per raw feature.
  from tensorflow_serving.apis import predict_pb2
  raw = predict_pb2.PredictRequest()
  raw.model_spec.name, raw.model_spec.signature_name = 'census', 'predict_raw'
  for key, dtype in model.raw_types.items():
    raw.inputs[key].CopyFrom(tf.make_tensor_proto([r[key] for r in rows], dtype=dtype))
  raw.output_filter.append('probabilities')
  reply = predictions.Predict(raw, 60)
  assert list(reply.outputs) == ['probabilities']
  np.testing.assert_allclose(tf.make_ndarray(reply.outputs['probabilities']),
                             expected['probabilities'], atol=1e-6)
  # Classify: every class with its probability, for Examples and for Examples with a context.
  request = classification_pb2.ClassificationRequest()
  request.model_spec.name = 'census'
  request.input.example_list.examples.extend(
      tf.train.Example.FromString(e) for e in examples)
  result = predictions.Classify(request, 60).result
  assert len(result.classifications) == len(rows)
  for got, want in zip(result.classifications, expected['probabilities']):
    assert [c.label for c in got.classes] == ['<=50K', '>50K']
    np.testing.assert_allclose([c.score for c in got.classes], want, atol=1e-6)
  with_context = classification_pb2.ClassificationRequest()
  with_context.model_spec.name = 'census'
  parsed = [tf.train.Example.FromString(e) for e in examples[:3]]
  context = with_context.input.example_list_with_context.context
  context.features.feature['native_country'].CopyFrom(
      parsed[0].features.feature['native_country'])
  for example in parsed:
    del example.features.feature['native_country']
  with_context.input.example_list_with_context.examples.extend(parsed)
  scores = [[c.score for c in x.classes]
            for x in predictions.Classify(with_context, 60).result.classifications]
  same_country = model.predict([dict(r, native_country=rows[0]['native_country'])
                                for r in rows[:3]])
  np.testing.assert_allclose(scores, same_country['probabilities'], atol=1e-6)


def test_grpc_metadata_and_status(census):
  from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2
  predictions, models = _stubs(census['server'])
  request = get_model_metadata_pb2.GetModelMetadataRequest()
  request.model_spec.name = 'census'
  request.metadata_field.append('signature_def')
  reply = predictions.GetModelMetadata(request, 60)
  signatures = get_model_metadata_pb2.SignatureDefMap()
  assert reply.metadata['signature_def'].Unpack(signatures)
  for name, signature in census['model'].signatures.items():
    assert sorted(signatures.signature_def[name].inputs) == sorted(
        signature.structured_input_signature[1])
    assert sorted(signatures.signature_def[name].outputs) == sorted(signature.structured_outputs)
  status = get_model_status_pb2.GetModelStatusRequest()
  status.model_spec.name = 'census'
  (version,) = models.GetModelStatus(status, 60).model_version_status
  assert (version.version, version.state, version.status.error_code) == (
      int(census['version']), get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)


def test_grpc_bad_requests_get_tf_serving_codes(census):
  import grpc
  from tensorflow_serving.apis import get_model_metadata_pb2, regression_pb2
  predictions, models = _stubs(census['server'])
  examples = _examples(census, census['rows'][:2])
  wrong_input = _predict_request(examples)
  wrong_input.inputs['other'].CopyFrom(tf.make_tensor_proto([1.0]))
  wrong_type = _predict_request(examples)
  wrong_type.inputs['examples'].CopyFrom(tf.make_tensor_proto([1.0, 2.0]))
  unknown_output = _predict_request(examples)
  unknown_output.output_filter.append('logits')
  regress = regression_pb2.RegressionRequest()
  regress.model_spec.name = 'census'
  regress.input.example_list.examples.extend(tf.train.Example.FromString(e) for e in examples)
  metadata = get_model_metadata_pb2.GetModelMetadataRequest()
  metadata.model_spec.name = 'census'
  metadata.metadata_field.append('graph_def')
  cases = [
      (predictions.Predict, _predict_request(examples, name='other'), 'NOT_FOUND',
       'Servable not found for request: Latest(other)'),
      (predictions.Predict, _predict_request(examples, version=99), 'NOT_FOUND',
       'Servable not found for request: Specific(census, 99)'),
      (predictions.Predict, _predict_request(examples, signature='nope'), 'INVALID_ARGUMENT',
       'Serving signature name: "nope" not found'),
      (predictions.Predict, wrong_input, 'INVALID_ARGUMENT', 'Sent extra: {other}'),
      (predictions.Predict, wrong_type, 'INVALID_ARGUMENT',
       'Expects arg examples to be string but float32 is provided'),
      (predictions.Predict, _predict_request([b'\x01junk']), 'INVALID_ARGUMENT',
       'Could not parse example input'),
      (predictions.Predict, unknown_output, 'INVALID_ARGUMENT',
       'output tensor alias not found in signature: logits'),
      (predictions.Regress, regress, 'INVALID_ARGUMENT', 'binary classifier: use Classify'),
      (predictions.GetModelMetadata, metadata, 'INVALID_ARGUMENT',
       "Metadata field 'graph_def' is not supported"),
  ]
  for method, request, code, message in cases:
    with pytest.raises(grpc.RpcError) as caught:
      method(request, 60)
    assert caught.value.code() == getattr(grpc.StatusCode, code), caught.value.details()
    assert message in caught.value.details(), caught.value.details()


def test_grpc_50_concurrent_clients(census):
  """50 gRPC clients at once, each with its own rows and channel: every answer is its rows'
  in-process result; five send an Example that does not parse and alone get INVALID_ARGUMENT."""
  import grpc
  rows, model = census['rows'], census['model']
  expected = model.predict(rows)
  examples = _examples(census, rows)
  barrier, results = threading.Barrier(50), {}

  def client(i):
    predictions, _ = _stubs(census['server'])
    mine = [(i + j) % len(rows) for j in range(1 + i % 3)]
    request = _predict_request([b'\x01junk'] if i % 10 == 3 else [examples[k] for k in mine])
    barrier.wait()
    try:
      reply = predictions.Predict(request, 120)
      results[i] = mine, tf.make_ndarray(reply.outputs['probabilities'])
    except grpc.RpcError as e:
      results[i] = mine, e.code()

  run_clients(client, 50)
  assert len(results) == 50
  for i, (mine, got) in results.items():
    if i % 10 == 3:
      assert got == grpc.StatusCode.INVALID_ARGUMENT, i
    else:
      np.testing.assert_allclose(got, expected['probabilities'][mine], atol=1e-6, err_msg=i)


def test_live_model_updates_drop_no_request(census, trained, tmp_path):
  """A client loop (REST and gRPC) keeps sending while a new version lands (written under a
  staging name and renamed, as the export does) and then a broken one: the server swaps to the
  new one, reports and skips the broken one, and no request fails."""
  import grpc
  from tensorflow_serving.apis import get_model_status_pb2
  base = tmp_path / 'census'
  shutil.copytree(trained['path'], base / '1')
  server = ServerProcess(['--model', base, '--file-system-poll-wait-seconds', '0.2'],
                         tmp_path / 'live.log')
  rows = census['rows']
  expected = census['model'].predict(rows)['probabilities']
  examples = _examples(census, rows)
  stop, failures, answered = threading.Event(), [], []

  def rest_client():
    while not stop.is_set():
      code, reply = call(f'{server.url}/v1/models/census:predict', {'instances': rows[:5]})
      got = [p['probabilities'] for p in reply.get('predictions', [])]
      if code != 200 or not np.allclose(got, expected[:5], atol=1e-6):
        failures.append((code, reply))
      else:
        answered.append('rest')

  def grpc_client():
    predictions, _ = _stubs(server)
    while not stop.is_set():
      try:
        reply = predictions.Predict(_predict_request(examples[:5]), 60)
      except grpc.RpcError as e:
        failures.append(e.details())
        continue
      if not np.allclose(tf.make_ndarray(reply.outputs['probabilities']), expected[:5],
                         atol=1e-6):
        failures.append(reply)
      else:
        answered.append(reply.model_spec.version.value)

  def version():
    return call(f'{server.url}/v1/models/census')[1]['model_version_status'][0]['version']

  def wait_for(check, what):
    deadline = time.monotonic() + 90
    while not check():
      assert time.monotonic() < deadline, (what, open(tmp_path / 'live.log').read()[-2000:])
      time.sleep(0.1)

  clients = [threading.Thread(target=f) for f in (rest_client, rest_client, grpc_client)]
  try:
    assert version() == '1'
    for t in clients:
      t.start()
    wait_for(lambda: len(answered) > 20, 'requests answered by version 1')
    shutil.copytree(base / '1', base / '.tmp-2-export')
    os.rename(base / '.tmp-2-export', base / '2')
    wait_for(lambda: version() == '2', 'version 2 served')
    wait_for(lambda: answered.count(2) > 5, 'gRPC requests answered by version 2')
    (base / '3').mkdir()
    (base / '3' / 'saved_model.pb').write_bytes(b'not a SavedModel')
    wait_for(lambda: 'version 3 of census cannot be loaded' in open(tmp_path / 'live.log').read(),
             'the broken version reported')
    settled = len(answered)
    wait_for(lambda: len(answered) > settled + 20, 'requests answered after the broken version')
    assert version() == '2'
  finally:
    stop.set()
    for t in clients:
      if t.ident:  # started
        t.join(60)
  assert not failures, failures[:3]
  assert {1, 2} <= set(answered)
  _, models = _stubs(server)
  status = get_model_status_pb2.GetModelStatusRequest()
  status.model_spec.name = 'census'
  assert [v.version for v in models.GetModelStatus(status, 60).model_version_status] == [2]
  out = server.stop()
  assert 'now serving census version 2 (was version 1)' in out


def test_clean_shutdown_and_batching(census):
  """SIGTERM: exit status 0 and a last line counting requests and model calls; concurrent
  requests were merged (fewer calls than requests)."""
  out = census['server'].stop(signal.SIGTERM)
  match = re.search(r'stopped serving census: (\d+) predict requests in (\d+) model calls', out)
  assert match, out
  requests, calls = map(int, match.groups())
  assert requests >= 50 + 5 and calls < requests


def test_a_taken_port_is_one_line_and_exit_2(trained):
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    proc = subprocess.run([sys.executable, '-m', 'trainer.serve', '--model',
                           os.path.dirname(trained['path']), '--port',
                           str(taken.getsockname()[1])],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert re.fullmatch(r'error: --host 127\.0\.0\.1 --port \d+: cannot listen there \(Address '
                      r'already in use\); choose another port or host', last), proc.stderr
  with pytest.raises(UserError, match='no numbered version'):
    served_model.ServedModel(str(REPO / 'data'))


def test_help_says_loopback_only(capsys):
  with pytest.raises(SystemExit):
    serve.parse_args(['--help'])
  text = ' '.join(capsys.readouterr().out.split())
  assert 'default 127.0.0.1: this machine only' in text
  assert 'other hosts reach it only with --host 0.0.0.0' in text


# ---- an image model ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """The image pipeline on the sample's 200 test PNGs, 2 training steps, served with TensorFlow
  alone."""
  from pipelines import images as image_pipeline
  root = tmp_path_factory.mktemp('serve_images')
  image_pipeline.run(['--train', str(SAMPLE_TEST), '--output', str(root / 'tft'),
                      '--image-size', '28', '28', '--channels', '1'])
  path, _, _ = train.train_and_export(train.TrainConfig(
      transformed_dir=str(root / 'tft'), model_dir=str(root / 'models'), model_name='fmnist',
      max_steps=2, batch_size=32))
  server = ServerProcess(['--model', os.path.dirname(path)], root / 'server.log',
                         tensorflow_only=True)
  pngs = [p.read_bytes() for p in sorted(SAMPLE_TEST.glob('*/*.png'))[::10]]
  yield {'server': server, 'model': serving.load_model(path), 'pngs': pngs}
  server.kill()


def test_image_model_over_http(images):
  url = f'{images["server"].url}/v1/models/fmnist:predict'
  pngs, model = images['pngs'], images['model']
  assert len(pngs) == 20
  expected = model.predict_images(pngs)
  code, reply = call(url, {'signature_name': 'predict_images',
                           'instances': [b64(p) for p in pngs]})
  assert code == 200
  assert_predictions(reply['predictions'], expected)
  code, reply = call(url, {'signature_name': 'predict_images',
                           'inputs': {'image_bytes': [b64(p) for p in pngs]}})
  assert code == 200 and reply['outputs']['classes'] == expected['classes'].tolist()
  np.testing.assert_allclose(reply['outputs']['probabilities'], expected['probabilities'],
                             atol=1e-6)
  # The raw feature as an object, to serving_default.
  code, reply = call(url, {'instances': [{'image': b64(p)} for p in pngs[:3]]})
  assert code == 200
  np.testing.assert_allclose([p['probabilities'] for p in reply['predictions']],
                             expected['probabilities'][:3], atol=1e-6)
  # Bytes that are no image: a 400 naming the problem, and the server goes on.
  code, reply = call(url, {'signature_name': 'predict_images',
                           'instances': [b64(pngs[0]), b64(b'not an image')]})
  assert code == 400 and list(reply) == ['error'] and reply['error']
  code, reply = call(url, {'signature_name': 'predict_images', 'instances': ['plain text']})
  assert code == 400
  assert call(url.replace(':predict', ''))[0] == 200
  out = images['server'].stop(signal.SIGINT)
  assert 'stopped serving fmnist' in out
