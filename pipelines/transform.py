"""Transform-only runs: an earlier run's transform graph applied to new inputs, without analysis.

  python -m pipelines.transform --transform-fn out/adult --input 'data/today/*.csv' \\
      --output out/adult_today [--split new]

The earlier run (--transform-fn, a published output of pipelines.tabular or pipelines.images)
decides everything about reading: its manifest's raw columns, CSV column names, missing-value
spellings and image format, so the dataset module need not be importable any more and cannot
have drifted from the graph. The inputs are read by the same readers, with the same dead letters
and --max-bad-rows, and written as one split's shards with its statistics, in an output that is
published atomically and holds a copy of the transform graph (the trainer and the export read it
as any pipeline output). The report measures the drift of the new data against the earlier
run's train statistics: does today's data still look like what the model was trained on?

Flags this module does not know are Beam's (--runner, --direct_num_workers, ...).
"""

if __name__ == '__main__':  # the command: quiet start-up, no collections while its modules load
  from transforms import command
  command.start()  # before TensorFlow and Beam are imported

import dataclasses
import time

import tensorflow_transform.beam as tft_beam
from apache_beam.io.filesystems import FileSystems

from pipelines import flags, job, output_dir, report, stages
from pipelines.report import write as report_write
from pipelines.runner import launch
from pipelines.sources import csv_files, csv_layout, csv_rows, image_files
from transforms import command, run_contract
from transforms import contract as contract_lib

# What the output holds of the earlier run besides its manifest's reading options.
_GRAPH_ENTRIES = (run_contract.TRANSFORM_FN, 'transformed_metadata')


def parse_args(argv):
  parser = command.ArgumentParser(prog='python -m pipelines.transform',
                                  description=__doc__.split('\n')[0])
  parser.add_argument('--transform-fn', required=True, metavar='RUN_DIR',
                      help='a published output of pipelines.tabular or pipelines.images, whose '
                           'transform graph is applied')
  parser.add_argument('--input', required=True, nargs='+', action='extend',
                      help='CSV files or globs (or image inputs, for an image run); may repeat')
  parser.add_argument('--split', default='new',
                      help='the name of the split written (default new; train makes the output '
                           'a training set for trainer.task)')
  flags.add_output_flags(parser, 'rows')
  parser.add_argument('--rows-per-batch', type=int, default=65536,
                      help='CSV inputs: rows per Arrow RecordBatch')
  parser.add_argument('--images-per-batch', type=int, default=256,
                      help='image inputs: images per RecordBatch')
  report.add_flags(parser)
  command.add_verbose_flag(parser)
  args, beam_args = flags.parse(parser, argv)
  if not args.split.isidentifier() or args.split == report_write.REFERENCE:
    parser.error(f'--split {args.split!r}: give a name of letters, digits and _ (not '
                 f'{report_write.REFERENCE!r}, the report\'s name for the earlier run\'s train)')
  for flag in ('rows_per_batch', 'images_per_batch'):
    if getattr(args, flag) < 1:
      parser.error(f'--{flag.replace("_", "-")} must be at least 1')
  if args.num_shards is not None and args.num_shards < 1:
    parser.error(f'--num-shards {args.num_shards}: must be at least 1 (or leave it out)')
  return args, beam_args


def _adapter_config(arrow_schema, manifest):
  """The TFXIO adapter of the raw inputs as the earlier run had it: its raw columns, without the
  defaults its reader filled in, as a run's contract gives them to TF Transform."""
  return job.adapter_config(arrow_schema,
                            contract_lib.without_defaults(manifest.raw_feature_spec()))


