"""Architecture options beyond the official network: converted from timm, official and
transformers checkpoints, proven against the source, written back for timm.

timm's small models with 1x1-conv MLPs (`convnext_atto`), overlapping stems
(`*_ols`), SimpleNorm and RMS norms (`zepto_rms`, `atto_rms`), a norm
epsilon other than 1e-6 and depths and widths of no named variant: every
parameter randomised (tests/convert_helpers.py), converted by this package,
and the logits, the four stage outputs and the pooled embedding compared to
1e-4 of the largest reference value at 224x224 and 97x131. Write-back: the
converted Keras model saved in timm's layout loads in timm (strict) and
computes the source's logits.
"""

import json

import numpy as np
import pytest
import torch

from tests.convert_helpers import (
    images, nchw, official_state_dict, randomise, relative_error,
)
from tests.test_convert_parity import TOLERANCE, compare, keras_outputs, timm_outputs

ODD_SIZES = [(224, 224), (97, 131)]
# timm architecture -> the preset fields its conversion must record.
TIMM_OPTIONS = {
    "convnext_atto": dict(conv_mlp=True, stem="patchify", norm_layer="layer_norm"),
    "convnext_atto_ols": dict(conv_mlp=True, stem="overlap_tiered", norm_layer="layer_norm"),
    "convnext_zepto_rms": dict(conv_mlp=True, stem="patchify", norm_layer="simple_norm"),
    "convnext_zepto_rms_ols": dict(conv_mlp=True, stem="overlap_act", norm_layer="simple_norm"),
    "convnext_atto_rms": dict(conv_mlp=True, stem="patchify", norm_layer="rms_norm"),
}
CUSTOM_DEPTHS, CUSTOM_DIMS = (1, 1, 3, 1), (24, 48, 96, 192)


def random_timm(arch, num_classes=1000, **kwargs):
    import timm

    return randomise(timm.create_model(arch, pretrained=False, num_classes=num_classes,
                                       **kwargs)).eval()


