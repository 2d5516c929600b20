"""`verify` / `scripts/verify_checkpoint.py` and `scripts/convert_checkpoint.py` end to end.

Every source format's reference (timm, transformers, OpenCLIP, DINOv3) on
small models with every parameter randomised: a faithful conversion passes,
and one perturbed tensor of the preset fails in the output it changes.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from tests.convert_helpers import hf_model, official_state_dict, randomise, timm_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", name), *map(str, args)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def call_script(name, *args, capsys):
    """`main(argv)` of a script in this process: its exit status and what it printed (no interpreter start-up;
    the scripts' `__main__` is `sys.exit(main())`, run as a process by the help test below)."""
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "scripts", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    status = module.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=status, stdout=out, stderr=err)


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
    # V2 atto: an official file of the smallest variant (3.7 M parameters) keeps the conversions and comparisons short.
    path = folder / "convnextv2_atto_1k_224_ema.pt"
    torch.save({"model": official_state_dict(timm_model("v2", "atto").state_dict())}, path)
    return path


def test_scripts_convert_then_verify(official_pth, tmp_path, capsys):
    out = tmp_path / "atto"
    result = call_script("convert_checkpoint.py", official_pth, out, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert '"variant": "atto"' in result.stdout
    result = call_script("verify_checkpoint.py", official_pth, out, capsys=capsys)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "top-1 agreement 100%" in result.stdout and "PASS" in result.stdout
    # A tampered preset: the script says FAIL and exits 1.
    perturb(out, "stages.2.blocks.4.mlp.fc1.bias")
    result = call_script("verify_checkpoint.py", official_pth, out, capsys=capsys)
    assert result.returncode == 1 and "FAIL" in result.stdout, result.stdout + result.stderr

    # A wrong override fails cleanly and leaves nothing behind.
    result = call_script("convert_checkpoint.py", official_pth, tmp_path / "bad", "--variant", "base", capsys=capsys)
    assert result.returncode == 1 and "variant='base'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bad").exists()


def perturb(preset, name, delta=0.05):
    """Adds `delta` to one tensor of a preset written in timm's layout."""
    from safetensors.numpy import load_file, save_file

    weights = str(preset / "model.safetensors")
    tensors = load_file(weights)
    assert name in tensors, sorted(tensors)[:10]
    tensors[name] = np.ascontiguousarray(tensors[name] + delta)
    save_file(tensors, weights)


def test_verify_detects_a_tampered_preset(official_pth, tmp_path):
    from convnext_zoo.convert import convert_checkpoint
    from convnext_zoo.verification import verify

    convert_checkpoint(official_pth, tmp_path / "atto")
    report = verify(official_pth, tmp_path / "atto")
    assert report["passed"] and report["images"] == 4
    assert report["logits_relative"] < 1e-5 and report["features_relative"] < 1e-5

    perturb(tmp_path / "atto", "stages.2.blocks.4.mlp.fc1.bias")
    report = verify(official_pth, tmp_path / "atto")
    assert not report["passed"] and report["logits_relative"] > 1e-4


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


def convert_and_verify(source, preset, **overrides):
    """Converts `source` at 64 px (the photographs resized: a few seconds) and verifies it."""
    from convnext_zoo.convert import convert_checkpoint
    from convnext_zoo.verification import verify

    convert_checkpoint(source, preset, input_size=64, **overrides)
    return verify(source, preset)


def assert_passed(report, compared):
    """`compared` (besides the features) within 1e-5, and nothing else compared."""
    assert report["passed"], report
    for name in ("logits", "features", "embedding", "patch_features"):
        if name in compared or name == "features":
            assert report[f"{name}_relative"] < 1e-5, (name, report)
        else:
            assert report[f"{name}_relative"] is None, (name, report)


# === timm's architecture and head options ===


@pytest.mark.parametrize("arch, options", [
    ("convnext_atto_ols", {"head_norm_first": True}),  # V1 custom shape, tiered stem, 1x1-conv MLPs
    ("convnext_zepto_rms", {"head_hidden_size": 24}),  # SimpleNorm, large_mlp's head narrowed
], ids=["atto_ols_hnf", "zepto_rms_mlp"])
def test_verify_timm_architecture_and_head_options(arch, options, tmp_path):
    """timm's reference is built with every option: otherwise it would not load strictly."""
    import timm
    from timm.models import save_for_hf

    model = randomise(timm.create_model(arch, pretrained=False, num_classes=10, **options), seed=11)
    save_for_hf(model.eval(), tmp_path / "src", safe_serialization=True)
    report = convert_and_verify(tmp_path / "src", tmp_path / "preset")
    assert report["reference"] == "timm"
    assert_passed(report, {"logits"})


