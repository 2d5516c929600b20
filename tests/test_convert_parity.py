"""Parity: converted presets reproduce timm, official and transformers models.

Every parameter is randomised at realistic magnitudes (pitfalls §5). Logits,
the four stage outputs and the pooled embedding must match to 1e-4 of the
largest reference value, at 224x224 and 200x264. atto, femto, pico, nano and
tiny (V1 and V2) run by default; small, base, large, xlarge and huge are
marked slow (every one in the timm layout, the deepest of each family in all).
"""

import re

import numpy as np
import pytest
import torch

from tests.convert_helpers import (
    ALL_VARIANTS, SIZES, SMALL, hf_model, images, nchw, official_state_dict,
    prove_official, relative_error, timm_model,
)

TOLERANCE = 1e-4


def keras_name(timm_key):
    from convnext_zoo.layout import timm_to_keras_name

    return timm_to_keras_name(timm_key)[0]


# The deepest network of each family (27 blocks in stage 3: two-digit block
# names, the longest float32 accumulation) in every layout; the other large
# variants only differ in width, which no key mapping depends on, so they run
# in the timm layout alone.
DEEP = {("v1", "small"), ("v2", "base")}


def _params(layouts):
    cases = []
    for f, v in ALL_VARIANTS:
        for lay in layouts:
            if (f, v) in SMALL:
                marks = ()
            elif (f, v) in DEEP or lay == "timm":
                marks = pytest.mark.slow
            else:
                continue
            cases.append(pytest.param(f, v, lay, id=f"{f}-{v}-{lay}", marks=marks))
    return cases


def keras_outputs(preset, x):
    """Logits (or None), the four stage outputs and the pooled embedding (or None).

    One model is built; the stage outputs and the embedding are read from
    its graph, so the largest variants fit in memory.
    """
    import keras

    from convnext_zoo import from_preset
    from convnext_zoo.preset_dir import read_config

    head = read_config(preset)["head"]
    model = from_preset(preset, include_top=False) if head == "none" else from_preset(preset)
    backbone = model if head == "none" else model.backbone
    outputs = [backbone.pyramid_outputs[f"P{i}"] for i in range(2, 6)]
    if head != "none":
        outputs.append(model.head_norm.output)
    if head == "fc":
        outputs.append(model.output)
    probe = keras.Model(model.input, outputs)
    values = [np.asarray(v) for v in probe(x, training=False)]
    features = values[:4]
    embedding = values[4] if head != "none" else None
    logits = values[5] if head == "fc" else None
    return logits, features, embedding


@torch.no_grad()
def timm_outputs(model, x):
    """timm logits (or None), the four stage outputs and the pooled embedding."""
    t = nchw(x)
    logits = model(t).numpy() if model.num_classes else None
    embedding = model.forward_head(model.forward_features(t), pre_logits=True).numpy()
    stages = model.forward_intermediates(t, indices=4, intermediates_only=True)
    features = [f.numpy().transpose(0, 2, 3, 1) for f in stages]
    return logits, features, embedding


@torch.no_grad()
def test_forward_intermediates_equal_features_only():
    """The stage outputs used above are timm's `features_only` outputs."""
    import timm

    model = timm_model("v2", "atto")
    features_net = timm.create_model("convnextv2_atto", pretrained=False, features_only=True)
    trunk = {re.sub(r"^(stem|stages)\.(\d+)", r"\1_\2", k): v
             for k, v in model.state_dict().items() if not k.startswith("head.")}
    features_net.load_state_dict(trunk, strict=True)
    t = nchw(images(96, 128, batch=1))
    for ours, theirs in zip(
        model.forward_intermediates(t, indices=4, intermediates_only=True),
        features_net.eval()(t), strict=True,
    ):
        assert torch.equal(ours, theirs)


def assert_close(ours, reference, what):
    error = relative_error(ours, reference)
    assert error <= TOLERANCE, f"{what}: max |diff| / max |ref| = {error:.2e} > {TOLERANCE}"
    return error


def compare(preset, reference_fn, x_sizes=SIZES, embedding=True):
    for height, width in x_sizes:
        x = images(height, width, batch=1)
        logits, features, pooled = keras_outputs(preset, x)
        ref_logits, ref_features, ref_pooled = reference_fn(x)
        if ref_logits is not None:
            assert_close(logits, ref_logits, f"logits {height}x{width}")
        for i, (ours, ref) in enumerate(zip(features, ref_features, strict=True)):
            assert_close(ours, ref, f"stage {i} {height}x{width}")
        if embedding and ref_pooled is not None:
            assert_close(pooled, ref_pooled, f"embedding {height}x{width}")


@pytest.mark.parametrize("family,variant,layout", _params(["timm", "official"]))
def test_timm_and_official_parity(family, variant, layout, tmp_path):
    from timm.models import save_for_hf

    from convnext_zoo.convert import convert_checkpoint

    model = timm_model(family, variant)
    state = model.state_dict()
    if layout == "timm":
        save_for_hf(model, tmp_path / "src", safe_serialization=True)  # model.safetensors + config.json
        source = tmp_path / "src"
    else:
        official = official_state_dict(state)
        prove_official(official, family, variant, 1000, state)
        source = tmp_path / f"convnext_{variant}_1k_224_ema.pth"
        torch.save({"model": official, "epoch": 3}, source)
    config = convert_checkpoint(source, tmp_path / "preset")
    assert (config["family"], config["variant"], config["num_classes"]) == (family, variant, 1000)
    assert config["provenance"]["source_format"] == layout
    compare(tmp_path / "preset", lambda x: timm_outputs(model, x))


