"""from_preset through the real huggingface_hub client against a local Hub.

The server (tests/hub_server.py) serves timm-layout checkpoints with random
weights under the real repo names. huggingface_hub reads HF_ENDPOINT at
import, so in-process tests point its `constants` at the server (and at a
fresh HF_HOME); `test_env_variables_offline_subprocess` uses the real
environment variables in a fresh interpreter.
"""

import importlib
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

try:  # torchvision/triton crash when loaded after TensorFlow: load them first
    import timm  # noqa: F401
    import timm.data  # noqa: F401
except ImportError:
    pass

torch = importlib.import_module("torch")
timm = importlib.import_module("timm")
safetensors_torch = importlib.import_module("safetensors.torch")
huggingface_hub = importlib.import_module("huggingface_hub")
from huggingface_hub import constants  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer, point_client_at  # noqa: E402

import convnext_zoo  # noqa: E402
from convnext_zoo import registry  # noqa: E402
from convnext_zoo.resolve import PresetDownloadError  # noqa: E402

V2 = "convnext_v2_atto_fcmae_ft_in1k"
V2_REPO = "timm/convnextv2_atto.fcmae_ft_in1k"
V1 = "convnext_v1_tiny_in1k"
V1_REPO = "timm/convnext_tiny.fb_in1k"
RTOL = 1e-4


def random_timm_model(arch, seed):
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False).eval()
    with torch.no_grad():
        for p in model.parameters():  # every parameter, GRN and layer scale included
            p.copy_(torch.randn_like(p) * 0.02 + (0.5 if p.ndim == 1 else 0.0) * torch.rand_like(p))
    return model


def timm_files(model, name):
    entry = registry.preset_info(name)
    prep = entry["preprocessing"]
    config = {
        "architecture": model.default_cfg.get("architecture", type(model).__name__),
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "pretrained_cfg": {
            "input_size": [3, entry["image_size"], entry["image_size"]],
            "crop_pct": prep["crop_pct"], "crop_mode": prep["crop_mode"],
            "interpolation": prep["interpolation"], "mean": prep["mean"], "std": prep["std"],
            "num_classes": entry["num_classes"], "license": entry["license"],
        },
    }
    config["architecture"] = entry["source"]["hf_repo"].split("/")[1].split(".")[0]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": safetensors_torch.save(state),
    }


@pytest.fixture(scope="module")
def checkpoints():
    v2 = random_timm_model("convnextv2_atto", 0)
    v1 = random_timm_model("convnext_tiny", 1)
    return {V2: (v2, timm_files(v2, V2)), V1: (v1, timm_files(v1, V1))}


@pytest.fixture(scope="module")
def server(checkpoints):
    with HubServer() as server:
        server.first_sha = server.hub.commit(V2_REPO, checkpoints[V2][1])
        server.hub.commit(V1_REPO, checkpoints[V1][1])
        server.hub.commit("someone/no-weights", {"config.json": b"{}"})
        yield server


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    """Points huggingface_hub at the local server and a fresh HF_HOME."""
    point_client_at(server, tmp_path / "hf_home", monkeypatch)
    server.hub.faults.clear()
    if server.httpd is None:
        server.start()
    yield server
    server.hub.faults.clear()
    if server.httpd is None:
        server.start()


