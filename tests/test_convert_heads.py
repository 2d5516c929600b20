"""Head options, CLIP image towers and DINOv3: converted presets against their references.

Every reference has every parameter randomised (pitfalls §5) and goes
through the real loading pipeline (`convert_checkpoint` or `from_preset` on
a directory, and one case per new source format through the local Hub
server). Outputs must match to 1e-4 of the largest reference value.

* timm's head forms: `head_norm_first` (`convnext_tiny_hnf`: norm on the
  feature map, then pool) and `head_hidden_size` (`convnext_large_mlp`:
  pool, norm, fc + GELU, fc), built on V2 atto to stay small; the
  preset written back in timm's layout loads in timm to the same weights.
* OpenCLIP image towers (linear and MLP projection) from OpenCLIP's own
  file (`open_clip_model.safetensors` with its text tower), and a
  timm-hosted CLIP tower (timm's `checkpoint_filter_fn` of the same file):
  the output is `encode_image`.
* DINOv3 from a transformers `DINOv3ConvNextModel` (`save_pretrained`) and
  from timm's layout: the pooled output and the normalised patch features
  (`last_hidden_state`).
"""

import importlib
import json
import os
import sys

import numpy as np
import pytest
import torch

from tests.convert_helpers import images, nchw, randomise, relative_error

TOLERANCE = 1e-4
SIZES = [(224, 224), (200, 264)]


def close(ours, reference, what):
    error = relative_error(ours, reference)
    assert error <= TOLERANCE, f"{what}: max |diff| / max |ref| = {error:.2e} > {TOLERANCE}"


def keras_head_outputs(model, x):
    """(model output, pooled embedding) of a converted classifier: one probe, one call."""
    import keras

    probe = keras.Model(model.input, [model.output, model.embedding_output])
    return [np.asarray(v) for v in probe(x, training=False)]


# === timm's head options ===


def timm_head_model(num_classes=10, **head):
    import timm

    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=num_classes, **head)
    return randomise(model, seed=3).eval()


@torch.no_grad()
def check_against_timm(converted, model):
    """Logits and pooled embedding (timm's pre_logits) at 224 px and an odd size."""
    for height, width in SIZES:
        x = images(height, width, batch=1)
        logits, embedding = keras_head_outputs(converted, x)
        t = nchw(x)
        close(logits, model(t).numpy(), f"logits {height}x{width}")
        reference = model.forward_head(model.forward_features(t), pre_logits=True).numpy()
        close(embedding, reference, f"embedding {height}x{width}")


@pytest.mark.parametrize("head", [{"head_norm_first": True}, {"head_hidden_size": 48}],
                         ids=["head_norm_first", "head_hidden_size"])
def test_timm_head_options_convert_and_write_back(head, tmp_path):
    import timm
    from timm.models import save_for_hf

    from convnext_zoo import from_preset
    from convnext_zoo.convert import convert_checkpoint
    from convnext_zoo.preset_dir import read_config

    model = timm_head_model(**head)
    save_for_hf(model, tmp_path / "src", safe_serialization=True)
    config = convert_checkpoint(tmp_path / "src", tmp_path / "preset")
    expected = {"head_norm_first": False, "head_hidden_size": None, **head}
    assert {k: config[k] for k in expected} == expected
    assert read_config(tmp_path / "preset")["timm"]["loadable"]

    converted = from_preset(tmp_path / "preset", preprocessing=False)
    assert {k: getattr(converted, k) for k in expected} == expected
    check_against_timm(converted, model)

    # Written back in timm's layout: timm builds the same head and loads the
    # very same tensors, strictly.
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'preset'}", pretrained=True).eval()
    reference = model.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(reference)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, reference[key]), key

    # The config round-trips through Keras serialisation.
    clone = type(converted).from_config(converted.get_config())
    assert {k: getattr(clone, k) for k in expected} == expected
    assert [w.shape for w in clone.weights] == [w.shape for w in converted.weights]


