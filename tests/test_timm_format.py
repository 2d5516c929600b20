"""timm-layout presets: timm loads them and computes what the Keras model computes.

A Keras ConvNeXt with every parameter randomised (pitfalls §5) is written
with `timm_state_dict` + `write_timm_weights` + `timm_config`, loaded by
timm itself (`local-dir:` here, `hf-hub:` from the local Hub server in a
subprocess) and run on the same scikit-image photographs: logits and
pooled embeddings agree to 1e-4 of the largest value. The same files read
back by this package's converter give the source variables exactly.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from convnext_zoo.optional import keep_triton_away

keep_triton_away()  # pitfalls §14: torch after TensorFlow must not import triton
torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer, point_client_at  # noqa: E402

import convnext_zoo  # noqa: E402
from convnext_zoo import weights  # noqa: E402
from convnext_zoo.timm_format import (  # noqa: E402
    TimmFormatError, timm_architecture, timm_config, timm_shapes, timm_state_dict,
    timm_support, write_timm_weights,
)
from convnext_zoo.variants import FAMILIES, default_preprocessing  # noqa: E402
from tests.conftest import photo  # noqa: E402
from tests.test_models import _randomize  # noqa: E402

TOLERANCE = 1e-4
PHOTOS = ("astronaut", "coffee", "chelsea")
ALL_VARIANTS = [(f, v) for f in FAMILIES for v in FAMILIES[f]]
# Too large to build in Keras in the default run; their shapes are still
# checked there through timm_shapes (which timm_state_dict enforces).
LARGE = {("v1", "large"), ("v1", "xlarge"), ("v2", "large"), ("v2", "huge")}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def create(family, variant, **kwargs):
    factory = convnext_zoo.create_convnext_v1 if family == "v1" else convnext_zoo.create_convnext_v2
    kwargs.setdefault("input_shape", (None, None, 3))
    return factory(variant, **kwargs)


def keras_arrays(model):
    return {name: v.numpy() for name, v in weights.keras_variables(model).items()}


def export(model, family, variant, directory, **config_options):
    """The timm directory of `model`: config.json + model.safetensors."""
    os.makedirs(directory, exist_ok=True)
    state = timm_state_dict(keras_arrays(model), family, variant)
    write_timm_weights(state, os.path.join(directory, "model.safetensors"))
    num_classes = model.num_classes if hasattr(model, "num_classes") else 0
    config = timm_config(
        family, variant, num_classes, [224, 224], default_preprocessing(),
        license="apache-2.0",
        **config_options,
    )
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    return str(directory)


def photos(size=224, channels=3):
    """The photographs, preprocessed as the config says: NHWC float32."""
    pre = default_preprocessing()
    images = np.stack([photo(name, (size, size)) for name in PHOTOS]).astype("float32") / 255.0
    if channels == 1:  # luminance, normalised with the mean of the three channel statistics
        images = images.mean(axis=-1, keepdims=True)
        return ((images - np.mean(pre["mean"])) / np.mean(pre["std"])).astype("float32")
    return (images - np.array(pre["mean"], "float32")) / np.array(pre["std"], "float32")


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@torch.no_grad()
def timm_output(model, x):
    return model.eval()(nchw(x)).numpy()


def relative_error(output, reference):
    output, reference = np.asarray(output, np.float64), np.asarray(reference, np.float64)
    assert output.shape == reference.shape, (output.shape, reference.shape)
    return float(np.abs(output - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def v2_atto(tmp_path_factory):
    """A randomised V2-atto classifier (1000 classes) and its timm directory."""
    model = create("v2", "atto", num_classes=1000)
    _randomize(model, np.random.default_rng(0))
    directory = export(model, "v2", "atto", tmp_path_factory.mktemp("timm") / "v2_atto")
    return model, directory


# === Names, shapes, config ===

def test_architecture_names_are_timm_models():
    names = [timm_architecture(f, v) for f, v in ALL_VARIANTS]
    assert names[:2] == ["convnext_tiny", "convnext_small"]
    assert "convnextv2_atto" in names and "convnextv2_huge" in names
    assert all(timm.is_model(name) for name in names)
    with pytest.raises(ValueError, match=r"variant='atoo'.*Did you mean 'atto'"):
        timm_architecture("v2", "atoo")


@pytest.mark.parametrize("family,variant", ALL_VARIANTS, ids=lambda p: str(p))
def test_timm_shapes_equal_timm_state_dict(family, variant):
    """Keys, order and shapes of timm's own model (built on the meta device: no memory)."""
    for num_classes, in_chans in ((1000, 3), (0, 1), (21841, 3)):
        with torch.device("meta"):
            model = timm.create_model(timm_architecture(family, variant), pretrained=False,
                                      num_classes=num_classes, in_chans=in_chans)
        reference = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
        assert list(timm_shapes(family, variant, num_classes, in_chans).items()) == reference


