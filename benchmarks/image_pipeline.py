"""Images/s of the Beam image pipeline against a single-process tf.io decode-and-resize loop.

  .venv/bin/python benchmarks/image_pipeline.py [--images 70000] [--runs 3] [--input 'GLOB']

The loop is the lower bound: it reads the same tar shards and decodes and resizes every image with
tf.io / tf.image, eagerly, one image at a time, and writes nothing. (The same steps traced into a
tf.function called per image were slower here: a function call costs more than the eager ops.) The
pipeline (`python -m pipelines.images`, one worker: Beam's in-process runner, default flags) does
that and more: it checks every image, analyzes the training split (per-channel mean and variance,
label vocabulary), transforms it, and writes gzip TFRecords, manifest and transform graph.

Without --input, the committed Fashion-MNIST sample (1,000 PNGs) is repeated into WebDataset tar
shards of --images images (the full Fashion-MNIST set has 70,000); with --input, those shards are
used (e.g. the full set built by data/fashion_mnist/build.py --layout tar). Runs alternate
contender by contender; the table shows medians and the median of the per-run ratios.
"""

import argparse
import glob
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, 'data', 'fashion_mnist', 'sample', 'train')
SIZE = (28, 28)
CHANNELS = 1

LOOP = r'''
import sys, tarfile, time
import tensorflow as tf
height, width, channels = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


def decode_and_resize(data):
  image = tf.io.decode_image(data, channels=channels, expand_animations=False)
  if image.shape[0] == height and image.shape[1] == width:  # nothing to resample
    return image
  resized = tf.image.resize(image, [height, width], antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


n = 0
for path in sys.argv[4:]:
  with tarfile.open(path, 'r|*') as tar:
    for member in tar:
      if member.isfile() and member.name.lower().endswith(('.png', '.jpg', '.jpeg')):
        pixels = decode_and_resize(tar.extractfile(member).read())
        n += 1
print(n)
'''


def make_shards(directory, images, per_shard=10000):
  """The sample's PNGs repeated into WebDataset tars (key.png + key.txt)."""
  sources = sorted(glob.glob(os.path.join(SAMPLE, '*', '*.png')))
  if not sources:
    sys.exit(f'error: no sample images under {SAMPLE}')
  blobs = [(os.path.basename(os.path.dirname(p)), open(p, 'rb').read()) for p in sources]
  paths = []
  for shard, first in enumerate(range(0, images, per_shard)):
    path = os.path.join(directory, f'train-{shard:05d}.tar')
    with tarfile.open(path, 'w') as tar:
      for i in range(first, min(images, first + per_shard)):
        label, data = blobs[i % len(blobs)]
        for name, payload in ((f'{i:07d}.png', data), (f'{i:07d}.txt', label.encode())):
          info = tarfile.TarInfo(name)
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))
    paths.append(path)
  return paths


def run_loop(shards):
  start = time.perf_counter()
  out = subprocess.run([sys.executable, '-c', LOOP, str(SIZE[0]), str(SIZE[1]),
                        str(CHANNELS)] + shards, check=True, capture_output=True, text=True)
  return int(out.stdout.split()[0]), time.perf_counter() - start


def run_pipeline(shards, output):
  shutil.rmtree(output, ignore_errors=True)
  start = time.perf_counter()
  subprocess.run([sys.executable, '-m', 'pipelines.images', '--train', *shards,
                  '--output', output, '--image-size', str(SIZE[0]), str(SIZE[1]),
                  '--channels', str(CHANNELS)], check=True, cwd=ROOT, capture_output=True)
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=70000)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--input', default=None, help='glob of WebDataset tar shards to use instead')
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix='bench_images_')
  try:
    shards = sorted(glob.glob(args.input)) if args.input else make_shards(work, args.images)
    if not shards:
      sys.exit(f'error: --input {args.input} matches nothing')
    loop, pipe, ratios, count = [], [], [], None
    for run in range(args.runs):
      count, loop_s = run_loop(shards)
      pipe_s = run_pipeline(shards, os.path.join(work, 'out'))
      loop.append(count / loop_s)
      pipe.append(count / pipe_s)
      ratios.append(loop_s / pipe_s)
      print(f'run {run + 1}: loop {count / loop_s:6.0f} images/s   pipeline '
            f'{count / pipe_s:6.0f} images/s   ratio {loop_s / pipe_s:.2f}', flush=True)
    median = statistics.median
    print(f'\n{count:,} images ({SIZE[0]}x{SIZE[1]}x{CHANNELS}), {len(shards)} tar shards, '
          f'{os.cpu_count()} CPUs; medians of {args.runs} runs of each whole command '
          '(process start and imports included)')
    print(f'  tf.io decode+resize loop, 1 process (lower bound)  {median(loop):8.0f} images/s')
    print(f'  pipelines.images, 1 worker                         {median(pipe):8.0f} images/s')
    print(f'  pipeline / loop                                    {median(ratios):8.2f}x '
          '(target >= 0.5x)')
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
