#!/usr/bin/env python3
"""Build Fashion-MNIST as PNG image folders and/or WebDataset tar shards.

Reads the four gzipped IDX files that Debian's ``dataset-fashion-mnist`` package
installs under /usr/share/datasets/fashion-mnist/ (install it with
``apt-get install dataset-fashion-mnist``) and writes each 28x28 grayscale image
as a PNG (encoded with ``tf.io.encode_png``):

  --layout folders   DIR/train/<class>/<index>.png and DIR/test/<class>/<index>.png
  --layout tar       DIR/train-00000.tar ... and DIR/test-00000.tar ...
                     (WebDataset shards: one sample = the adjacent members
                     <key>.png and <key>.txt, the .txt holding the class name
                     in UTF-8 without a newline; key like train_00042)
  --layout both      both of the above

<index> is the image's position in its IDX file, zero-padded to 5 digits, so a
PNG can always be traced back to the source arrays. Classes, in Fashion-MNIST's
official label order 0..9: T-shirt_top, Trouser, Pullover, Dress, Coat, Sandal,
Shirt, Sneaker, Bag, Ankle_boot.

Tar shards are written deterministically (sorted members, mtime 0, uid/gid 0,
ustar format) and atomically (temp name, then rename). Files or shards of this
script's own naming left in DIR by an earlier, larger run are removed, so the
output depends only on the arguments.

Usage (from the repository root):

  # the committed sample: first 100 train / 20 test images of each class
  .venv/bin/python data/fashion_mnist/build.py --layout folders \\
      --per-class 100 --test-per-class 20 --out data/fashion_mnist/sample

  # the full set (60,000 train + 10,000 test), as folders and tar shards
  .venv/bin/python data/fashion_mnist/build.py --layout both --out /tmp/fmnist

  # tar shards of 5,000 samples each
  .venv/bin/python data/fashion_mnist/build.py --layout tar --shard-size 5000 --out /tmp/fmnist_tar

Exit status: 0 on success, 2 if the IDX files are missing (package not
installed) or the arguments are bad, 1 if the IDX files are malformed.

Data: Fashion-MNIST, (c) 2017 Zalando SE (Zalando Research; Xiao, Rasul &
Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
Learning Algorithms", arXiv:1708.07747), MIT license. This script depends on
nothing from the surrounding project: only the standard library, numpy and
tensorflow.
"""

import argparse
import gzip
import io
import os
import re
import struct
import sys
import tarfile
import time

import numpy as np

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)
SPLITS = {
    # split: (images file, labels file, expected count)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
              0x0D: ">f4", 0x0E: ">f8"}
ENCODE_BATCH = 10000


class IdxError(Exception):
    """A malformed or unexpected IDX file."""


def read_idx(path):
    """Return the array stored in a gzipped IDX file, checking its header."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise IdxError(f"{path}: cannot read as gzip: {e}") from e
    if len(data) < 4:
        raise IdxError(f"{path}: too short for an IDX header")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in IDX_DTYPES or ndim == 0:
        raise IdxError(f"{path}: bad IDX magic {data[:4].hex()}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = np.dtype(IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_len != expected:
        raise IdxError(f"{path}: header dims {dims} need {expected} bytes of data, "
                       f"found {len(data) - header_len}")
    return np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)


def load_split(source, split):
    images_name, labels_name, count = SPLITS[split]
    images = read_idx(os.path.join(source, images_name))
    labels = read_idx(os.path.join(source, labels_name))
    if images.dtype != np.uint8 or images.shape != (count, 28, 28):
        raise IdxError(f"{images_name}: expected uint8 images of shape ({count}, 28, 28), "
                       f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != (count,):
        raise IdxError(f"{labels_name}: expected {count} uint8 labels, "
                       f"got {labels.dtype} {labels.shape}")
    if labels.max() >= len(CLASS_NAMES):
        raise IdxError(f"{labels_name}: label {labels.max()} out of range 0..9")
    return images, labels


def select(labels, per_class):
    """File-order indices of the first `per_class` images of each class (all if None)."""
    if per_class is None:
        return np.arange(len(labels))
    keep = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASS_NAMES))]
    return np.sort(np.concatenate(keep))


def encode_pngs(images):
    """PNG-encode uint8 images of shape (n, 28, 28); returns a list of bytes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TF's start-up notices
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.uint8)])
    def encode_batch(batch):
        return tf.map_fn(tf.io.encode_png, batch, fn_output_signature=tf.string,
                         parallel_iterations=16)

    out = []
    for start in range(0, len(images), ENCODE_BATCH):
        batch = images[start:start + ENCODE_BATCH, :, :, np.newaxis]
        out.extend(encode_batch(tf.constant(batch)).numpy().tolist())
    return out


