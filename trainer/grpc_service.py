"""TensorFlow Serving's gRPC API for the served model, as `tensorflow-serving-api` clients call it:
PredictionService (Predict, Classify, Regress, GetModelMetadata) and ModelService
(GetModelStatus), through the same batching as the REST endpoint (trainer.batching).

The messages and the services' stubs are TF Serving's own (tensorflow_serving.apis, the package
tfx-bsl already brings); tensors go through TensorFlow's TensorProto conversions. Bad requests get
TF Serving's status codes: NOT_FOUND for a model name or version not served, INVALID_ARGUMENT for
inputs that do not fit the signature (and for Classify on a regression model, Regress on a
classifier), UNAVAILABLE while shutting down, INTERNAL for a failure of the model itself.

Classify and Regress take tf.train.Examples (an ExampleList, or an ExampleListWithContext whose
context features join every example) and run the export's serving_default signature, the one that
parses raw Examples: Classify answers each example with every class name and its probability,
Regress with the prediction (in the raw label's units where the export has an inverse).
"""

import concurrent.futures
import threading

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
  classification_pb2,
  get_model_metadata_pb2,
  get_model_status_pb2,
  model_service_pb2_grpc,
  predict_pb2,
  prediction_service_pb2_grpc,
  regression_pb2,
)

from trainer import served_model
from trainer.rest_codec import DEFAULT_SIGNATURE, ApiError

# TensorFlow Serving's reply to a REST status, for the errors the served model raises.
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          503: grpc.StatusCode.UNAVAILABLE}


class _Abort(Exception):
  def __init__(self, code, message):
    super().__init__(message)
    self.code = code


def _check_model(served, spec):
  """The request's ModelSpec against the model served: its name, and its version if it asks
  for one."""
  version = spec.version.value if spec.HasField('version') else None
  if spec.version_label:
    raise _Abort(grpc.StatusCode.NOT_FOUND,
                 f'Servable not found for request: Labeled({spec.name}, {spec.version_label}); '
                 f'this server has no version labels (it serves {served.name} version '
                 f'{served.version})')
  if spec.name != served.name or (version is not None and str(version) != served.version):
    wanted = f'Specific({spec.name}, {version})' if version is not None else \
        f'Latest({spec.name})'
    raise _Abort(grpc.StatusCode.NOT_FOUND, f'Servable not found for request: {wanted}; this '
                                            f'server serves {served.name} version '
                                            f'{served.version}')


def _reply_spec(served, spec, signature):
  spec.name = served.name
  spec.version.value = int(served.version)
  spec.signature_name = signature


def _tensor(proto, name, spec):
  try:
    array = tf.make_ndarray(proto)
  except Exception as e:  # a TensorProto that does not hold what its dtype and shape say
    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f'input {name}: {e}') from None
  wanted = tf.as_dtype(spec.dtype)
  given = tf.as_dtype(proto.dtype)
  if given != wanted:
    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                 f'Expects arg {name} to be {wanted.name} but {given.name} is provided')
  if not spec.shape.is_compatible_with(array.shape):
    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                 f'input {name}: shape {list(array.shape)} does not fit the signature\'s '
                 f'{spec.shape}')
  return array


