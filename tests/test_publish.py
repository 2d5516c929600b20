"""push_to_hub and the maintainer path, through the real huggingface_hub client.

The local Hub (tests/hub_server.py, with its upload endpoints) receives the
pushes; `from_preset("hf://...")` downloads them back. Tiny models (atto,
64 px) keep this fast.
"""

import importlib
import os
import sys

import numpy as np
import pytest

try:  # torchvision/triton crash when loaded after TensorFlow: load them first
    import timm  # noqa: F401
    import timm.data  # noqa: F401
except ImportError:
    pass


sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer, point_client_at  # noqa: E402

import convnext_zoo  # noqa: E402
from convnext_zoo import model_card, publish  # noqa: E402

SHAPE = (64, 64, 3)
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture(scope="module")
def server():
    with HubServer() as server:
        yield server


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    point_client_at(server, tmp_path / "hf_home", monkeypatch)
    server.hub.requests.clear()
    return server


def randomize(model, seed):
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = rng.normal(0, 0.05, variable.shape) + (0.5 if len(variable.shape) == 1 else 0)
        variable.assign(value.astype("float32"))
    return model


@pytest.fixture(scope="module")
def v2_model():
    return randomize(convnext_zoo.create_convnext_v2("atto", num_classes=1000, input_shape=SHAPE), 0)


@pytest.fixture(scope="module")
def v1_preset(tmp_path_factory):
    """A V1 preset directory (tiny at 64 px, 10 classes: a fine-tuned model)."""
    model = randomize(convnext_zoo.create_convnext_v1("tiny", num_classes=10, input_shape=SHAPE), 1)
    directory = tmp_path_factory.mktemp("v1_preset")
    publish.stage_preset(model, str(directory))
    return str(directory), model