def write_folders(out, split, indices, labels, pngs):
    """Write DIR/split/<class>/<index>.png; remove stray PNGs of this naming."""
    written = set()
    for name in CLASS_NAMES:
        os.makedirs(os.path.join(out, split, name), exist_ok=True)
    for idx, png in zip(indices, pngs):
        path = os.path.join(out, split, CLASS_NAMES[labels[idx]], f"{idx:05d}.png")
        with open(path, "wb") as f:
            f.write(png)
        written.add(path)
    removed = 0
    for name in CLASS_NAMES:
        folder = os.path.join(out, split, name)
        for entry in os.listdir(folder):
            path = os.path.join(folder, entry)
            if re.fullmatch(r"\d{5}\.png", entry) and path not in written:
                os.remove(path)
                removed += 1
    return removed


def _add_member(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def write_tars(out, split, indices, labels, pngs, shard_size):
    """Write DIR/split-NNNNN.tar shards atomically; remove stale higher shards."""
    os.makedirs(out, exist_ok=True)
    samples = sorted(zip(indices, pngs), key=lambda s: s[0])
    paths = []
    for shard, start in enumerate(range(0, len(samples), shard_size)):
        path = os.path.join(out, f"{split}-{shard:05d}.tar")
        tmp = os.path.join(out, f".{split}-{shard:05d}.tar.tmp{os.getpid()}")
        try:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for idx, png in samples[start:start + shard_size]:
                    key = f"{split}_{idx:05d}"
                    _add_member(tar, f"{key}.png", png)
                    _add_member(tar, f"{key}.txt", CLASS_NAMES[labels[idx]].encode("utf-8"))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        paths.append(path)
    removed = 0
    for entry in os.listdir(out):
        m = re.fullmatch(rf"{split}-(\d{{5}})\.tar", entry)
        if m and int(m.group(1)) >= len(paths):
            os.remove(os.path.join(out, entry))
            removed += 1
    return paths, removed


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Build Fashion-MNIST PNG folders and/or WebDataset tar shards "
                    "from the dataset-fashion-mnist Debian package.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--layout", choices=("folders", "tar", "both"), default="folders")
    parser.add_argument("--per-class", type=int, default=None, metavar="N",
                        help="keep only the first N images of each class (train; "
                             "test too unless --test-per-class is given)")
    parser.add_argument("--test-per-class", type=int, default=None, metavar="M",
                        help="keep only the first M test images of each class")
    parser.add_argument("--shard-size", type=int, default=10000,
                        help="samples per tar shard (default 10000)")
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help=f"folder holding the IDX .gz files (default {DEFAULT_SOURCE})")
    args = parser.parse_args(argv)
    for flag in ("per_class", "test_per_class", "shard_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")

    missing = [name for images, labels, _ in SPLITS.values() for name in (images, labels)
               if not os.path.isfile(os.path.join(args.source, name))]
    if missing:
        print(f"error: Fashion-MNIST IDX files not found in {args.source} ({', '.join(missing)}); "
              f"install them with: apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 2

    started = time.monotonic()
    per_class = {"train": args.per_class,
                 "test": args.test_per_class if args.test_per_class is not None else args.per_class}
    try:  # read and check both splits before writing anything
        loaded = {split: load_split(args.source, split) for split in SPLITS}
    except IdxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    counts, outputs, removed = {}, [], 0
    for split, (images, labels) in loaded.items():
        indices = select(labels, per_class[split])
        pngs = encode_pngs(images[indices])
        counts[split] = len(indices)
        if args.layout in ("folders", "both"):
            removed += write_folders(args.out, split, indices, labels, pngs)
            outputs.append(os.path.join(args.out, split) + "/")
        if args.layout in ("tar", "both"):
            paths, n = write_tars(args.out, split, indices, labels, pngs, args.shard_size)
            removed += n
            outputs.append(paths[0] if len(paths) == 1 else
                           f"{os.path.join(args.out, split)}-{{00000..{len(paths) - 1:05d}}}.tar")

    stale = f", removed {removed} stale files" if removed else ""
    print(f"fashion-mnist: train={counts['train']} test={counts['test']} "
          f"layout={args.layout} -> {' '.join(outputs)}{stale}; "
          f"{time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
