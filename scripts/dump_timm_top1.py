"""Copies timm's measured ImageNet-1k top-1 of every ConvNeXt checkpoint into the registry inputs.

timm re-evaluates its pretrained checkpoints and publishes the results as
`results/results-imagenet.csv` in its GitHub repository (not in the wheel).
This script keeps the `convnext*` rows of that file (top-1, and the image size,
crop_pct and interpolation the figure was measured with) and writes them,
with where they came from, to `scripts/registry_inputs/timm_top1.json`, which
`build_registry.py` reads: the top-1 of the checkpoints without an official
figure (timm's own, the ImageNet-12k fine-tunes, the CLIP fine-tunes), at
the entry's own input size.

Usage (the CSV from a checkout of huggingface/pytorch-image-models):
    git -C pytorch-image-models log -1 --format=%H -- results/results-imagenet.csv
    python scripts/dump_timm_top1.py --csv pytorch-image-models/results/results-imagenet.csv \
        --commit <that commit> [--output PATH]
"""

import argparse
import csv
import os

from build_registry import DEFAULT_TOP1, write_atomic  # scripts/ is on the path when a script runs

REPO = "huggingface/pytorch-image-models"
PATH = "results/results-imagenet.csv"


def convnext_rows(csv_path):
    """`{timm name: [{top1, image_size, crop_pct, interpolation}, ...]}` for every `convnext*` model.

    timm measures most checkpoints twice, at their input size and at their
    test size; both are kept, smallest size first.
    """
    rows = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            # timm's unit-test models (test_convnext*) are not released checkpoints.
            if row["model"].startswith("convnext"):
                rows.setdefault(row["model"], []).append({
                    "top1": float(row["top1"]),
                    "image_size": int(row["img_size"]),
                    "crop_pct": float(row["crop_pct"]),
                    "interpolation": row["interpolation"],
                })
    return {name: sorted(measured, key=lambda r: r["image_size"]) for name, measured in sorted(rows.items())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", required=True, help=f"{PATH} from a checkout of {REPO}")
    parser.add_argument("--commit", required=True, help="the commit the CSV was read at (40 hex digits)")
    parser.add_argument("--output", default=DEFAULT_TOP1)
    args = parser.parse_args(argv)
    if len(args.commit) != 40 or any(c not in "0123456789abcdef" for c in args.commit):
        parser.error(f"--commit must be a full 40-digit hex commit; received {args.commit!r}.")
    rows = convnext_rows(args.csv)
    if not rows:
        parser.error(f"{args.csv} has no convnext* rows; pass timm's {PATH}.")
    write_atomic({
        "source": {
            "repo": REPO,
            "path": PATH,
            "commit": args.commit,
            "what": "timm's own re-measurement of each checkpoint's ImageNet-1k validation top-1 (percent), "
                    "at the image_size, crop_pct and interpolation given per measurement",
        },
        "rows": rows,
    }, args.output)
    print(f"Wrote the measurements of {len(rows)} checkpoints to {args.output}")


if __name__ == "__main__":
    main()
