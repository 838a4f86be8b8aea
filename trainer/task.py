"""Trains a Keras model on a pipeline's output and exports it with the transform graph attached.

  python -m trainer.task --transformed out/adult --model-dir out/models

The model lands in MODEL_DIR/<name>/<version>/ (TensorFlow Serving's layout; a new version each run).
"""

import argparse
import logging
import sys

from pipelines.common import UserError
from trainer import input as input_lib
from trainer import train


def parse_args(argv):
  defaults = train.TrainConfig('', '')
  p = argparse.ArgumentParser(prog='python -m trainer.task', description=__doc__.split('\n')[0])
  p.add_argument('--transformed', required=True, help='output directory of a pipeline run')
  p.add_argument('--model-dir', required=True, help='checkpoints, logs and exported versions')
  p.add_argument('--model-name', default=None, help='default: the dataset module name')
  p.add_argument('--epochs', type=int, default=defaults.epochs)
  p.add_argument('--batch-size', type=int, default=defaults.batch_size)
  p.add_argument('--learning-rate', type=float, default=defaults.learning_rate)
  p.add_argument('--max-steps', type=int, default=None, help='stop after this many batches')
  p.add_argument('--mixed-precision', action='store_true', help='float16 compute (GPU)')
  p.add_argument('--xla', action='store_true', help='compile the model with XLA')
  p.add_argument('--distribute', choices=('auto', 'mirrored', 'none'), default='auto',
                 help='auto: MirroredStrategy when several GPUs are present')
  p.add_argument('--profile-steps', type=int, nargs=2, default=None, metavar=('FIRST', 'LAST'),
                 help='record a TensorBoard profile of these batches')
  p.add_argument('--augment', nargs='+', choices=input_lib.AUGMENTATIONS, default=(),
                 help='random flips and/or crops of training images (off by default: flips '
                      'break digits and text)')
  args = p.parse_args(argv)
  for flag in ('epochs', 'batch_size'):
    if getattr(args, flag) < 1:
      p.error(f'--{flag.replace("_", "-")} must be at least 1')
  return train.TrainConfig(
      transformed_dir=args.transformed, model_dir=args.model_dir, model_name=args.model_name,
      epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
      max_steps=args.max_steps, mixed_precision=args.mixed_precision, xla=args.xla,
      distribute=args.distribute, augment=tuple(args.augment),
      profile_steps=tuple(args.profile_steps) if args.profile_steps else None)


def run(argv=None):
  try:
    return train.train_and_export(parse_args(argv))
  except input_lib.InputError as e:
    raise UserError(str(e)) from e


def main():
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  try:
    path, metrics, _ = run(sys.argv[1:])
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'exported {path}')
  if metrics:
    print('eval ' + '  '.join(f'{k} {v:.4f}' for k, v in metrics.items()))


if __name__ == '__main__':
  main()