def _tabular_source(args, manifest):
  """(units, bytes, source, adapter config) of CSV inputs read as the earlier run read its."""
  from pipelines import tabular
  columns = tuple(contract_lib.Column(c.name, c.dtype, c.varlen, c.default)
                  for c in manifest.raw_columns)
  fmt = csv_layout.CsvFormat(columns=columns,
                             column_names=tuple(manifest.csv_columns or ()) or None,
                             na_values=tuple(manifest.na_values), label_key=manifest.label_key)
  files = csv_layout.match_inputs(args.input, '--input')
  units, input_bytes = tabular.inspect_files(files, fmt, '--input')

  def source(units, split, eval_fraction, spill):
    return csv_files.ReadCsv(units, fmt, split, eval_fraction, args.rows_per_batch, spill=spill)

  return units, input_bytes, source, _adapter_config(csv_rows.arrow_schema(fmt), manifest)


def _image_source(args, manifest):
  image = manifest.image
  features = image.get('input_features', {})
  fmt = image_files.ImageFormat(channels=image['channels'], max_pixels=image['max_pixels'],
                                max_bytes=image['max_image_bytes'],
                                image_key=features.get('image', 'image/encoded'),
                                label_key=features.get('label', 'image/class/label'))
  units, input_bytes = image_files.match_image_inputs(args.input, '--input')

  def source(units, split, eval_fraction, spill):
    return image_files.ReadImages(units, fmt, split, eval_fraction, args.images_per_batch,
                                  spill=spill)

  return units, input_bytes, source, _adapter_config(image_files.arrow_schema(), manifest)


def _copy_tree(source, destination):
  for path in output_dir.files_under(source):
    target = output_dir.join(destination, path[len(source) + 1:])
    output_dir.mkdirs(target.rsplit('/', 1)[0])
    FileSystems.copy([path], [target])


def run(argv=None):
  """Runs a transform-only job; returns the published manifest (None for a --dry_run build)."""
  started = time.time()
  args, beam_args = parse_args(argv)
  earlier_dir = args.transform_fn.rstrip('/') or '/'
  earlier = run_contract.read_manifest(earlier_dir, flag='--transform-fn')
  what = 'images' if earlier.pipeline == 'images' else 'rows'
  units, input_bytes, source, adapter_config = (
      _image_source if what == 'images' else _tabular_source)(args, earlier)
  shards = args.num_shards or output_dir.auto_num_shards(input_bytes)
  job.check_remote_paths(beam_args, args.output, list(args.input) + [earlier_dir])
  out = output_dir.OutputDir(args.output, args.overwrite)
  out.prepare()
  # The output is a pipeline output of its own: the graph (and the label's inverse) with it.
  for entry in _GRAPH_ENTRIES + ((earlier.label_inverse,) if earlier.label_inverse else ()):
    _copy_tree(output_dir.join(earlier_dir, entry), output_dir.join(out.out, entry))

  pipeline = launch.make_pipeline(beam_args)
  # TF2 behaviours read the transform graph in either format (TF1 where a rewrite failed).
  with tft_beam.Context(temp_dir=out.tmp, force_tf_compat_v1=False):
    stages.add_transform_only(pipeline, source, units, args.split, earlier_dir, adapter_config,
                              out, shards, args.compression)
  counts = job.run_and_check(pipeline, out, [args.split], args.max_bad_rows, what=what,
                             main_split=args.split)
  if counts is None:
    return None
  entries = {f.name: getattr(earlier, f.name) for f in dataclasses.fields(earlier)
             if f.name in _KEPT}
  return job.publish(
      out, args, argv, beam_args, started, what=what, reference=earlier_dir,
      **entries,
      transform_of=earlier_dir,
      inputs={args.split: list(args.input)},
      splits=job.split_entries(counts, {args.split: shards}, args.compression))


# What a transform-only output keeps of the earlier run's manifest: how its raw inputs read, and
# what the trainer and the export need to know about the transform.
_KEPT = ('pipeline', 'transforms', 'label_key', 'raw_columns', 'label_classes', 'csv_columns',
         'na_values', 'image', 'transformed_label_key', 'weighted_features', 'label_inverse')


if __name__ == '__main__':
  command.main(run)
