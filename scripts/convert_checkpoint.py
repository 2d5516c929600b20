#!/usr/bin/env python
"""Convert an official, timm or transformers ConvNeXt checkpoint to a Keras preset directory.

Examples:
    python scripts/convert_checkpoint.py timm/convnextv2_atto.fcmae_ft_in1k out/convnext_v2_atto
    python scripts/convert_checkpoint.py convnext_tiny_22k_224.pth out/convnext_v1_tiny_in22k
    python scripts/convert_checkpoint.py convnextv2_atto_1k_224_fcmae.pt out/atto_fcmae
    python scripts/convert_checkpoint.py convnextv2_atto_1k_224_fcmae.pt out/atto10 --init-head --num-classes 10
    python scripts/convert_checkpoint.py ./facebook-convnext-tiny-224/ out/tiny --dtype bfloat16

Exit status: 0 on success, 1 when the conversion fails (the message says why; no
output directory is left behind).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="a weights file (.safetensors, .pth, .pt, .bin, "
                        ".safetensors.index.json), a directory holding one (config.json beside it "
                        "is read when present), or a Hugging Face Hub repo id ('owner/name').")
    parser.add_argument("output_dir", help="the preset directory to create (written atomically).")
    parser.add_argument("--source-format", default="auto",
                        choices=["auto", "official", "timm", "transformers", "preset", "keras-hub"],
                        help="format of the source (default: detected).")
    arch = parser.add_argument_group("architecture (inferred; an override must agree with the checkpoint)")
    arch.add_argument("--family", choices=["v1", "v2"], help="ConvNeXt V1 or V2.")
    arch.add_argument("--variant", help="atto, femto, pico, nano, tiny, small, base, large, xlarge, huge, "
                      "or custom (other depths and widths).")
    arch.add_argument("--norm-layer", choices=["layer_norm", "simple_norm", "rms_norm"],
                      help="the norm where the tensors cannot tell (bias-free: SimpleNorm or RMS norm).")
    arch.add_argument("--norm-epsilon", type=float,
                      help="epsilon of every norm (default: timm's config.json, else 1e-6).")
    arch.add_argument("--num-classes", type=int,
                      help="classes of the head; with --init-head, the size of the fresh head.")
    head = arch.add_mutually_exclusive_group()
    head.add_argument("--init-head", action="store_true",
                      help="write a classifier with a freshly initialised head (LayerNorm + Dense of "
                      "--num-classes), leaving any source head unused: the way to a classifier "
                      "from an FCMAE encoder.")
    head.add_argument("--backbone-only", action="store_true",
                      help="write the backbone only, leaving the source head unused.")
    source = parser.add_argument_group("source")
    source.add_argument("--checkpoint-key",
                        help="entry of a pickled training checkpoint that holds the weights "
                        "(default: the bare state dict, else model, model_ema, state_dict).")
    source.add_argument("--revision", help="Hub revision (branch, tag or commit) of a repo id source.")
    meta = parser.add_argument_group("preset metadata (defaults from the source's config files, else ImageNet)")
    meta.add_argument("--input-size", type=int, nargs="+", metavar="PX",
                      help="training resolution: one side, or height width (default 224).")
    meta.add_argument("--crop-pct", type=float, help="center-crop fraction at evaluation (default 0.875).")
    meta.add_argument("--crop-mode", choices=["center", "squash"], help="evaluation crop mode.")
    meta.add_argument("--interpolation", choices=["bicubic", "bilinear", "nearest"],
                      help="resize interpolation (default bicubic).")
    meta.add_argument("--mean", type=float, nargs=3, help="normalisation mean, RGB.")
    meta.add_argument("--std", type=float, nargs=3, help="normalisation std, RGB.")
    meta.add_argument("--labels", choices=["imagenet-1k", "imagenet-22k", "none"],
                      help="label set of the head (default from the number of classes).")
    meta.add_argument("--license", help="licence of the weights (default: the source's, else "
                      "apache-2.0 for V1 and cc-by-nc-4.0 for V2).")
    out = parser.add_argument_group("output")
    out.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                     help="storage dtype of model.safetensors (default float32).")
    out.add_argument("--layout", default="auto", choices=["auto", "timm", "keras"],
                     help="weights layout: timm's where timm can build the network (default auto, "
                          "so timm loads the directory too), or Keras' own.")
    out.add_argument("--name", help="Keras model name (default convnext_{family}_{variant}).")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output directory.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    overrides = {
        "family": args.family, "variant": args.variant, "num_classes": args.num_classes,
        "init_head": args.init_head, "backbone_only": args.backbone_only,
        "checkpoint_key": args.checkpoint_key, "revision": args.revision,
        "crop_pct": args.crop_pct, "crop_mode": args.crop_mode,
        "interpolation": args.interpolation, "mean": args.mean, "std": args.std,
        "license": args.license, "dtype": args.dtype, "name": args.name,
        "overwrite": args.overwrite, "layout": args.layout,
        "norm_layer": args.norm_layer, "norm_epsilon": args.norm_epsilon,
    }
    if args.input_size:
        overrides["input_size"] = args.input_size[0] if len(args.input_size) == 1 else args.input_size[:2]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.labels:  # after the filter: "none" states that there is no label set
        overrides["labels"] = None if args.labels == "none" else args.labels

    from convnext_zoo.convert import convert_checkpoint

    try:
        config = convert_checkpoint(args.source, args.output_dir, args.source_format, **overrides)
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = {k: config[k] for k in ("family", "variant", "head", "num_classes", "image_size",
                                       "label_set", "license", "weights_dtype")}
    print(json.dumps(summary))
    print(f"wrote {args.output_dir} in {config['seconds']} s "
          f"({config['provenance']['source_format']} source {config['provenance']['file_name']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
