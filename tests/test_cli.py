"""The installed `convnext-zoo` entry point, run as a subprocess.

Checks output, exit codes (errors: 2 with one line on stderr, no traceback),
that `--help`, `list` and `info` stay under a second without importing Keras
or TensorFlow, and predict / convert --verify / push against local files and
the local Hub server.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.path.dirname(sys.executable), "convnext-zoo")
PHOTO = os.path.join(ROOT, "examples", "chelsea.jpg")
HEAVY = ("keras", "tensorflow", "jax", "torch", "keras_hub", "huggingface_hub")

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer  # noqa: E402



def env(**extra):
    base = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_DISABLE_XET="1")
    base.pop("CONVNEXT_ZOO_LIGHT_IMPORT", None)
    base.update(extra)
    return base


def run(*args, timeout=300, **extra):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout, env=env(**extra), cwd=ROOT)


def assert_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convnext-zoo: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("args", [["--help"], ["list"], ["info", "convnext_v1_tiny"],
                                  ["list", "--license", "apache-2.0", "--task", "features", "--max-params", "30M"]])
def test_fast_and_without_keras(args):
    best = min(_timed(args) for _ in range(3))
    assert best < 1.0, f"{args}: {best:.2f} s"
    # -X importtime lists every module the entry point imports.
    traced = subprocess.run([sys.executable, "-X", "importtime", BIN, *args], capture_output=True,
                            text=True, env=env(), timeout=60)
    assert traced.returncode == 0, traced.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in traced.stderr.splitlines() if "|" in line}
    assert "convnext_zoo" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def _timed(args):
    start = time.perf_counter()
    result = run(*args)
    assert result.returncode == 0, result.stderr
    return time.perf_counter() - start


def test_list_table_filters_and_json():
    table = run("list").stdout.splitlines()
    assert table[0].split() == ["name", "family", "variant", "resolution", "classes", "params", "top-1",
                                "task", "licence"]
    assert "106 presets." in table[-1]
    atto = run("list", "--family", "v2", "--variant", "atto").stdout
    assert "convnext_v2_atto_fcmae_ft_in1k" in atto and "cc-by-nc-4.0" in atto and "convnext_v1" not in atto
    entries = json.loads(run("list", "--json", "--classes", "21841").stdout)
    assert entries and all(e["num_classes"] == 21841 and e["family"] == "v1" for e in entries)
    module = subprocess.run([sys.executable, "-m", "convnext_zoo", "list", "--json"], capture_output=True,
                            text=True, env=env(), cwd=ROOT, timeout=60)
    assert len(json.loads(module.stdout)) == 106


def test_list_licence_task_and_size_filters():
    rows = json.loads(run("list", "--json", "--license", "apache-2.0", "--task", "classification",
                          "--max-params", "30M").stdout)
    names = {e["name"] for e in rows}
    assert {"convnext_v1_atto_d2_in1k", "convnext_v1_zepto_rms_ra4_e3600_r224_in1k", "convnext_v1_tiny_in1k"} <= names
    assert all(e["license"] == "apache-2.0" and e["task"] == "classification" and e["params"] <= 30_000_000
               for e in rows)
    assert "convnext_v1_small_in1k" not in names and "convnext_v2_atto_fcmae_ft_in1k" not in names
    clip = json.loads(run("list", "--json", "--task", "embedding", "--max-params", "1.5B").stdout)
    assert len(clip) == 12 and {e["label_set"] for e in clip} == {None}
    table = run("list", "--license", "dinov3-license").stdout
    assert "(gated)" in table and "8 presets." in table
    assert_error(run("list", "--license", "apache"), "license='apache'", "apache-2.0", "dinov3-license")
    assert_error(run("list", "--task", "detection"), "task='detection'", "classification, embedding, features")
    assert_error(run("list", "--max-params", "lots"), "max_params='lots'", "30M")


def test_info():
    result = run("info", "convnext_v2_atto")
    assert result.returncode == 0
    assert "name:          convnext_v2_atto_fcmae_ft_in1k" in result.stdout
    assert "3,708,400" in result.stdout and "cc-by-nc-4.0" in result.stdout
    entry = json.loads(run("info", "convnext_v1_tiny", "--json").stdout)
    assert entry["name"] == "convnext_v1_tiny_in1k" and "convnext_v1_tiny" in entry["aliases"]


def test_errors_are_one_line_exit_2(tmp_path):
    assert_error(run("info", "convnext_v3_tiny"), "Unknown preset", "convnext_v3_tiny")
    assert_error(run("predict", str(tmp_path / "missing.jpg")), "No such file")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert_error(run("predict", str(text)), "is not an image")
    assert_error(run("predict", PHOTO, "--preset", "convnext_v9_atto"), "Unknown preset")
    assert_error(run("verify", "x.safetensors", str(tmp_path / "nope")), "No such checkpoint")
    assert_error(run("verify", PHOTO, str(tmp_path / "nope")), "No such preset directory")
    assert_error(run("push", str(tmp_path / "nope"), "user/x"), "No such preset directory")
    usage = run("frobnicate")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr


def test_no_network_nothing_cached_exit_2(tmp_path):
    result = run("predict", PHOTO, "--preset", "convnext_v2_atto", HF_HUB_OFFLINE="1",
                 HF_HOME=str(tmp_path / "empty_home"))
    assert_error(result, "HF_HUB_OFFLINE", "cache")


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory):
    """A random-weight V2 atto classifier as a preset directory (224 px, 1000 classes)."""
    code = (
        "import sys, numpy as np, convnext_zoo;"
        "from convnext_zoo.publish import stage_preset;"
        "m = convnext_zoo.create_convnext_v2('atto', num_classes=1000);"
        "rng = np.random.default_rng(0);"
        "[v.assign((rng.normal(0, 0.05, v.shape) + (0.5 if len(v.shape) == 1 else 0)).astype('float32')) for v in m.weights];"
        "stage_preset(m, sys.argv[1])"
    )
    directory = tmp_path_factory.mktemp("preset")
    done = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True,
                          env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return str(directory)


def test_predict_text_and_json(preset_dir, tmp_path):
    png = tmp_path / "cat.png"
    from PIL import Image

    Image.open(PHOTO).save(png)
    result = run("predict", PHOTO, str(png), "--preset", preset_dir, "--top", "3", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout)
    assert [r["image"] for r in payload["results"]] == [PHOTO, str(png)]
    for r in payload["results"]:
        probabilities = [p["probability"] for p in r["predictions"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
        assert all(p["synset"].startswith("n") and p["label"] for p in r["predictions"])
    # JPEG and PNG of the same photo: same top class.
    assert payload["results"][0]["predictions"][0]["class"] == payload["results"][1]["predictions"][0]["class"]
    text = run("predict", PHOTO, "--preset", preset_dir, "--top", "2")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0] == f"{PHOTO}:" and len(lines) == 3 and lines[1].strip().endswith(")")


def test_push_dry_run_and_push_to_local_hub(preset_dir, tmp_path):
    dry = run("push", preset_dir, "user/cli-dry", "--dry-run", HF_ENDPOINT="http://127.0.0.1:9",
              HF_HOME=str(tmp_path / "home"))
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "Dry run" in dry.stdout and "model.safetensors" in dry.stdout and 'license: "cc-by-nc-4.0"' in dry.stdout
    with HubServer() as server:
        pushed = run("push", preset_dir, "user/cli", "--revision", "v1", HF_ENDPOINT=server.url,
                     HF_HOME=str(tmp_path / "home"))
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        assert "Pushed to" in pushed.stdout
        _, tree = server.hub.resolve("user/cli", "v1")
        assert {"config.json", "model.safetensors", "README.md"} <= set(tree)
        # (pull requests: tests/test_publish.py::test_branch_and_pull_request)


def random_timm_source(tmp_path, name="source", scale=1.0):
    torch = importlib.import_module("torch")
    timm = importlib.import_module("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn_like(p) * 0.02 + (0.5 if p.ndim == 1 else 0.0) * torch.rand_like(p)) * scale)
    source = tmp_path / name
    source.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(source / "model.safetensors"))
    return source


def test_convert(tmp_path):
    source = random_timm_source(tmp_path)
    out = tmp_path / "preset"
    result = run("convert", str(source), str(out), "--family", "v2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"Wrote {out}: ConvNeXt V2-atto, 1000 classes, head fc, licence cc-by-nc-4.0")
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert_error(run("convert", str(source), str(out)), "already exists")
    assert_error(run("convert", str(tmp_path / "absent.safetensors"), str(tmp_path / "o2")), "No such checkpoint")


@pytest.mark.slow
def test_convert_with_verify_and_failing_verify(tmp_path):
    source = random_timm_source(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(PHOTO, images)
    out = tmp_path / "preset"
    result = run("convert", str(source), str(out), "--verify", "--images", str(images))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "Wrote" in result.stdout and "PASS" in result.stdout
    # verify against a different checkpoint: FAIL, exit status 1.
    other = random_timm_source(tmp_path, "other", scale=1.1)
    failed = run("verify", str(other), str(out), "--images", str(images))
    assert failed.returncode == 1, failed.stdout + failed.stderr[-3000:]
    assert "FAIL" in failed.stdout
