"""TensorFlow Serving's REST JSON, both ways: a predict request's body -> the signature's input
arrays (row or columnar format, {"b64": ...} values, dtypes and shapes checked against the
signature), the outputs -> the reply, and ApiError for the {"error": ...} replies.

Beyond TensorFlow Serving, objects of raw feature values sent to serving_default are encoded as
Examples here, by trainer.serving's rules, so JSON clients need not build Examples. Knows nothing of
HTTP or of batching: the codec takes and gives plain JSON objects and numpy arrays.
"""

import base64
import binascii
import json

import numpy as np
import tensorflow as tf

from trainer import serving
from transforms.errors import UserError

DEFAULT_SIGNATURE = 'serving_default'
REQUEST_KEYS = ('signature_name', 'instances', 'inputs')


class ApiError(Exception):
  """A request answered with TensorFlow Serving's error reply: {"error": message}, HTTP status."""

  def __init__(self, status, message):
    super().__init__(message)
    self.status = status


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
  except UserError as e:
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