@pytest.mark.parametrize("family,variant,layout", _params(["transformers"]))
def test_transformers_parity(family, variant, layout, tmp_path):
    from convnext_zoo.convert import convert_checkpoint

    model = hf_model(family, variant)
    model.save_pretrained(tmp_path / "src")
    config = convert_checkpoint(tmp_path / "src", tmp_path / "preset")
    assert config["provenance"]["source_format"] == "transformers"
    assert (config["family"], config["variant"]) == (family, variant)

    @torch.no_grad()
    def reference(x):
        out = model(pixel_values=nchw(x), output_hidden_states=True)
        hidden = [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states[1:]]
        # transformers' pooled LayerNorm uses eps 1e-12 (official: 1e-6); the
        # difference is far below the tolerance at these magnitudes.
        base = getattr(model, "convnext", None) or model.convnextv2
        pooled = base(pixel_values=nchw(x)).pooler_output.numpy()
        return out.logits.numpy(), hidden, pooled

    compare(tmp_path / "preset", reference)


def test_v1_22k_head_official(tmp_path):
    from convnext_zoo.convert import convert_checkpoint

    model = timm_model("v1", "tiny", num_classes=21841)
    official = official_state_dict(model.state_dict())
    prove_official(official, "v1", "tiny", 21841, model.state_dict())
    torch.save({"model": official}, tmp_path / "convnext_tiny_22k_224.pth")
    config = convert_checkpoint(tmp_path / "convnext_tiny_22k_224.pth", tmp_path / "preset")
    assert config["num_classes"] == 21841 and config["label_set"] == "imagenet-22k"
    compare(tmp_path / "preset", lambda x: timm_outputs(model, x), x_sizes=[(200, 264)])


def test_v2_fcmae_official_headless(tmp_path):
    from convnext_zoo.convert import convert_checkpoint
    from convnext_zoo import from_preset

    model = timm_model("v2", "atto", num_classes=0)
    official = {k: v for k, v in official_state_dict(model.state_dict()).items()
                if not k.startswith("norm.")}
    prove_official(official, "v2", "atto", 0, model.state_dict())
    path = tmp_path / "convnextv2_atto_1k_224_fcmae.pt"
    torch.save({"model": official}, path)

    config = convert_checkpoint(path, tmp_path / "preset")
    assert (config["head"], config["num_classes"]) == ("none", 0)
    compare(tmp_path / "preset", lambda x: timm_outputs(model, x), embedding=False)

    # A classifier only on request, with the fresh head stated in the config.
    config = convert_checkpoint(path, tmp_path / "clf", init_head=True, num_classes=10)
    assert (config["head"], config["num_classes"]) == ("fc", 10)
    assert config["provenance"]["fresh_variables"] == sorted(
        keras_name(f"head.{m}.{p}") for m in ("fc", "norm") for p in ("weight", "bias"))
    classifier = from_preset(tmp_path / "clf")
    assert classifier.output.shape[-1] == 10
    # The fresh head is randomly initialised (the converter skips only the
    # init of the backbone it overwrites).
    kernel = np.asarray(classifier.get_layer("head_fc").kernel)
    assert 0.01 < kernel.std() < 0.03


def test_timm_headless_embedding_checkpoint(tmp_path):
    """A timm num_classes=0 model keeps head.norm: it converts to the embedding model."""
    from timm.models import save_for_hf

    from convnext_zoo.convert import convert_checkpoint

    model = timm_model("v2", "atto", num_classes=0)
    save_for_hf(model, tmp_path / "src", safe_serialization=True)
    config = convert_checkpoint(tmp_path / "src", tmp_path / "preset")
    assert (config["head"], config["num_classes"]) == ("norm", 0)
    compare(tmp_path / "preset", lambda x: timm_outputs(model, x), x_sizes=[(224, 224)])


def test_half_precision_storage(tmp_path):
    from timm.models import save_for_hf

    from convnext_zoo.convert import convert_checkpoint
    from convnext_zoo import from_preset

    model = timm_model("v2", "atto")
    save_for_hf(model, tmp_path / "src", safe_serialization=True)
    x = images(64, 64, batch=1)
    with torch.no_grad():
        reference = model(nchw(x)).numpy()
    for dtype in ("float16", "bfloat16"):
        config = convert_checkpoint(tmp_path / "src", tmp_path / dtype, dtype=dtype)
        assert config["weights_dtype"] == dtype
        size = (tmp_path / dtype / "model.safetensors").stat().st_size
        full = sum(p.numel() for p in model.parameters()) * 2
        assert size < full * 1.01
        logits = np.asarray(from_preset(tmp_path / dtype)(x))
        assert relative_error(logits, reference) < 0.05