@pytest.mark.parametrize(
    "family,variant",
    [pytest.param(f, v, marks=pytest.mark.slow if (f, v) in LARGE else ())
     for f, v in ALL_VARIANTS],
    ids=lambda p: str(p),
)
def test_state_dict_of_keras_model_has_timm_shapes(family, variant):
    model = create(family, variant, num_classes=1000)
    state = timm_state_dict(keras_arrays(model), family, variant)
    with torch.device("meta"):
        reference = timm.create_model(timm_architecture(family, variant), pretrained=False)
    assert {k: v.shape for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert all(v.flags.c_contiguous for v in state.values())
    conv_mlp = variant in ("atto", "femto", "pico", "nano")
    assert state["stages.0.blocks.0.mlp.fc1.weight"].ndim == (4 if conv_mlp else 2)


def test_config_holds_what_timm_reads(v2_atto):
    from timm.models._hub import load_model_config_from_path

    _, directory = v2_atto
    pretrained_cfg, name, model_args = load_model_config_from_path(directory)
    assert name == "convnextv2_atto" and model_args == {}
    assert pretrained_cfg["input_size"] == [3, 224, 224]
    assert pretrained_cfg["num_classes"] == 1000 and pretrained_cfg["license"] == "apache-2.0"
    assert (pretrained_cfg["first_conv"], pretrained_cfg["classifier"]) == ("stem.0", "head.fc")
    with open(os.path.join(directory, "config.json")) as handle:
        config = json.load(handle)
    assert "convnext_zoo" not in config  # a plain timm directory
    section = {"schema_version": 2, "family": "v2"}
    assert timm_config("v2", "atto", 1000, 224, default_preprocessing(),
                       zoo_section=section)["convnext_zoo"] == section
    assert (config["num_features"], config["global_pool"]) == (320, "avg")
    labelled = timm_config("v1", "tiny", 2, 224, default_preprocessing(), label_names=["a", "b"],
                           in_channels=1, pooling="max")
    assert labelled["model_args"] == {"in_chans": 1, "global_pool": "max"}
    assert labelled["label_names"] == ["a", "b"]
    assert labelled["pretrained_cfg"]["input_size"] == [1, 224, 224]
    assert "convnext_zoo" not in labelled and "license" not in labelled["pretrained_cfg"]
    with pytest.raises(ValueError, match=r"`in_channels` must be an int >= 1\. Received: in_chann"):
        timm_config("v1", "tiny", 2, 224, default_preprocessing(), in_channels=0)
    with pytest.raises(ValueError, match="Received 1 label_names for num_classes=2"):
        timm_config("v1", "tiny", 2, 224, default_preprocessing(), label_names=["a"])
    with pytest.raises(ValueError, match=r"lacks crop_pct.*default_preprocessing"):
        timm_config("v1", "tiny", 2, 224, {"mean": [0], "std": [1], "crop_mode": "center",
                                           "interpolation": "bicubic"})


def test_module_imports_neither_keras_nor_torch():
    code = ("import sys, convnext_zoo.timm_format; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'keras', 'tensorflow', 'torch', 'timm', 'jax', 'safetensors'}))")
    env = dict(os.environ, CONVNEXT_ZOO_LIGHT_IMPORT="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# === timm loads the files and computes the same ===

@pytest.mark.parametrize("family,variant", [("v2", "atto"), ("v1", "tiny")])
def test_local_dir_logits_equal(family, variant, v2_atto, tmp_path):
    if (family, variant) == ("v2", "atto"):
        model, directory = v2_atto
    else:
        model = create(family, variant, num_classes=1000)
        _randomize(model, np.random.default_rng(1))
        directory = export(model, family, variant, tmp_path / "timm")
    loaded = timm.create_model("local-dir:" + directory, pretrained=True)
    assert loaded.num_classes == 1000
    x = photos()
    reference = np.asarray(model(x, training=False))
    assert np.abs(reference).max() > 1.0  # a live network, not a switched-off one
    assert relative_error(timm_output(loaded, x), reference) <= TOLERANCE


def test_local_dir_pooled_embedding_equal(tmp_path):
    model = create("v2", "atto", include_top=False, pooling="avg")
    _randomize(model, np.random.default_rng(2))
    directory = export(model, "v2", "atto", tmp_path / "timm")
    loaded = timm.create_model("local-dir:" + directory, pretrained=True)
    assert loaded.num_classes == 0
    x = photos()
    assert relative_error(timm_output(loaded, x), model(x, training=False)) <= TOLERANCE


def test_local_dir_one_input_channel(tmp_path):
    """in_chans=1 through model_args: timm's local-dir path builds a 1-channel stem."""
    model = create("v2", "atto", num_classes=5, input_shape=(None, None, 1))
    _randomize(model, np.random.default_rng(3))
    directory = export(model, "v2", "atto", tmp_path / "timm", in_channels=1)
    loaded = timm.create_model("local-dir:" + directory, pretrained=True)
    assert loaded.stem[0].in_channels == 1 and loaded.pretrained_cfg["input_size"][0] == 1
    x = photos(channels=1)
    assert relative_error(timm_output(loaded, x), model(x, training=False)) <= TOLERANCE


def test_local_dir_max_pooling(tmp_path):
    """timm's NormMlpClassifierHead with global_pool='max' is pool -> norm -> fc, as here."""
    model = create("v2", "atto", num_classes=7, pooling="max")
    _randomize(model, np.random.default_rng(4))
    assert timm_support("v2", "atto", pooling="max") == (True, None)
    directory = export(model, "v2", "atto", tmp_path / "timm", pooling="max")
    loaded = timm.create_model("local-dir:" + directory, pretrained=True)
    assert loaded.head.global_pool.pool_type == "max"
    x = photos()
    assert relative_error(timm_output(loaded, x), model(x, training=False)) <= TOLERANCE
    # ...and the average-pooling model computes something else.
    loaded_avg = timm.create_model("local-dir:" + directory, pretrained=True, global_pool="avg")
    assert relative_error(timm_output(loaded_avg, x), model(x, training=False)) > 0.01


_HUB_SCRIPT = """
import sys, numpy as np, timm, torch
model = timm.create_model("hf-hub:" + sys.argv[1], pretrained=True).eval()
x = np.load(sys.argv[2])
with torch.no_grad():
    np.save(sys.argv[3], model(torch.from_numpy(x)).numpy())
print(model.pretrained_cfg["hf_hub_id"], model.pretrained_cfg["license"])
"""


def test_pushed_repo_loads_in_timm_and_here_with_equal_logits(v2_atto, tmp_path, monkeypatch):
    """`push_to_hub` to the local Hub; timm (in a subprocess) and `from_preset` download it."""
    model, _ = v2_atto
    repo = "org/convnextv2-atto-timm"
    with HubServer() as server:
        point_client_at(server, tmp_path / "upload_home", monkeypatch)
        convnext_zoo.push_to_hub(model, repo)
        x = photos()
        ours = convnext_zoo.from_preset("hf://" + repo, preprocessing=False)
        np.save(tmp_path / "x.npy", np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "timm_home"),
                   HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", PYTHONPATH=ROOT)
        done = subprocess.run(
            [sys.executable, "-c", _HUB_SCRIPT, repo, str(tmp_path / "x.npy"),
             str(tmp_path / "logits.npy")],
            capture_output=True, text=True, env=env, timeout=120,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == [repo, "cc-by-nc-4.0"]
    expected = np.asarray(model(x, training=False))
    assert relative_error(np.load(tmp_path / "logits.npy"), expected) <= TOLERANCE
    np.testing.assert_array_equal(np.asarray(ours(x, training=False)), expected)


def test_converted_timm_checkpoint_loads_back_in_timm(tmp_path):
    """timm checkpoint -> convert_checkpoint -> timm `local-dir:`: the same network as the source."""
    from safetensors.torch import save_file

    source = timm.create_model("convnextv2_atto", num_classes=10)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for parameter in source.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2
                            + (1.0 if parameter.ndim == 1 else 0.0))
    (tmp_path / "timm_source").mkdir()
    save_file(source.state_dict(), str(tmp_path / "timm_source" / "model.safetensors"))
    config = convnext_zoo.convert_checkpoint(str(tmp_path / "timm_source"), str(tmp_path / "preset"))
    assert config["weights_layout"] == "timm" and config["timm"]["loadable"]
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'preset'}", pretrained=True)
    x = photos()
    expected = timm_output(source, x)
    assert relative_error(timm_output(reloaded, x), expected) <= TOLERANCE
    keras_model = convnext_zoo.from_preset(str(tmp_path / "preset"), preprocessing=False)
    assert relative_error(keras_model(x, training=False), expected) <= TOLERANCE


def test_small_input_models_are_written_in_keras_layout_and_say_why(tmp_path):
    from convnext_zoo import writer

    model = create("v2", "atto", num_classes=4, input_shape=(32, 32, 3))
    _randomize(model, np.random.default_rng(4))
    config = writer.save_preset(model, str(tmp_path / "small"))
    written = json.loads((tmp_path / "small" / "config.json").read_text())
    assert "architecture" not in written  # timm is never handed a network it would build differently
    assert written["convnext_zoo"]["timm"]["loadable"] is False
    assert "strides" in written["convnext_zoo"]["timm"]["reason"]
    assert config["weights_layout"] == "keras"
    reloaded = convnext_zoo.from_preset(str(tmp_path / "small"), preprocessing=False)
    assert tuple(reloaded.backbone.strides) == tuple(model.backbone.strides)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(reloaded(x)), np.asarray(model(x)))


