"""Generates presets/registry.json: the 47 official ConvNeXt checkpoints.

The inputs live in `scripts/registry_inputs/`: timm's pretrained configs
(`timm_pretrained_cfgs.json`, the 45 timm tags), read here, and the released
checkpoints' official top-1 and preprocessing (`README.md` there), written
into `V1_TOP1`, `V2_TOP1` and `official_384_entry` below. The two
V1 `in1k_384` checkpoints have no timm repo and point at the official `.pth`.
Parameter counts are computed from the variant table (no Keras needed).
Revisions and sha256 stay empty: `scripts/pin_presets.py` fills them online.

Usage:
    python scripts/build_registry.py [--reference PATH] [--output PATH]
"""

import argparse
import json
import os
import tempfile

import importlib.util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_variants():
    # Loaded by path: importing the package would pull in Keras.
    path = os.path.join(ROOT, "convnext_zoo", "variants.py")
    spec = importlib.util.spec_from_file_location("_convnext_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_variants = _load_variants()
variant_config = _variants.variant_config

DEFAULT_REFERENCE = os.path.join(ROOT, "scripts", "registry_inputs", "timm_pretrained_cfgs.json")
DEFAULT_OUTPUT = os.path.join(ROOT, "presets", "registry.json")
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/convnext/"
SCHEMA_VERSION = 1

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
# timm tag suffix -> our tag.
V1_TAGS = {"fb_in1k": "in1k", "fb_in22k": "in22k", "fb_in22k_ft_in1k": "in22k_ft_in1k",
           "fb_in22k_ft_in1k_384": "in22k_ft_in1k_384"}
IMAGENET_MEAN = list(_variants.IMAGENET_MEAN)
IMAGENET_STD = list(_variants.IMAGENET_STD)
LICENSES = {"v1": "apache-2.0", "v2": "cc-by-nc-4.0"}


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


def entry_from_timm(cfg):
    arch, timm_tag = cfg["timm_name"].split(".", 1)
    if arch.startswith("convnextv2_"):
        family, variant, tag = "v2", arch[len("convnextv2_"):], timm_tag
        top1 = V2_TOP1.get(tag, {}).get(variant)
    else:
        family, variant, tag = "v1", arch[len("convnext_"):], V1_TAGS[timm_tag]
        top1 = V1_TOP1.get(tag, {}).get(variant)
    num_classes = cfg["num_classes"]
    size = cfg["input_size"][1]
    assert cfg["license"] == LICENSES[family], cfg
    return f"convnext_{family}_{variant}_{tag}", {
        "family": family,
        "variant": variant,
        "tag": tag,
        "num_classes": num_classes,
        "image_size": size,
        "source": {
            "format": "timm",
            "hf_repo": cfg["hf_hub_id"],
            "filename": "model.safetensors",
            "revision": "",
            "sha256": "",
            "official_url": cfg["url"],
        },
        "preprocessing": preprocessing(cfg),
        "test_time": {
            "image_size": (cfg.get("test_input_size") or cfg["input_size"])[1],
            "crop_pct": cfg.get("test_crop_pct") or cfg["crop_pct"],
        },
        "label_set": {1000: "imagenet-1k", 21841: "imagenet-22k", 0: None}[num_classes],
        "license": cfg["license"],
        "top1": top1,
        "params": param_count(family, variant, num_classes),
    }


def official_384_entry(variant):
    url = f"{OFFICIAL_URL}convnext_{variant}_1k_384.pth"
    return f"convnext_v1_{variant}_in1k_384", {
        "family": "v1",
        "variant": variant,
        "tag": "in1k_384",
        "num_classes": 1000,
        "image_size": 384,
        "source": {
            "format": "official",
            "hf_repo": "",
            "filename": url.rsplit("/", 1)[1],
            "revision": "",
            "sha256": "",
            "official_url": url,
        },
        # At 384 px the official eval resizes straight to 384 x 384 (registry_inputs/README.md).
        "preprocessing": {
            "image_size": 384, "crop_pct": 1.0, "crop_mode": "squash",
            "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        },
        "test_time": {"image_size": 384, "crop_pct": 1.0},
        "label_set": "imagenet-1k",
        "license": LICENSES["v1"],
        "top1": V1_TOP1["in1k_384"][variant],
        "params": param_count("v1", variant, 1000),
    }


def build(reference):
    with open(reference) as f:
        cfgs = json.load(f)
    presets = dict(entry_from_timm(cfg) for cfg in cfgs)
    presets.update(official_384_entry(v) for v in ("base", "large"))
    presets = dict(sorted(presets.items(), key=_order))
    aliases = {}
    for name, entry in presets.items():
        default_tag = {"v1": "in1k", "v2": "fcmae_ft_in1k"}[entry["family"]]
        if entry["family"] == "v1" and entry["variant"] == "xlarge":
            default_tag = "in22k_ft_in1k"  # no xlarge in1k checkpoint
        if entry["tag"] == default_tag:
            base = f"convnext_{entry['family']}_{entry['variant']}"
            aliases[f"{base}_imagenet"] = name
            aliases[base] = name
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_by": "scripts/build_registry.py",
        "presets": presets,
        "aliases": dict(sorted(aliases.items())),
    }


TAG_ORDER = ["in1k", "in1k_384", "in22k", "in22k_ft_in1k", "in22k_ft_in1k_384", "fcmae",
             "fcmae_ft_in1k", "fcmae_ft_in22k_in1k", "fcmae_ft_in22k_in1k_384",
             "fcmae_ft_in22k_in1k_512"]
VARIANT_ORDER = ["atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "xlarge", "huge"]


def _order(item):
    e = item[1]
    return (e["family"], VARIANT_ORDER.index(e["variant"]), TAG_ORDER.index(e["tag"]))


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
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    registry = build(args.reference)
    if len(registry["presets"]) != 47:
        raise SystemExit(f"Expected 47 presets, built {len(registry['presets'])}.")
    _keep_pins(registry, args.output)
    write_atomic(registry, args.output)
    print(f"Wrote {len(registry['presets'])} presets and {len(registry['aliases'])} "
          f"aliases to {args.output}")


if __name__ == "__main__":
    main()
