"""Image pipeline: class folders, WebDataset tars or TFRecords -> TF Transform -> TFRecords.

  python -m pipelines.images --train data/fashion_mnist/sample/train \\
      --eval data/fashion_mnist/sample/test --output /tmp/fmnist_tft --image-size 28 28 --channels 1

Flags this module does not know are Beam's (--runner, --direct_num_workers, --project, ...).
The output layout, manifest, dead letters and publication are the tabular pipeline's (README.md).
"""

if __name__ == '__main__':  # the command: quiet start-up, no collections while its modules load
  from transforms import command
  command.start()  # before TensorFlow and Beam are imported

import dataclasses
import time

from apache_beam.io.filesystems import FileSystems

from pipelines import analysis_cache, flags, job, output_dir
from pipelines.sources import image_files
from transforms import command, run_contract
from transforms import contract as contract_lib

DEFAULT_TRANSFORMS = 'transforms.images'


def parse_args(argv):
  parser = command.ArgumentParser(prog='python -m pipelines.images',
                                 description=__doc__.split('\n')[0])
  flags.add_split_flags(parser, 'images', 'class-folder root(s), tar shards or TFRecord shards '
                      '(paths or globs)')
  parser.add_argument('--transforms', default=DEFAULT_TRANSFORMS,
                      help='dataset module or .py file: make_preprocessing_fn(height, width, '
                           f'channels) or preprocessing_fn (default {DEFAULT_TRANSFORMS})')
  parser.add_argument('--image-size', type=int, nargs=2, default=None, metavar=('HEIGHT', 'WIDTH'),
                      help='size images are resized to (default: the module\'s DEFAULT_SIZE)')
  parser.add_argument('--channels', type=int, choices=(1, 3), default=None,
                      help='1 (grayscale) or 3 (RGB); images are converted (default: the '
                           'module\'s DEFAULT_CHANNELS)')
  parser.add_argument('--image-feature', default='image/encoded',
                      help='TFRecord inputs: the bytes feature holding the encoded image')
  parser.add_argument('--label-feature', default='image/class/label',
                      help='TFRecord inputs: the int64 or bytes feature holding the label')
  parser.add_argument('--max-pixels', type=int, default=50_000_000,
                      help='images whose header claims more pixels are rejected undecoded')
  parser.add_argument('--max-image-bytes', type=int, default=32 << 20,
                      help='larger encoded images are rejected unread')
  parser.add_argument('--images-per-batch', type=int, default=256,
                      help='images per Arrow RecordBatch (and per TF Transform batch)')
  command.add_verbose_flag(parser)
  args, beam_args = flags.parse(parser, argv)
  flags.check_split_flags(parser, args)
  if args.image_size is not None and min(args.image_size) < 1:
    parser.error(f'--image-size {args.image_size[0]} {args.image_size[1]}: both must be >= 1')
  for flag in ('max_pixels', 'max_image_bytes', 'images_per_batch'):
    if getattr(args, flag) < 1:
      parser.error(f'--{flag.replace("_", "-")} must be at least 1')
  return args, beam_args


def _bytes_written(directory, pattern):
  return sum(m.size_in_bytes for m in
             FileSystems.match([output_dir.join(directory, pattern)])[0].metadata_list)


def run(argv=None):
  """Runs the pipeline; returns the published manifest (None for a --dry_run build)."""
  started = time.time()
  args, beam_args = parse_args(argv)
  contract = contract_lib.load_images(args.transforms, args.image_size, args.channels)
  size, channels, hints = contract.size, contract.channels, contract.training
  fmt = image_files.ImageFormat(channels=channels, max_pixels=args.max_pixels,
                                 max_bytes=args.max_image_bytes, image_key=args.image_feature,
                                 label_key=args.label_feature)
  units, input_bytes = {}, {}
  units['train'], input_bytes['train'] = image_files.match_image_inputs(args.train, '--train')
  if args.eval:
    units['eval'], input_bytes['eval'] = image_files.match_image_inputs(args.eval, '--eval')
  splits, shards = job.plan_splits(args, input_bytes)

  job.check_remote_paths(beam_args, args.output, list(args.train) + list(args.eval or []) + (
      [args.analysis_cache] if args.analysis_cache else []))
  out = output_dir.OutputDir(args.output, args.overwrite)
  out.prepare()
  label_inverse = job.save_label_inverse(out, hints.inverse_label_fn)
  adapter_config = job.adapter_config(image_files.arrow_schema(), contract.raw_feature_spec)

  def source(units, split, eval_fraction, spill):
    return image_files.ReadImages(units, fmt, split, eval_fraction, args.images_per_batch,
                                  spill=spill)

  cache = None
  if args.analysis_cache:  # what the images analyzed depend on, besides the files and the graph
    cache = analysis_cache.request(
        args.analysis_cache, units['train'], image_files.span_of,
        reader={'pipeline': 'images', 'format': fmt, 'schema': contract.raw_feature_spec,
                'size': size, 'images_per_batch': args.images_per_batch,
                'eval_fraction': args.eval_fraction})
  built = job.build(beam_args, out, source, units, args, contract.preprocessing_fn,
                    adapter_config, shards, cache=cache, desired_batch_size=args.images_per_batch)
  counts = job.run_and_check(built.pipeline, out, splits, args.max_bad_rows, what='images',
                             spill=built.spill)
  if counts is None:
    return None

  splits = {}
  for split, entry in job.split_entries(counts, shards, args.compression).items():
    written = _bytes_written(out.out, entry.files)
    splits[split] = dataclasses.replace(
        entry, bytes_written=written,
        bytes_per_image=round(written / entry.rows_written, 1) if entry.rows_written else None)
  return job.publish(
      out, args, argv, beam_args, started, what='images', cache=built.cache,
      pipeline='images',
      transforms=args.transforms,
      label_key='label',
      label_classes=None,  # the label vocabulary file `label` names the classes
      raw_columns=[run_contract.RawColumn('image', 'string', binary=True),
                   run_contract.RawColumn('label', 'string')],
      image={'height': size[0], 'width': size[1], 'channels': channels,
             'stored_as': 'int64 pixel values 0..255 (image_xf), per-channel train mean and '
                          'std of pixels/255 (image_mean_xf, image_std_xf)',
             'max_pixels': args.max_pixels, 'max_image_bytes': args.max_image_bytes,
             'input_features': {'image': args.image_feature, 'label': args.label_feature}},
      inputs={'train': list(args.train), **({'eval': list(args.eval)} if args.eval else {})},
      splits=splits,
      label_inverse=label_inverse,
      **hints.manifest_entries())

if __name__ == '__main__':
  command.main(run)
