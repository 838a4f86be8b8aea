"""The transform graph of a graph-mode analysis, rewritten as the TF2 SavedModel that TF
Transform writes with TF2 behaviours, so that every reader of DIR/transform_fn gets the format
it expects.

TF Transform's graph mode (force_tf_compat_v1) traces the preprocessing_fn once, where TF2
behaviours trace it four times (pipelines/job.build), but it writes a TF1 SavedModel, which
TFTransformOutput.transform_raw_features applies only inside a tf.compat.v1 graph, not eagerly
as a TF2 user calls it. `rewrite_as_tf2` replaces it with a TF2 SavedModel of the same graph:

- loaded with tf.saved_model.load (a TF1 SavedModel loads as an object with its graph, its
  tables' initializer, its assets and `prune(feeds, fetches)`);
- the outputs grouped by the raw inputs they depend on (data edges only), each group pruned
  into its own function: TF Transform's TF2 loader finds which inputs an output needs by
  walking the function's ops back to its inputs, and drops the outputs whose inputs a caller
  does not feed (a serving request has no label). One function of every input would make every
  output need every input;
- a tf.function over those, with TF Transform's name for it (`transform_fn`) and the
  TensorAdapter's original TypeSpecs as its input signature, as TF Transform's TF2 export has,
  saved with the loaded object (its tables, their vocabulary files as assets, its variables).

Values are the TF1 graph's own ops: the transformed shards (written by the TF1 graph) and this
graph agree (tests/test_tabular_pipeline.py). Public APIs only: tf.saved_model,
tf.compat.v1.saved_model.utils, the SavedModel protos.

No Beam here: stages.AnalyzeTrain calls it once TF Transform has written the transform graph, in its
own step or, where that step runs in the process that runs the job (Beam's in-process runner), in a
child process (`start_in_background`), which the job waits for before it publishes
(`wait_for_background`, once the report is written). The rewrite is Python graph building (a
300-column graph: 12 s of one core here, benchmarks/RESULTS.md), which holds the GIL: on a thread it
ran no faster; in a child process it runs on the machine's other core while the job transforms the
splits.
"""

import atexit
import collections
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import uuid

# TF Transform's names for a transform graph: the TF1 SavedModel's tag and signature, and the
# attribute its TF2 loader reads the transform function from.
TF1_TAG = 'transform'
TF1_SIGNATURE = 'transform_signature'
FUNCTION = 'transform_fn'


def tf1_meta_graph(saved_model_dir):
  """The MetaGraphDef of TF Transform's TF1 SavedModel in `saved_model_dir`, or None for
  another (a TF2 one, tagged 'serve')."""
  import tensorflow as tf
  from tensorflow.core.protobuf import saved_model_pb2

  saved_model = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(os.path.join(saved_model_dir, 'saved_model.pb'), 'rb') as f:
    saved_model.ParseFromString(f.read())
  return next((m for m in saved_model.meta_graphs if TF1_TAG in m.meta_info_def.tags), None)


def components(info):
  """The tensor names of a signature's TensorInfo: one for a tensor, (indices, values, dense
  shape) for a SparseTensor, the components of another composite (a RaggedTensor)."""
  which = info.WhichOneof('encoding')
  if which == 'name':
    return [info.name]
  if which == 'coo_sparse':
    c = info.coo_sparse
    return [c.indices_tensor_name, c.values_tensor_name, c.dense_shape_tensor_name]
  return [c.name for c in info.composite_tensor.components]


def input_groups(meta_graph):
  """{tuple of raw inputs: [outputs that depend on exactly those]} of the TF1 signature, by the
  data edges of its graph (a control dependency makes no output need an input)."""
  signature = meta_graph.signature_def[TF1_SIGNATURE]
  sources = {n.name: [i.split(':')[0] for i in n.input if not i.startswith('^')]
             for n in meta_graph.graph_def.node}
  feature_of = {name.split(':')[0]: feature for feature, info in signature.inputs.items()
                for name in components(info)}
  groups = collections.defaultdict(list)
  for output, info in sorted(signature.outputs.items()):
    needed, stack, seen = set(), [n.split(':')[0] for n in components(info)], set()
    while stack:
      node = stack.pop()
      if node in seen:
        continue
      seen.add(node)
      if node in feature_of:
        needed.add(feature_of[node])
      else:
        stack.extend(sources.get(node, ()))
    groups[tuple(sorted(needed))].append(output)
  return dict(groups)


