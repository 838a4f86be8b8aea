"""Export: a TF.js graph model of a version's predict_raw signature, with the transform inside.

Raw feature columns in, the SavedModel's outputs out:

  python -m trainer.export_tfjs --model out/models/census [--version N] [--output DIR]
  node tfjs/predict.mjs out/models/census/1/tfjs < request.json

The converter (tensorflowjs 4.22) needs TensorFlow 2.19 and so lives in an environment of its
own (`make tfjs` builds it in .tfjs-env; --converter-env or TFJS_CONVERTER_ENV point elsewhere),
run here as a subprocess. This process (TensorFlow 2.21) first rewrites the signature into a
SavedModel that the converter takes and the TF.js runtime runs (trainer/tfjs_graph.py says how
and why); what the runtime cannot run is refused in one line, before and after the conversion.

The model is written to VERSION/tfjs (model.json and its weight shards) through a staging
directory beside it, renamed into place last: a killed export leaves no tfjs/ that looks
complete, and the next export removes what it left. Needs TensorFlow alone (no Beam).
"""

if __name__ == '__main__':  # the command: quiet start-up, before TensorFlow loads (command.start)
  from transforms import command
  command.start()

import glob
import json
import os
import re
import shutil
import subprocess
import uuid

from transforms import command
from transforms.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ENV = os.path.join(REPO, '.tfjs-env')
ENV_VARIABLE = 'TFJS_CONVERTER_ENV'
STAGING = '.tmp-tfjs-'  # beside the output: a TF.js model being written
CONVERTER_TIMEOUT_S = 900


def converter_env(flag=None):
  """The converter environment's directory: --converter-env, else $TFJS_CONVERTER_ENV, else
  .tfjs-env in the repository. Refused in one line unless it holds the converter."""
  env = flag or os.environ.get(ENV_VARIABLE) or DEFAULT_ENV
  if not os.access(os.path.join(env, 'bin', 'tensorflowjs_converter'), os.X_OK):
    raise UserError(f'no TF.js converter in {env} (bin/tensorflowjs_converter): run `make tfjs` '
                    f'to build it, or point --converter-env or {ENV_VARIABLE} at one')
  return env


def runtime_ops(env):
  """The TF op names the TF.js runtime executes, as the converter's package lists them."""
  files = glob.glob(os.path.join(env, 'lib', 'python*', 'site-packages', 'tensorflowjs',
                                 'op_list', '*.json'))
  if not files:
    raise UserError(f'{env} has no tensorflowjs package (its op_list): rebuild it with '
                    '`make tfjs`')
  ops = set()
  for path in files:
    with open(path) as f:
      ops.update(entry['tfOpName'] for entry in json.load(f))
  return ops


def _converter_failure(output):
  """One line from what a failed converter printed."""
  lines = [line.strip() for line in output.splitlines() if line.strip()]
  for i, line in enumerate(lines):
    if 'Unsupported Ops in the model' in line:
      names = lines[i + 1] if i + 1 < len(lines) else ''
      return f'it found ops the TF.js runtime lacks: {names}'
  errors = [line for line in lines if re.match(r'^[\w.]*(Error|Exception)\b.*:', line)]
  return (errors or lines or ['no output'])[-1][:500]


