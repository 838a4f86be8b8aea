"""The TF.js conversion, run in the converter's environment (.tfjs-env: tensorflowjs 4.22 on
TensorFlow 2.19) by trainer/export_tfjs.py, which prepared the SavedModel:

  .tfjs-env/bin/python tfjs/convert.py SAVED_MODEL OUTPUT_DIR

tensorflowjs_converter's own code on the SavedModel's predict_raw signature, then one fix of
what it wrote: it names each output of model.json's signature after the signature output of the
same dtype and shape, and after its tensor (`Identity_2:0`) when several share them (three
string matrices, say). Here every output gets the signature's key for its tensor.
"""

import json
import os
import sys

import tensorflow as tf
from tensorflowjs.converters import converter

SIGNATURE = 'predict_raw'


def main(saved_model, output):
  converter.convert([
      '--input_format=tf_saved_model', '--output_format=tfjs_graph_model',
      f'--signature_name={SIGNATURE}', '--saved_model_tags=serve', saved_model, output])
  function = tf.saved_model.load(saved_model).signatures[SIGNATURE]
  # The function's output tensors (those the converter read) are its outputs flattened: in the
  # order of the sorted keys.
  outputs = sorted(function.structured_outputs)
  key_of = {tensor.name: key for key, tensor in zip(outputs, function.outputs)}
  path = os.path.join(output, 'model.json')
  with open(path) as f:
    model = json.load(f)
  signature = model['signature']['outputs']
  model['signature']['outputs'] = {key_of.get(spec['name'], key): spec
                                   for key, spec in signature.items()}
  if sorted(model['signature']['outputs']) != outputs:
    sys.exit(f'RuntimeError: model.json names the outputs {sorted(signature)}, the signature '
             f'{outputs}')
  with open(path + '.tmp', 'w') as f:
    json.dump(model, f, separators=(',', ':'))
  os.replace(path + '.tmp', path)


if __name__ == '__main__':
  if len(sys.argv) != 3:
    sys.exit('usage: convert.py SAVED_MODEL OUTPUT_DIR')
  main(*sys.argv[1:])