def test_head_options_refuse_each_other():
    from convnext_zoo import ConvNeXtBackbone, ConvNeXtImageClassifier

    backbone = ConvNeXtBackbone((1, 1, 1, 1), (8, 16, 24, 32))
    with pytest.raises(ValueError, match=r"exclude each other.*head_hidden_size=16"):
        ConvNeXtImageClassifier(backbone, 4, head_norm_first=True, head_hidden_size=16)
    with pytest.raises(ValueError, match=r"head_hidden_size=0"):
        ConvNeXtImageClassifier(backbone, 4, head_hidden_size=0)


def test_timm_hnf_architecture_name_is_accepted_and_checked():
    """timm's `convnext_tiny_hnf` is V1 tiny with head_norm_first; its name must agree with the tensors."""
    from convnext_zoo.readers import ConversionError, _timm_sidecar_architecture
    from convnext_zoo.variants import V1_VARIANTS

    def check(name, variant, **head):
        depths, dims = V1_VARIANTS[variant]
        arch = {"depths": depths, "hidden_dims": dims, "stem": "patchify"}
        options = {"head_norm_first": False, "head_hidden_size": None, **head}
        return _timm_sidecar_architecture({"config.json": {"architecture": name}}, arch, "v1", options, "f")

    assert check("convnext_tiny_hnf", "tiny", head_norm_first=True)["hidden_dims"] == V1_VARIANTS["tiny"][1]
    with pytest.raises(ConversionError, match="convnext_tiny_hnf"):
        check("convnext_tiny_hnf", "tiny")
    assert check("convnext_large_mlp", "large", head_hidden_size=1536)["depths"] == (3, 3, 27, 3)
    with pytest.raises(ConversionError, match="convnext_large_mlp"):
        check("convnext_large_mlp", "large", head_hidden_size=768)
    with pytest.raises(ConversionError, match="do not belong together"):
        check("convnext_tiny_hnf", "large", head_norm_first=True)  # the body differs


@pytest.mark.slow
def test_timm_convnext_tiny_hnf(tmp_path):
    """The registered timm architecture itself (1x1-conv MLPs, norm_pre), at 224 and 200x264."""
    import timm
    from timm.models import save_for_hf

    from convnext_zoo import from_preset
    from convnext_zoo.convert import convert_checkpoint

    model = randomise(timm.create_model("convnext_tiny_hnf", pretrained=False), seed=4).eval()
    save_for_hf(model, tmp_path / "src", safe_serialization=True)
    config = convert_checkpoint(tmp_path / "src", tmp_path / "preset")
    assert (config["variant"], config["head_norm_first"]) == ("tiny", True)
    converted = from_preset(tmp_path / "preset", preprocessing=False)
    check_against_timm(converted, model)


# === OpenCLIP image towers ===

EMBED = 32
CLIP_SIZE = 64


def open_clip_model(proj, seed=5):
    """A tiny OpenCLIP CLIP: a timm ConvNeXt V2 atto image tower, a 1-layer text tower."""
    open_clip = pytest.importorskip("open_clip")

    model = open_clip.CLIP(
        embed_dim=EMBED,
        vision_cfg={"timm_model_name": "convnextv2_atto", "timm_model_pretrained": False,
                    "timm_pool": "", "timm_proj": proj, "image_size": CLIP_SIZE},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    )
    return randomise(model, seed).eval()


def open_clip_files(model, proj):
    """OpenCLIP's own files: the whole model (both towers) and its config."""
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = {
        "model_cfg": {"embed_dim": EMBED, "vision_cfg": {
            "timm_model_name": "convnextv2_atto", "timm_pool": "", "timm_proj": proj,
            "image_size": CLIP_SIZE}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711],
                           "interpolation": "bicubic"},
    }
    return {"open_clip_model.safetensors": save(state),
            "open_clip_config.json": json.dumps(config).encode()}