def _load_unsigned(saved_model_dir):
  """tf.saved_model.load of TF Transform's TF1 SavedModel, without its signature. A TF1 load
  makes a function of each signature, copying the graph op by op (3 s of a 300-column graph's
  6 s load); the rewrite prunes its own functions instead. The SavedModel is read without its
  signatures for the load and restored byte for byte afterwards, whatever happens."""
  import tensorflow as tf
  from tensorflow.core.protobuf import saved_model_pb2

  path = os.path.join(saved_model_dir, 'saved_model.pb')
  with tf.io.gfile.GFile(path, 'rb') as f:
    original = f.read()
  unsigned = saved_model_pb2.SavedModel.FromString(original)
  for meta_graph in unsigned.meta_graphs:
    meta_graph.signature_def.clear()
  try:
    with tf.io.gfile.GFile(path, 'wb') as f:
      f.write(unsigned.SerializeToString())
    return tf.saved_model.load(saved_model_dir, tags=[TF1_TAG])
  finally:
    with tf.io.gfile.GFile(path, 'wb') as f:
      f.write(original)


def _paths(output_dir, temp_dir):
  """(the transform graph, the new one while it is written, the old one while it is replaced)."""
  return (output_dir.rstrip('/') + '/transform_fn', os.path.join(temp_dir, 'transform_fn.tf2'),
          os.path.join(temp_dir, 'transform_fn.tf1'))


def rewrite_as_tf2(output_dir, type_specs, temp_dir):
  """Replaces output_dir/transform_fn, a TF1 SavedModel that TF Transform wrote, by the same
  transform as a TF2 SavedModel taking `type_specs` ({raw feature: batched tf.TypeSpec}, the
  TensorAdapter's original ones). Does nothing when it already is a TF2 one. The new graph is
  saved in `temp_dir` (on the same file system) and renamed into place: a failure leaves the
  TF1 graph where it was, and nothing of the new one."""
  import tensorflow as tf

  final, staged, old = _paths(output_dir, temp_dir)
  meta_graph = tf1_meta_graph(final)
  if meta_graph is None:
    return
  signature = meta_graph.signature_def[TF1_SIGNATURE]
  loaded = _load_unsigned(final)
  tensor = tf.compat.v1.saved_model.utils.get_tensor_from_tensor_info
  pruned = []
  for inputs, outputs in sorted(input_groups(meta_graph).items()):
    feeds = [t for name in inputs for t in tf.nest.flatten(
        tensor(signature.inputs[name], loaded.graph), expand_composites=True)]
    fetches = {name: tensor(signature.outputs[name], loaded.graph) for name in outputs}
    pruned.append((inputs, loaded.prune(feeds, fetches)))

  @tf.function(input_signature=[dict(type_specs)])
  def transform(features):
    result = {}
    for inputs, function in pruned:
      result.update(function(*[t for name in inputs for t in tf.nest.flatten(
          features[name], expand_composites=True)]))
    return result

  module = tf.Module()
  module.loaded = loaded  # its tables' initializer, vocabulary assets and variables
  setattr(module, FUNCTION, transform.get_concrete_function())
  for path in (staged, old):
    if tf.io.gfile.exists(path):
      tf.io.gfile.rmtree(path)
  try:
    tf.saved_model.save(module, staged)
    tf.io.gfile.rename(final, old)
    try:
      tf.io.gfile.rename(staged, final)
    except BaseException:
      tf.io.gfile.rename(old, final)
      raise
  finally:
    if tf.io.gfile.exists(staged):
      tf.io.gfile.rmtree(staged)
  tf.io.gfile.rmtree(old)


# This process, as the job's steps see it: a step that finds the same token runs in the process
# that built the job (a worker process or machine imports this module afresh).
PROCESS_TOKEN = uuid.uuid4().hex
_LOG = logging.getLogger('pipelines')
_RUNNING = {}  # output_dir -> (child process, its log file's path)


def warn_not_rewritten(cause):
  _LOG.warning(
      'the transform graph stays a TF1 SavedModel (TFTransformOutput.transform_raw_features '
      'then needs a tf.compat.v1 graph; --tracing tf2 writes a TF2 one): it could not be '
      'rewritten as TF2: %s', cause)


# A child process pays for importing TensorFlow (about 5 s of CPU here) before it rewrites: less
# than the rewrite of a 300-column graph (about 15,000 nodes, 12 s), more than a census graph's.
BACKGROUND_MIN_NODES = 5000


def worth_a_child(output_dir):
  """Whether output_dir's TF1 transform graph is large enough for start_in_background."""
  return is_large(output_dir.rstrip('/') + '/transform_fn')


def is_large(saved_model_dir):
  """Whether the TF1 graph in saved_model_dir has BACKGROUND_MIN_NODES nodes or more."""
  meta_graph = tf1_meta_graph(saved_model_dir)
  return meta_graph is not None and len(meta_graph.graph_def.node) >= BACKGROUND_MIN_NODES


def prepare_child():
  """Starts, ahead of start_in_background, the child process it will hand its rewrite to: the
  child imports TensorFlow (about 2.5 s of its 12 s on a 300-column graph) while the job is
  still binding the transform graph, then waits for its arguments. The binding of the
  transform graph (binding_packing.bind_all) calls it where the rewrite will run in a child
  (the job's own process, a large graph). One at most; release_prepared() ends one that was
  not used."""
  if _PREPARED and _PREPARED['child'].process.poll() is None:
    return
  release_prepared()
  job = tempfile.mkdtemp(prefix='transform-graph-rewrite-')
  _PREPARED['child'] = _Child(_spawn(job, ['--wait'], subprocess.PIPE), job, None)
  _at_exit()


