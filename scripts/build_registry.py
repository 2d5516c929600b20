"""Generates presets/registry.json: every ConvNeXt checkpoint this package loads.

The inputs live in `scripts/registry_inputs/`, dumped from the reference
packages by `scripts/dump_registry_inputs.py` (so this script needs neither
timm nor torch): `timm_pretrained_cfgs.json` (every `convnext*` checkpoint of
timm's pretrained list: config, model arguments, parameter count) and
`extra_sources.json` (DINOv3's transformers repos, OpenCLIP towers timm does
not republish) and `timm_top1.json` (timm's measured ImageNet-1k top-1 of
every ConvNeXt checkpoint, from its GitHub repository's
`results/results-imagenet.csv`, see `dump_timm_top1.py`). The official top-1
and preprocessing of the 47 official checkpoints (`README.md` there) are
written into `V1_TOP1`, `V2_TOP1` and `official_384_entry` below; an entry's
`top1` is the official figure where one was published (`top1_source`
"official") and timm's measured figure for every other ImageNet-1k classifier
(`top1_source` "timm", measured at the entry's input size, `top1_image_size`);
entries without an ImageNet-1k head (22k and 12k heads, CLIP towers, DINOv3,
EUPE, FCMAE encoders) have none; the two V1 `in1k_384` checkpoints have no timm
repo and point at the official `.pth`. Parameter counts of the official
entries are computed from the variant table, the others are the reference
package's own count. Revisions and sha256 stay empty: `scripts/pin_presets.py`
fills them online.

Usage:
    python scripts/build_registry.py [--reference PATH] [--extra PATH] [--top1 PATH] [--output PATH]
"""

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_light():
    """`convnext_zoo.timm_format` and `.variants` through the package's light import (numpy, no Keras).

    The switch is set for the import only, so that importing this script
    (tests do) leaves the environment of later subprocesses as it was.
    """
    previous = os.environ.get("CONVNEXT_ZOO_LIGHT_IMPORT")
    os.environ["CONVNEXT_ZOO_LIGHT_IMPORT"] = "1"
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    try:
        from convnext_zoo import timm_format, variants
    finally:
        if previous is None:
            del os.environ["CONVNEXT_ZOO_LIGHT_IMPORT"]
        else:
            os.environ["CONVNEXT_ZOO_LIGHT_IMPORT"] = previous
    return timm_format, variants


timm_format, _variants = _import_light()

variant_config = _variants.variant_config

DEFAULT_REFERENCE = os.path.join(ROOT, "scripts", "registry_inputs", "timm_pretrained_cfgs.json")
DEFAULT_EXTRA = os.path.join(ROOT, "scripts", "registry_inputs", "extra_sources.json")
DEFAULT_TOP1 = os.path.join(ROOT, "scripts", "registry_inputs", "timm_top1.json")
DEFAULT_OUTPUT = os.path.join(ROOT, "presets", "registry.json")
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/convnext/"
SCHEMA_VERSION = 2
EXPECTED_PRESETS = 106

# Official ImageNet-1k top-1 (registry_inputs/README.md). None: no 1k head (in22k, fcmae).
V1_TOP1 = {
    "in1k": {"tiny": 82.1, "small": 83.1, "base": 83.8, "large": 84.3},
    "in1k_384": {"base": 85.1, "large": 85.5},
    "in22k_ft_in1k": {"tiny": 82.9, "small": 84.6, "base": 85.8, "large": 86.6, "xlarge": 87.0},
    "in22k_ft_in1k_384": {"tiny": 84.1, "small": 85.8, "base": 86.8, "large": 87.5, "xlarge": 87.8},
}
V2_TOP1 = {
    "fcmae_ft_in1k": {"atto": 76.7, "femto": 78.5, "pico": 80.3, "nano": 81.9, "tiny": 83.0,
                      "base": 84.9, "large": 85.8, "huge": 86.3},
    "fcmae_ft_in22k_in1k": {"nano": 82.1, "tiny": 83.9, "base": 86.8, "large": 87.3},
    "fcmae_ft_in22k_in1k_384": {"nano": 83.4, "tiny": 85.1, "base": 87.7, "large": 88.2, "huge": 88.7},
    "fcmae_ft_in22k_in1k_512": {"huge": 88.9},
}
# timm tag suffix -> our tag, for the official V1 checkpoints; timm's own tags are kept as they are.
V1_TAGS = {"fb_in1k": "in1k", "fb_in22k": "in22k", "fb_in22k_ft_in1k": "in22k_ft_in1k",
           "fb_in22k_ft_in1k_384": "in22k_ft_in1k_384"}
