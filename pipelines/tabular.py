"""Tabular pipeline: CSV files -> TF Transform (analyze train, transform every split) -> TFRecords.

  python -m pipelines.tabular --transforms transforms.census \\
      --train 'data/adult/adult.data' --eval 'data/adult/adult.test' --output /tmp/adult_tft

Flags this module does not know are Beam's (--runner, --direct_num_workers, --project, ...).
See README.md for the dataset contract, the output layout and launching on Dataflow or Flink/Spark.
"""

import logging
import time

import apache_beam as beam
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import schema_utils
from tfx_bsl.public import tfxio
from tfx_bsl.tfxio import tensor_representation_util

from pipelines import common, csv_source, job, outputs
from transforms import contract as contract_lib

_LOG = logging.getLogger('pipelines.tabular')


def parse_args(argv):
  parser = common.ArgumentParser(prog='python -m pipelines.tabular', description=__doc__.split('\n')[0])
  parser.add_argument('--transforms', required=True,
                      help='dataset module (e.g. transforms.census) or path to a .py module file')
  parser.add_argument('--train', required=True, nargs='+', action='extend',
                      help='CSV files or globs of the training split (.gz works); may repeat')
  parser.add_argument('--eval', nargs='+', action='extend', default=None,
                      help='CSV files or globs of the eval split')
  parser.add_argument('--eval-fraction', type=float, default=0.0,
                      help='with --train only: carve this share of rows out as the eval split, '
                           'by a hash of each row (the same rows on every run)')
  parser.add_argument('--output', required=True, help='output directory (local or gs://...)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a complete result already in --output')
  parser.add_argument('--column-names', default=None,
                      help='comma-separated column names for CSV files without a header row '
                           '(overrides CSV_COLUMNS)')
  parser.add_argument('--num-shards', type=int, default=None,
                      help='TFRecord shards per split (default: one per 256 MiB of input)')
  parser.add_argument('--compression', choices=('gzip', 'none'), default='gzip')
  parser.add_argument('--max-bad-rows', default='1%',
                      help='rejected rows a split may have before the run fails: a count or a '
                           'percentage of rows read (default 1%%)')
  parser.add_argument('--rows-per-batch', type=int, default=8192,
                      help='rows per Arrow RecordBatch read from CSV')
  args, beam_args = parser.parse_known_args(argv)
  if args.eval and args.eval_fraction:
    parser.error('give either --eval or --eval-fraction, not both')
  if not 0 <= args.eval_fraction < 1:
    parser.error(f'--eval-fraction {args.eval_fraction}: must be in [0, 1)')
  if args.num_shards is not None and args.num_shards < 1:
    parser.error(f'--num-shards {args.num_shards}: must be at least 1 (or leave it out)')
  if args.rows_per_batch < 1:
    parser.error('--rows-per-batch must be at least 1')
  args.max_bad_rows_limit = outputs.parse_max_bad_rows(args.max_bad_rows)
  if args.column_names is not None:
    args.column_names = tuple(n.strip() for n in args.column_names.split(','))
  return args, beam_args


def _inspect(files, fmt, flag):
  """Checks every file at launch; returns the work units: files, large ones cut in ranges."""
  layouts = [csv_source.inspect_file(f, fmt) for f in files]
  if all(layout is None for layout in layouts):
    raise common.UserError(f'{flag}: every matched file is empty ({", ".join(files[:3])}'
                           f'{", ..." if len(files) > 3 else ""})')
  units = []
  for path, layout in zip(files, layouts):
    size = job.input_bytes([path])
    units.extend(csv_source.plan_ranges(path, size, layout) if layout else [path])
  return units


def run(argv=None):
  """Runs the pipeline; returns the published manifest (None for a --dry_run build)."""
  started = time.time()
  args, beam_args = parse_args(argv)
  contract = contract_lib.load(args.transforms)
  fmt = csv_source.CsvFormat(
      columns=contract.columns,
      column_names=args.column_names or contract.csv_columns,
      na_values=contract.na_values)
  inputs = {'train': csv_source.match_inputs(args.train, '--train')}
  if args.eval:
    inputs['eval'] = csv_source.match_inputs(args.eval, '--eval')
  units = {split: _inspect(files, fmt, f'--{split}') for split, files in inputs.items()}
  splits = ['train'] + (['eval'] if args.eval or args.eval_fraction else [])
  input_bytes = {split: job.input_bytes(files) for split, files in inputs.items()}
  if args.eval_fraction:
    input_bytes['eval'] = input_bytes['train'] * args.eval_fraction
  shards = {s: args.num_shards or outputs.auto_num_shards(input_bytes[s]) for s in splits}

  job.check_remote_paths(beam_args, args.output, [f for fs in inputs.values() for f in fs])
  out = outputs.OutputDir(args.output, args.overwrite)
  out.prepare()
  schema = schema_utils.schema_from_feature_spec(contract.schema_feature_spec)
  adapter_config = tfxio.TensorAdapterConfig(
      csv_source.arrow_schema(fmt),
      tensor_representation_util.InferTensorRepresentationsFromSchema(schema))

  pipeline = common.make_pipeline(beam_args)
  with tft_beam.Context(temp_dir=out.tmp):
    raw, errors = {}, {}
    raw['train'], carved_eval, errors['train'] = pipeline | 'ReadTrainCsv' >> csv_source.ReadCsv(
        units['train'], fmt, 'train', args.eval_fraction, args.rows_per_batch)
    if args.eval_fraction:
      raw['eval'] = carved_eval
      errors['train'], errors['eval'] = (
          errors['train'] | 'SplitErrors' >> beam.Partition(
              lambda e, _: int(e['split'] == 'eval'), 2))
    elif args.eval:
      raw['eval'], _, errors['eval'] = pipeline | 'ReadEvalCsv' >> csv_source.ReadCsv(
          units['eval'], fmt, 'eval', 0.0, args.rows_per_batch)

    # The analysis reads the train split again (see job.transform_and_write): its rows, and
    # errors, are those of the read above; only those of the read above are counted.
    analyze, _, _ = pipeline | 'ReadTrainCsvForAnalysis' >> csv_source.ReadCsv(
        units['train'], fmt, 'train', args.eval_fraction, args.rows_per_batch)
    job.transform_and_write(raw, errors, adapter_config, contract.preprocessing_fn, out, shards,
                            args.compression, analyze=analyze)
    counts = job.run_and_check(pipeline, out, splits, args.max_bad_rows_limit)
  if counts is None:
    return None

  manifest = {
      'pipeline': 'tabular',
      'transforms': contract.name,
      'label_key': contract.label_key,
      'label_classes': contract.label_classes,
      # What serving needs to read raw rows exactly as this run did.
      'raw_columns': [dict(name=c.name, dtype=c.dtype, varlen=c.varlen, default=c.default)
                      for c in contract.columns],
      'csv_columns': list(fmt.column_names) if fmt.column_names else None,
      'na_values': list(contract.na_values),
      'inputs': inputs,
      'splits': job.split_entries(counts, shards, args.compression),
      'eval_fraction': args.eval_fraction,
      'compression': args.compression,
      'options': {'argv': list(argv) if argv is not None else None, 'beam': beam_args},
      'versions': outputs.package_versions(),
      'run_id': out.run_id,
      'elapsed_seconds': round(time.time() - started, 1),
  }
  manifest = out.publish(manifest)
  job.print_summary(manifest, args.output)
  return manifest


if __name__ == '__main__':
  common.main(run)
