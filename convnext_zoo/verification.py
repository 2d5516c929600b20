"""`verify`: run a source checkpoint and its converted preset side by side.

The source runs through an independent implementation, loaded strictly:

* timm for timm and official checkpoints (the latter through timm's own
  `checkpoint_filter_fn`), built with the preset's architecture options
  (`timm_format.timm_model_args`: depths, widths, stem, norm, epsilon, MLP
  form) and head form (`head_norm_first`, `head_hidden_size`);
* transformers' `ConvNext[V2]ForImageClassification` (or `ConvNext[V2]Model`)
  for transformers checkpoints, of the preset's depths and widths;
* OpenCLIP for OpenCLIP model files: the whole CLIP model that
  `open_clip.create_model` builds from the `open_clip_config.json` beside the
  weights (nothing downloaded), the file loaded by `open_clip.load_checkpoint`;
* transformers' `DINOv3ConvNextModel` for DINOv3 repos, configured by the
  repo's `config.json`.

Both models see the same images, preprocessed once by timm's eval transform
with the preset's settings. Compared, each as max |difference| relative to
the largest reference value:

* features: the trunk's last feature map (before any head norm), always;
* logits: a classifier's output;
* embedding: what an embedding model returns: an OpenCLIP tower's projected
  image embedding (`encode_image` unnormalised: the normalised one follows
  from it, and its scale is the projection's), or, for a preset whose head is
  the norm (DINOv3, timm with `num_classes=0`), the pooled, normalised
  embedding (DINOv3's `pooler_output`);
* patch_features: for a preset whose head is the norm, the last feature map
  normalised at every position (`patch_features`; DINOv3's patch tokens).

A head replaced at conversion (`init_head`, `backbone_only`) cannot match the
source: then only the features are compared. Maintainers run this before
publishing (`convnext_zoo.publish.publish_preset`).

Needs torch and timm, plus transformers or open-clip-torch for those sources.
"""

import glob
import os

import numpy as np

from convnext_zoo.checkpoint_io import CheckpointError, detect_format, open_source
from convnext_zoo.optional import require

DEFAULT_TOLERANCE = 1e-4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Four photographs shipped inside the package (package data), so the default
# also works for an installed package, not only in a checkout.
DEFAULT_IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "images")


def _require(module, purpose="verify (the reference implementation)"):
    return require(module, purpose)


def load_images(images, config):
    """Image files -> one NCHW float32 batch, by timm's eval transform."""
    torch = _require("torch")
    _require("timm")
    import timm.data as timm_data
    from PIL import Image

    if images is None:
        images = DEFAULT_IMAGES
    if isinstance(images, (str, os.PathLike)) and os.path.isdir(images):
        images = sorted(p for p in glob.glob(os.path.join(images, "*"))
                        if p.lower().endswith(IMAGE_SUFFIXES))
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    images = [os.fspath(p) for p in images]
    if not images:
        raise ValueError(
            "verify needs at least one image. Received no image files; pass "
            f"images=<directory or list of {', '.join(IMAGE_SUFFIXES)} files>."
        )
    pre = config["preprocessing"]
    transform = timm_data.create_transform(
        input_size=(3, *config["image_size"]), crop_pct=pre["crop_pct"],
        crop_mode=pre["crop_mode"], interpolation=pre["interpolation"],
        mean=tuple(pre["mean"]), std=tuple(pre["std"]),
    )
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    return batch.numpy(), images


# How each source format's reference is named in the report.
REFERENCE_NAMES = {"official": "timm", "timm": "timm", "transformers": "transformers",
                   "open_clip": "open_clip", "dinov3": "transformers (DINOv3ConvNextModel)"}
# The outputs a report compares, in the order it prints them.
OUTPUTS = ("logits", "features", "embedding", "patch_features")


def _torch_state(reader):
    torch = _require("torch")
    return {k: torch.from_numpy(np.array(reader.get(k), dtype=np.float32)) for k in reader.keys()}


def _trunk_only(config):
    """Whether only the trunk can match: no head, or one replaced at conversion."""
    provenance = config["provenance"]
    return config["head"] == "none" or bool(
        provenance.get("fresh_variables") or provenance.get("unused_source_tensors"))


