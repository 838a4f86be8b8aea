"""Trains a Keras model on a pipeline's output and exports it with the transform graph attached.

  python -m trainer.task --transformed out/adult --model-dir out/models

The model lands in MODEL_DIR/<name>/<version>/ (TensorFlow Serving's layout; a new version each
run). A run killed before its export resumes from its backup (MODEL_DIR/backup/<name>) when the
same command runs again; --fresh starts over.
"""

if __name__ == '__main__':  # the command: quiet start-up, before TensorFlow loads (command.start)
  from transforms import command
  command.start()

from trainer import heads, train
from trainer import input as input_lib
from transforms import command


def parse_args(argv):
  defaults = train.TrainConfig('', '')
  p = command.ArgumentParser(prog='python -m trainer.task', description=__doc__.split('\n')[0])
  p.add_argument('--transformed', required=True, help='output directory of a pipeline run')
  p.add_argument('--model-dir', required=True, help='checkpoints, logs and exported versions')
  p.add_argument('--model-name', default=None, help='default: the dataset module name')
  p.add_argument('--epochs', type=int, default=defaults.epochs)
  p.add_argument('--batch-size', type=int, default=defaults.batch_size)
  p.add_argument('--learning-rate', type=float, default=defaults.learning_rate)
  p.add_argument('--max-steps', type=int, default=None, help='stop after this many batches')
  p.add_argument('--early-stopping-patience', type=int, default=None, metavar='N',
                 help='stop after N epochs without a better eval loss and keep the best epoch\'s '
                      'weights (needs an eval split)')
  p.add_argument('--checkpoint-every-steps', type=int, default=defaults.checkpoint_every_steps,
                 metavar='N', help='back up the training state every N batches and at each '
                                   'epoch\'s end, so the same command resumes a killed run '
                                   f'(default {defaults.checkpoint_every_steps}; 0: at epoch '
                                   'ends only)')
  p.add_argument('--fresh', action='store_true',
                 help='start over: delete the backup of an interrupted run of this model '
                      'instead of resuming from it')
  p.add_argument('--mixed-precision', action='store_true', help='float16 compute (GPU)')
  p.add_argument('--xla', action='store_true', help='compile the model with XLA')
  p.add_argument('--distribute', choices=('auto', 'mirrored', 'none'), default='auto',
                 help='auto: MirroredStrategy when several GPUs are present')
  p.add_argument('--profile-steps', type=int, nargs=2, default=None, metavar=('FIRST', 'LAST'),
                 help='record a TensorBoard profile of these batches')
  p.add_argument('--augment', nargs='+', choices=input_lib.AUGMENTATIONS, default=(),
                 help='random flips and/or crops of training images (off by default: flips '
                      'break digits and text)')
  p.add_argument('--task', choices=heads.TASKS, default=None,
                 help='default: from the transformed label (float: regression; int ids with a '
                      'domain or LABEL_CLASSES: binary or multiclass)')
  p.add_argument('--label', default=None, metavar='NAME',
                 help='the transformed feature to learn (default: the dataset module\'s '
                      'TRANSFORMED_LABEL_KEY, else <LABEL_KEY>_xf, else <LABEL_KEY>); other '
                      'candidate labels stay features unless --exclude-features names them')
  p.add_argument('--model-module', default=None, metavar='MODULE_OR_FILE',
                 help='a module or .py file whose build_model(context) returns the Keras model '
                      '(default: the model built from the transformed schema)')
  p.add_argument('--exclude-features', nargs='+', default=(), metavar='NAME',
                 help='transformed features the model does not see')
  model = p.add_argument_group('the default model')
  model.add_argument('--hidden-units', type=int, nargs='+', default=defaults.hidden_units,
                     metavar='N', help=f'units of each hidden layer (default '
                                       f'{" ".join(map(str, defaults.hidden_units))})')
  model.add_argument('--dropout', type=float, default=defaults.dropout,
                     help=f'after each hidden layer (default {defaults.dropout})')
  model.add_argument('--max-embedding-dim', type=int, default=defaults.max_embedding_dim,
                     help=f'embedding size cap (default {defaults.max_embedding_dim})')
  model.add_argument('--combiner', choices=train.COMBINERS, default=defaults.combiner,
                     help='how a bag of ids (a multivalent feature) combines its embeddings '
                          f'(default {defaults.combiner}); weighted ids are summed by weight')
  command.add_verbose_flag(p)
  args = p.parse_args(argv)
  for flag in ('epochs', 'batch_size', 'max_embedding_dim'):
    if getattr(args, flag) < 1:
      p.error(f'--{flag.replace("_", "-")} must be at least 1')
  if min(args.hidden_units) < 1:
    p.error('--hidden-units: every layer needs at least 1 unit')
  if not 0 <= args.dropout < 1:
    p.error(f'--dropout {args.dropout}: must be in [0, 1)')
  if args.max_steps is not None and args.max_steps < 1:
    p.error('--max-steps must be at least 1')
  if args.early_stopping_patience is not None:
    if args.early_stopping_patience < 1:
      p.error('--early-stopping-patience must be at least 1')
    if args.max_steps is not None:
      p.error('--early-stopping-patience counts epochs, and --max-steps trains one')
  if args.checkpoint_every_steps < 0:
    p.error('--checkpoint-every-steps must be at least 0 (0: at epoch ends only)')
  return train.TrainConfig(
      transformed_dir=args.transformed, model_dir=args.model_dir, model_name=args.model_name,
      epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
      max_steps=args.max_steps, mixed_precision=args.mixed_precision, xla=args.xla,
      distribute=args.distribute, augment=tuple(args.augment),
      profile_steps=tuple(args.profile_steps) if args.profile_steps else None,
      task=args.task, label=args.label, model_module=args.model_module,
      exclude_features=tuple(args.exclude_features), hidden_units=tuple(args.hidden_units),
      dropout=args.dropout, max_embedding_dim=args.max_embedding_dim, combiner=args.combiner,
      fresh=args.fresh, checkpoint_every_steps=args.checkpoint_every_steps,
      early_stopping_patience=args.early_stopping_patience)


def run(argv=None):
  """Trains and exports; returns (export path, eval metrics, model). UserError for the user."""
  return train.train_and_export(parse_args(argv))


def _command(argv):
  path, metrics, _ = run(argv)
  print(f'exported {path}')
  if metrics:
    print('eval ' + '  '.join(f'{k} {v:.4f}' for k, v in metrics.items()))


if __name__ == '__main__':
  command.main(_command)
