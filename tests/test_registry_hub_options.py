"""The architecture options test_registry_hub.py does not reach, by registry name through the local Hub.

Each case serves a checkpoint with every parameter randomised under the
repo id and file names its registry entry states (tests/hub_server.py),
loads it with `from_preset("<registry name>")` through the real
huggingface_hub client and compares with the reference library holding the
same weights, to 1e-4 of the largest reference value:

* head MLP (`large_mlp`: pool, norm, fc, GELU, fc) and norm epsilon 1e-5
  (`xxlarge`), timm repos. At full size these are 200M and 850M parameters,
  so the test narrows the entry's depths and widths (and the served timm
  model's `model_args` to match); every other field (repo, file, head,
  epsilon, classes, preprocessing) is the registry's own. The xxlarge
  stem's outputs are made small, so that its epsilon moves the output far
  past the tolerance: a loader that used 1e-6 fails.
* the CLIP projection from OpenCLIP's own repo and file names
  (`open_clip_pytorch_model.bin` + `open_clip_config.json`), against
  `encode_image`: the registered linear projection to 512, on a
  ConvNeXt-Tiny-shaped image tower (the entry narrowed to it, the served
  OpenCLIP config naming `convnext_tiny`; OpenCLIP passes no depths to
  timm) beside a one-layer text tower, a third of the full size.
* DINOv3 from its gated transformers repo with a granted `HF_TOKEN`,
  against transformers' `DINOv3ConvNextModel` (pooled output and the
  normalised patch features).
"""

import copy
import io
import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("timm")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer, point_client_at  # noqa: E402
from test_hub import timm_files  # noqa: E402

import convnext_zoo  # noqa: E402
from convnext_zoo import registry  # noqa: E402
from tests.convert_helpers import images, nchw, randomise, relative_error  # noqa: E402

TOLERANCE = 1e-4
NARROW = {"depths": [1, 1, 2, 1], "hidden_dims": [32, 64, 128, 256]}
LARGE_MLP = "convnext_v1_large_mlp_clip_laion2b_augreg_ft_in1k"
XXLARGE = "convnext_v1_xxlarge_clip_laion2b_soup_ft_in1k"
OPEN_CLIP = "convnext_v1_base_clip_laion400m_s13b_b51k"
DINOV3 = "convnext_v1_tiny_dinov3_lvd1689m_transformers"
GRANTED = "hf_granted_token"


def close(ours, reference, what):
    error = relative_error(ours, reference)
    assert error <= TOLERANCE, f"{what}: max |diff| / max |ref| = {error:.2e} > {TOLERANCE}"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubServer() as server:
        point_client_at(server, tmp_path / "hf_home", monkeypatch)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no_token"))
        yield server


def narrowed(monkeypatch, name, shape=NARROW):
    """The registry with `name`'s depths and widths narrowed to `shape`, all else as registered."""
    data = copy.deepcopy(registry._registry())
    data["presets"][name]["architecture"].update(shape)
    monkeypatch.setattr(registry, "_registry", lambda: data)
    return registry.preset_info(name)


@pytest.mark.parametrize("name", [LARGE_MLP, XXLARGE], ids=["head_hidden_size", "norm_epsilon_1e-5"])
def test_timm_head_mlp_and_norm_epsilon(hub, monkeypatch, name):
    import timm

    registered = registry.preset_info(name)
    entry = narrowed(monkeypatch, name)
    arch = entry["timm_name"].split(".")[0]
    shape = {"depths": NARROW["depths"], "dims": NARROW["hidden_dims"]}
    model = randomise(timm.create_model(arch, pretrained=False, num_classes=entry["num_classes"], **shape), 11)
    if name == XXLARGE:
        assert model.stem[1].eps == registered["architecture"]["norm_epsilon"] == 1e-5
        with torch.no_grad():  # stem outputs of variance ~1e-6: the epsilon now matters
            model.stem[0].weight.mul_(1e-3)
            model.stem[0].bias.mul_(1e-3)
    else:
        assert model.head.pre_logits.fc.out_features == registered["architecture"]["head_hidden_size"] == 1536
    files = timm_files(model.eval(), name)
    document = json.loads(files["config.json"])
    document["model_args"] = shape  # what timm's save_for_hf writes for a narrowed model
    files["config.json"] = json.dumps(document).encode()
    hub.hub.commit(entry["source"]["hf_repo"], files)

    loaded = convnext_zoo.from_preset(name, preprocessing=False)
    backbone = loaded.backbone
    assert backbone.norm_epsilon == registered["architecture"].get("norm_epsilon", 1e-6)
    assert loaded.head_hidden_size == registered["architecture"].get("head_hidden_size")
    x = images(64, 64, batch=2)
    with torch.no_grad():
        reference = model(nchw(x)).numpy()
    ours = np.asarray(loaded(x, training=False))
    close(ours, reference, name)
    if name == XXLARGE:
        config = loaded.get_config()
        config["backbone"]["config"]["norm_epsilon"] = 1e-6
        other = type(loaded).from_config(config)
        other.set_weights(loaded.get_weights())
        assert relative_error(np.asarray(other(x, training=False)), reference) > 10 * TOLERANCE
    requested = {r["path"] for r in hub.hub.requests}
    assert f"/{entry['source']['hf_repo']}/resolve/main/model.safetensors" in requested


