"""timm's own registered checkpoints end to end: registry name -> local Hub -> Keras model == timm.

One small checkpoint per backbone option the registry records (1x1-conv
MLPs, the three overlapping stems, SimpleNorm), the head norm before pooling
(`tiny_hnf`) and per new label set, served
with every parameter randomised under its real repo name by
tests/hub_server.py and downloaded by the real huggingface_hub client. The
registry supplies what the tensors cannot tell (SimpleNorm vs RMS norm).
The head MLP, norm epsilon, OpenCLIP and DINOv3-transformers repos are in
test_registry_hub_options.py.
"""

import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("timm")
sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer, point_client_at  # noqa: E402
from test_hub import inputs, keras_logits, random_timm_model, rel_diff, timm_files, timm_logits  # noqa: E402

import convnext_zoo  # noqa: E402
from convnext_zoo import preset_dir, registry  # noqa: E402

# name -> what it exercises
CASES = {
    "convnext_v1_atto_d2_in1k": "conv_mlp, custom depths/widths",
    "convnext_v1_atto_ols_a2_in1k": "overlap_tiered stem",
    "convnext_v1_nano_ols_d1h_in1k": "overlap stem",
    "convnext_v1_zepto_rms_ols_ra4_e3600_r224_in1k": "overlap_act stem, simple_norm, mean/std 0.5",
    "convnext_v1_tiny_hnf_a2h_in1k": "head_norm_first (norm on the feature map, then pool)",
    "convnext_v1_nano_in12k": "ImageNet-12k head",
    "convnext_v1_tiny_dinov3_lvd1689m": "feature encoder: pooled, final norm, no classes (DINOv3, timm repo)",
}
RTOL = 1e-4


@pytest.fixture(scope="module")
def server():
    with HubServer() as server:
        server.references = {}
        for seed, name in enumerate(CASES):
            entry = registry.preset_info(name)
            model = random_timm_model(entry["timm_name"], seed)  # its head: the pretrained config's classes
            files = timm_files(model, name)
            server.hub.commit(entry["source"]["hf_repo"], files)
            server.references[name] = model
        yield server


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    point_client_at(server, tmp_path / "hf_home", monkeypatch)
    return server


@pytest.mark.parametrize("name", list(CASES))
def test_registered_timm_checkpoint_through_the_hub(hub, name):
    entry = registry.preset_info(name)
    model = convnext_zoo.from_preset(name, preprocessing=False)
    backbone = model.backbone
    arch = entry["architecture"]
    assert (backbone.stem, backbone.norm_layer, backbone.conv_mlp) == (
        arch.get("stem", "patchify"), arch.get("norm_layer", "layer_norm"), arch.get("conv_mlp", False))
    assert model.head_norm_first == arch.get("head_norm_first", False)
    assert model.count_params() == entry["params"]
    x = inputs(seed=len(name))
    assert rel_diff(keras_logits(model, x), timm_logits(hub.references[name], x)) < RTOL
    # Classes, or the pooled features of an encoder.
    assert model.output.shape[-1] == (entry["num_classes"] or backbone.hidden_dims[-1])
    requested = {r["path"] for r in hub.hub.requests}
    assert f"/{entry['source']['hf_repo']}/resolve/main/model.safetensors" in requested


def test_label_set_and_preprocessing_of_a_12k_checkpoint(hub, tmp_path):
    name = "convnext_v1_nano_in12k"
    model = convnext_zoo.from_preset(name)
    converter = model.preprocessor.image_converter
    entry = registry.preset_info(name)
    assert converter.image_size == (entry["image_size"],) * 2
    out = tmp_path / "preset"
    convnext_zoo.convert_checkpoint(name, str(out))
    with open(out / "config.json") as f:
        config = preset_dir.zoo_fields(json.load(f))
    assert config["label_set"] == "imagenet-12k" and config["license"] == "apache-2.0"
    scores = np.asarray(model.predict(np.zeros((1, 64, 64, 3), "uint8"), verbose=0))
    assert convnext_zoo.decode_predictions(scores, top=1)[0][0][0].startswith("n")
