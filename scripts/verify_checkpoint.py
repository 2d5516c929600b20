#!/usr/bin/env python
"""Compare a source checkpoint with its converted preset on natural images.

The source runs through timm (timm and official checkpoints), transformers
(transformers and DINOv3 checkpoints) or open_clip (OpenCLIP files); the preset
through convnext_zoo. Prints max |difference| of the logits, the last feature
map, and, where the model has them, the embedding and the patch features;
top-1 / top-5 agreement for classifiers.

Example:
    python scripts/verify_checkpoint.py convnext_tiny_1k_224_ema.pth out/convnext_v1_tiny

Exit status: 0 when every difference is within tolerance, 1 above it, 2 on errors.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="the checkpoint that was converted (file, directory or Hub repo id).")
    parser.add_argument("preset", help="the converted preset directory.")
    parser.add_argument("--images", nargs="+",
                        help="a directory or image files (default: convnext_zoo/data/images, 4 photos).")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest max |diff| relative to the largest reference value (default 1e-4).")
    parser.add_argument("--source-format", default="auto",
                        choices=["auto", "official", "timm", "transformers", "open_clip", "dinov3"],
                        help="layout of the source.")
    parser.add_argument("--checkpoint-key", help="entry of a pickled training checkpoint holding the weights.")
    parser.add_argument("--revision", help="Hub revision of a repo id source.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from convnext_zoo.verification import format_report, verify

    images = args.images[0] if args.images and len(args.images) == 1 else args.images
    try:
        report = verify(args.source, args.preset, images=images, tolerance=args.tolerance,
                        source_format=args.source_format, checkpoint_key=args.checkpoint_key,
                        revision=args.revision)
    except (ValueError, OSError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