IMAGENET_MEAN = list(_variants.IMAGENET_MEAN)
IMAGENET_STD = list(_variants.IMAGENET_STD)
LICENSES = {"v1": "apache-2.0", "v2": "cc-by-nc-4.0"}
# timm model arguments that the family already fixes (GRN, layer scale).
FAMILY_ARGS = ("use_grn", "ls_init_value")


def param_count(family, variant, num_classes):
    """Exact parameter count of the Keras model the entry builds.

    `num_classes=0` (FCMAE) is the bare backbone: no head LayerNorm.
    """
    depths, dims = variant_config(family, variant)
    total = 3 * 16 * dims[0] + dims[0] + 2 * dims[0]  # stem conv + LN
    for stage, (depth, d) in enumerate(zip(depths, dims)):
        if stage:
            prev = dims[stage - 1]
            total += 2 * prev + 4 * prev * d + d  # LN + 2x2 conv
        block = 49 * d + d + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
        block += 8 * d if family == "v2" else d  # GRN gamma/beta or layer scale
        total += depth * block
    if num_classes:
        total += 2 * dims[3] + dims[3] * num_classes + num_classes
    return total


def preprocessing(cfg):
    return {
        "image_size": cfg["input_size"][1],
        "crop_pct": cfg["crop_pct"],
        "crop_mode": cfg["crop_mode"],
        "interpolation": cfg["interpolation"],
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
    }


def label_set(num_classes):
    """The label set of a head with `num_classes` outputs (`None`: no ImageNet labels)."""
    return {1000: "imagenet-1k", 11821: "imagenet-12k", 21841: "imagenet-22k"}.get(num_classes)


def task(num_classes):
    """classification (ImageNet labels), embedding (a CLIP projection) or features (no head)."""
    if label_set(num_classes):
        return "classification"
    return "embedding" if num_classes else "features"


def architecture(family, variant, model_args):
    """The config options beyond the family's variant table, from timm's model arguments.

    A variant of the table (tiny ... xlarge, V2 atto ... huge) contributes no
    depths or widths; any other (atto_ols, large_mlp, xxlarge, ...) records
    both. Every other argument maps to its backbone / classifier option
    through `timm_format.TIMM_MODEL_ARGS`.
    """
    options, unknown = timm_format.options_from_timm_args(
        {k: v for k, v in model_args.items() if k not in FAMILY_ARGS})
    if unknown:
        raise SystemExit(f"{variant}: timm model argument(s) {unknown} have no config option.")
    depths, dims = options.pop("depths"), options.pop("hidden_dims")
    arch = {}
    if variant in _variants.FAMILIES[family]:
        assert (tuple(depths), tuple(dims)) == variant_config(family, variant), (variant, model_args)
    else:
        arch.update(depths=depths, hidden_dims=dims)
    arch.update(options)
    return arch


def top1_fields(name, label, official_top1, image_size, timm_name, timm_top1):
    """`top1`, `top1_source` and `top1_image_size` of an entry.

    The official figure wins where there is one; any other ImageNet-1k
    classifier takes timm's measured figure, and one missing from timm's
    results stops the build rather than leaving a silent gap.
    """
    if official_top1 is not None:
        return {"top1": official_top1, "top1_source": "official", "top1_image_size": image_size}
    if label != "imagenet-1k":
        return {"top1": None, "top1_source": None, "top1_image_size": None}
    # timm measures at the input size and the test size; the input size is the
    # one the official figures were published at.
    row = [m for m in timm_top1.get(timm_name, ()) if m["image_size"] == image_size]
    if not row:
        raise SystemExit(f"{name}: an ImageNet-1k classifier without an official top-1 and without a "
                         f"measurement of {timm_name!r} at {image_size} px in timm's results "
                         f"({os.path.basename(DEFAULT_TOP1)}).")
    return {"top1": row[0]["top1"], "top1_source": "timm", "top1_image_size": image_size}


def _source(fmt, hf_repo, filename="model.safetensors", official_url=""):
    return {"format": fmt, "hf_repo": hf_repo, "filename": filename, "revision": "", "sha256": "",
            "official_url": official_url or ""}


