"""What the graph rewrites for other runtimes (trainer/tflite_graph.py, tflite_strings.py,
tfjs_graph.py) read off a NodeDef's inputs: its data inputs and its control inputs ('^name')."""


def data_inputs(node):
  return [i for i in node.input if not i.startswith('^')]


def control_inputs(node):
  return [i for i in node.input if i.startswith('^')]
