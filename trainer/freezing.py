"""A signature frozen: its variables as constants, its functions inlined, its control flow
lowered; one GraphDef that the TFLite image export and the TF.js export rewrite and import again.

TensorFlow's convert_to_constants (tensorflow.python.framework) does it, the module TFLite's own
converter freezes with. It is not a public API: it is used only on the TensorFlow versions this
was tested with (TESTED_TF); on another, the exports that need it refuse in one line.
"""

import tensorflow as tf

from transforms.errors import UserError

TESTED_TF = ('2.21.',)


def frozen_signature(saved_model, signature):
  """(GraphDef of `signature` with variables as constants, {input: TensorSpec}, {output name:
  tensor name in the GraphDef}) of a loaded SavedModel."""
  if signature not in saved_model.signatures:
    raise UserError(f'the SavedModel has no {signature} signature (exported before it existed?)')
  if not tf.__version__.startswith(TESTED_TF):
    raise UserError(f'freezing a signature is tested with TensorFlow {TESTED_TF[0]}x only '
                    f'(this is {tf.__version__})')
  from tensorflow.python.framework import convert_to_constants
  function = saved_model.signatures[signature]
  frozen = convert_to_constants.convert_variables_to_constants_v2(
      function, lower_control_flow=True, aggressive_inlining=True)
  inputs = dict(function.structured_input_signature[1])
  # The frozen function's outputs are the signature's, flattened in the order of the sorted keys.
  outputs = dict(zip(sorted(function.structured_outputs), (t.name for t in frozen.outputs)))
  return frozen.graph.as_graph_def(), inputs, outputs
