"""Batch prediction from raw inputs to a CSV of predictions, with an exported model.

  python -m trainer.predict --model out/models/census --input data/adult/adult.test \\
      --output out/predictions.csv
  python -m trainer.predict --model out/models/images --input 'photos/*.jpg' \\
      --output out/image_predictions.csv          # image models: a folder, files or a glob

Needs TensorFlow alone. Rows that cannot be encoded, and images that cannot be decoded, are
reported with their line number or file (and, for images, kept in the output with the reason).
"""

if __name__ == '__main__':  # the command: quiet start-up, before TensorFlow loads (command.start)
  from transforms import command
  command.start()

import csv
import os
import sys

import tensorflow as tf

from trainer import serving
from transforms import command
from transforms.errors import UserError


def run(argv=None):
  p = command.ArgumentParser(prog='python -m trainer.predict', description=__doc__.split('\n')[0])
  p.add_argument('--model', required=True, help='model base directory or one version directory')
  p.add_argument('--input', required=True, help='raw CSV file (header row, or the columns the '
                                                'pipeline used)')
  p.add_argument('--output', required=True, help='CSV of predictions to write')
  p.add_argument('--limit', type=int, default=None, help='predict the first N rows only')
  p.add_argument('--show', type=int, default=0,
                 help='print the first N rows with their predictions')
  command.add_verbose_flag(p)
  args = p.parse_args(argv)
  model = serving.load_model(args.model)
  if model.is_image_model:
    return _predict_images(model, args)
  try:
    with open(args.input, newline='') as f:
      rows = [r for r in csv.reader(f) if r]
  except OSError as e:
    raise UserError(f'--input {args.input}: {e.strerror or e}') from None
  columns = model.csv_columns
  if rows and set(model.raw_types) <= {c.strip() for c in rows[0]}:
    columns, rows = [c.strip() for c in rows[0]], rows[1:]
  if not columns:
    raise UserError(f'{args.input} has no header row and the model records no columns')
  good, lines = [], []
  # Columns the model does not take (ids, the label, extras) are ignored, as the pipeline does.
  kept = [i for i, c in enumerate(columns) if c in model.raw_types]
  for number, row in enumerate(rows, start=1):
    if len(row) == len(columns):
      good.append({columns[i]: row[i] for i in kept})
      lines.append(number)
    else:
      print(f'warning: {args.input} row {number}: {len(row)} fields, expected {len(columns)}; '
            'skipped', file=sys.stderr)
  if args.limit:
    good, lines = good[:args.limit], lines[:args.limit]
  result = model.predict(good)  # {} when no row is left
  regression = model.task == 'regression'
  probs = result.get('probabilities')
  try:
    f = open(args.output, 'w', newline='')
  except OSError as e:
    raise UserError(f'--output {args.output}: {e.strerror or e}') from None
  with f:
    writer = csv.writer(f)
    if regression:
      writer.writerow(['row', 'prediction'])
      for i, line in enumerate(lines):
        writer.writerow([line, f'{result["predictions"][i]:.6g}'])
    else:
      n = probs.shape[1] if probs is not None else len(model.class_names)
      writer.writerow(['row', 'class'] + probability_columns(model, n))
      for i, line in enumerate(lines):
        writer.writerow([line, result['classes'][i]] + [f'{p:.6f}' for p in probs[i]])
  for i in range(min(args.show, len(lines))):
    raw = ', '.join(f'{k}={v.strip()}' for k, v in good[i].items() if k in model.raw_types)
    if regression:
      print(f'row {lines[i]}: {result["predictions"][i]:.6g}  <- {raw}')
    else:
      print(f'row {lines[i]}: {result["classes"][i]} (p={probs[i].max():.3f})  <- {raw}')
  return result, lines


IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


def probability_columns(model, n):
  """`p_<class name>` for each of n classes (the model's class names; ids where it records
  none)."""
  names = list(model.class_names)[:n] + [str(i) for i in range(len(model.class_names), n)]
  return [f'p_{name}' for name in names]


def image_files(pattern):
  """A folder (searched recursively), one file, or a glob -> sorted image files."""
  if tf.io.gfile.isdir(pattern):
    found = [os.path.join(d, f) for d, _, files in tf.io.gfile.walk(pattern) for f in files
             if f.lower().endswith(IMAGE_SUFFIXES)]
  else:
    found = tf.io.gfile.glob(pattern)
  if not found:
    raise UserError(f'--input {pattern}: no image files (.jpg, .jpeg, .png) found')
  return sorted(found)


def _predict_images(model, args):
  files = image_files(args.input)[:args.limit]
  rows = []  # (file, class, probabilities or None, problem)
  for start in range(0, len(files), 256):
    chunk = files[start:start + 256]
    images = [tf.io.gfile.GFile(f, 'rb').read() for f in chunk]
    try:
      result = model.predict_images(images)
      rows += [(f, result['classes'][i], result['probabilities'][i], '')
               for i, f in enumerate(chunk)]
    except UserError:  # one bad image fails its batch: find it, keep the rest
      for f, image in zip(chunk, images):
        try:
          result = model.predict_images([image])
          rows.append((f, result['classes'][0], result['probabilities'][0], ''))
        except UserError as e:
          print(f'warning: {f}: cannot be predicted: {e}', file=sys.stderr)
          rows.append((f, '', None, str(e)))
  n_classes = max((len(r[2]) for r in rows if r[2] is not None), default=0)
  with tf.io.gfile.GFile(args.output, 'w') as f:
    writer = csv.writer(f)
    writer.writerow(['file', 'class'] + probability_columns(model, n_classes) + ['error'])
    for name, label, probs, problem in rows:
      cells = [f'{p:.6f}' for p in probs] if probs is not None else [''] * n_classes
      writer.writerow([name, label] + cells + [problem])
  for name, label, probs, problem in rows[:args.show]:
    print(f'{name}: {label} (p={probs.max():.3f})' if probs is not None else f'{name}: {problem}')
  return rows, files


def _command(argv):
  try:
    _, lines = run(argv)
  except UserError as e:  # the model, the input or a row: the user's to fix
    raise UserError(str(e)) from e
  print(f'predicted {len(lines)} {"images" if lines and isinstance(lines[0], str) else "rows"}')


if __name__ == '__main__':
  command.main(_command)
