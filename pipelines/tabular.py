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
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.runner import PipelineState
from tensorflow_transform.tf_metadata import schema_utils
from tfx_bsl.public import tfxio
from tfx_bsl.tfxio import tensor_representation_util

from pipelines import common, csv_source, outputs
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
  layouts = [csv_source.inspect_file(f, fmt) for f in files]
  if all(layout is None for layout in layouts):
    raise common.UserError(f'{flag}: every matched file is empty ({", ".join(files[:3])}'
                           f'{", ..." if len(files) > 3 else ""})')


def _bytes(files):
  return sum(m.size_in_bytes for f in files for m in
             beam.io.filesystems.FileSystems.match([f])[0].metadata_list)


def _check_bad_rows(split, counts, limit, out):
  count, share = limit
  allowed = count if count is not None else int(share * counts['rows_read'])
  rejected = counts['rows_rejected']
  if rejected > allowed:
    reasons = ', '.join(f'{k}: {v}' for k, v in counts['rejected_by_kind'].items())
    raise common.UserError(
        f'{split}: {rejected} of {counts["rows_read"]} rows rejected ({reasons}), more than '
        f'--max-bad-rows allows ({allowed}); see {out.errors_path(split)}; nothing was published')


def _check_remote_paths(beam_args, output, inputs):
  """Dataflow workers cannot see this machine's disk: local paths would only fail once workers
  start (and bill); a dry run only builds the job, so it may use them."""
  options, _ = common.pipeline_options(beam_args)
  runner = str(options.view_as(StandardOptions).runner or '').lower()
  if 'dataflow' not in runner or options.get_all_options().get('dry_run'):
    return
  local = [p for p in [output] + [f for files in inputs.values() for f in files] if '://' not in p]
  if local:
    raise common.UserError(f'{local[0]}: DataflowRunner workers cannot read local paths; put '
                           'inputs and --output on gs:// (or add --dry_run=True to only build)')


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
  for split, files in inputs.items():
    _inspect(files, fmt, f'--{split}')
  splits = ['train'] + (['eval'] if args.eval or args.eval_fraction else [])
  input_bytes = {split: _bytes(files) for split, files in inputs.items()}
  if args.eval_fraction:
    input_bytes['eval'] = input_bytes['train'] * args.eval_fraction
  shards = {s: args.num_shards or outputs.auto_num_shards(input_bytes[s]) for s in splits}

  _check_remote_paths(beam_args, args.output, inputs)
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
        inputs['train'], fmt, 'train', args.eval_fraction, args.rows_per_batch)
    if args.eval_fraction:
      raw['eval'] = carved_eval
      errors['train'], errors['eval'] = (
          errors['train'] | 'SplitErrors' >> beam.Partition(
              lambda e, _: int(e['split'] == 'eval'), 2))
    elif args.eval:
      raw['eval'], _, errors['eval'] = pipeline | 'ReadEvalCsv' >> csv_source.ReadCsv(
          inputs['eval'], fmt, 'eval', 0.0, args.rows_per_batch)

    transformed = {}
    transformed['train'], transform_fn = (
        (raw['train'], adapter_config)
        | 'AnalyzeAndTransformTrain' >> tft_beam.AnalyzeAndTransformDataset(
            contract.preprocessing_fn, output_record_batches=True))
    if 'eval' in raw:
      transformed['eval'] = (
          ((raw['eval'], adapter_config), transform_fn)
          | 'TransformEval' >> tft_beam.TransformDataset(output_record_batches=True))
    _ = transform_fn | 'WriteTransformFn' >> tft_beam.WriteTransformFn(out.out)

    for split in splits:
      label = split.capitalize()
      examples = transformed[split] | f'Encode{label}' >> tft_beam.EncodeTransformedDataset()
      written = examples | f'Write{label}' >> outputs.WriteExamples(
          out.split_prefix(split), shards[split], args.compression)
      rejected = errors[split] | f'Write{label}Errors' >> outputs.WriteErrors(
          out.errors_path(split))
      rows_ok = (raw[split]
                 | f'Rows{label}' >> beam.Map(lambda batch: batch.num_rows)
                 | f'Sum{label}' >> beam.CombineGlobally(sum))
      _ = (rows_ok, written, rejected) | f'Count{label}' >> outputs.WriteCounts(
          outputs.join(out.counts, f'{split}.json'))

    try:
      state = pipeline.run().wait_until_finish()
    except Exception as e:  # a worker's failure (often the user's preprocessing_fn)
      raise common.UserError(out.failure(e)) from e

  if common.is_dry_run(pipeline):
    out.discard()
    _LOG.info('dry run: the job was built and not run; nothing was written')
    return None
  if state != PipelineState.DONE:
    raise common.UserError(f'the pipeline ended in state {state}; nothing was published '
                           f'(staged files are in {out.staging})')

  counts = {split: out.read_counts(split) for split in splits}
  for split, c in counts.items():
    if c['rows_read'] != c['rows_written'] + c['rows_rejected']:
      raise RuntimeError(f'{split}: rows read {c["rows_read"]} != written {c["rows_written"]} + '
                         f'rejected {c["rows_rejected"]}; nothing was published')
    _check_bad_rows(split, c, args.max_bad_rows_limit, out)

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
      'splits': {
          split: dict(counts[split],
                      files=f'{split}-*-of-{shards[split]:05d}'
                      f'{".tfrecord.gz" if args.compression == "gzip" else ".tfrecord"}',
                      num_shards=shards[split])
          for split in splits
      },
      'eval_fraction': args.eval_fraction,
      'compression': args.compression,
      'options': {'argv': list(argv) if argv is not None else None, 'beam': beam_args},
      'versions': outputs.package_versions(),
      'run_id': out.run_id,
      'elapsed_seconds': round(time.time() - started, 1),
  }
  manifest = out.publish(manifest)
  _print_summary(manifest, args.output)
  return manifest


def _print_summary(manifest, directory):
  lines = [f'published {directory} in {manifest["elapsed_seconds"]}s']
  for split, c in manifest['splits'].items():
    rejected = ''
    if c['rows_rejected']:
      rejected = ' (' + ', '.join(f'{k}: {v}' for k, v in c['rejected_by_kind'].items()) + \
          f'; see {outputs.join(directory, "errors", split + ".jsonl")})'
    lines.append(f'  {split:5s} rows read {c["rows_read"]:>9,}  written {c["rows_written"]:>9,}  '
                 f'rejected {c["rows_rejected"]:>7,}{rejected}')
  print('\n'.join(lines))


if __name__ == '__main__':
  common.main(run)