def test_verify_transformers_custom_shape(tmp_path):
    """A transformers ConvNeXt of no named variant's depths and widths."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 48, 64], num_labels=7)
    randomise(ConvNextForImageClassification(config), seed=12).eval().save_pretrained(tmp_path / "hf")
    report = convert_and_verify(tmp_path / "hf", tmp_path / "preset")
    assert report["reference"] == "transformers"
    assert_passed(report, {"logits"})


# === OpenCLIP image towers ===


def open_clip_source(folder, seed=13):
    """An OpenCLIP repo as OpenCLIP writes it: the whole CLIP model and its full config."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 24,
        "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "mlp", "image_size": 64},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    model = randomise(open_clip.CLIP(**model_cfg), seed).eval()
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    preprocess = {"mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic"}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    return folder


def test_verify_open_clip_tower_and_a_tampered_projection(tmp_path, capsys, monkeypatch):
    from convnext_zoo import cli
    from convnext_zoo.checkpoint_io import CheckpointError
    from convnext_zoo.verification import format_report, verify

    source = open_clip_source(tmp_path / "clip")
    report = convert_and_verify(source, tmp_path / "preset")
    assert report["reference"] == "open_clip"
    assert_passed(report, {"embedding"})
    assert "embedding:" in format_report(report)

    # The projection alone changed: the trunk still matches, the embedding does
    # not, and the report fails (also through the CLI, exit status 1).
    perturb(tmp_path / "preset", "head.fc.weight")
    report = verify(source, tmp_path / "preset")
    assert report["features_relative"] < 1e-5 and report["embedding_relative"] > 1e-3
    assert not report["passed"]
    assert cli.main(["verify", str(source), str(tmp_path / "preset"), "--format", "open_clip"]) == 1
    printed = capsys.readouterr().out
    assert "embedding:" in printed and "FAIL" in printed

    # Without open_clip: one line naming the package to install.
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r"pip install open-clip-torch"):
        verify(source, tmp_path / "preset")
    monkeypatch.undo()
    # Without the config the reference is built from: said so, in one line.
    (source / "open_clip_config.json").unlink()
    with pytest.raises(CheckpointError, match="open_clip_config.json"):
        verify(source, tmp_path / "preset")


# === DINOv3 ===


def test_verify_dinov3_transformers_and_timm_layouts(tmp_path):
    import timm
    from timm.models import save_for_hf
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

    from convnext_zoo.layout import dinov3_to_timm_name
    from convnext_zoo.verification import verify

    depths, dims = [1, 1, 2, 1], [16, 32, 48, 64]
    model = DINOv3ConvNextModel(DINOv3ConvNextConfig(depths=depths, hidden_sizes=dims))
    randomise(model, seed=14).eval().save_pretrained(tmp_path / "hf")
    report = convert_and_verify(tmp_path / "hf", tmp_path / "hf_preset")
    assert "DINOv3ConvNextModel" in report["reference"]
    assert_passed(report, {"embedding", "patch_features"})

    # timm's layout of the same tensors (`convnext_*.dinov3_lvd1689m`): timm's reference.
    tower = timm.create_model("convnext_tiny", pretrained=False, num_classes=0, depths=depths, dims=dims)
    tower.load_state_dict({dinov3_to_timm_name(k): v for k, v in model.state_dict().items()}, strict=True)
    save_for_hf(tower.eval(), tmp_path / "timm", safe_serialization=True)
    report = convert_and_verify(tmp_path / "timm", tmp_path / "timm_preset")
    assert report["reference"] == "timm"
    assert_passed(report, {"embedding", "patch_features"})

    # The final norm alone changed: the trunk matches, both normalised outputs do not.
    perturb(tmp_path / "hf_preset", "head.norm.weight", delta=0.5)
    report = verify(tmp_path / "hf", tmp_path / "hf_preset")
    assert report["features_relative"] < 1e-5 and not report["passed"]
    assert report["embedding_relative"] > 1e-3 and report["patch_features_relative"] > 1e-3