def save_timm(model, folder):
    from timm.models import save_for_hf

    save_for_hf(model, folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("arch", list(TIMM_OPTIONS))
def test_timm_architecture_options_parity(arch, tmp_path):
    from convnext_zoo.convert import convert_checkpoint

    model = random_timm(arch)
    config = convert_checkpoint(save_timm(model, tmp_path / "src"), tmp_path / "preset")
    expected = dict(TIMM_OPTIONS[arch], family="v1", variant="custom", norm_epsilon=1e-6)
    assert {k: config[k] for k in expected} == expected
    assert (config["depths"], config["hidden_dims"]) == (
        [len(s.blocks) for s in model.stages],
        [s.blocks[0].conv_dw.out_channels for s in model.stages],
    )
    # Written in timm's layout (timm builds every option) under timm's name.
    document = json.loads((tmp_path / "preset" / "config.json").read_text())
    assert (document["architecture"], document.get("model_args", {})) == (arch, {})
    compare(tmp_path / "preset", lambda x: timm_outputs(model, x), x_sizes=ODD_SIZES)


@pytest.mark.parametrize("side", [32, 125])
def test_overlapping_stem_small_inputs(side, tmp_path):
    """An `_ols` model at a small static size: stage sizes as planned for its own stem.

    At 125 px the overlapping stem's last map is 4 px with the reference
    strides, so nothing is lowered and the model is timm's; at 32 px strides
    are lowered and every stage output has the size `feature_sizes` plans.
    """
    from convnext_zoo import from_preset
    from convnext_zoo.convert import convert_checkpoint
    from convnext_zoo.variants import STANDARD_STRIDES, feature_sizes

    model = random_timm("convnext_atto_ols")
    convert_checkpoint(save_timm(model, tmp_path / "src"), tmp_path / "preset")
    loaded = from_preset(tmp_path / "preset", preprocessing=False, input_shape=(side, side, 3))
    backbone = loaded.backbone
    assert backbone.stem == "overlap_tiered"
    planned = feature_sizes(side, backbone.strides, backbone.stem)
    assert [backbone.pyramid_outputs[f"P{i}"].shape[1:3] for i in range(2, 6)] == [(s, s) for s in planned]
    assert planned[-1] >= 4
    x = images(side, side, batch=1)
    if side == 125:
        assert backbone.strides == STANDARD_STRIDES
        with torch.no_grad():
            reference = model(nchw(x)).numpy()
        assert relative_error(np.asarray(loaded(x, training=False)), reference) <= TOLERANCE
    else:
        assert backbone.strides == (4, 2, 1, 1)
        assert np.isfinite(np.asarray(loaded(x, training=False))).all()


def test_norm_epsilon_from_timm_model_args(tmp_path):
    """A custom timm ConvNeXt with norm_eps (as xxlarge's 1e-5, made large enough to matter)."""
    from convnext_zoo import from_preset
    from convnext_zoo.convert import convert_checkpoint
    from convnext_zoo.timm_format import from_timm_architecture

    model = random_timm("convnext_tiny", depths=CUSTOM_DEPTHS, dims=CUSTOM_DIMS, norm_eps=0.05)
    config = convert_checkpoint(save_timm(model, tmp_path / "src"), tmp_path / "preset")
    assert (config["norm_epsilon"], config["variant"]) == (0.05, "custom")
    compare(tmp_path / "preset", lambda x: timm_outputs(model, x), x_sizes=ODD_SIZES)
    # The epsilon is used, not only recorded: at 1e-6 the same weights differ.
    loaded = from_preset(tmp_path / "preset")
    changed = loaded.get_config()
    changed["backbone"]["config"]["norm_epsilon"] = 1e-6
    other = type(loaded).from_config(changed)
    other.set_weights(loaded.get_weights())
    x = images(64, 64, batch=1)
    assert relative_error(other(x), loaded(x)) > 10 * TOLERANCE
    # timm's xxlarge is read with its own epsilon.
    assert from_timm_architecture("convnext_xxlarge")["norm_epsilon"] == 1e-5


def test_timm_table_matches_timm_models():
    """Every TIMM_ARCHITECTURES row: timm's stem, norm class and epsilon, MLP form, shape."""
    import timm
    from timm.layers import LayerNorm2d, RmsNorm2d, SimpleNorm2d

    from convnext_zoo.timm_format import TIMM_ARCHITECTURES, from_timm_architecture
    from convnext_zoo.variants import STEMS

    norms = {LayerNorm2d: "layer_norm", SimpleNorm2d: "simple_norm", RmsNorm2d: "rms_norm"}
    for name in TIMM_ARCHITECTURES:
        row = from_timm_architecture(name)
        model = timm.create_model(name, pretrained=False, device="meta")
        assert [len(s.blocks) for s in model.stages] == list(row["depths"]), name
        assert [s.blocks[0].conv_dw.out_channels for s in model.stages] == list(row["hidden_dims"])
        assert hasattr(model.stages[0].blocks[0].mlp, "grn") == (row["family"] == "v2"), name
        assert model.stages[0].blocks[0].use_conv_mlp == row["conv_mlp"], name
        assert len(model.stem) == len(STEMS[row["stem"]]), name
        stem_norm = model.stem[-1]
        assert norms[type(stem_norm)] == row["norm_layer"], name
        assert stem_norm.eps == row["norm_epsilon"], name
        assert type(model.head.norm) is type(stem_norm) and model.head.norm.eps == stem_norm.eps
        if row["stem"] != "patchify":
            assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (2, 2)


def test_custom_shape_from_transformers(tmp_path):
    """The issue's case: ConvNextForImageClassification at atto's shape (no V1 variant)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from convnext_zoo.convert import convert_checkpoint

    hf_config = ConvNextConfig(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], num_labels=10)
    model = randomise(ConvNextForImageClassification(hf_config)).eval()
    model.save_pretrained(tmp_path / "src")
    config = convert_checkpoint(tmp_path / "src", tmp_path / "preset")
    assert (config["family"], config["variant"], config["depths"], config["hidden_dims"]) == (
        "v1", "custom", [2, 2, 6, 2], [40, 80, 160, 320])
    assert config["conv_mlp"] is False

    @torch.no_grad()
    def reference(x):
        out = model(pixel_values=nchw(x), output_hidden_states=True)
        hidden = [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states[1:]]
        pooled = model.convnext(pixel_values=nchw(x)).pooler_output.numpy()
        return out.logits.numpy(), hidden, pooled

    compare(tmp_path / "preset", reference, x_sizes=ODD_SIZES)


def test_custom_shape_from_timm_and_official_reloads_and_loads_in_timm(tmp_path):
    import timm

    from convnext_zoo.convert import convert_checkpoint

    model = random_timm("convnextv2_tiny", depths=CUSTOM_DEPTHS, dims=CUSTOM_DIMS, num_classes=7)
    config = convert_checkpoint(save_timm(model, tmp_path / "src"), tmp_path / "preset")
    assert (config["family"], config["variant"], config["depths"], config["hidden_dims"]) == (
        "v2", "custom", list(CUSTOM_DEPTHS), list(CUSTOM_DIMS))
    compare(tmp_path / "preset", lambda x: timm_outputs(model, x), x_sizes=[(97, 131)])
    # The written preset is timm's too: its base architecture and model_args.
    document = json.loads((tmp_path / "preset" / "config.json").read_text())
    assert document["architecture"] == "convnextv2_tiny"
    assert document["model_args"] == {"depths": list(CUSTOM_DEPTHS), "dims": list(CUSTOM_DIMS)}
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'preset'}", pretrained=True).eval()
    x = nchw(images(64, 64, batch=1))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))

    official = official_state_dict(model.state_dict())
    torch.save({"model": official}, tmp_path / "custom.pth")
    config = convert_checkpoint(tmp_path / "custom.pth", tmp_path / "from_official")
    assert (config["variant"], config["depths"]) == ("custom", list(CUSTOM_DEPTHS))
    compare(tmp_path / "from_official", lambda x: timm_outputs(model, x), x_sizes=[(224, 224)])


def test_custom_shape_in_keras_layouts(tmp_path):
    """Keras' own weights layout and a keras-hub preset of a custom model reload as it."""
    from convnext_zoo import ConvNeXtBackbone, ConvNeXtImageClassifier, from_preset, save_preset
    from tests.test_models import _randomize

    backbone = ConvNeXtBackbone(CUSTOM_DEPTHS, CUSTOM_DIMS, norm_layer="rms_norm",
                                stem="overlap", norm_epsilon=1e-4)
    model = ConvNeXtImageClassifier(backbone, num_classes=5)
    _randomize(model, np.random.default_rng(0))
    config = save_preset(model, tmp_path / "keras", layout="keras")
    assert (config["variant"], config["depths"], config["stem"], config["norm_layer"],
            config["norm_epsilon"]) == ("custom", list(CUSTOM_DEPTHS), "overlap", "rms_norm", 1e-4)
    x = images(97, 131, batch=1)
    expected = np.asarray(model(x))
    assert relative_error(from_preset(tmp_path / "keras")(x), expected) <= 1e-6
    model.save_to_preset(str(tmp_path / "keras_hub"))
    assert relative_error(from_preset(tmp_path / "keras_hub")(x), expected) <= 1e-6
    logits, _, _ = keras_outputs(tmp_path / "keras", x)
    assert relative_error(logits, expected) <= 1e-6


@pytest.mark.parametrize("arch", ["convnext_atto", "convnext_zepto_rms_ols"])
def test_write_back_loads_in_timm(arch, tmp_path):
    """Converted, loaded in Keras, saved in timm's layout: timm loads it and computes the same."""
    import timm
    from safetensors.numpy import load_file

    from convnext_zoo import from_preset, save_preset
    from convnext_zoo.convert import convert_checkpoint

    model = random_timm(arch)
    convert_checkpoint(save_timm(model, tmp_path / "src"), tmp_path / "preset", layout="keras")
    keras_model = from_preset(tmp_path / "preset")
    save_preset(keras_model, tmp_path / "timm", layout="timm")
    state = load_file(str(tmp_path / "timm" / "model.safetensors"))
    assert state["stages.0.blocks.0.mlp.fc1.weight"].ndim == 4  # the 1x1-conv layout
    reloaded = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "timm" / "model.safetensors"))).eval()
    x = images(97, 131, batch=1)
    with torch.no_grad():
        reference = model(nchw(x)).numpy()
        assert relative_error(reloaded(nchw(x)).numpy(), reference) == 0.0
    assert relative_error(keras_model(x), reference) <= TOLERANCE


def test_bias_free_norm_without_a_timm_config_needs_norm_layer(tmp_path):
    from convnext_zoo.convert import convert_checkpoint
    from convnext_zoo.readers import ConversionError

    model = random_timm("convnext_atto_rms")
    save_timm(model, tmp_path / "src")
    (tmp_path / "src" / "config.json").unlink()
    with pytest.raises(ConversionError, match="cannot tell apart. Pass norm_layer='simple_norm'"):
        convert_checkpoint(tmp_path / "src" / "model.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    config = convert_checkpoint(tmp_path / "src" / "model.safetensors", tmp_path / "out",
                                norm_layer="rms_norm")
    assert config["norm_layer"] == "rms_norm"
    compare(tmp_path / "out", lambda x: timm_outputs(model, x), x_sizes=[(97, 131)])
    with pytest.raises(ConversionError, match="norm_layer='rms_norm'.*have a bias"):
        model = random_timm("convnext_atto")
        save_timm(model, tmp_path / "ln")
        convert_checkpoint(tmp_path / "ln", tmp_path / "out2", norm_layer="rms_norm")
