"""`verify` / `scripts/verify_checkpoint.py` and `scripts/convert_checkpoint.py` end to end."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.convert_helpers import hf_model, official_state_dict, timm_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", name), *map(str, args)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def test_convert_script_help_documents_every_option():
    result = run_script("convert_checkpoint.py", "--help")
    assert result.returncode == 0
    from convnext_zoo.convert import OVERRIDES

    for option in OVERRIDES:
        flag = {"labels": "--labels", "name": "--name"}.get(option, "--" + option.replace("_", "-"))
        assert flag in result.stdout, flag
    assert "--source-format" in result.stdout


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    path = folder / "convnext_tiny_1k_224_ema.pth"
    torch.save({"model": official_state_dict(timm_model("v1", "tiny").state_dict())}, path)
    return path


def test_scripts_convert_then_verify(official_pth, tmp_path):
    out = tmp_path / "tiny"
    result = run_script("convert_checkpoint.py", official_pth, out)
    assert result.returncode == 0, result.stderr
    assert '"variant": "tiny"' in result.stdout
    result = run_script("verify_checkpoint.py", official_pth, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "top-1 agreement 100%" in result.stdout and "PASS" in result.stdout

    # A wrong override fails cleanly and leaves nothing behind.
    result = run_script("convert_checkpoint.py", official_pth, tmp_path / "bad", "--variant", "base")
    assert result.returncode == 1 and "variant='base'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bad").exists()


def test_verify_detects_a_tampered_preset(official_pth, tmp_path):
    from safetensors.numpy import load_file, save_file

    from convnext_zoo.convert import convert_checkpoint
    from convnext_zoo.verification import verify

    convert_checkpoint(official_pth, tmp_path / "tiny")
    report = verify(official_pth, tmp_path / "tiny")
    assert report["passed"] and report["images"] == 4
    assert report["logits_relative"] < 1e-5 and report["features_relative"] < 1e-5

    weights = tmp_path / "tiny" / "model.safetensors"
    tensors = load_file(str(weights))
    name = "stages.2.blocks.4.mlp.fc1.bias"  # written in timm's layout
    tensors[name] = np.ascontiguousarray(tensors[name] + 0.05)
    save_file(tensors, str(weights))
    report = verify(official_pth, tmp_path / "tiny")
    assert not report["passed"] and report["logits_relative"] > 1e-4
    result = run_script("verify_checkpoint.py", official_pth, tmp_path / "tiny")
    assert result.returncode == 1 and "FAIL" in result.stdout


def test_verify_transformers_and_fcmae(tmp_path):
    from convnext_zoo.convert import convert_checkpoint
    from convnext_zoo.verification import verify

    hf_model("v2", "atto").save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "hf_preset")
    report = verify(tmp_path / "hf", tmp_path / "hf_preset")
    assert report["passed"] and report["reference"] == "transformers", report

    state = official_state_dict(timm_model("v2", "atto", num_classes=0).state_dict())
    fcmae = {k: v for k, v in state.items() if not k.startswith("norm.")}
    torch.save({"model": fcmae}, tmp_path / "fcmae.pt")
    convert_checkpoint(tmp_path / "fcmae.pt", tmp_path / "fcmae")
    report = verify(tmp_path / "fcmae.pt", tmp_path / "fcmae")
    assert report["passed"] and report["logits_relative"] is None, report

    # A fresh head cannot match the source: only the trunk is compared.
    convert_checkpoint(tmp_path / "fcmae.pt", tmp_path / "fresh", init_head=True, num_classes=5)
    report = verify(tmp_path / "fcmae.pt", tmp_path / "fresh")
    assert report["passed"] and report["logits_relative"] is None, report

    # convnext_zoo.from_preset (the package entry point) loads a converted directory.
    import convnext_zoo

    assert convnext_zoo.from_preset(str(tmp_path / "fresh")).output.shape[-1] == 5