@pytest.fixture(scope="module")
def v2_preset(v2_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("v2_preset")
    publish.stage_preset(v2_model, str(directory))
    return str(directory), v2_model


def x(seed=0):
    return np.random.default_rng(seed).normal(size=(2,) + SHAPE).astype("float32")


def readme(server, repo, ref="main"):
    _, tree = server.hub.resolve(repo, ref)
    return tree["README.md"].decode()


def uploads(server):
    return [r for r in server.hub.requests if r["method"] in ("POST", "PUT")]


def test_push_then_from_preset_reproduces_outputs_v2_card(hub, v2_model):
    info = convnext_zoo.push_to_hub(v2_model, "user/atto")
    assert info.oid and "/user/atto/commit/" in info.commit_url
    _, tree = hub.hub.resolve("user/atto", "main")
    assert {"config.json", "model.safetensors", "README.md"} <= set(tree)
    loaded = convnext_zoo.from_preset("hf://user/atto", input_shape=SHAPE, preprocessing=False)
    np.testing.assert_array_equal(np.asarray(loaded(x())), np.asarray(v2_model(x())))
    meta = model_card.parse_front_matter(readme(hub, "user/atto"))
    assert meta["license"] == "cc-by-nc-4.0"
    assert meta["pipeline_tag"] == "image-classification"
    assert {"keras", "convnext", "image-classification"} <= set(meta["tags"])
    assert meta["library_name"] == "keras-hub"
    assert meta["datasets"] == ["imagenet-1k"]
    assert "base_model" not in meta
    card = readme(hub, "user/atto")
    assert 'from_preset("hf://user/atto")' in card and "Woo" in card
    assert hub.hub.validated_yaml  # the client validated the metadata with the Hub


def test_v1_preset_dir_card_base_model_and_licence(hub, v1_preset):
    directory, model = v1_preset
    convnext_zoo.push_to_hub(directory, "user/tiny-ft", base_model="hf://timm/convnext_tiny.fb_in1k",
                             top1=82.1)
    card = readme(hub, "user/tiny-ft")
    meta = model_card.parse_front_matter(card)
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == "timm/convnext_tiny.fb_in1k"
    assert "convnext-v1" in meta["tags"] and "Liu" in card and "82.1%" in card
    loaded = convnext_zoo.from_preset("hf://user/tiny-ft", input_shape=SHAPE, preprocessing=False)
    np.testing.assert_array_equal(np.asarray(loaded(x(1))), np.asarray(model(x(1))))


def test_branch_and_pull_request(hub, v2_preset):
    directory, model = v2_preset
    convnext_zoo.push_to_hub(directory, "user/branchy")
    convnext_zoo.push_to_hub(directory, "user/branchy", revision="dev", commit_message="to dev")
    pr = convnext_zoo.push_to_hub(directory, "user/branchy", create_pr=True)
    refs = hub.hub.repos["user/branchy"]["refs"]
    assert {"main", "dev", "refs/pr/1"} <= set(refs)
    assert pr.pr_url.endswith("/user/branchy/discussions/1")
    assert ("user/branchy", "dev", "to dev") in hub.hub.commit_messages
    for handle in ("hf://user/branchy@dev", "hf://user/branchy@refs/pr/1"):
        loaded = convnext_zoo.from_preset(handle, input_shape=SHAPE, preprocessing=False)
        np.testing.assert_array_equal(np.asarray(loaded(x(2))), np.asarray(model(x(2))))


def test_existing_readme_survives_unless_replaced(hub, v2_preset):
    directory, _ = v2_preset
    hub.hub.commit("user/documented", {"README.md": b"# My own card\n"})
    convnext_zoo.push_to_hub(directory, "user/documented")
    assert readme(hub, "user/documented") == "# My own card\n"
    _, tree = hub.hub.resolve("user/documented", "main")
    assert "model.safetensors" in tree
    convnext_zoo.push_to_hub(directory, "user/documented", replace_readme=True)
    assert readme(hub, "user/documented").startswith("---\nlibrary_name")


def test_dry_run_sends_nothing(hub, v2_preset, capsys):
    directory, _ = v2_preset
    result = convnext_zoo.push_to_hub(directory, "user/dry", dry_run=True)
    assert hub.hub.requests == [] and "user/dry" not in hub.hub.repos
    assert set(result["files"]) == {"config.json", "model.safetensors", "README.md"}
    out = capsys.readouterr().out
    assert "Dry run" in out and "model.safetensors" in out and "license:" in out


def test_wrong_licence_for_v2_refused_before_any_request(hub, v2_model):
    with pytest.raises(ValueError, match="cc-by-nc-4.0"):
        convnext_zoo.push_to_hub(v2_model, "user/bad", license="apache-2.0")
    assert uploads(hub) == []


def test_invalid_preset_dir_refused(hub, tmp_path):
    from convnext_zoo.preset_dir import PresetError

    with pytest.raises(PresetError):
        convnext_zoo.push_to_hub(str(tmp_path), "user/empty")
    with pytest.raises(ValueError, match="namespace/name"):
        convnext_zoo.push_to_hub(str(tmp_path), "no-namespace")
    assert uploads(hub) == []


# === Maintainer path: registry entry -> convert -> verify -> push ===

V2_NAME = "convnext_v2_atto_fcmae_ft_in1k"
V2_REPO = "timm/convnextv2_atto.fcmae_ft_in1k"


@pytest.fixture(scope="module")
def timm_source(server):
    torch = importlib.import_module("torch")
    timm = importlib.import_module("timm")
    safetensors_torch = importlib.import_module("safetensors.torch")
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02 + (0.5 if p.ndim == 1 else 0.0) * torch.rand_like(p))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    server.hub.commit(V2_REPO, {"model.safetensors": safetensors_torch.save(state)})
    return model