def release_prepared():
  """Ends the child prepare_child started, where no rewrite took it: it has written nothing
  but its log, and may still be importing TensorFlow, which the job does not wait for."""
  child = _PREPARED.pop('child', None)
  if child is not None:
    _stop(child)
    child.process.stdin.close()


def _spawn(job, arguments, stdin):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [root] + [p for p in [os.environ.get('PYTHONPATH')] if p]), TF_CPP_MIN_LOG_LEVEL='2')
  with open(os.path.join(job, 'log'), 'wb') as log:
    return subprocess.Popen([sys.executable, '-m', 'pipelines.transform_graph', *arguments],
                            stdin=stdin, stdout=log, stderr=subprocess.STDOUT, env=env)


def _at_exit():
  atexit.unregister(kill_background)
  atexit.register(kill_background)  # a command that fails after the job ran


def start_in_background(output_dir, adapter_config, temp_dir):
  """rewrite_as_tf2 of output_dir's transform graph in a child process of this one (the one
  prepare_child started, where it is waiting), with the raw features' TypeSpecs of
  `adapter_config` (a tfx_bsl TensorAdapterConfig); the rewrite's files go to `temp_dir` as
  inline, the child's arguments and output to a local directory."""
  if output_dir in _RUNNING:  # the step ran again
    _stop(_RUNNING.pop(output_dir))
  prepared = _PREPARED.pop('child', None)
  job = prepared.job if prepared is not None else tempfile.mkdtemp(
      prefix='transform-graph-rewrite-')
  with open(os.path.join(job, 'config.pickle'), 'wb') as f:
    pickle.dump(adapter_config, f)
  arguments = [output_dir, temp_dir, os.path.join(job, 'config.pickle')]
  child = None
  if prepared is not None:
    child = prepared.process
    try:
      child.stdin.write((json.dumps(arguments) + '\n').encode())
      child.stdin.close()
    except OSError:  # it died: a fresh one
      child.kill()
      child.wait()
      child = None
  if child is None:
    child = _spawn(job, arguments, subprocess.DEVNULL)
  _at_exit()
  _RUNNING[output_dir] = _Child(child, job, temp_dir)


_Child = collections.namedtuple('_Child', ['process', 'job', 'temp_dir'])
_PREPARED = {}  # 'child': the _Child prepare_child started, waiting for its arguments


def wait_for_background():
  """Waits for the rewrites start_in_background began. A rewrite that failed, or a child that
  died, leaves the TF1 graph where it was (put back if it died between its two renames), with
  the warning an inline rewrite gives."""
  import tensorflow as tf

  while _RUNNING:
    output_dir, child = _RUNNING.popitem()
    try:
      status = child.process.wait()
      if status != 0:
        final, old = _paths(output_dir, child.temp_dir)[::2]
        if not tf.io.gfile.exists(final) and tf.io.gfile.exists(old):
          tf.io.gfile.rename(old, final)
        with open(os.path.join(child.job, 'log'), errors='replace') as f:
          lines = [line.strip() for line in f if line.strip()]
        warn_not_rewritten(lines[-1] if status == _FAILED and lines
                           else f'its process ended with exit status {status}')
    finally:
      shutil.rmtree(child.job, ignore_errors=True)


def kill_background():
  """Stops the rewrites still running (a job that failed publishes nothing), and a prepared
  child."""
  while _RUNNING:
    _stop(_RUNNING.popitem()[1])
  release_prepared()


def _stop(child):
  child.process.kill()
  child.process.wait()
  shutil.rmtree(child.job, ignore_errors=True)


_FAILED = 3  # the child's exit status for a rewrite that raised; its last line is the cause


def _main(output_dir, temp_dir, config_path):
  from tfx_bsl.tfxio import tensor_adapter
  with open(config_path, 'rb') as f:
    adapter_config = pickle.load(f)
  try:
    rewrite_as_tf2(output_dir, tensor_adapter.TensorAdapter(adapter_config).OriginalTypeSpecs(),
                   temp_dir)
  except Exception as e:  # an op or a composite the rewrite does not know
    cause = str(e).strip().splitlines()
    print(f'{type(e).__name__}: {cause[0] if cause else ""}', flush=True)
    sys.exit(_FAILED)


def _wait_for_arguments():
  """prepare_child's child: TensorFlow imported first, then one line of arguments (a JSON
  list) on stdin; none (its input closed) ends it."""
  import tensorflow  # noqa: F401
  from tfx_bsl.tfxio import tensor_adapter  # noqa: F401
  line = sys.stdin.readline()
  if line.strip():
    _main(*json.loads(line))


if __name__ == '__main__':
  if sys.argv[1:] == ['--wait']:
    _wait_for_arguments()
  else:
    _main(*sys.argv[1:])