@torch.no_grad()
def encode_image(model, x):
    return model.encode_image(nchw(x)).numpy()


def write(folder, files):
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("proj", ["linear", "mlp"])
def test_open_clip_image_tower(proj, tmp_path):
    from convnext_zoo import from_preset, readers
    from convnext_zoo.resolve import locate

    model = open_clip_model(proj)
    folder = write(tmp_path / "src", open_clip_files(model, proj))
    checkpoint = readers.read(locate(str(folder)))
    config = checkpoint.config
    assert checkpoint.source_format == "open_clip"
    assert (config["num_classes"], config["label_set"], config["license"]) == (EMBED, None, "mit")
    assert config["head_hidden_size"] == (2 * EMBED if proj == "mlp" else None)
    assert config["image_size"] == [CLIP_SIZE, CLIP_SIZE]
    assert config["preprocessing"]["mean"][0] == pytest.approx(0.48145466)
    # The text tower is listed as deliberately unused, nothing of the image tower is.
    text = {k for k in model.state_dict() if not k.startswith("visual.")}
    assert set(checkpoint.unused) == text and "text_projection" in text

    converted = from_preset(folder, preprocessing=False)
    for height, width in [(CLIP_SIZE, CLIP_SIZE), (72, 88)]:
        x = images(height, width, batch=2)
        close(np.asarray(converted(x, training=False)), encode_image(model, x),
              f"projected embedding {height}x{width}")


def test_open_clip_text_tower_without_image_tower_is_no_convnext(tmp_path):
    from safetensors.torch import save

    from convnext_zoo import from_preset
    from convnext_zoo.resolve import PresetDownloadError
    from convnext_zoo.checkpoint_io import CheckpointError

    model = open_clip_model("linear")
    text = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("visual.")}
    folder = write(tmp_path / "src", {"open_clip_model.safetensors": save(text)})
    with pytest.raises((CheckpointError, PresetDownloadError), match="OpenCLIP"):
        from_preset(folder)


def test_timm_hosted_clip_tower(tmp_path):
    """timm's `convnext_*.clip_*` repos: the same tower in timm's layout (projection as head.fc)."""
    import timm
    from timm.models import save_for_hf
    from timm.models.convnext import checkpoint_filter_fn

    from convnext_zoo import from_preset

    clip = open_clip_model("mlp", seed=6)
    tower = timm.create_model("convnextv2_atto", pretrained=False, num_classes=EMBED,
                              head_hidden_size=2 * EMBED)
    tower.load_state_dict(checkpoint_filter_fn(clip.state_dict(), tower), strict=True)
    save_for_hf(tower.eval(), tmp_path / "src", safe_serialization=True)
    converted = from_preset(tmp_path / "src", preprocessing=False)
    x = images(CLIP_SIZE, CLIP_SIZE, batch=2)
    close(np.asarray(converted(x, training=False)), encode_image(clip, x), "projected embedding")


# === DINOv3 ===


def dinov3_model(seed=7):
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

    config = DINOv3ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768],
                                  layer_norm_eps=1e-6)
    return randomise(DINOv3ConvNextModel(config), seed).eval()


@torch.no_grad()
def dinov3_reference(model, x):
    out = model(pixel_values=nchw(x))
    tokens = out.last_hidden_state.numpy()
    batch, height, width = x.shape[0], x.shape[1] // 32, x.shape[2] // 32
    patches = tokens[:, 1:].reshape(batch, height, width, -1)
    return out.pooler_output.numpy(), patches


def check_dinov3(converted, model, sizes=SIZES):
    for height, width in sizes:
        x = images(height, width, batch=1)
        pooled, patches = dinov3_reference(model, x)
        close(np.asarray(converted(x, training=False)), pooled, f"pooled {height}x{width}")
        close(np.asarray(converted.patch_features(x)), patches, f"patch features {height}x{width}")