def convert(env, saved_model_dir, output_dir):
  """The converter (tfjs/convert.py in the converter's environment) on the prepared SavedModel."""
  command_line = [os.path.join(env, 'bin', 'python'), os.path.join(REPO, 'tfjs', 'convert.py'),
                  saved_model_dir, output_dir]
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', CUDA_VISIBLE_DEVICES='')
  environment.pop('PYTHONPATH', None)  # this environment's packages are not the converter's
  try:
    done = subprocess.run(command_line, env=environment, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=CONVERTER_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    raise UserError(f'the TF.js converter did not finish in {CONVERTER_TIMEOUT_S}s') from None
  except OSError as e:
    raise UserError(f'the TF.js converter in {env} does not run: {e.strerror or e}') from None
  if done.returncode != 0:
    raise UserError(f'the TF.js converter failed: {_converter_failure(done.stdout + done.stderr)}')
  if not os.path.isfile(os.path.join(output_dir, 'model.json')):
    raise UserError('the TF.js converter wrote no model.json')


def model_json_nodes(model_json):
  """Every node of a converted model.json: its graph, its functions, its initializer."""
  topology = model_json.get('modelTopology', {})
  nodes = list(topology.get('node', []))
  for function in topology.get('library', {}).get('function', []):
    nodes.extend(function.get('nodeDef', []))
  nodes.extend(model_json.get('modelInitializer', {}).get('node', []))
  return nodes


def _check_replaceable(output):
  """An existing output is replaced only when it is an earlier TF.js export (model.json and
  weight shards) or empty: never a directory of other files."""
  if not os.path.lexists(output):
    return
  if not os.path.isdir(output) or os.path.islink(output):
    raise UserError(f'{output} exists and is not a directory of a TF.js model; remove it or '
                    'choose another --output')
  files = os.listdir(output)
  if files and not ('model.json' in files and all(
      f == 'model.json' or re.fullmatch(r'group\d+-shard\d+of\d+(\.bin)?', f) for f in files)):
    raise UserError(f'{output} holds files other than a TF.js model; remove them or choose '
                    'another --output')


def _publish(staging, output):
  """staging (on output's file system) -> output, replacing an older export: the old one is
  moved aside first, so the name never holds a half-written model."""
  old = None
  if os.path.lexists(output):
    old = os.path.join(os.path.dirname(output), f'{STAGING}old-{uuid.uuid4().hex[:8]}')
    os.rename(output, old)
  os.rename(staging, output)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _remove_staging(parent):
  """What killed exports left beside the output."""
  for path in glob.glob(os.path.join(parent, STAGING + '*')):
    shutil.rmtree(path, ignore_errors=True)


def _sizes(directory):
  files = sorted(os.listdir(directory))
  weights = [f for f in files if f != 'model.json']
  return (os.path.getsize(os.path.join(directory, 'model.json')),
          sum(os.path.getsize(os.path.join(directory, f)) for f in weights), len(weights))


def export(version_dir, output=None, env=None):
  """Writes the TF.js model of `version_dir`; returns (its directory, summary dict)."""
  import tensorflow as tf  # loaded once the converter is known to be there

  from trainer import pixel_graph, tfjs_graph

  output = os.path.abspath(output or os.path.join(version_dir, 'tfjs'))
  ops = runtime_ops(env)
  _check_replaceable(output)
  parent = os.path.dirname(output)
  try:
    os.makedirs(parent, exist_ok=True)
    _remove_staging(parent)
  except OSError as e:
    raise UserError(f'cannot write {output}: {e.strerror or e}') from None
  # One staging directory beside the output holds the prepared SavedModel and the converter's
  # output; a killed export leaves it there, and the next export removes it.
  staging = os.path.join(parent, f'{STAGING}{uuid.uuid4().hex[:8]}')
  saved_model, converted = os.path.join(staging, 'saved_model'), os.path.join(staging, 'model')
  try:
    try:
      source, signature = version_dir, tfjs_graph.SIGNATURE
      key = pixel_graph.image_key(version_dir)
      if key is not None:  # TF.js cannot decode an image: pixels in (trainer/pixel_graph.py)
        source, signature = os.path.join(staging, 'pixels'), pixel_graph.SIGNATURE
        pixel_graph.write_pixel_model(version_dir, key, source, input_dtype=tf.int32)
      prepared = tfjs_graph.prepare(source, ops, signature)
    except (UserError, pixel_graph.Unsupported) as e:
      raise UserError(f'{version_dir} cannot be exported to TF.js: {e}') from None
    prepared.save(saved_model)
    convert(env, saved_model, converted)
    with open(os.path.join(converted, 'model.json')) as f:
      missing = tfjs_graph.unsupported(model_json_nodes(json.load(f)), ops)
    if missing:
      raise UserError(f'{version_dir} cannot be exported to TF.js: the converted graph has ops '
                      f'the TF.js runtime cannot run: {", ".join(missing)}')
    try:
      _publish(converted, output)
    except OSError as e:
      raise UserError(f'cannot write {output}: {e.strerror or e}') from None
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  json_bytes, weight_bytes, shards = _sizes(output)
  return output, {'model_json_bytes': json_bytes, 'weight_bytes': weight_bytes,
                  'weight_files': shards, 'tables': prepared.tables,
                  'rewrites': dict(sorted(prepared.rewrites.items())),
                  'inputs': sorted(prepared.inputs), 'outputs': prepared.outputs}


def run(argv=None):
  p = command.ArgumentParser(prog='python -m trainer.export_tfjs',
                             description=__doc__.split('\n')[0])
  p.add_argument('--model', required=True, help='model base directory, or one version directory')
  p.add_argument('--version', type=int, default=None,
                 help='the version to convert (default: the newest)')
  p.add_argument('--output', default=None, help='where to write the TF.js model (default: '
                                                'VERSION/tfjs)')
  p.add_argument('--converter-env', default=None,
                 help=f'the converter environment (default: ${ENV_VARIABLE}, else .tfjs-env in '
                      'the repository; `make tfjs` builds it)')
  command.add_verbose_flag(p)
  args = p.parse_args(argv)
  if '://' in args.model or (args.output and '://' in args.output):
    raise UserError('the TF.js export reads and writes local paths only')
  env = converter_env(args.converter_env)
  from trainer import serving  # TensorFlow
  if args.version is not None:
    version_dir = os.path.join(args.model, str(args.version))
    if not os.path.isfile(os.path.join(version_dir, 'saved_model.pb')):
      raise UserError(f'{args.model} has no version {args.version} '
                      f'(versions: {serving.versions(args.model) or "none"})')
  else:
    version_dir = serving.newest_version(args.model)
  output, summary = export(version_dir, args.output, env)
  rewrites = ', '.join(f'{op} x{n}' for op, n in summary['rewrites'].items()) or 'none'
  shards = summary['weight_files']
  print(f'wrote {output}: model.json {summary["model_json_bytes"]:,} bytes + {shards} weight '
        f'file{"s" if shards != 1 else ""} {summary["weight_bytes"]:,} bytes; '
        f'{summary["tables"]} vocabulary tables; ops rewritten for TF.js: {rewrites}')
  print(f'run it: node {os.path.relpath(os.path.join(REPO, "tfjs", "predict.mjs"))} {output} '
        '< request.json')
  return output, summary


if __name__ == '__main__':
  command.main(run)
