"""`verify`: run a source checkpoint and its converted preset side by side.

The source runs through an independent implementation: timm (timm and
official checkpoints, the latter through timm's own `checkpoint_filter_fn`)
or transformers (`ConvNext[V2]ForImageClassification`), loaded strictly.
Both models see the same images, preprocessed once by timm's eval transform
with the preset's settings. Maintainers run this before publishing.

Needs torch and timm (and transformers for transformers checkpoints).
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


def _reference_model(reader, source_format, config):
    """The source checkpoint in timm or transformers, loaded strictly.

    When the preset has no head, or its head was replaced at conversion
    (`init_head` / `backbone_only`), only the trunk is loaded and compared.
    """
    torch = _require("torch")
    state = {k: torch.from_numpy(np.array(reader.get(k), dtype=np.float32)) for k in reader.keys()}
    family, variant = config["family"], config["variant"]
    provenance = config["provenance"]
    trunk_only = config["head"] == "none" or bool(
        provenance.get("fresh_variables") or provenance.get("unused_source_tensors"))
    num_classes = 0 if trunk_only else config["num_classes"]
    if source_format == "transformers":
        transformers = _require("transformers")
        from convnext_zoo.preset_dir import backbone_arguments

        architecture = backbone_arguments(config)
        depths, dims = architecture["depths"], architecture["hidden_dims"]
        prefix = "ConvNextV2" if family == "v2" else "ConvNext"
        hf_config = getattr(transformers, f"{prefix}Config")(
            depths=list(depths), hidden_sizes=list(dims), num_labels=max(num_classes, 1))
        if num_classes:
            model = getattr(transformers, f"{prefix}ForImageClassification")(hf_config)
        else:
            model = getattr(transformers, f"{prefix}Model")(hf_config)
            base = "convnextv2." if family == "v2" else "convnext."
            state = {k.removeprefix(base): v for k, v in state.items()
                     if not k.startswith("classifier.")}
        model.load_state_dict(state, strict=not trunk_only)
        return model.eval(), "transformers", trunk_only
    timm = _require("timm")
    from timm.models.convnext import checkpoint_filter_fn

    from convnext_zoo.preset_dir import backbone_arguments
    from convnext_zoo.timm_format import timm_model_args

    # The architecture of the source itself: its MLP form too (a Linear
    # source in a 1x1-conv architecture would not load).
    architecture = backbone_arguments(config)
    arch, model_args = timm_model_args(family, variant, architecture)
    if not architecture["conv_mlp"] and timm_format_conv_mlp(arch):
        model_args["conv_mlp"] = False
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
    return model.eval(), "timm", trunk_only


def timm_format_conv_mlp(arch):
    """Whether timm's architecture `arch` stores its MLPs as 1x1 convs."""
    from convnext_zoo.timm_format import TIMM_ARCHITECTURES

    return bool(TIMM_ARCHITECTURES[arch].get("conv_mlp"))


def _reference_outputs(model, kind, batch):
    torch = _require("torch")
    x = torch.from_numpy(batch)
    with torch.no_grad():
        if kind == "timm":
            features = model.forward_features(x)
            logits = model.forward_head(features) if model.num_classes else None
        else:
            out = model(pixel_values=x, output_hidden_states=True)
            logits = getattr(out, "logits", None)
            features = out.hidden_states[-1]
    features = features.numpy().transpose(0, 2, 3, 1)
    return (None if logits is None else logits.numpy()), features


def _difference(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    max_abs = float(np.abs(ours - reference).max())
    return max_abs, max_abs / max(float(np.abs(reference).max()), 1e-12)


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
            reference value, for logits and for the last feature map.
        source_format: "auto", "official", "timm" or "transformers".
        checkpoint_key: as in `convert_checkpoint`.
        revision: Hub revision of `source`.

    Returns:
        A dict: `images`, `logits_max_abs`, `logits_relative`,
        `features_max_abs`, `features_relative`, `top1_agreement`,
        `top5_agreement` (None without a classifier, or when the head was
        replaced at conversion: then only the trunk is compared),
        `tolerance`, `passed`.

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
    weights_path = readers.find_weights(located.path) if os.path.isdir(located.path) else located.path
    reader = open_source(weights_path, checkpoint_key)
    detected = detect_format(reader.keys(), weights_path)
    if source_format not in ("auto", detected):
        raise CheckpointError(
            f"Received: source_format={source_format!r}, but {weights_path} is in "
            f"the {detected} layout."
        )
    batch, files = load_images(images, config)
    reference, kind, trunk_only = _reference_model(reader, detected, config)
    ref_logits, ref_features = _reference_outputs(reference, kind, batch)

    x = batch.transpose(0, 2, 3, 1)
    backbone = from_preset(preset, include_top=False, preprocessing=False)
    features = np.asarray(backbone(x, training=False))
    report = {"images": len(files), "reference": kind, "tolerance": tolerance}
    report["features_max_abs"], report["features_relative"] = _difference(features, ref_features)
    report.update(logits_max_abs=None, logits_relative=None, top1_agreement=None,
                  top5_agreement=None)
    if config["head"] == "fc" and not trunk_only:
        logits = np.asarray(from_preset(preset, preprocessing=False)(x, training=False))
        report["logits_max_abs"], report["logits_relative"] = _difference(logits, ref_logits)
        top5 = np.argsort(-logits, axis=1)[:, :5]
        ref_top5 = np.argsort(-ref_logits, axis=1)[:, :5]
        report["top1_agreement"] = float(np.mean(top5[:, 0] == ref_top5[:, 0]))
        report["top5_agreement"] = float(np.mean([set(a) == set(b) for a, b in zip(top5, ref_top5)]))
    relative = [report["features_relative"]]
    if report["logits_relative"] is not None:
        relative.append(report["logits_relative"])
    report["passed"] = bool(max(relative) <= tolerance)
    return report


def format_report(report):
    """The report as the lines `scripts/verify_checkpoint.py` prints."""
    def number(value):
        return "n/a" if value is None else f"{value:.3e}"

    lines = [
        f"images: {report['images']} (reference: {report['reference']})",
        f"logits:   max |diff| {number(report['logits_max_abs'])}, "
        f"relative {number(report['logits_relative'])}",
        f"features: max |diff| {number(report['features_max_abs'])}, "
        f"relative {number(report['features_relative'])}",
    ]
    if report["top1_agreement"] is not None:
        lines.append(f"top-1 agreement {report['top1_agreement']:.0%}, "
                     f"top-5 agreement {report['top5_agreement']:.0%}")
    lines.append(f"{'PASS' if report['passed'] else 'FAIL'} (tolerance {report['tolerance']:g} relative)")
    return "\n".join(lines)