def _reference_model(reader, source_format, config, folder):
    """The source checkpoint in its reference implementation, loaded strictly.

    Returns:
        `(model, kind)`, kind one of "timm", "transformers", "open_clip",
        "dinov3" (what `_reference_outputs` runs).
    """
    if source_format == "open_clip":
        return _open_clip_model(reader.path, folder), "open_clip"
    if source_format == "dinov3":
        return _dinov3_model(reader, folder), "dinov3"
    if source_format == "transformers":
        return _transformers_model(reader, config), "transformers"
    return _timm_model(reader, source_format, config), "timm"


def _transformers_model(reader, config):
    transformers = _require("transformers")
    from convnext_zoo.preset_dir import backbone_arguments

    state = _torch_state(reader)
    trunk_only = _trunk_only(config)
    num_classes = 0 if trunk_only else config["num_classes"]
    architecture = backbone_arguments(config)
    prefix = "ConvNextV2" if config["family"] == "v2" else "ConvNext"
    hf_config = getattr(transformers, f"{prefix}Config")(
        depths=list(architecture["depths"]), hidden_sizes=list(architecture["hidden_dims"]),
        num_labels=max(num_classes, 1))
    if num_classes:
        model = getattr(transformers, f"{prefix}ForImageClassification")(hf_config)
    else:
        model = getattr(transformers, f"{prefix}Model")(hf_config)
        base = "convnextv2." if config["family"] == "v2" else "convnext."
        state = {k.removeprefix(base): v for k, v in state.items()
                 if not k.startswith("classifier.")}
    model.load_state_dict(state, strict=not trunk_only)
    return model.eval()


def _timm_model(reader, source_format, config):
    timm = _require("timm")
    from timm.models.convnext import checkpoint_filter_fn

    from convnext_zoo.preset_dir import backbone_arguments
    from convnext_zoo.timm_format import timm_args_from_options, timm_model_args

    state = _torch_state(reader)
    trunk_only = _trunk_only(config)
    # The architecture of the source itself: its MLP form too (a Linear
    # source in a 1x1-conv architecture would not load).
    architecture = backbone_arguments(config)
    arch, model_args = timm_model_args(config["family"], config["variant"], architecture)
    if not architecture["conv_mlp"] and timm_format_conv_mlp(arch):
        model_args["conv_mlp"] = False
    # The head's form (timm's `*_hnf` and `*_mlp`): timm builds norm_pre or
    # the pre-logits MLP only when asked.
    head = {key: config[key] for key in ("head_norm_first", "head_hidden_size") if config.get(key)}
    model_args.update(timm_args_from_options(head))
    num_classes = 0 if trunk_only else config["num_classes"]
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args)
    if source_format == "official":
        state = checkpoint_filter_fn(state, model)
    if trunk_only:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("head.")]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"timm could not load the source: {result}.")
    else:
        model.load_state_dict(state, strict=True)
    return model.eval()


