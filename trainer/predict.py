"""Batch prediction from a raw CSV file to a CSV of predictions, with an exported model.

  python -m trainer.predict --model out/models/census --input data/adult/adult.test \\
      --output out/predictions.csv

Needs TensorFlow alone. Rows that cannot be encoded are reported with their line number.
"""

import argparse
import csv
import sys

from trainer import serving


def run(argv=None):
  p = argparse.ArgumentParser(prog='python -m trainer.predict', description=__doc__.split('\n')[0])
  p.add_argument('--model', required=True, help='model base directory or one version directory')
  p.add_argument('--input', required=True, help='raw CSV file (header row, or the columns the '
                                                'pipeline used)')
  p.add_argument('--output', required=True, help='CSV of predictions to write')
  p.add_argument('--limit', type=int, default=None, help='predict the first N rows only')
  p.add_argument('--show', type=int, default=0, help='print the first N rows with their predictions')
  args = p.parse_args(argv)
  model = serving.load_model(args.model)
  with open(args.input, newline='') as f:
    rows = [r for r in csv.reader(f) if r]
  columns = model.csv_columns
  if rows and set(model.raw_types) <= {c.strip() for c in rows[0]}:
    columns, rows = [c.strip() for c in rows[0]], rows[1:]
  if not columns:
    raise serving.ServingError(f'{args.input} has no header row and the model records no columns')
  good, lines = [], []
  for number, row in enumerate(rows, start=1):
    if len(row) == len(columns):
      good.append(dict(zip(columns, row)))
      lines.append(number)
    else:
      print(f'warning: {args.input} row {number}: {len(row)} fields, expected {len(columns)}; '
            'skipped', file=sys.stderr)
  if args.limit:
    good, lines = good[:args.limit], lines[:args.limit]
  result = model.predict(good)
  with open(args.output, 'w', newline='') as f:
    writer = csv.writer(f)
    probs = result.get('probabilities')
    n_classes = probs.shape[1] if probs is not None and len(probs) else 0
    writer.writerow(['row', 'class'] + [f'p_{i}' for i in range(n_classes)])
    for i, line in enumerate(lines):
      writer.writerow([line, result['classes'][i]] + [f'{p:.6f}' for p in probs[i]])
  for i in range(min(args.show, len(lines))):
    raw = ', '.join(f'{k}={v.strip()}' for k, v in good[i].items() if k in model.raw_types)
    print(f'row {lines[i]}: {result["classes"][i]} (p={probs[i].max():.3f})  <- {raw}')
  return result, lines


def main():
  try:
    result, lines = run(sys.argv[1:])
  except serving.ServingError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'predicted {len(lines)} rows')


if __name__ == '__main__':
  main()
