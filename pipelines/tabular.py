"""Tabular pipeline: CSV files -> TF Transform (analyze train, transform every split) -> TFRecords.

  python -m pipelines.tabular --transforms transforms.census \\
      --train 'data/adult/adult.data' --eval 'data/adult/adult.test' --output /tmp/adult_tft

Flags this module does not know are Beam's (--runner, --direct_num_workers, --project, ...).
See README.md for the dataset contract, the output layout and launching on Dataflow or Flink/Spark.
"""

if __name__ == '__main__':  # the command: quiet start-up, no collections while its modules load
  from transforms import command
  command.start()  # before TensorFlow and Beam are imported

import logging
import time
import typing

from pipelines import analysis_cache, flags, job, output_dir
from pipelines.sources import csv_files, csv_layout, csv_rows
from transforms import command, run_contract
from transforms import contract as contract_lib
from transforms.errors import UserError

_LOG = logging.getLogger('pipelines.tabular')


def parse_args(argv):
  parser = command.ArgumentParser(prog='python -m pipelines.tabular',
                                  description=__doc__.split('\n')[0])
  parser.add_argument('--transforms', required=True,
                      help='dataset module (e.g. transforms.census) or path to a .py module file')
  flags.add_split_flags(parser, 'rows', 'CSV files or globs (.gz works)')
  parser.add_argument('--column-names', default=None,
                      help='comma-separated column names for CSV files without a header row '
                           '(overrides CSV_COLUMNS)')
  parser.add_argument('--rows-per-batch', type=int, default=65536,
                      help='rows per Arrow RecordBatch read from CSV')
  command.add_verbose_flag(parser)
  args, beam_args = flags.parse(parser, argv)
  flags.check_split_flags(parser, args)
  if args.rows_per_batch < 1:
    parser.error('--rows-per-batch must be at least 1')
  if args.column_names is not None:
    args.column_names = tuple(n.strip() for n in args.column_names.split(','))
  return args, beam_args


def inspect_files(files, fmt, flag):
  """Checks every file ({path: size}, as matched) at launch; returns the work units (files,
  large ones cut in ranges) and the files' total bytes."""
  paths = list(files)
  layouts = [csv_layout.inspect_file(f, fmt) for f in paths]
  if all(layout is None for layout in layouts):
    raise UserError(f'{flag}: every matched file is empty or holds only a header row '
                    f'({", ".join(paths[:3])}{", ..." if len(paths) > 3 else ""}); give '
                    'files with data rows')
  units = []
  for path, layout in zip(paths, layouts):
    units.extend(csv_layout.plan_ranges(path, files[path], layout) if layout else [path])
  return units, sum(files.values())


class Inputs(typing.NamedTuple):
  """What a run reads, decided at launch from its flags (before any output is touched)."""
  contract: object  # transforms.contract.Contract
  fmt: csv_layout.CsvFormat
  inputs: dict  # split -> the matched files
  units: dict  # split -> work units
  input_bytes: dict  # split -> bytes
  adapter_config: object  # tfxio.TensorAdapterConfig of the raw rows
  cache: object  # analysis_cache.Request, or None without --analysis-cache


def inspect_inputs(args):
  """The run's Inputs: the dataset module, every input file checked, the analysis cache's
  spans (their content read once for its digest)."""
  contract = contract_lib.load(args.transforms)
  fmt = csv_layout.CsvFormat(
      columns=contract.columns,
      column_names=args.column_names or contract.csv_columns,
      na_values=contract.na_values,
      label_key=contract.label_key)
  matched = {'train': csv_layout.match_inputs(args.train, '--train')}
  if args.eval:
    matched['eval'] = csv_layout.match_inputs(args.eval, '--eval')
  inputs = {split: list(files) for split, files in matched.items()}
  units, input_bytes = {}, {}
  for split, files in matched.items():
    units[split], input_bytes[split] = inspect_files(files, fmt, f'--{split}')
  adapter_config = job.adapter_config(csv_rows.arrow_schema(fmt), contract.schema_feature_spec)
  cache = None
  if args.analysis_cache:  # what the rows analyzed depend on, besides the files and the graph
    cache = analysis_cache.request(
        args.analysis_cache, units['train'], csv_files.span_of,
        reader={'pipeline': 'tabular', 'format': fmt, 'schema': contract.schema_feature_spec,
                'rows_per_batch': args.rows_per_batch, 'eval_fraction': args.eval_fraction})
  return Inputs(contract, fmt, inputs, units, input_bytes, adapter_config, cache)


def run(argv=None):
  """Runs the pipeline; returns the published manifest (None for a --dry_run build)."""
  started = time.time()
  args, beam_args = parse_args(argv)
  contract, fmt, inputs, units, input_bytes, adapter_config, cache = inspect_inputs(args)
  splits, shards = job.plan_splits(args, input_bytes)

  job.check_remote_paths(beam_args, args.output, [f for fs in inputs.values() for f in fs] + (
      [args.analysis_cache] if args.analysis_cache else []))
  out = output_dir.OutputDir(args.output, args.overwrite)
  out.prepare()
  label_inverse = job.save_label_inverse(out, contract.training.inverse_label_fn)

  def source(units, split, eval_fraction, spill):
    return csv_files.ReadCsv(units, fmt, split, eval_fraction, args.rows_per_batch, spill=spill)

  built = job.build(beam_args, out, source, units, args, contract.preprocessing_fn,
                    adapter_config, shards, cache=cache)
  counts = job.run_and_check(built.pipeline, out, splits, args.max_bad_rows, spill=built.spill)
  if counts is None:
    return None

  return job.publish(
      out, args, argv, beam_args, started, cache=built.cache,
      pipeline='tabular',
      transforms=contract.name,
      label_key=contract.label_key,
      label_classes=contract.label_classes,
      # What serving needs to read raw rows exactly as this run did.
      raw_columns=[run_contract.RawColumn(c.name, c.dtype, c.varlen, c.default)
                   for c in contract.columns],
      csv_columns=list(fmt.column_names) if fmt.column_names else None,
      na_values=list(contract.na_values),
      inputs=inputs,
      splits=job.split_entries(counts, shards, args.compression),
      label_inverse=label_inverse,
      **contract.training.manifest_entries())

if __name__ == '__main__':
  command.main(run)
