"""Dumps the facts the registry is built from, out of the installed reference packages.

Writes, into `scripts/registry_inputs/` (atomically):
    timm_pretrained_cfgs.json  every `convnext*` checkpoint of `timm.list_pretrained`:
        its pretrained config (hub repo, classes, input and test sizes, crop,
        interpolation, mean/std, licence), the keyword arguments of its timm
        model function (`model_args`: depths, dims, stem, norm, head options)
        and the parameter count of `timm.create_model(name, pretrained=False)`.
    extra_sources.json  checkpoints outside timm's list: the DINOv3 ConvNeXt
        transformers repos (`DINOv3ConvNextModel`, parameters counted with
        transformers) and OpenCLIP's ConvNeXt image towers that timm does not
        republish (`params`: the tower with its projection as timm and this
        package load it, a Linear with a zero bias; `open_clip_params`: the
        bias-free tower open_clip builds).

Models are built on PyTorch's meta device: nothing is allocated or
initialised, so the 850M-parameter xxlarge costs no memory. Building the
registry (`scripts/build_registry.py`) then needs none of these packages.

Usage (needs timm, torch, transformers, open_clip_torch):
    python scripts/dump_registry_inputs.py [--output-dir DIR]
"""

import argparse
import os

from build_registry import write_atomic  # scripts/ is on the path when a script runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(ROOT, "scripts", "registry_inputs")
CFG_KEYS = ("hf_hub_id", "url", "input_size", "test_input_size", "crop_pct", "test_crop_pct",
            "crop_mode", "interpolation", "mean", "std", "num_classes", "license")
# DINOv3's ConvNeXt repos in transformers format: timm architecture -> repo.
DINOV3_TRANSFORMERS = {
    size: f"facebook/dinov3-convnext-{size}-pretrain-lvd1689m" for size in ("tiny", "small", "base", "large")
}
# OpenCLIP ConvNeXt towers without a timm copy: (open_clip model, pretrained tag).
OPEN_CLIP_ONLY = (("convnext_base", "laion400m_s13b_b51k"), ("convnext_xxlarge", "laion2b_s34b_b82k_augreg"))


def _count(module):
    return sum(p.numel() for p in module.parameters())


def model_args(architecture):
    """The keyword arguments timm's model function passes for `architecture`."""
    import timm.models.convnext as convnext

    captured = {}
    original = convnext._create_convnext

    def capture(variant, pretrained=False, **kwargs):
        captured.update(kwargs)
        raise StopIteration  # the arguments are all we want

    convnext._create_convnext = capture
    try:
        getattr(convnext, architecture)(pretrained=False)
    except StopIteration:
        pass
    finally:
        convnext._create_convnext = original
    return {k: list(v) if isinstance(v, tuple) else v for k, v in captured.items()}


def timm_cfgs():
    import timm
    import torch
    from timm.models import get_pretrained_cfg

    rows = []
    for name in sorted(timm.list_pretrained("convnext*")):
        cfg = get_pretrained_cfg(name).to_dict()
        row = {key: list(cfg[key]) if isinstance(cfg.get(key), tuple) else cfg.get(key) for key in CFG_KEYS}
        row["num_classes"] = row["num_classes"] or 0
        row["timm_name"] = name
        row["model_args"] = model_args(name.split(".")[0])
        with torch.device("meta"):
            row["params"] = _count(timm.create_model(name, pretrained=False))
        rows.append(row)
    return rows


def dinov3_transformers_rows(cfgs):
    import torch
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel
    from transformers.models.dinov3_vit import image_processing_dinov3_vit as processing

    processor = processing.DINOv3ViTImageProcessor
    rows = []
    for size, repo in DINOV3_TRANSFORMERS.items():
        timm_cfg = next(c for c in cfgs if c["timm_name"] == f"convnext_{size}.dinov3_lvd1689m")
        args = timm_cfg["model_args"]
        config = DINOv3ConvNextConfig(depths=list(args["depths"]), hidden_sizes=list(args["dims"]))
        with torch.device("meta"):
            params = _count(DINOv3ConvNextModel(config))
        rows.append({
            "source": "transformers", "hf_hub_id": repo, "filename": "model.safetensors",
            "arch": size, "tag": "dinov3_lvd1689m_transformers", "same_weights_as": timm_cfg["timm_name"],
            "depths": list(config.depths), "dims": list(config.hidden_sizes),
            "norm_eps": config.layer_norm_eps, "num_classes": 0,
            # transformers' DINOv3 image processor: a straight resize to height x width.
            "input_size": [3, processor.size["height"], processor.size["width"]],
            "crop_pct": 1.0, "crop_mode": "squash",
            "interpolation": processor.resample.name.lower(),
            "mean": list(processor.image_mean), "std": list(processor.image_std),
            "license": "dinov3-license", "gated": True, "params": params,
        })
    return rows


def open_clip_rows():
    import open_clip
    import timm
    import torch
    from open_clip.timm_model import TimmModel

    rows = []
    for model, tag in OPEN_CLIP_ONLY:
        pretrained = open_clip.get_pretrained_cfg(model, tag)
        config = open_clip.get_model_config(model)
        vision = config["vision_cfg"]
        assert vision["timm_proj"] == "linear", (model, vision)  # an MLP projection: head_hidden_size
        with torch.device("meta"):
            tower = TimmModel(vision["timm_model_name"], config["embed_dim"], image_size=vision["image_size"],
                              pool=vision["timm_pool"], proj=vision["timm_proj"])
            as_loaded = timm.create_model(vision["timm_model_name"], num_classes=config["embed_dim"])
        rows.append({
            "source": "open_clip", "hf_hub_id": pretrained["hf_hub"].rstrip("/"),
            "filename": "open_clip_pytorch_model.bin", "open_clip": [model, tag],
            "arch": vision["timm_model_name"].split("_", 1)[1], "tag": "clip_" + tag,
            "timm_model": vision["timm_model_name"], "proj": vision["timm_proj"],
            "num_classes": config["embed_dim"],
            "input_size": [3, vision["image_size"], vision["image_size"]],
            # open_clip's 'shortest' resize mode: short side to size, then a center crop.
            "crop_pct": 1.0, "crop_mode": "center", "interpolation": pretrained["interpolation"],
            "mean": list(pretrained["mean"]), "std": list(pretrained["std"]),
            # The LAION repos state MIT.
            "license": "mit", "gated": False, "params": _count(as_loaded), "open_clip_params": _count(tower),
        })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    cfgs = timm_cfgs()
    extra = dinov3_transformers_rows(cfgs) + open_clip_rows()
    write_atomic(cfgs, os.path.join(args.output_dir, "timm_pretrained_cfgs.json"))
    write_atomic(extra, os.path.join(args.output_dir, "extra_sources.json"))
    print(f"Wrote {len(cfgs)} timm configs and {len(extra)} other sources to {args.output_dir}")


if __name__ == "__main__":
    main()