# === This package reads the files back ===

def test_round_trip_through_the_converter(v2_atto):
    model, directory = v2_atto
    loaded = convnext_zoo.from_preset(directory, preprocessing=False)
    ours, theirs = keras_arrays(loaded), keras_arrays(model)
    assert list(ours) == list(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_round_trip_v1_embedding(tmp_path):
    from convnext_zoo import ConvNeXtBackbone, ConvNeXtImageClassifier, pipeline

    model = create("v1", "tiny", include_top=False, pooling="avg")
    _randomize(model, np.random.default_rng(5))
    directory = export(model, "v1", "tiny", tmp_path / "timm")
    checkpoint = pipeline.read_source(str(directory))
    config = checkpoint.config
    assert (checkpoint.source_format, config["family"], config["variant"],
            config["head"]) == ("timm", "v1", "tiny", "norm")
    rebuilt = pipeline.fill(checkpoint, directory, ConvNeXtBackbone, ConvNeXtImageClassifier).model
    for name, value in keras_arrays(model).items():
        np.testing.assert_array_equal(keras_arrays(rebuilt)[name], value, err_msg=name)


# === What timm cannot load ===

def test_headless_encoder_is_refused_by_timm(tmp_path):
    """An FCMAE-like backbone (no head LayerNorm): timm's strict load fails."""
    model = create("v2", "atto", include_top=False)
    ok, reason = timm_support("v2", "atto", head="none")
    assert not ok and "head.norm.weight" in reason
    state = timm_state_dict(keras_arrays(model), "v2", "atto")
    assert not any(k.startswith("head.") for k in state)
    directory = export(model, "v2", "atto", tmp_path / "timm")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*head\.norm\.weight"):
        timm.create_model("local-dir:" + directory, pretrained=True)


def test_lowered_strides_are_refused(tmp_path):
    """A 64 px static model runs with lowered strides: timm computes something else."""
    model = create("v2", "atto", num_classes=10, input_shape=(64, 64, 3))
    strides = model.backbone.strides
    assert tuple(strides) != (4, 2, 2, 2)
    ok, reason = timm_support("v2", "atto", strides=strides)
    assert not ok and "plan_strides" in reason and "input_shape=(None, None, C)" in reason
    assert timm_support("v2", "atto", strides=(4, 2, 2, 2)) == (True, None)
    _randomize(model, np.random.default_rng(6))
    directory = export(model, "v2", "atto", tmp_path / "timm")
    loaded = timm.create_model("local-dir:" + directory, pretrained=True)
    x = photos(size=64)
    assert relative_error(timm_output(loaded, x), model(x, training=False)) > 0.01


def test_support_answers():
    assert timm_support("v1", "tiny") == (True, None)
    assert timm_support("v2", "huge", head="norm", in_channels=1) == (True, None)
    ok, reason = timm_support("v1", "tiny", layer_scale=False)
    assert not ok and "layer scale" in reason
    assert not timm_support("v1", "tiny", pooling="avgmax")[0]
    with pytest.raises(ValueError, match="head='nrom'.*Did you mean 'norm'"):
        timm_support("v1", "tiny", head="nrom")


# === Errors ===

def test_error_lists_variables_without_timm_name():
    arrays = keras_arrays(create("v2", "atto", num_classes=3))
    arrays["extra_dense/kernel"] = np.zeros((3, 3), "float32")
    with pytest.raises(TimmFormatError) as error:
        timm_state_dict(arrays, "v2", "atto")
    message = str(error.value)
    assert "Keras variables with no timm name (1): extra_dense/kernel" in message
    assert "convnextv2_atto" in message and "'stages_0_blocks_0_mlp_fc1/kernel'" in message


def test_error_names_wrong_shapes_and_missing_keys():
    arrays = keras_arrays(create("v2", "atto", num_classes=3))
    with pytest.raises(TimmFormatError) as error:
        timm_state_dict(arrays, "v2", "femto")
    message = str(error.value)
    assert ("shape mismatch: Keras variable 'stem_0/kernel' has shape (4, 4, 3, 40) "
            "((40, 3, 4, 4) in timm layout); timm's 'stem.0.weight' has shape (48, 3, 4, 4)"
            ) in message
    assert "Check family=/variant=" in message
    del arrays["stages_1_blocks_0_mlp_grn/gamma"]
    arrays["stages_0_blocks_0_conv_dw/kernel"] = np.zeros((7, 7, 40), "float32")
    with pytest.raises(TimmFormatError) as error:
        timm_state_dict(arrays, "v2", "atto")
    message = str(error.value)
    assert ("- timm keys of convnextv2_atto with no Keras variable (1): "
            "stages.1.blocks.0.mlp.grn.weight") in message
    assert "'stages_0_blocks_0_conv_dw/kernel' has shape (7, 7, 40) (no timm layout)" in message
    assert "Expected a 4-D" in message


# === Writing ===

def test_write_is_contiguous_checked_and_atomic(tmp_path, monkeypatch):
    from safetensors import safe_open

    base = np.arange(24, dtype="float32").reshape(2, 3, 4)
    state = {"a": base.transpose(2, 0, 1), "b": np.ones(3, "float32")}  # a is not C-contiguous
    path = tmp_path / "model.safetensors"
    assert write_timm_weights(state, path, metadata={"note": "x"}) == 2
    with safe_open(str(path), framework="numpy") as handle:
        assert handle.metadata() == {"format": "pt", "note": "x"}
        np.testing.assert_array_equal(handle.get_tensor("a"), state["a"])
    # A writer that scrambles element order is caught on read-back; nothing is left.
    monkeypatch.setattr(weights, "_contiguous", lambda array: np.ascontiguousarray(array[::-1]))
    with pytest.raises(OSError, match="reads back different"):
        write_timm_weights(state, tmp_path / "bad.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    mixed = "one dtype of float32, float16, bfloat16.*: float16, float32"
    with pytest.raises(ValueError, match=mixed):
        write_timm_weights({"a": base, "b": base.astype("float16")}, tmp_path / "mixed.safetensors")


def test_half_precision_file_loads_in_timm(v2_atto, tmp_path):
    model, directory = v2_atto
    state = timm_state_dict(keras_arrays(model), "v2", "atto")
    half = tmp_path / "half"
    half.mkdir()
    half_state = {k: v.astype("float16") for k, v in state.items()}
    write_timm_weights(half_state, half / "model.safetensors")
    with open(os.path.join(directory, "config.json")) as handle:
        (half / "config.json").write_text(handle.read())
    loaded = timm.create_model(f"local-dir:{half}", pretrained=True)
    x = photos()
    assert relative_error(timm_output(loaded, x), model(x, training=False)) < 0.01