def test_open_clip_projection_from_open_clips_repo(hub, monkeypatch):
    open_clip = pytest.importorskip("open_clip")

    registered = registry.preset_info(OPEN_CLIP)
    config = open_clip.get_model_config("convnext_base")
    assert (config["embed_dim"], config["vision_cfg"]["timm_proj"]) == (registered["num_classes"], "linear")
    assert (registered["variant"], registered["architecture"]) == ("base", {})
    entry = narrowed(monkeypatch, OPEN_CLIP, {"depths": [3, 3, 9, 3], "hidden_dims": [96, 192, 384, 768]})
    config["vision_cfg"]["timm_model_name"] = "convnext_tiny"
    # A one-layer text tower keeps the file's two-tower layout small.
    config["text_cfg"] = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    config["vision_cfg"]["image_size"] = entry["image_size"]
    model = randomise(open_clip.CLIP(**config), 12).eval()
    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    prep = entry["preprocessing"]
    sidecar = {"model_cfg": config, "preprocess_cfg": {
        "mean": prep["mean"], "std": prep["std"], "interpolation": prep["interpolation"]}}
    assert entry["source"]["filename"] == "open_clip_pytorch_model.bin"
    hub.hub.commit(entry["source"]["hf_repo"], {
        entry["source"]["filename"]: weights.getvalue(),
        "open_clip_config.json": json.dumps(sidecar).encode(),
    })

    loaded = convnext_zoo.from_preset(OPEN_CLIP, preprocessing=False)
    assert loaded.backbone.hidden_dims[-1] == 768 and loaded.output.shape[-1] == registered["num_classes"]
    # timm's copies of these towers load the projection as a Dense with a zero bias.
    assert loaded.count_params() == sum(p.numel() for p in model.visual.parameters()) + 512
    x = images(64, 64, batch=2)
    with torch.no_grad():
        reference = model.encode_image(nchw(x)).numpy()
    close(np.asarray(loaded(x, training=False)), reference, "projected embedding")
    requested = {r["path"] for r in hub.hub.requests}
    assert f"/{entry['source']['hf_repo']}/resolve/main/open_clip_pytorch_model.bin" in requested


def test_dinov3_from_its_gated_transformers_repo(hub, monkeypatch, tmp_path):
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

    entry = registry.preset_info(DINOV3)
    assert entry["gated"] and entry["architecture"] == {}
    config = DINOv3ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], layer_norm_eps=1e-6)
    model = randomise(DINOv3ConvNextModel(config), 13).eval()
    model.save_pretrained(tmp_path / "dino")
    repo = entry["source"]["hf_repo"]
    files = {p.name: p.read_bytes() for p in (tmp_path / "dino").iterdir()}
    assert entry["source"]["filename"] in files
    hub.hub.commit(repo, files)
    hub.hub.gate(repo, granted={GRANTED})
    monkeypatch.setenv("HF_TOKEN", GRANTED)

    loaded = convnext_zoo.from_preset(DINOV3, preprocessing=False)
    assert loaded.count_params() == entry["params"]
    x = images(64, 96, batch=2)
    with torch.no_grad():
        out = model(pixel_values=nchw(x))
    close(np.asarray(loaded(x, training=False)), out.pooler_output.numpy(), "pooled")
    patches = out.last_hidden_state.numpy()[:, 1:].reshape(2, 2, 3, -1)
    close(np.asarray(loaded.patch_features(x)), patches, "patch features")
    sent = [r["headers"].get("authorization") for r in hub.hub.requests if repo in r["path"]]
    assert f"Bearer {GRANTED}" in sent
