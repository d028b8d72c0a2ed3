#!/usr/bin/env python3
"""Small data sets in the formats layerwise reads, written independently of its Rust
writers: with numpy (CIFAR-10 and CIFAR-100 binary, STL-10 binary) and scipy.io.savemat
(SVHN's MATLAB v5 files), from each format's published description.

    python3 scripts/reader_fixtures.py OUT

writes OUT/<set>/ with the set's files, and beside them what a reader must return:
OUT/<set>/expected-<split>-images.u8 (N x C x H x W, row-major, bytes) and
expected-<split>-labels.u8 (0-based class per image). tests/readers.rs compares.
"""
import os
import sys

import numpy as np
import scipy.io

RNG = np.random.default_rng(2019)


def images(n, channels, side):
    """n random images, N x C x H x W bytes, as the readers must return them."""
    return RNG.integers(0, 256, size=(n, channels, side, side), dtype=np.uint8)


def expect(folder, split, x, y):
    x.tofile(os.path.join(folder, f"expected-{split}-images.u8"))
    np.asarray(y, dtype=np.uint8).tofile(os.path.join(folder, f"expected-{split}-labels.u8"))


def cifar10(out):
    """data_batch_1..5.bin and test_batch.bin: records of 1 label byte, then the red,
    green and blue planes of 32 x 32, each row-major."""
    folder = os.path.join(out, "cifar10")
    os.makedirs(folder)
    xs, ys = [], []
    for name, n in [(f"data_batch_{i}.bin", 2 + i % 2) for i in range(1, 6)] + [("test_batch.bin", 4)]:
        x, y = images(n, 3, 32), RNG.integers(0, 10, size=n, dtype=np.uint8)
        records = np.concatenate([y[:, None], x.reshape(n, -1)], axis=1)
        records.tofile(os.path.join(folder, name))
        if name == "test_batch.bin":
            expect(folder, "test", x, y)
        else:
            xs.append(x)
            ys.append(y)
    expect(folder, "train", np.concatenate(xs), np.concatenate(ys))


def cifar100(out):
    """train.bin and test.bin: records of a coarse label (0..19), a fine label (0..99),
    then the three planes. The expected labels are the fine ones (the default)."""
    folder = os.path.join(out, "cifar100")
    os.makedirs(folder)
    for name, split, n in [("train.bin", "train", 5), ("test.bin", "test", 3)]:
        x = images(n, 3, 32)
        coarse, fine = RNG.integers(0, 20, size=n, dtype=np.uint8), RNG.integers(0, 100, size=n, dtype=np.uint8)
        np.concatenate([coarse[:, None], fine[:, None], x.reshape(n, -1)], axis=1).tofile(os.path.join(folder, name))
        expect(folder, split, x, fine)


def svhn(out):
    """train_32x32.mat and test_32x32.mat: X of 32 x 32 x 3 x N bytes (height, width,
    channel, image, as MATLAB stores it) and y of N x 1 digits, 10 standing for 0."""
    folder = os.path.join(out, "svhn")
    os.makedirs(folder)
    for name, split, n in [("train_32x32.mat", "train", 4), ("test_32x32.mat", "test", 3)]:
        x, digits = images(n, 3, 32), RNG.integers(0, 10, size=n)
        mat_x = np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # [n, c, h, w] -> [h, w, c, n]
        mat_y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        scipy.io.savemat(os.path.join(folder, name), {"X": mat_x, "y": mat_y}, format="5")
        expect(folder, split, x, digits)


def stl10(out):
    """train_X.bin/train_y.bin and test_X.bin/test_y.bin: each image 3 planes of 96 x 96,
    each plane column-major; labels are bytes 1..10."""
    folder = os.path.join(out, "stl10")
    os.makedirs(folder)
    for split, n in [("train", 2), ("test", 1)]:
        x, y = images(n, 3, 96), RNG.integers(0, 10, size=n, dtype=np.uint8)
        np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tofile(os.path.join(folder, f"{split}_X.bin"))
        (y + 1).astype(np.uint8).tofile(os.path.join(folder, f"{split}_y.bin"))
        expect(folder, split, x, y)


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    for write in (cifar10, cifar100, svhn, stl10):
        write(sys.argv[1])
    print(f"reader fixtures written to {sys.argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