def rel_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def timm_logits(model, x_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def inputs(seed=0, size=64):
    return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype("float32")


def keras_logits(model, x):
    return np.asarray(model(x, training=False))


@pytest.mark.parametrize("handle", [V2, "convnext_v2_atto_imagenet", "convnext_v2_atto",
                                    f"hf://{V2_REPO}", "local"])
def test_v2_every_handle_reproduces_timm(hub, checkpoints, tmp_path, handle):
    reference, files = checkpoints[V2]
    if handle == "local":
        handle = tmp_path / "timm_dir"
        handle.mkdir()
        for name, data in files.items():
            (handle / name).write_bytes(data)
    model = convnext_zoo.from_preset(handle, preprocessing=False)
    x = inputs()
    assert rel_diff(keras_logits(model, x), timm_logits(reference, x)) < RTOL


def photo_and_timm_input(name):
    skimage_data = importlib.import_module("skimage.data")
    from PIL import Image

    entry = registry.preset_info(name)
    prep = entry["preprocessing"]
    transform = timm.data.create_transform(
        input_size=(3, entry["image_size"], entry["image_size"]), crop_pct=prep["crop_pct"],
        crop_mode=prep["crop_mode"], interpolation="bicubic", mean=prep["mean"], std=prep["std"],
    )
    image = skimage_data.chelsea()
    return image, transform(Image.fromarray(image)).numpy().transpose(1, 2, 0)[None]


@pytest.mark.parametrize("name", [V2, V1])
def test_photograph_with_preprocessing_matches_timm(hub, checkpoints, name):
    reference = checkpoints[name][0]
    image, timm_input = photo_and_timm_input(name)
    expected = timm_logits(reference, timm_input)
    model = convnext_zoo.from_preset(name)
    assert model.preprocessor is not None
    # Same input tensor: the conversion tolerance.
    assert rel_diff(keras_logits(model, timm_input), expected) < RTOL
    # Raw uint8 photograph through the attached preprocessing (TF bicubic vs
    # PIL bicubic): measured 2e-3..5e-3 relative on random weights.
    ours = model.predict(image[None], verbose=0)
    assert rel_diff(ours, expected) < 2e-2
    assert np.argmax(ours) == np.argmax(expected)
    np.testing.assert_array_equal(np.argsort(-ours[0])[:5], np.argsort(-expected[0])[:5])
    without = convnext_zoo.from_preset(name, preprocessing=False)
    assert without.preprocessor is None


def test_transfer_learning_and_backbone(hub, checkpoints):
    full = convnext_zoo.from_preset(V2, preprocessing=False)
    model10 = convnext_zoo.from_preset(V2, num_classes=10, input_shape=(64, 64, 3))
    assert model10.output.shape == (None, 10)
    backbone = convnext_zoo.ConvNeXtBackbone.from_preset(V2)
    assert isinstance(backbone, convnext_zoo.ConvNeXtBackbone)
    classifier = convnext_zoo.ConvNeXtImageClassifier.from_preset(V2, preprocessing=False)
    x = inputs(1)
    np.testing.assert_allclose(keras_logits(classifier, x), keras_logits(full, x), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(backbone(x)), np.asarray(full.backbone(x)), rtol=1e-6, atol=1e-6
    )


def test_cache_hit_without_network_and_offline_mode(hub, checkpoints, monkeypatch):
    reference = checkpoints[V2][0]
    convnext_zoo.from_preset(V2, preprocessing=False)  # first download
    hub.stop()  # no network: the cache answers
    def resolves():
        return [r for r in hub.hub.requests if "/resolve/" in r["path"]]

    before = len(resolves())
    model = convnext_zoo.from_preset(V2, preprocessing=False)
    x = inputs(2)
    assert rel_diff(keras_logits(model, x), timm_logits(reference, x)) < RTOL
    assert len(resolves()) == before
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = convnext_zoo.from_preset("convnext_v2_atto_imagenet", preprocessing=False)
    assert rel_diff(keras_logits(model, x), timm_logits(reference, x)) < RTOL
    with pytest.raises(PresetDownloadError, match=r"not in the huggingface_hub cache.*HF_HUB_OFFLINE"):
        convnext_zoo.from_preset(V1)


def test_revision_pin(hub, checkpoints):
    other = random_timm_model("convnextv2_atto", 7)
    second = hub.hub.commit(V2_REPO, timm_files(other, V2))
    try:
        x = inputs(3)
        latest = convnext_zoo.from_preset(V2, preprocessing=False)
        assert rel_diff(keras_logits(latest, x), timm_logits(other, x)) < RTOL
        first = hub.first_sha
        for model in (
            convnext_zoo.from_preset(V2, revision=first, preprocessing=False),
            convnext_zoo.from_preset(f"hf://{V2_REPO}@{first}", preprocessing=False),
        ):
            assert rel_diff(keras_logits(model, x), timm_logits(checkpoints[V2][0], x)) < RTOL
        with pytest.raises(PresetDownloadError, match=r"Revision 'v9' not found.*revision="):
            convnext_zoo.from_preset(V2, revision="v9")
    finally:  # restore main to the first commit for the other tests
        hub.hub.repos[V2_REPO]["refs"]["main"] = hub.first_sha
        del hub.hub.repos[V2_REPO]["commits"][second]


def test_missing_repo_file_and_unknown_names(hub):
    with pytest.raises(PresetDownloadError, match=r"'someone/missing' not found.*HF_TOKEN"):
        convnext_zoo.from_preset("hf://someone/missing")
    with pytest.raises(PresetDownloadError, match=r"has none of model.safetensors, model.safetensors.index.json, pytorch_model.bin"):
        convnext_zoo.from_preset("hf://someone/no-weights")
    with pytest.raises(ValueError, match=r"Did you mean 'convnext_v2_atto'.*hf://org/repo.*local directory"):
        convnext_zoo.from_preset("convnext_v2_atoo")
    # The cache is still usable afterwards.
    convnext_zoo.from_preset(V2, load_weights=True, preprocessing=False)


def test_corrupt_bytes_from_server(hub, checkpoints):
    data = checkpoints[V2][1]["model.safetensors"]
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size: the client's size check passes
    hub.hub.faults[(V2_REPO, "model.safetensors")] = {"serve": bytes(corrupt)}
    with pytest.raises(PresetDownloadError, match=r"Integrity check failed.*force_download=True"):
        convnext_zoo.from_preset(V2)
    hub.hub.faults.clear()
    model = convnext_zoo.from_preset(V2, force_download=True, preprocessing=False)
    x = inputs(4)
    assert rel_diff(keras_logits(model, x), timm_logits(checkpoints[V2][0], x)) < RTOL


def test_corrupt_cached_file(hub, checkpoints):
    path = huggingface_hub.hf_hub_download(V2_REPO, "model.safetensors")
    blob = os.path.realpath(path)
    data = bytearray(open(blob, "rb").read())
    data[1000] ^= 0xFF
    open(blob, "wb").write(bytes(data))
    with pytest.raises(PresetDownloadError, match=r"corrupt or truncated.*force_download=True"):
        convnext_zoo.from_preset(V2)
    open(blob, "wb").write(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(PresetDownloadError, match=r"corrupt or truncated"):
        convnext_zoo.from_preset(V2)
    model = convnext_zoo.from_preset(V2, force_download=True, preprocessing=False)
    x = inputs(5)
    assert rel_diff(keras_logits(model, x), timm_logits(checkpoints[V2][0], x)) < RTOL
    assert hashlib.sha256(open(blob, "rb").read()).hexdigest() == os.path.basename(blob)


def test_download_cut_off_halfway(hub, checkpoints):
    size = len(checkpoints[V2][1]["model.safetensors"])
    key = (V2_REPO, "model.safetensors")
    hub.hub.faults[key] = {"cut_after": size // 2}  # every attempt dies halfway
    with pytest.raises(PresetDownloadError, match=r"failed.*cache was left usable"):
        convnext_zoo.from_preset(V2)
    # Nothing half-written was promoted to a cache entry.
    blobs = [
        name
        for _, _, files in os.walk(constants.HF_HUB_CACHE)
        for name in files
        if not name.endswith(".incomplete") and len(name) == 64
    ]
    assert blobs == []
    # One cut: huggingface_hub retries the transfer itself and the load succeeds.
    hub.hub.faults[key] = {"cut_after": size // 2, "times": 1}
    model = convnext_zoo.from_preset(V2, preprocessing=False)
    x = inputs(6)
    assert rel_diff(keras_logits(model, x), timm_logits(checkpoints[V2][0], x)) < RTOL


def test_private_repo_needs_token(hub, checkpoints, monkeypatch):
    hub.hub.commit("me/private-atto", checkpoints[V2][1], private=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    with pytest.raises(PresetDownloadError, match="HF_TOKEN"):
        convnext_zoo.from_preset("hf://me/private-atto")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    model = convnext_zoo.from_preset("hf://me/private-atto", preprocessing=False)
    assert model.output.shape[-1] == 1000
    assert any(r["headers"].get("authorization") == "Bearer hf_test_token" for r in hub.hub.requests)


def test_official_preset_without_torch(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"convnext_v1_base_in1k_384.*pip install torch"):
        convnext_zoo.from_preset("convnext_v1_base_in1k_384")


def test_env_variables_offline_subprocess(server, tmp_path):
    """The real environment variables, read at import, in a fresh interpreter."""
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "home"),
               HF_HUB_DISABLE_XET="1", TF_CPP_MIN_LOG_LEVEL="3")
    code = (
        "import sys, convnext_zoo as cz;"
        "m = cz.from_preset(sys.argv[1], preprocessing=False, input_shape=(64, 64, 3));"
        "print('OK', m.count_params())"
    )
    online = subprocess.run([sys.executable, "-c", code, V2], env=env, capture_output=True, text=True, timeout=300)
    assert "OK 3708400" in online.stdout, online.stderr[-2000:]
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there
    offline = subprocess.run([sys.executable, "-c", code, V2], env=env, capture_output=True, text=True, timeout=300)
    assert "OK 3708400" in offline.stdout, offline.stderr[-2000:]