def test_maintainer_publishes_verified_preset_then_skips(hub, timm_source):
    result = publish.publish_preset(V2_NAME, "zoo", images=EXAMPLES)
    assert result["status"] == "pushed" and result["report"]["passed"]
    card = readme(hub, f"zoo/{V2_NAME}")
    meta = model_card.parse_front_matter(card)
    assert meta["license"] == "cc-by-nc-4.0" and "76.7%" in card and "Parity" in card
    assert "the paper's figure for the source checkpoint at 224 px" in card
    loaded = convnext_zoo.from_preset(f"hf://zoo/{V2_NAME}", preprocessing=False)
    with importlib.import_module("torch").no_grad():
        import torch

        expected = timm_source(torch.from_numpy(x(3).transpose(0, 3, 1, 2).copy())).numpy()
    ours = np.asarray(loaded(x(3)))
    assert np.max(np.abs(ours - expected)) / np.max(np.abs(expected)) < 1e-4
    # Whole-registry mode (restricted to one name): already published -> skipped.
    again = publish.publish_registry("zoo", names=[V2_NAME], images=EXAMPLES)
    assert [r["status"] for r in again] == ["skipped"]


def test_maintainer_publishes_a_registered_open_clip_tower(hub, monkeypatch):
    """An OpenCLIP repo (weights + open_clip_config.json) converts, verifies against open_clip, publishes.

    The registered entry narrowed to an atto body at 64 px (its projection
    width, preprocessing and files as registered) keeps this small.
    """
    import copy
    import io
    import json

    import torch

    from convnext_zoo import registry
    from tests.convert_helpers import randomise

    open_clip = pytest.importorskip("open_clip")
    name = "convnext_v1_base_clip_laion400m_s13b_b51k"
    data = copy.deepcopy(registry._registry())
    data["presets"][name]["architecture"] = {"depths": [2, 2, 6, 2], "hidden_dims": [40, 80, 160, 320],
                                             "conv_mlp": True}
    data["presets"][name]["image_size"] = 64
    monkeypatch.setattr(registry, "_registry", lambda: data)
    entry = registry.preset_info(name)
    model_cfg = {"embed_dim": entry["num_classes"],
                 "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                                "timm_pool": "", "timm_proj": "linear", "image_size": 64},
                 "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    model = randomise(open_clip.CLIP(**model_cfg), 15).eval()
    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    hub.hub.commit(entry["source"]["hf_repo"], {
        entry["source"]["filename"]: weights.getvalue(),
        "open_clip_config.json": json.dumps({"model_cfg": model_cfg}).encode(),
    })
    result = publish.publish_preset(name, "zoo", images=EXAMPLES, dry_run=True)
    report = result["report"]
    assert result["status"] == "dry-run" and report["passed"] and report["reference"] == "open_clip"
    assert report["embedding_relative"] < 1e-5 and report["logits_relative"] is None
    assert "Parity with the source implementation (open_clip)" in result["commit"]["readme"]
    assert ", embedding " in result["commit"]["readme"]


def test_card_says_whose_top1_each_registry_entry_quotes():
    from convnext_zoo import registry

    sources = {}
    for name in registry.list_presets():
        entry = registry.preset_info(name)
        words = model_card.top1_provenance(entry)
        sources.setdefault(entry["top1_source"], set()).add(
            "timm" if "timm" in words else "paper" if "paper" in words else words)
        if entry["top1"] is not None:
            assert f"at {entry['top1_image_size']} px" in words, name
    assert sources == {"official": {"paper"}, "timm": {"timm"}, None: {"reported for the source checkpoint"}}


def test_failed_verification_blocks_the_push(hub, timm_source, monkeypatch):
    from safetensors.numpy import load_file, save_file

    from convnext_zoo import convert

    original = convert.convert_checkpoint

    def tampered(source, output_dir, **kwargs):
        config = original(source, output_dir, **kwargs)
        path = os.path.join(output_dir, "model.safetensors")
        tensors = load_file(path)
        tensors["head.fc.weight"] = np.ascontiguousarray(tensors["head.fc.weight"] * 1.01)  # timm layout
        save_file(tensors, path)
        return config

    monkeypatch.setattr(convert, "convert_checkpoint", tampered)
    # The message names each compared output and its difference.
    with pytest.raises(publish.VerificationFailed,
                       match=r"relative differences: logits \S+, features \S+; .*Nothing was pushed"):
        publish.publish_preset(V2_NAME, "blocked", images=EXAMPLES)
    assert uploads(hub) == [] and "blocked/" + V2_NAME not in hub.hub.repos
