"""Image pipeline: class folders, WebDataset tars or TFRecords -> TF Transform -> TFRecords.

  python -m pipelines.images --train data/fashion_mnist/sample/train \\
      --eval data/fashion_mnist/sample/test --output /tmp/fmnist_tft --image-size 28 28 --channels 1

Flags this module does not know are Beam's (--runner, --direct_num_workers, --project, ...).
The output layout, manifest, dead letters and publication are the tabular pipeline's (README.md).
"""

import gc

if __name__ == '__main__':  # the command: no collections while its modules load (command.main)
  gc.disable()

import time

import tensorflow_transform.beam as tft_beam
from apache_beam.io.filesystems import FileSystems
from tensorflow_transform.tf_metadata import schema_utils
from tfx_bsl.public import tfxio
from tfx_bsl.tfxio import tensor_representation_util

from pipelines import job, output_dir
from pipelines.runner import launch
from pipelines.sources import image_files
from transforms.errors import UserError
from transforms import command
from transforms import contract as contract_lib

DEFAULT_TRANSFORMS = 'transforms.images'


def parse_args(argv):
  parser = command.ArgumentParser(prog='python -m pipelines.images',
                                 description=__doc__.split('\n')[0])
  job.add_split_flags(parser, 'images', 'class-folder root(s), tar shards or TFRecord shards '
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
  args, beam_args = parser.parse_known_args(argv)
  job.check_split_flags(parser, args)
  if args.image_size is not None and min(args.image_size) < 1:
    parser.error(f'--image-size {args.image_size[0]} {args.image_size[1]}: both must be >= 1')
  for flag in ('max_pixels', 'max_image_bytes', 'images_per_batch'):
    if getattr(args, flag) < 1:
      parser.error(f'--{flag.replace("_", "-")} must be at least 1')
  return args, beam_args


def _load(args):
  """The dataset module's preprocessing_fn for the configured size, and the size it uses."""
  module = contract_lib.import_module(args.transforms, pickle_by_value=True)
  where = f'--transforms {args.transforms}'
  hints = contract_lib.training_hints(module, where)
  spec = getattr(module, 'RAW_FEATURE_SPEC', None)
  if not isinstance(spec, dict) or set(spec) != {'image', 'label'}:
    raise UserError(f'{where}: an image module\'s RAW_FEATURE_SPEC must have exactly the '
                           "features 'image' and 'label' (tf.string), which the image reader "
                           'produces')
  height, width = args.image_size or getattr(module, 'DEFAULT_SIZE', (None, None))
  channels = args.channels or getattr(module, 'DEFAULT_CHANNELS', 3)
  make = getattr(module, 'make_preprocessing_fn', None)
  if callable(make):
    if height is None:
      raise UserError(f'{where} has no DEFAULT_SIZE: pass --image-size HEIGHT WIDTH')
    return make(height, width, channels), spec, (height, width), channels, hints
  fn = getattr(module, 'preprocessing_fn', None)
  if not callable(fn):
    raise UserError(f'{where} defines neither make_preprocessing_fn(height, width, '
                           'channels) nor preprocessing_fn(inputs)')
  if args.image_size or args.channels:
    raise UserError(f'{where} has a fixed preprocessing_fn: --image-size and --channels '
                           'need make_preprocessing_fn(height, width, channels)')
  return fn, spec, (height, width), channels, hints


def _bytes_written(directory, pattern):
  return sum(m.size_in_bytes for m in
             FileSystems.match([output_dir.join(directory, pattern)])[0].metadata_list)


def run(argv=None):
  """Runs the pipeline; returns the published manifest (None for a --dry_run build)."""
  started = time.time()
  args, beam_args = parse_args(argv)
  preprocessing_fn, raw_spec, size, channels, hints = _load(args)
  fmt = image_files.ImageFormat(channels=channels, max_pixels=args.max_pixels,
                                 max_bytes=args.max_image_bytes, image_key=args.image_feature,
                                 label_key=args.label_feature)
  units, input_bytes = {}, {}
  units['train'], input_bytes['train'] = image_files.match_image_inputs(args.train, '--train')
  if args.eval:
    units['eval'], input_bytes['eval'] = image_files.match_image_inputs(args.eval, '--eval')
  splits, shards = job.plan_splits(args, input_bytes)

  job.check_remote_paths(beam_args, args.output, list(args.train) + list(args.eval or []))
  out = output_dir.OutputDir(args.output, args.overwrite)
  out.prepare()
  label_inverse = job.save_label_inverse(out, hints.inverse_label_fn)
  schema = schema_utils.schema_from_feature_spec(raw_spec)
  adapter_config = tfxio.TensorAdapterConfig(
      image_files.arrow_schema(),
      tensor_representation_util.InferTensorRepresentationsFromSchema(schema))

  pipeline = launch.make_pipeline(beam_args)
  with tft_beam.Context(temp_dir=out.tmp, desired_batch_size=args.images_per_batch):
    spill = job.make_spill(pipeline, out)
    raw, errors, analyze = job.read_splits(
        pipeline, lambda u, split, fraction, spill: image_files.ReadImages(
            u, fmt, split, fraction, args.images_per_batch, spill=spill), units,
        args.eval_fraction, 'Images', spill)
    job.transform_and_write(raw, errors, analyze, adapter_config, preprocessing_fn, out, shards,
                            args.compression)
    counts = job.run_and_check(pipeline, out, splits, args.max_bad_rows_limit, what='images',
                               spill=spill)
  if counts is None:
    return None

  split_entries = job.split_entries(counts, shards, args.compression)
  for split, entry in split_entries.items():
    written = _bytes_written(out.out, entry['files'])
    entry['bytes_written'] = written
    entry['bytes_per_image'] = round(written / entry['rows_written'], 1) if entry[
        'rows_written'] else None
  return job.publish(out, {
      'pipeline': 'images',
      'transforms': args.transforms,
      'label_key': 'label',
      'label_classes': None,  # the label vocabulary file `label` names the classes
      'raw_columns': [dict(name='image', dtype='string', varlen=False, default=None, binary=True),
                      dict(name='label', dtype='string', varlen=False, default=None)],
      'csv_columns': None,
      'na_values': [],
      'image': {'height': size[0], 'width': size[1], 'channels': channels,
                'stored_as': 'int64 pixel values 0..255 (image_xf), per-channel train mean and '
                             'std of pixels/255 (image_mean_xf, image_std_xf)',
                'max_pixels': args.max_pixels, 'max_image_bytes': args.max_image_bytes,
                'input_features': {'image': args.image_feature, 'label': args.label_feature}},
      'inputs': {'train': list(args.train), **({'eval': list(args.eval)} if args.eval else {})},
      'splits': split_entries,
      **hints.manifest_entries(),
      'label_inverse': label_inverse,
  }, args, argv, beam_args, started, what='images')


if __name__ == '__main__':
  command.main(run)
