"""A TFLite model of an exported model, transform included, on TFLite's built-in ops only.

  python -m trainer.export_tflite --model out/models/census        # the newest version
  python -m trainer.export_tflite --model out/models/census/3      # or the one named

Writes VERSION/model.tflite: one signature, `predict_raw`, with the SavedModel's inputs (one
tensor per raw feature, [batch]) and outputs (probabilities, class_ids, classes; or predictions).
An image model's signature is `predict_pixels` instead: decoded pixels [batch, H, W, C] uint8 at
the model's size in (TFLite cannot decode an image; trainer/pixel_graph.py), the same outputs.
The vocabularies are inside as TFLite hash tables, the analyzers' results as constants. A phone's
app needs the plain TFLite interpreter (or LiteRT), no Flex delegate: a model that would need
TensorFlow ops TFLite has no built-in for is refused, and the refusal names them.

Raw strings go in as the pipeline reads them: trimmed (TFLite has no op that trims strings); a
missing value of a variable-length string feature is ''. trainer/tflite_graph.py says what is
rewritten and why.

Needs TensorFlow alone.
"""

if __name__ == '__main__':  # the command: quiet start-up, before TensorFlow loads (command.start)
  from transforms import command
  command.start()

import contextlib
import os
import re
import sys
import tempfile
import uuid

import tensorflow as tf

from trainer import pixel_graph, serving, tflite_graph, tflite_strings
from transforms import command
from transforms.errors import UserError

SIGNATURE = 'predict_raw'
FILENAME = 'model.tflite'


def _first_error(error):
  """The converter's first error, without its MLIR location."""
  for line in str(error).splitlines():
    found = re.search(r'error: (?:loc\(.*\)\): )?(.*)', line)
    if found and found.group(1).strip():
      return found.group(1).strip()
  return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _needed_ops(error):
  """The TensorFlow ops a failed builtins-only conversion lists as having no built-in."""
  found = re.search(r'(?:TF Select ops|Flex ops): ([\w, ]+)', str(error))
  return found.group(1).strip() if found else None


@contextlib.contextmanager
def _converter_output_kept(verbose):
  """The converter's C++ side writes its diagnostics (MLIR locations, every op it refused) to the
  process's stderr. They are kept in a file and shown only with --verbose: what was refused is
  said in one line."""
  if verbose:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as kept:
    os.dup2(kept.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def convert(version_dir, verbose=False):
  """The .tflite bytes of `version_dir`, its signature's name, and what was rewritten."""
  key = pixel_graph.image_key(version_dir)
  with tempfile.TemporaryDirectory(prefix='tflite-') as scratch:
    rewritten = os.path.join(scratch, 'saved_model')
    try:
      if key is not None:
        spec = pixel_graph.write_pixel_model(version_dir, key, rewritten)
        signature = pixel_graph.SIGNATURE
        replaced = {f'the decode of {key!r} (pixels {spec.shape} {spec.dtype.name} in)': 1}
      else:
        replaced = tflite_graph.rewrite_saved_model(version_dir, rewritten, SIGNATURE)
        signature = SIGNATURE
    except (tflite_graph.Refused, tflite_strings.Unsupported, pixel_graph.Unsupported) as e:
      raise UserError(f'{version_dir} cannot run on TFLite built-in ops: {e}') from None
    converter = tf.lite.TFLiteConverter.from_saved_model(rewritten, signature_keys=[signature])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
      with _converter_output_kept(verbose):
        content = converter.convert()
    except Exception as e:  # the converter raises its own ConverterError, or others
      ops = _needed_ops(e)
      if ops is None:
        raise UserError(f'{version_dir} cannot be converted to TFLite built-in ops: the '
                        f'converter says: {_first_error(e)}') from None
      raise UserError(
          f'{version_dir} cannot run on TFLite built-in ops: it needs the TensorFlow op(s) '
          f'{ops}, which TFLite has only through the Flex delegate (see README, TFLite)'
      ) from None
  return content, signature, replaced


def write(content, version_dir):
  """Writes VERSION/model.tflite under a temporary name, renamed last: never half a model."""
  path = os.path.join(version_dir, FILENAME)
  staging = os.path.join(version_dir, f'.{FILENAME}.{uuid.uuid4().hex[:8]}.tmp')
  with tf.io.gfile.GFile(staging, 'wb') as f:
    f.write(content)
  tf.io.gfile.rename(staging, path, overwrite=True)
  return path


def run(argv=None):
  p = command.ArgumentParser(prog='python -m trainer.export_tflite',
                             description=__doc__.split('\n')[0])
  p.add_argument('--model', required=True,
                 help='model base directory (its newest version) or one version directory')
  command.add_verbose_flag(p)
  args = p.parse_args(argv)
  version_dir = serving.newest_version(args.model)
  content, signature, replaced = convert(version_dir, command.verbose_requested(argv))
  path = write(content, version_dir)
  return path, len(content), signature, replaced


def _command(argv):
  path, size, signature, replaced = run(argv)
  what = ', '.join(f'{op} x{n}' for op, n in sorted(replaced.items())) or 'nothing'
  print(f'wrote {path} ({size:,} bytes, TFLite built-in ops only, signature {signature}; '
        f'rewritten for TFLite: {what})')


if __name__ == '__main__':
  command.main(_command)