def entry_from_timm(cfg, timm_top1):
    arch, timm_tag = cfg["timm_name"].split(".", 1)
    official = arch.startswith("convnextv2_") or timm_tag in V1_TAGS
    if arch.startswith("convnextv2_"):
        family, variant, tag = "v2", arch[len("convnextv2_"):], timm_tag
        top1 = V2_TOP1.get(tag, {}).get(variant)
    else:
        family, variant, tag = "v1", arch[len("convnext_"):], V1_TAGS.get(timm_tag, timm_tag)
        top1 = V1_TOP1.get(tag, {}).get(variant)
    num_classes = cfg["num_classes"]
    size = cfg["input_size"][1]
    if official:
        assert cfg["license"] == LICENSES[family], cfg
        # The official checkpoints keep the dense MLP layout they were released in.
        options = {}
        params = param_count(family, variant, num_classes)
    else:
        options = architecture(family, variant, cfg["model_args"])
        params = cfg["params"]
    name = f"convnext_{family}_{variant}_{tag}"
    return name, {
        "family": family,
        "variant": variant,
        "tag": tag,
        "num_classes": num_classes,
        "image_size": size,
        "source": _source("timm", cfg["hf_hub_id"], official_url=cfg["url"]),
        "preprocessing": preprocessing(cfg),
        "test_time": {
            "image_size": (cfg.get("test_input_size") or cfg["input_size"])[1],
            "crop_pct": cfg.get("test_crop_pct") or cfg["crop_pct"],
        },
        "label_set": label_set(num_classes),
        "license": cfg["license"],
        **top1_fields(name, label_set(num_classes), top1, size, cfg["timm_name"], timm_top1),
        "params": params,
        "architecture": options,
        "task": task(num_classes),
        "gated": False,
        "timm_name": cfg["timm_name"],
    }


def entry_from_extra(row, cfgs):
    """A DINOv3 transformers repo or an OpenCLIP tower (`extra_sources.json`)."""
    variant = row["arch"]
    if row["source"] == "open_clip":
        timm_arch = row["timm_model"]
        args = next(c["model_args"] for c in cfgs if c["timm_name"].split(".")[0] == timm_arch)
        # The projection loads as a Dense with a zero bias, as timm's copies of these towers.
        options = architecture("v1", variant, args)
    else:
        options = architecture("v1", variant, {"depths": row["depths"], "dims": row["dims"]})
    size = row["input_size"][1]
    return f"convnext_v1_{variant}_{row['tag']}", {
        "family": "v1",
        "variant": variant,
        "tag": row["tag"],
        "num_classes": row["num_classes"],
        "image_size": size,
        "source": _source(row["source"], row["hf_hub_id"], row["filename"]),
        "preprocessing": preprocessing(row),
        "test_time": {"image_size": size, "crop_pct": row["crop_pct"]},
        "label_set": label_set(row["num_classes"]),
        "license": row["license"],
        # No ImageNet-1k head among these (DINOv3 features, CLIP projections).
        **top1_fields(f"convnext_v1_{variant}_{row['tag']}", label_set(row["num_classes"]), None, size, "", {}),
        "params": row["params"],
        "architecture": options,
        "task": task(row["num_classes"]),
        "gated": row["gated"],
        "timm_name": "",
    }


def official_384_entry(variant):
    url = f"{OFFICIAL_URL}convnext_{variant}_1k_384.pth"
    return f"convnext_v1_{variant}_in1k_384", {
        "family": "v1",
        "variant": variant,
        "tag": "in1k_384",
        "num_classes": 1000,
        "image_size": 384,
        "source": _source("official", "", url.rsplit("/", 1)[1], url),
        # At 384 px the official eval resizes straight to 384 x 384 (registry_inputs/README.md).
        "preprocessing": {
            "image_size": 384, "crop_pct": 1.0, "crop_mode": "squash",
            "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        },
        "test_time": {"image_size": 384, "crop_pct": 1.0},
        "label_set": "imagenet-1k",
        "license": LICENSES["v1"],
        **top1_fields(f"convnext_v1_{variant}_in1k_384", "imagenet-1k", V1_TOP1["in1k_384"][variant], 384, "", {}),
        "params": param_count("v1", variant, 1000),
        "architecture": {},
        "task": "classification",
        "gated": False,
        "timm_name": "",
    }


def build(reference, extra=DEFAULT_EXTRA, top1=DEFAULT_TOP1):
    with open(reference) as f:
        cfgs = json.load(f)
    with open(extra) as f:
        extra_rows = json.load(f)
    with open(top1) as f:
        timm_top1 = json.load(f)["rows"]
    presets = dict(entry_from_timm(cfg, timm_top1) for cfg in cfgs)
    presets.update(official_384_entry(v) for v in ("base", "large"))
    presets.update(entry_from_extra(row, cfgs) for row in extra_rows)
    presets = dict(sorted(presets.items(), key=_order))
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_by": "scripts/build_registry.py",
        "presets": presets,
        "aliases": dict(sorted(_aliases(presets).items())),
    }


