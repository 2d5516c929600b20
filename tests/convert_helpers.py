"""Reference models with every parameter randomised, in the three checkpoint layouts."""

import re

import numpy as np
import torch

from convnext_zoo.variants import FAMILIES

# The 13 variant configurations.
ALL_VARIANTS = [("v1", v) for v in FAMILIES["v1"]] + [("v2", v) for v in FAMILIES["v2"]]
SMALL = {("v2", "atto"), ("v2", "femto"), ("v2", "pico"), ("v2", "nano"), ("v1", "tiny"), ("v2", "tiny")}
SIZES = [(224, 224), (200, 264)]


def timm_arch(family, variant):
    return f"convnext{'v2' if family == 'v2' else ''}_{variant}"


@torch.no_grad()
def randomise(model, seed=0):
    """Every parameter random, at realistic magnitudes (pitfalls §5).

    Weights ~ N(0, 1/fan_in); norm and GRN scales ~ 1 + N(0, 0.25^2) (GRN
    gamma ~ N(0, 0.5^2)); biases ~ N(0, 0.1^2); layer scale ~ N(0.5, 0.2^2).
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(p, mean, std):
        p.copy_(torch.randn(p.shape, generator=generator) * std + mean)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith(("grn.weight", "grn.gamma")):
            normal(p, 0.0, 0.5)
        elif name.endswith(("grn.bias", "grn.beta")):
            normal(p, 0.0, 0.1)
        elif leaf in ("gamma", "layer_scale_parameter"):
            normal(p, 0.5, 0.2)
        elif leaf == "bias":
            normal(p, 0.0, 0.1)
        elif p.ndim == 0:  # a scalar (CLIP's logit scale)
            normal(p, 0.0, 1.0)
        elif p.ndim == 1:  # LayerNorm scales
            normal(p, 1.0, 0.25)
        else:
            fan_in = p[0].numel()
            normal(p, 0.0, fan_in ** -0.5)
    return model


def timm_model(family, variant, num_classes=1000, seed=0, **kwargs):
    import timm

    model = timm.create_model(timm_arch(family, variant), pretrained=False,
                              num_classes=num_classes, **kwargs)
    return randomise(model, seed).eval()


def official_state_dict(timm_state):
    """timm state dict -> official layout (the inverse of timm's checkpoint_filter_fn)."""
    out = {}
    for key, value in timm_state.items():
        k = key
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc", ".pwconv")
        if ".mlp.grn." in k:
            k = k.replace(".mlp.grn.weight", ".grn.gamma").replace(".mlp.grn.bias", ".grn.beta")
            value = value.reshape(1, 1, 1, -1)
        k = re.sub(r"^head\.norm\.", "norm.", k)
        k = re.sub(r"^head\.fc\.", "head.", k)
        if ".pwconv" in k and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[k] = value.clone().contiguous()
    return out


def prove_official(official, family, variant, num_classes, reference_state):
    """Loads `official` into timm via timm's own checkpoint_filter_fn, strictly."""
    import timm
    from timm.models.convnext import checkpoint_filter_fn

    fresh = timm.create_model(timm_arch(family, variant), pretrained=False, num_classes=num_classes)
    filtered = checkpoint_filter_fn(dict(official), fresh)
    strict = "norm.weight" in official  # FCMAE has no head norm by design
    result = fresh.load_state_dict(filtered, strict=strict)
    if not strict:
        assert sorted(result.missing_keys) == ["head.norm.bias", "head.norm.weight"], result
        assert not result.unexpected_keys
    for key, value in fresh.state_dict().items():
        if key in filtered:
            assert torch.equal(value, reference_state[key]), key


def hf_model(family, variant, num_classes=1000, seed=0):
    from transformers import (
        ConvNextConfig, ConvNextForImageClassification,
        ConvNextV2Config, ConvNextV2ForImageClassification,
    )

    depths, dims = FAMILIES[family][variant]
    config_cls, model_cls = (
        (ConvNextConfig, ConvNextForImageClassification) if family == "v1"
        else (ConvNextV2Config, ConvNextV2ForImageClassification)
    )
    config = config_cls(depths=list(depths), hidden_sizes=list(dims), num_labels=num_classes)
    return randomise(model_cls(config), seed).eval()


def images(height, width, batch=2, seed=0):
    return np.random.RandomState(seed).randn(batch, height, width, 3).astype("float32")


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def relative_error(output, reference):
    output, reference = np.asarray(output, np.float64), np.asarray(reference, np.float64)
    assert output.shape == reference.shape, (output.shape, reference.shape)
    return float(np.abs(output - reference).max() / np.abs(reference).max())
