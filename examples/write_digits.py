"""Writes scikit-learn's 1,797 handwritten digits as 32x32 RGB PNGs in class folders.

Usage:
    python examples/write_digits.py OUT_DIR [--per-class N]

`OUT_DIR/train/<digit>/*.png` and `OUT_DIR/val/<digit>/*.png`: a fixed,
stratified 80/20 split (seed 0), the layout `convnext-zoo finetune` reads
(`val/` is the held-out test set). The 8x8 scans (17 grey levels) are scaled
to 0-255 and resized to 32x32 (bicubic). `--per-class` keeps only the first
N images of each class in each split (the tests use a small subset).
"""

import argparse
import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(out_dir, per_class=None, size=32, seed=0):
    """Writes the split; returns `{"train": n, "val": n}`."""
    data = load_digits()
    images = (data.images * (255 / 16)).round().astype("uint8")
    order = np.random.default_rng(seed).permutation(len(images))
    counts = {"train": 0, "val": 0}
    for digit in range(10):
        index = [i for i in order if data.target[i] == digit]
        cut = int(round(0.8 * len(index)))
        for split, chosen in (("train", index[:cut]), ("val", index[cut:])):
            chosen = chosen[:per_class] if per_class else chosen
            folder = os.path.join(out_dir, split, str(digit))
            os.makedirs(folder, exist_ok=True)
            for i in chosen:
                image = Image.fromarray(images[i]).resize((size, size), Image.BICUBIC).convert("RGB")
                image.save(os.path.join(folder, f"{i:04d}.png"))
            counts[split] += len(chosen)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--per-class", type=int)
    args = parser.parse_args(argv)
    counts = write_digits(args.out_dir, args.per_class)
    print(f"Wrote {counts['train']} training and {counts['val']} test images to {args.out_dir}")


if __name__ == "__main__":
    main()