def _aliases(presets):
    """`convnext_{family}_{variant}` and `..._imagenet` name each variant's ImageNet-1k checkpoint.

    The official variants keep their default tag (V1 `in1k`, xlarge
    `in22k_ft_in1k`, V2 `fcmae_ft_in1k`); a timm variant gets an alias when it
    has exactly one checkpoint trained on ImageNet-1k alone (e.g. atto's
    `d2_in1k`); CLIP and DINOv3 variants get none.
    """
    default_tags = {("v1", "xlarge"): "in22k_ft_in1k"}
    by_variant = {}
    for name, entry in presets.items():
        by_variant.setdefault((entry["family"], entry["variant"]), []).append((name, entry))
    aliases = {}
    for (family, variant), members in by_variant.items():
        default = default_tags.get((family, variant), {"v1": "in1k", "v2": "fcmae_ft_in1k"}[family])
        chosen = [name for name, e in members if e["tag"] == default]
        if not chosen:
            chosen = [name for name, e in members if e["tag"].endswith("_in1k") and e["timm_name"]
                      and not any(k in e["tag"] for k in ("in12k", "in22k", "clip", "_ft_"))]
        if len(chosen) == 1:
            base = f"convnext_{family}_{variant}"
            aliases[f"{base}_imagenet"] = aliases[base] = chosen[0]
    return aliases


TAG_ORDER = ["in1k", "in1k_384", "in22k", "in22k_ft_in1k", "in22k_ft_in1k_384", "fcmae",
             "fcmae_ft_in1k", "fcmae_ft_in22k_in1k", "fcmae_ft_in22k_in1k_384",
             "fcmae_ft_in22k_in1k_512"]
VARIANT_ORDER = ["zepto_rms", "zepto_rms_ols", "atto", "atto_ols", "femto", "femto_ols", "pico", "pico_ols",
                 "nano", "nano_ols", "tiny", "tiny_hnf", "small", "base", "large", "large_mlp", "xlarge",
                 "xxlarge", "huge"]


def _order(item):
    # Official tags first in their fixed order, then timm's and the others alphabetically.
    e = item[1]
    tag = TAG_ORDER.index(e["tag"]) if e["tag"] in TAG_ORDER else len(TAG_ORDER)
    return (e["family"], VARIANT_ORDER.index(e["variant"]), tag, e["tag"])


def _keep_pins(registry, output):
    """Carries revisions and checksums already pinned in `output` over."""
    if not os.path.exists(output):
        return
    with open(output) as f:
        old = json.load(f)["presets"]
    for name, entry in registry["presets"].items():
        previous = old.get(name, {}).get("source", {})
        if previous.get("filename") == entry["source"]["filename"]:
            for key in ("revision", "sha256"):
                entry["source"][key] = previous.get(key, "") or entry["source"][key]


def write_atomic(data, output):
    directory = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, output)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default=DEFAULT_REFERENCE)
    parser.add_argument("--extra", default=DEFAULT_EXTRA)
    parser.add_argument("--top1", default=DEFAULT_TOP1)
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    registry = build(args.reference, args.extra, args.top1)
    if len(registry["presets"]) != EXPECTED_PRESETS:
        raise SystemExit(f"Expected {EXPECTED_PRESETS} presets, built {len(registry['presets'])}.")
    _keep_pins(registry, args.output)
    write_atomic(registry, args.output)
    print(f"Wrote {len(registry['presets'])} presets and {len(registry['aliases'])} "
          f"aliases to {args.output}")


if __name__ == "__main__":
    main()