class Services(prediction_service_pb2_grpc.PredictionServiceServicer,
               model_service_pb2_grpc.ModelServiceServicer):
  """Both services over one ServedModel and its Batcher."""

  def __init__(self, current, batcher):
    self._current, self._batcher = current, batcher  # served_model.Current: the version served
    self._local = threading.local()  # per call: the version it sees, whether it was queued

  @property
  def _served(self):
    return self._local.served

  # ---- the calls ------------------------------------------------------------------------------

  def _run(self, signature, inputs, rows):
    self._local.queued = True  # submit() counts it as arriving no more
    try:
      return self._batcher.submit(signature, inputs, rows, self._served)
    except ApiError as e:
      raise _Abort(_CODES.get(e.status, grpc.StatusCode.INTERNAL), str(e)) from None

  def _answer(self, context, reply_type, work, runs_model=True):
    """The reply of `work`, or the call aborted with its status. A call that runs the model
    counts as arriving from its start, so that the batcher waits for it while it is decoded
    (as the REST endpoint does while a body is read)."""
    self._local.served = self._current.served  # once: the whole call sees one version
    if runs_model:
      self._batcher.arriving(+1)
      self._local.queued = False
    try:
      return work()
    except _Abort as e:
      context.abort(e.code, str(e))
    except Exception as e:  # any other failure is the server's own: INTERNAL
      context.abort(grpc.StatusCode.INTERNAL, f'internal error: {type(e).__name__}: {e}')
    finally:
      if runs_model and not self._local.queued:
        self._batcher.arriving(-1)
    return reply_type()

  def Predict(self, request, context):
    return self._answer(context, predict_pb2.PredictResponse, lambda: self._predict(request))

  def _predict(self, request):
    served = self._served
    _check_model(served, request.model_spec)
    signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
    if signature not in served.signatures:
      raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                   f'Serving signature name: "{signature}" not found in signature def; the '
                   f'model has {sorted(served.signatures)}')
    specs = served.input_specs[signature]
    given, wanted = set(request.inputs), set(specs)
    if given != wanted:
      raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                   f'input size does not match signature: {len(given)}!={len(wanted)} '
                   f'len({{{", ".join(sorted(wanted))}}}). Sent extra: '
                   f'{{{", ".join(sorted(given - wanted))}}}. Missing but required: '
                   f'{{{", ".join(sorted(wanted - given))}}}.')
    inputs = {n: _tensor(request.inputs[n], n, specs[n]) for n in specs}
    sizes = {a.shape[0] if a.ndim else None for a in inputs.values()}
    rows = sizes.pop() if len(sizes) == 1 else None
    outputs = self._run(signature, inputs, rows or None)
    names = list(request.output_filter) or sorted(outputs)
    unknown = sorted(set(names) - set(outputs))
    if unknown:
      raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                   f'output tensor alias not found in signature: {unknown[0]}; the outputs are '
                   f'{sorted(outputs)}')
    response = predict_pb2.PredictResponse()
    _reply_spec(served, response.model_spec, signature)
    for name in names:
      response.outputs[name].CopyFrom(tf.make_tensor_proto(outputs[name]))
    return response

  def _examples(self, request, method):
    """The request's Examples, serialized, and the signature name: serving_default, the one
    that parses raw Examples."""
    _check_model(self._served, request.model_spec)
    signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
    if signature != DEFAULT_SIGNATURE or set(self._served.input_specs.get(signature, {})) != {
        'examples'}:
      raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                   f'{method} runs the {DEFAULT_SIGNATURE} signature (serialized Examples in), '
                   f'not "{signature}"; use Predict for the other signatures')
    kind = request.input.WhichOneof('kind')
    if kind == 'example_list':
      examples = list(request.input.example_list.examples)
    elif kind == 'example_list_with_context':
      given = request.input.example_list_with_context
      examples = []
      for example in given.examples:
        merged = tf.train.Example()
        merged.CopyFrom(given.context)
        for name, feature in example.features.feature.items():  # the example's own win
          merged.features.feature[name].CopyFrom(feature)
        examples.append(merged)
    else:
      raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f'{method}: the request has no input '
                                                     'examples')
    if not examples:
      raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f'{method}: the input holds no examples')
    serialized = np.array([e.SerializeToString() for e in examples], dtype=object)
    return signature, serialized

  def Classify(self, request, context):
    return self._answer(context, classification_pb2.ClassificationResponse,
                        lambda: self._classify(request))

  def _classify(self, request):
    served = self._served
    signature, serialized = self._examples(request, 'Classify')
    if served.model.task == 'regression':
      raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f'{served.name} is a regression model: '
                                                     'use Regress (or Predict)')
    outputs = self._run(signature, {'examples': serialized}, len(serialized))
    probabilities = outputs['probabilities']
    names = served.model.class_names or tuple(str(i) for i in range(probabilities.shape[1]))
    response = classification_pb2.ClassificationResponse()
    _reply_spec(served, response.model_spec, signature)
    for row in probabilities:
      classes = response.result.classifications.add().classes
      for name, score in zip(names, row):
        classes.add(label=name, score=float(score))
    return response

  def Regress(self, request, context):
    return self._answer(context, regression_pb2.RegressionResponse,
                        lambda: self._regress(request))

  def _regress(self, request):
    served = self._served
    signature, serialized = self._examples(request, 'Regress')
    if served.model.task != 'regression':
      raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f'{served.name} is a {served.model.task} '
                                                     'classifier: use Classify (or Predict)')
    outputs = self._run(signature, {'examples': serialized}, len(serialized))
    response = regression_pb2.RegressionResponse()
    _reply_spec(served, response.model_spec, signature)
    for value in np.reshape(outputs['predictions'], [len(serialized), -1])[:, 0]:
      response.result.regressions.add(value=float(value))
    return response

  def GetModelMetadata(self, request, context):
    return self._answer(context, get_model_metadata_pb2.GetModelMetadataResponse,
                        lambda: self._metadata(request), runs_model=False)

  def _metadata(self, request):
    served = self._served
    _check_model(served, request.model_spec)
    fields = list(request.metadata_field)
    if fields != ['signature_def']:
      raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                   f'Metadata field {next((f for f in fields if f != "signature_def"), "")!r} '
                   'is not supported; ask for "signature_def"' if fields else
                   'GetModelMetadata needs metadata_field "signature_def"')
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    _reply_spec(served, response.model_spec, '')
    signatures = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in served_model.signature_defs(served.path).items():
      signatures.signature_def[name].CopyFrom(signature)
    response.metadata['signature_def'].Pack(signatures)
    return response

  def GetModelStatus(self, request, context):
    return self._answer(context, get_model_status_pb2.GetModelStatusResponse,
                        lambda: self._status(request), runs_model=False)

  def _status(self, request):
    _check_model(self._served, request.model_spec)
    response = get_model_status_pb2.GetModelStatusResponse()
    response.model_version_status.add(
        version=int(self._served.version),
        state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    return response


def make_server(host, port, current, batcher, threads=64):
  """A started gRPC server of both services on host:port (0: any free port); returns (server,
  the port it listens on). An address it cannot bind is an OSError."""
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                                             thread_name_prefix='grpc'))
  services = Services(current, batcher)
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(services, server)
  model_service_pb2_grpc.add_ModelServiceServicer_to_server(services, server)
  try:
    bound = server.add_insecure_port(f'{host}:{port}')
  except RuntimeError as e:  # grpcio raises where older versions returned 0
    raise OSError(str(e)) from None
  if not bound:
    raise OSError(f'cannot listen on {host}:{port}')
  server.start()
  return server, bound
