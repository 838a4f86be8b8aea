"""The model a server serves: the newest version of a model base directory, its signatures' input
specs and its metadata as TensorFlow Serving prints them, and one call of a signature on numpy
arrays (TensorFlow's errors as the REST replies they become).

Apart from trainer.serving (the library that predict also uses) because these are TensorFlow
Serving's conventions: numbered versions under a name, SignatureDefs as JSON, 400 and 500 replies.
"""

import os

import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2

from trainer import serving
from trainer.rest_codec import ApiError
from transforms.errors import UserError


def signature_defs(version_dir):
  """{name: SignatureDef} of the SavedModel's serving graph, sorted by name."""
  proto = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(os.path.join(version_dir, 'saved_model.pb'), 'rb') as f:
    proto.ParseFromString(f.read())
  graph = next((g for g in proto.meta_graphs if 'serve' in g.meta_info_def.tags),
               proto.meta_graphs[0])
  return dict(sorted(graph.signature_def.items()))


def signature_metadata(version_dir):
  """The SignatureDefs of the SavedModel's serving graph as TensorFlow Serving prints them (proto
  field names, enum names, int64 as strings, fields at their defaults included)."""
  return {name: json_format.MessageToDict(sig, always_print_fields_with_no_presence=True,
                                          preserving_proto_field_name=True)
          for name, sig in signature_defs(version_dir).items()}


class ServedModel:
  """One version of one model: its signatures' input specs, and trainer.serving's Model for the
  raw-row encoding."""

  def __init__(self, model_dir, name=None):
    path = serving.newest_version(model_dir)
    version = os.path.basename(os.path.normpath(path))
    if not version.isdigit():
      raise UserError(f'--model {model_dir}: give the model\'s base directory, the one '
                      'that holds numbered version directories (1/, 2/, ...)')
    self.version = str(int(version))
    self.path = path
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


class Current:
  """The ServedModel being served. The model watcher swaps it whole; a request reads it once, so
  the version that decoded a request is the one that answers it."""

  def __init__(self, served):
    self.served = served
