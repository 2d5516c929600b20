"""Conversion failures: each gives a clear error and leaves no output directory."""

import json
import os
import re
import sys

import numpy as np
import pytest
import torch

from tests.convert_helpers import official_state_dict, timm_model


@pytest.fixture(scope="module")
def atto_dir(tmp_path_factory):
    """A timm V2-atto checkpoint directory (model.safetensors + config.json)."""
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("atto")
    save_for_hf(timm_model("v2", "atto"), folder, safe_serialization="both")
    return folder


def convert(*args, **kwargs):
    from convnext_zoo.convert import convert_checkpoint

    return convert_checkpoint(*args, **kwargs)


def assert_fails(tmp_path, error, match, source, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        convert(source, out, **kwargs)
    assert not out.exists()
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".out")]
    assert not leftovers, leftovers


def test_truncated_safetensors(atto_dir, tmp_path):
    from convnext_zoo.checkpoint_io import CheckpointError

    data = (atto_dir / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    assert_fails(tmp_path, CheckpointError, r"model\.safetensors.*corrupt or truncated.*not fully covered", bad)


def test_corrupt_safetensors_header(tmp_path):
    from convnext_zoo.checkpoint_io import CheckpointError

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_fails(tmp_path, CheckpointError, r"not a valid safetensors file", bad)


def test_truncated_and_corrupt_pickle(atto_dir, tmp_path):
    from convnext_zoo.checkpoint_io import CheckpointError

    state = official_state_dict(timm_model("v2", "atto").state_dict())
    good = tmp_path / "good.pth"
    torch.save({"model": state}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    assert_fails(tmp_path, CheckpointError, r"truncated\.pth.*truncated or corrupt", truncated)
    # Random bytes: most make the restricted unpickler raise UnpicklingError,
    # some IndexError, KeyError or UnicodeDecodeError (seeds 17, 62 and 54
    # among these 100); each must be reported as a corrupt file.
    garbage = tmp_path / "garbage.pt"
    for seed in range(100):
        garbage.write_bytes(np.random.default_rng(seed).bytes(4096))
        assert_fails(tmp_path, CheckpointError, r"garbage\.pt.*truncated or corrupt", garbage)


class NotATensor:
    pass


def test_pickle_with_objects_is_refused(tmp_path):
    from convnext_zoo.checkpoint_io import CheckpointError

    path = tmp_path / "unsafe.pth"
    torch.save({"model": {"stem.0.weight": torch.zeros(1)}, "args": NotATensor()}, path)
    assert_fails(tmp_path, CheckpointError, r"Refused to load .*weights_only=True", path)


def test_unknown_layout(tmp_path):
    from safetensors.numpy import save_file

    from convnext_zoo.checkpoint_io import CheckpointError

    path = tmp_path / "model.safetensors"
    save_file({"module.backbone.conv1.weight": np.zeros((4, 3, 3, 3), np.float32)}, str(path))
    assert_fails(tmp_path, CheckpointError, r"Unknown checkpoint layout.*module\.backbone\.conv1", path)


def test_wrong_variant_override(atto_dir, tmp_path):
    from convnext_zoo.convert import ConversionError

    assert_fails(tmp_path, ConversionError,
                 r"variant='tiny'.*V2-atto.*depths=\(2, 2, 6, 2\)", atto_dir, variant="tiny")


def test_wrong_family_and_classes_overrides(atto_dir, tmp_path):
    from convnext_zoo.convert import ConversionError

    assert_fails(tmp_path, ConversionError, r"family='v1'.*ConvNeXt V2", atto_dir, family="v1")
    assert_fails(tmp_path, ConversionError, r"num_classes=10.*1000-class head.*init_head=True",
                 atto_dir, num_classes=10)
    assert_fails(tmp_path, TypeError, r"Unknown conversion option.*varient.*Did you mean 'variant'",
                 atto_dir, varient="atto")
    assert_fails(tmp_path, ValueError, r"source_format='timmm'.*Did you mean 'timm'",
                 atto_dir, source_format="timmm")


def test_config_json_that_disagrees(atto_dir, tmp_path):
    from convnext_zoo.convert import ConversionError

    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((atto_dir / "model.safetensors").read_bytes())
    config = json.loads((atto_dir / "config.json").read_text())
    config["architecture"] = "convnextv2_base"
    (folder / "config.json").write_text(json.dumps(config))
    assert_fails(tmp_path, ConversionError, r"architecture='convnextv2_base'.*convnextv2_atto", folder)


def test_extra_and_missing_tensors_are_listed(atto_dir, tmp_path):
    from safetensors.numpy import save_file

    from convnext_zoo.checkpoint_io import SafetensorsReader
    from convnext_zoo.weights import WeightMismatchError

    reader = SafetensorsReader(atto_dir / "model.safetensors")
    tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
    del tensors["stages.1.blocks.0.mlp.fc2.bias"]
    tensors["stages.1.blocks.0.extra.weight"] = np.zeros(3, np.float32)
    tensors["stages.0.blocks.0.norm.weight"] = np.zeros(7, np.float32)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    from convnext_zoo.layout import timm_to_keras_name

    unassigned = re.escape(timm_to_keras_name("stages.1.blocks.0.mlp.fc2.bias")[0])
    target = re.escape(timm_to_keras_name("stages.0.blocks.0.norm.weight")[0])
    assert_fails(
        tmp_path, WeightMismatchError,
        r"(?s)\+ unused source tensors.*stages\.1\.blocks\.0\.extra\.weight.*"
        rf"- unassigned Keras variables.*{unassigned}.*"
        r"source key 'stages\.0\.blocks\.0\.norm\.weight' has shape \(7,\).*"
        rf"'{target}' has shape \(40,\)",
        path,
    )


def test_existing_output_is_kept(atto_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert(atto_dir, out)
    assert (out / "keep.txt").exists()


def test_training_checkpoint_key_and_backbone_only(atto_dir, tmp_path):
    from convnext_zoo.preset_dir import read_config

    state = official_state_dict(timm_model("v2", "atto").state_dict())
    ema = {k: v + 1 for k, v in state.items()}
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": state, "model_ema": ema, "epoch": 10, "optimizer": {"lr": 0.1}}, path)
    config = convert(path, tmp_path / "ema", checkpoint_key="model_ema", backbone_only=True)
    assert config["head"] == "none"
    assert config["provenance"]["unused_source_tensors"] == [
        "head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert read_config(tmp_path / "ema")["provenance"]["file_name"] == "checkpoint-best.pth"
    assert_fails(tmp_path, Exception, r"checkpoint_key='ema'.*model_ema", path, checkpoint_key="ema")


def test_missing_torch_gives_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "x.pth"
    path.write_bytes(b"irrelevant")
    monkeypatch.setitem(sys.modules, "torch", None)
    assert_fails(tmp_path, ImportError, r"x\.pth needs the optional package 'torch'.*convnext_zoo\[torch\]", path)


def test_hub_repo_id_is_downloaded(atto_dir, tmp_path, monkeypatch):
    """A bare repo id means `hf://` and goes through huggingface_hub (stubbed here: no network)."""
    import huggingface_hub
    from huggingface_hub import errors

    calls = []

    def hf_hub_download(repo_id, filename, revision=None, force_download=False):
        calls.append((repo_id, filename, revision))
        if not (atto_dir / filename).is_file():
            raise errors.EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(atto_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    repo = "timm/convnextv2_atto.fcmae_ft_in1k"
    config = convert(repo, tmp_path / "out", revision="abc123")
    # config.json first (it tells a keras-hub preset apart), then the first weights file.
    assert calls[:2] == [(repo, "config.json", "abc123"), (repo, "model.safetensors", "abc123")]
    assert all(name not in ("pytorch_model.bin",) for _, name, _ in calls)
    provenance = config["provenance"]
    assert (provenance["source"], provenance["revision"]) == (repo, "abc123")


def test_source_that_is_nothing(tmp_path):
    assert_fails(tmp_path, ValueError, r"Unknown preset.*'hf://org/repo'.*existing local directory or "
                 r"weights file", str(tmp_path / "missing" / "model.pth"))


def test_timm_pytorch_model_bin_matches_safetensors(atto_dir, tmp_path):
    """timm's pickled `pytorch_model.bin` converts to the same weights as its safetensors."""
    from convnext_zoo.checkpoint_io import SafetensorsReader

    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("pytorch_model.bin", "config.json"):
        (folder / name).write_bytes((atto_dir / name).read_bytes())
    from_bin = convert(folder, tmp_path / "a")
    from_st = convert(atto_dir, tmp_path / "b")
    assert from_bin["provenance"]["file_name"] == "pytorch_model.bin"
    assert from_st["provenance"]["file_name"] == "model.safetensors"
    a = SafetensorsReader(tmp_path / "a" / "model.safetensors")
    b = SafetensorsReader(tmp_path / "b" / "model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        np.testing.assert_array_equal(a.get(key), b.get(key))


def test_sharded_safetensors_index(atto_dir, tmp_path):
    """A `model.safetensors.index.json` with two shards converts like the single file."""
    from safetensors.numpy import save_file

    from convnext_zoo.checkpoint_io import SafetensorsReader

    reader = SafetensorsReader(atto_dir / "model.safetensors")
    keys = sorted(reader.keys())
    folder = tmp_path / "sharded"
    folder.mkdir()
    weight_map = {}
    for index, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{index + 1}-of-00002.safetensors"
        save_file({k: np.array(reader.get(k)) for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = convert(folder, tmp_path / "a")
    assert [f["name"] for f in config["provenance"]["files"]] == [
        "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors"]
    convert(atto_dir, tmp_path / "b")
    a = SafetensorsReader(tmp_path / "a" / "model.safetensors")
    b = SafetensorsReader(tmp_path / "b" / "model.safetensors")
    for key in b.keys():
        np.testing.assert_array_equal(a.get(key), b.get(key))


def test_conversion_shows_a_progress_bar_over_every_tensor(atto_dir, tmp_path, monkeypatch):
    import importlib

    bars = []

    class RecordingBar:
        def __init__(self, iterable, desc=None, unit=None, disable=None):
            self.items, self.desc, self.disable = list(iterable), desc, disable
            bars.append(self)

        def __iter__(self):
            return iter(self.items)

    # huggingface_hub.utils is a lazy module: patch the class where it lives.
    monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "tqdm", RecordingBar)
    config = convert(atto_dir, tmp_path / "out")
    assert len(bars) == 1
    assert bars[0].desc == "Converting model.safetensors"
    # disable=None: tqdm shows the bar on a terminal and stays quiet in logs.
    assert bars[0].disable is None
    from convnext_zoo.checkpoint_io import SafetensorsReader

    assert len(bars[0].items) == len(SafetensorsReader(atto_dir / "model.safetensors").keys())
    assert config["num_classes"] == 1000