def _open_clip_model(weights_path, folder):
    """OpenCLIP's CLIP model from the source's `open_clip_config.json`, the file loaded strictly."""
    open_clip = _require("open_clip", "verify (the OpenCLIP reference)")
    config_path = os.path.join(folder, "open_clip_config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"verify builds OpenCLIP's model from open_clip_config.json, and {folder} has "
            "none. Put the repo's open_clip_config.json beside the weights."
        )
    try:
        # Built from the config alone (load_weights=False, no tower weights
        # fetched), then the very file verified is loaded, strictly.
        model = open_clip.create_model(f"local-dir:{folder}", load_weights=False,
                                       pretrained_image=False, pretrained_text=False)
    except (KeyError, ValueError, RuntimeError, OSError) as error:
        raise CheckpointError(
            f"OpenCLIP cannot build its model from {config_path} ({type(error).__name__}: "
            f"{error}). verify needs the repo's own config (model_cfg with vision_cfg and "
            "text_cfg)."
        ) from None
    try:
        open_clip.load_checkpoint(model, weights_path, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(
            f"{weights_path} does not load into the OpenCLIP model of {config_path}: {first}"
        ) from None
    return model.eval()


def _dinov3_model(reader, folder):
    """transformers' DINOv3ConvNextModel configured by the repo's `config.json`, loaded strictly."""
    transformers = _require("transformers", "verify (the DINOv3 reference)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CheckpointError(
            f"verify builds transformers' DINOv3ConvNextModel from the repo's config.json, "
            f"and {folder} has none. Put the repo's config.json beside the weights."
        )
    model = transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig.from_pretrained(folder))
    # Files from `save_pretrained` leave out the encoder's "model." prefix.
    state = {key if key.startswith(("model.", "layer_norm.")) else f"model.{key}": value
             for key, value in _torch_state(reader).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def timm_format_conv_mlp(arch):
    """Whether timm's architecture `arch` stores its MLPs as 1x1 convs."""
    from convnext_zoo.timm_format import TIMM_ARCHITECTURES

    return bool(TIMM_ARCHITECTURES[arch].get("conv_mlp"))


def _timm_outputs(model, x):
    """features, logits, embedding and patch features of a timm ConvNeXt."""
    import torch

    trunk = model.stages(model.stem(x))
    # timm's forward_features ends with norm_pre (a norm for `*_hnf`, else
    # identity); one of norm_pre and head.norm is always the identity.
    mapped = model.norm_pre(trunk)
    return {
        "features": trunk,
        "logits": model.forward_head(mapped) if model.num_classes else None,
        "embedding": model.forward_head(mapped, pre_logits=True),
        "patch_features": getattr(model.head, "norm", torch.nn.Identity())(mapped),
    }


def _reference_outputs(model, kind, batch):
    """`{output name: NHWC or (batch, size) array, or None}` of the reference."""
    torch = _require("torch")
    x = torch.from_numpy(batch)
    with torch.no_grad():
        if kind == "timm":
            outputs = _timm_outputs(model, x)
        elif kind == "open_clip":
            outputs = {"features": _timm_outputs(model.visual.trunk, x)["features"],
                       "embedding": model.encode_image(x, normalize=False)}
        elif kind == "dinov3":
            out = model(pixel_values=x, output_hidden_states=True)
            features = out.hidden_states[-1]
            # Token 0 is the pooled one; the rest are the map's positions, row-major.
            patches = out.last_hidden_state[:, 1:].transpose(1, 2).reshape(features.shape)
            outputs = {"features": features, "embedding": out.pooler_output,
                       "patch_features": patches}
        else:
            out = model(pixel_values=x, output_hidden_states=True)
            outputs = {"features": out.hidden_states[-1], "logits": getattr(out, "logits", None)}
    arrays = {}
    for name, value in outputs.items():
        if value is not None:
            value = value.numpy()
            arrays[name] = value.transpose(0, 2, 3, 1) if value.ndim == 4 else value
    return arrays


def _difference(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    max_abs = float(np.abs(ours - reference).max())
    return max_abs, max_abs / max(float(np.abs(reference).max()), 1e-12)


def _compared(config, kind):
    """The outputs a preset and its source's reference both have, besides the features."""
    if _trunk_only(config):
        return ()
    if kind == "open_clip":
        # The classifier's Dense is the CLIP projection: its output is the embedding.
        return ("embedding",)
    if config["head"] == "norm":
        return ("embedding", "patch_features")
    return ("logits",) if config["head"] == "fc" else ()


def verify(source, preset, images=None, tolerance=DEFAULT_TOLERANCE, source_format="auto",
           checkpoint_key=None, revision=None):
    """Compares a source checkpoint and its converted preset on natural images.

    Args:
        source: the checkpoint given to `convert_checkpoint` (file, directory
            or Hub repo id).
        preset: the converted preset directory.
        images: a directory or list of image files; default: the images
            shipped in the package (`convnext_zoo/data/images`).
        tolerance: largest accepted max |difference| relative to the largest
            reference value, for every compared output.
        source_format: "auto", "official", "timm", "transformers",
            "open_clip" or "dinov3".
        checkpoint_key: as in `convert_checkpoint`.
        revision: Hub revision of `source`.

    Returns:
        A dict: `images`, `reference` (the implementation the source ran
        in), `{name}_max_abs` and `{name}_relative` for each of `OUTPUTS`
        (see the module docstring; None where not compared: `logits` for a
        classifier, `embedding` for an OpenCLIP tower or a preset whose head
        is the norm, `patch_features` for the latter, `features` always),
        `top1_agreement`, `top5_agreement` (for logits, else None),
        `tolerance`, and `passed`: every compared output within tolerance.

    Example:
        >>> report = convnext_zoo.verify("convnext_tiny_1k_224_ema.pth", "presets/tiny")  # doctest: +SKIP
        >>> report["passed"]  # doctest: +SKIP
        True
    """
    from convnext_zoo import readers, resolve
    from convnext_zoo.convert import source_handle
    from convnext_zoo.factory import from_preset
    from convnext_zoo.preset_dir import read_config

    config = read_config(preset)
    located = resolve.locate(source_handle(source), revision=revision)
    if os.path.isdir(located.path):
        folder, weights_path = located.path, readers.find_weights(located.path)
    else:
        folder, weights_path = os.path.dirname(os.path.abspath(located.path)), located.path
    reader = open_source(weights_path, checkpoint_key)
    detected = detect_format(reader.keys(), weights_path)
    if source_format not in ("auto", detected):
        raise CheckpointError(
            f"Received: source_format={source_format!r}, but {weights_path} is in "
            f"the {detected} layout."
        )
    batch, files = load_images(images, config)
    reference, kind = _reference_model(reader, detected, config, folder)
    expected = _reference_outputs(reference, kind, batch)
    del reference
    compared = _compared(config, kind)

    x = batch.transpose(0, 2, 3, 1)
    ours = {}
    if compared:
        model = from_preset(preset, preprocessing=False)
        ours["features"] = model.backbone(x, training=False)
        output = model(x, training=False)
        ours["logits" if "logits" in compared else "embedding"] = output
        if "patch_features" in compared:
            ours["patch_features"] = model.patch_features(x)
    else:
        ours["features"] = from_preset(preset, include_top=False, preprocessing=False)(x, training=False)
    report = {"images": len(files), "reference": REFERENCE_NAMES[detected], "tolerance": tolerance}
    for name in OUTPUTS:
        report[f"{name}_max_abs"] = report[f"{name}_relative"] = None
        if name in ours:
            ours[name] = np.asarray(ours[name])
            report[f"{name}_max_abs"], report[f"{name}_relative"] = _difference(
                ours[name], expected[name])
    report.update(top1_agreement=None, top5_agreement=None)
    if "logits" in ours:
        top5 = np.argsort(-ours["logits"], axis=1)[:, :5]
        ref_top5 = np.argsort(-expected["logits"], axis=1)[:, :5]
        report["top1_agreement"] = float(np.mean(top5[:, 0] == ref_top5[:, 0]))
        report["top5_agreement"] = float(np.mean([set(a) == set(b) for a, b in zip(top5, ref_top5)]))
    report["passed"] = bool(max(relative_differences(report).values()) <= tolerance)
    return report


def relative_differences(report):
    """`{output: relative difference}` of the outputs a report compared."""
    return {name: report[f"{name}_relative"] for name in OUTPUTS
            if report.get(f"{name}_relative") is not None}


def summary(report):
    """One line of the compared outputs' relative differences, e.g. "features 1.2e-06, logits 3.0e-06"."""
    return ", ".join(f"{name} {value:.1e}" for name, value in relative_differences(report).items())


def format_report(report):
    """The report as the lines `scripts/verify_checkpoint.py` prints."""
    def number(value):
        return "n/a" if value is None else f"{value:.3e}"

    def line(name, label):
        return (f"{label} max |diff| {number(report[f'{name}_max_abs'])}, "
                f"relative {number(report[f'{name}_relative'])}")

    lines = [
        f"images: {report['images']} (reference: {report['reference']})",
        line("logits", "logits:  "),
        line("features", "features:"),
    ]
    # Only where compared: older reports lack these keys.
    if report.get("embedding_relative") is not None:
        lines.append(line("embedding", "embedding:"))
    if report.get("patch_features_relative") is not None:
        lines.append(line("patch_features", "patch features:"))
    if report["top1_agreement"] is not None:
        lines.append(f"top-1 agreement {report['top1_agreement']:.0%}, "
                     f"top-5 agreement {report['top5_agreement']:.0%}")
    lines.append(f"{'PASS' if report['passed'] else 'FAIL'} (tolerance {report['tolerance']:g} relative)")
    return "\n".join(lines)