def test_dinov3_transformers_and_timm_layouts(tmp_path):
    from timm.models import save_for_hf

    from convnext_zoo import from_preset, readers
    from convnext_zoo.layout import dinov3_to_timm_name
    from convnext_zoo.resolve import locate
    import timm

    model = dinov3_model()
    model.save_pretrained(tmp_path / "hf")
    checkpoint = readers.read(locate(str(tmp_path / "hf")))
    assert checkpoint.source_format == "dinov3"
    config = checkpoint.config
    assert (config["family"], config["variant"], config["head"], config["num_classes"]) == (
        "v1", "tiny", "norm", 0)
    assert (config["license"], config["label_set"]) == ("dinov3-license", None)
    check_dinov3(from_preset(tmp_path / "hf"), model)

    # timm's `convnext_tiny.dinov3_lvd1689m` layout: the same tensors under timm's names.
    tower = timm.create_model("convnext_tiny", pretrained=False, num_classes=0)
    state = {dinov3_to_timm_name(k): v for k, v in model.state_dict().items()}
    tower.load_state_dict(state, strict=True)
    save_for_hf(tower.eval(), tmp_path / "timm", safe_serialization=True)
    check_dinov3(from_preset(tmp_path / "timm"), model, sizes=[(200, 264)])


# === Through the local Hub server ===


@pytest.fixture
def hub(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.dirname(__file__))
    hub_server = importlib.import_module("hub_server")
    with hub_server.HubServer() as server:
        hub_server.point_client_at(server, tmp_path / "hf_home", monkeypatch)
        yield server


def test_open_clip_and_dinov3_repos_through_the_hub(hub, tmp_path):
    from convnext_zoo import from_preset

    clip = open_clip_model("linear", seed=8)
    hub.hub.commit("laion/CLIP-convnext_tiny-test", open_clip_files(clip, "linear"))
    converted = from_preset("hf://laion/CLIP-convnext_tiny-test")
    assert converted.preprocessor.image_converter.image_size == (CLIP_SIZE, CLIP_SIZE)
    x = images(CLIP_SIZE, CLIP_SIZE, batch=2)
    close(np.asarray(converted(x, training=False)), encode_image(clip, x), "projected embedding")

    dino = dinov3_model(seed=9)
    dino.save_pretrained(tmp_path / "dino")
    hub.hub.commit("facebook/dinov3-convnext-tiny-test",
                   {p.name: p.read_bytes() for p in (tmp_path / "dino").iterdir()})
    check_dinov3(from_preset("hf://facebook/dinov3-convnext-tiny-test"), dino, sizes=[(224, 224)])


@pytest.mark.parametrize("head", [{"head_norm_first": True}, {"head_hidden_size": 16}],
                         ids=["head_norm_first", "head_hidden_size"])
def test_head_options_survive_keras_hub_presets_and_preset_dirs(head, tmp_path):
    """keras-hub's `save_to_preset` and this package's `save_preset` keep the head's form."""
    from convnext_zoo import ConvNeXtBackbone, ConvNeXtImageClassifier, from_preset
    from convnext_zoo.preset_dir import read_config
    from convnext_zoo.variants import FAMILIES
    from convnext_zoo.writer import save_preset

    depths, dims = FAMILIES["v2"]["atto"]
    backbone = ConvNeXtBackbone(depths, dims, use_grn=True, layer_scale_init_value=None)
    model = ConvNeXtImageClassifier(backbone, 5, **head)
    x = images(64, 64, batch=2)
    expected = np.asarray(model(x, training=False))
    model.save_to_preset(str(tmp_path / "keras_hub"))
    save_preset(model, tmp_path / "preset")
    assert {k: read_config(tmp_path / "preset")[k] for k in head} == head
    for folder in ("keras_hub", "preset"):
        loaded = from_preset(tmp_path / folder, preprocessing=False)
        assert {k: getattr(loaded, k) for k in head} == head, folder
        np.testing.assert_allclose(np.asarray(loaded(x, training=False)), expected,
                                   rtol=1e-5, atol=1e-5)
