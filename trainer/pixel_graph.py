"""An image model's graph from decoded pixels: pixels in, the SavedModel's predictions out, for
the runtimes that cannot decode an image (trainer/export_tflite.py, trainer/export_tfjs.py).

TFLite has no built-in that decodes an image, nor TF.js a kernel, and the transform graph
starts by decoding the encoded bytes it is sent (transforms/images.py: tf.io.decode_image in a
tf.map_fn, resized where the size differs). On a phone or in a browser the app has the pixels
already (a camera frame, a bitmap, a canvas), so the model starts after the decode: its input
`pixels` [batch, H, W, C] (uint8), at the model's size, replaces the tensor where the decoded
images are stacked, and the decode, the resize and the loop around them fall away. What comes
after (scaling, the training set's mean and standard deviation, the model) is the SavedModel's
own graph.

How: the signature is frozen (variables to constants, functions inlined), its GraphDef imported
again with the stacked images mapped to the new input, and the encoded-bytes input mapped to ''
per image (what else reads it, its batch size, still reads that). Where the images are stacked
is found, not assumed: the one TensorListStack downstream of a Decode* op.

Freezing: trainer/freezing.py (gated on the TensorFlow versions it was tested with).
"""

import tensorflow as tf

from trainer import freezing, serving

SIGNATURE = 'predict_pixels'
_DECODES = ('DecodeImage', 'DecodePng', 'DecodeJpeg', 'DecodeBmp', 'DecodeGif',
            'DecodeAndCropJpeg')


class Unsupported(ValueError):
  pass


def _decoded_stack(graph_def):
  """The TensorListStack node downstream of a decode: where the decoded images are stacked."""
  nodes = {n.name: n for n in graph_def.node}

  def decodes_upstream(name):
    seen, pending = set(), [name]
    while pending:
      node = nodes.get(pending.pop())
      if node is None or node.name in seen:
        continue
      if node.op in _DECODES:
        return True
      seen.add(node.name)
      pending.extend(i.lstrip('^').split(':')[0] for i in node.input)
    return False

  found = [n for n in graph_def.node if n.op == 'TensorListStack' and decodes_upstream(n.name)]
  if len(found) != 1:
    raise Unsupported('the graph does not decode its images in one tf.map_fn '
                      f'({len(found)} stacks of decoded images)')
  stack = found[0]
  shape = nodes[stack.input[1].split(':')[0]]
  element_shape = tf.make_ndarray(shape.attr['value'].tensor).tolist() \
      if shape.op == 'Const' else None
  if not element_shape or any(d is None or d < 0 for d in element_shape):
    raise Unsupported('the decoded images have no fixed size in the graph')
  return f'{stack.name}:0', tf.as_dtype(stack.attr['element_dtype'].type), element_shape


def image_key(version_dir):
  """The encoded-image input of an image model (its one binary raw feature), or None."""
  binary = serving.raw_format(version_dir).get('binary') or []
  return binary[0] if len(binary) == 1 else None


def write_pixel_model(version_dir, image_key, output_dir, input_dtype=None):
  """Writes a SavedModel with one signature, SIGNATURE(pixels), to `output_dir`; returns the
  input's TensorSpec. `input_dtype`: the input's, where the runtime has no tensors of the
  decoded images' own (TF.js: no uint8); values are clipped to that dtype's range, then cast."""
  graph_def, _, output_tensors = freezing.frozen_signature(
      tf.saved_model.load(version_dir), 'predict_raw')
  if any(n.op.startswith(('HashTable', 'LookupTable')) for n in graph_def.node):
    raise Unsupported('an image model that also looks up a vocabulary (not supported yet)')
  stack, dtype, element_shape = _decoded_stack(graph_def)
  image_input = f'{image_key}:0'  # the frozen graph's placeholders are named after the inputs
  names = sorted(output_tensors)
  outputs = [output_tensors[n] for n in names]
  spec = tf.TensorSpec([None, *element_shape], input_dtype or dtype, name='pixels')

  def body(pixels):
    if pixels.dtype != dtype:
      pixels = tf.cast(tf.clip_by_value(pixels, dtype.min, dtype.max), dtype)
    one_per_image = tf.fill(tf.shape(pixels)[:1], '')
    found = tf.graph_util.import_graph_def(
        graph_def, input_map={stack: pixels, image_input: one_per_image},
        return_elements=outputs, name='')
    return dict(zip(names, found))

  wrapped = tf.compat.v1.wrap_function(body, [spec])

  @tf.function(input_signature=[spec])
  def predict_pixels(pixels):
    return wrapped(pixels)

  holder = tf.Module()
  holder.wrapped = wrapped
  tf.saved_model.save(holder, output_dir, signatures={SIGNATURE: predict_pixels})
  return spec
