"""`convnext-zoo pretrain`: a real (short) FCMAE run on scikit-learn's digits, its outputs, resume, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convnext_zoo import cli
from tests.run_helpers import kill_after_epochs, resumed_epochs, run_cli

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from write_digits import write_digits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(capsys, *argv):
    return run_cli(capsys, "pretrain", *argv)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    assert write_digits(str(root), per_class=3) == {"train": 30, "val": 30}
    # Labels are ignored: images at any depth, and loose files beside the folders.
    with Image.open(next((root / "train" / "7").iterdir())) as image:
        image.save(root / "train" / "loose.png")
        (root / "train" / "7" / "deeper").mkdir()
        image.convert("L").save(root / "train" / "7" / "deeper" / "gray.png")
    (root / "train" / "notes.txt").write_text("not an image")
    return root / "train"


@pytest.fixture(scope="module")
def pretrained(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    status = cli.main(["pretrain", str(digits), "--variant", "atto", "--output", str(out),
                       "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--crop-scale", "0.5",
                       "--verbose", "0"])
    assert status == 0
    return out


def test_pretrain_writes_encoder_fcmae_grids_and_log_that_fine_tune_and_continue(pretrained, digits, tmp_path, capsys):
    import keras

    import convnext_zoo
    from convnext_zoo.fcmae import load_fcmae
    from convnext_zoo.weights import keras_variables

    assert sorted(os.listdir(pretrained)) == ["encoder", "fcmae", "pretraining_log.json", "reconstructions"]
    assert not os.path.exists(str(pretrained) + ".partial")
    log = json.loads((pretrained / "pretraining_log.json").read_text())
    assert log["num_images"] == 32 and log["ignored_files"] == 1  # 30 + loose + deeper; notes.txt
    assert (log["image_size"], log["patch_size"], log["grid"]) == (32, 8, [4, 4])
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and log["plan"]["lr"] == 1e-3
    assert log["plan"]["betas"] == [0.9, 0.95] and log["plan"]["crop_scale"] == [0.5, 1.0]
    assert sorted(os.listdir(pretrained / "reconstructions")) == ["epoch_001.png", "epoch_002.png"]
    with Image.open(pretrained / "reconstructions" / "epoch_002.png") as grid:
        # 3 rows (original, masked, reconstructed) x 8 images of 32 px, scaled 3x.
        assert grid.size == (8 * 32 * 3, 3 * 32 * 3) and grid.mode == "RGB"
        rows = np.asarray(grid).reshape(3, 96, 8, 96, 3)
    # The masked row is the original outside its grey patches; the reconstruction differs.
    assert (rows[1] == rows[0]).mean() > 0.2 and (rows[1] != rows[0]).mean() > 0.2
    assert np.abs(rows[2].astype(int) - rows[0]).max() > 0

    model = load_fcmae(pretrained / "fcmae")
    encoder = convnext_zoo.from_preset(str(pretrained / "encoder"))
    assert type(encoder).__name__ == "ConvNeXtBackbone"
    trained = keras_variables(model.encoder)
    for name, variable in keras_variables(encoder).items():
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable),
                                      keras.ops.convert_to_numpy(trained[name]), err_msg=name)
    # Training moved the weights away from any initialisation: LayerNorm gammas start at 1.
    assert np.abs(keras.ops.convert_to_numpy(trained["stem_1/gamma"]) - 1).max() > 0
    classifier = convnext_zoo.from_preset(str(pretrained / "encoder"), num_classes=4,
                                          input_shape=(32, 32, 3), preprocessing=False)
    assert classifier.num_classes == 4

    # The encoder fine-tunes, and an output continues. In the same test: a module fixture runs once per
    # pytest-xdist worker, and the pre-training is the expensive part.
    data = digits.parent  # train/ and val/ class folders
    out = tmp_path / "tuned"
    status = cli.main(["finetune", str(pretrained / "encoder"), str(data), "--output", str(out),
                       "--epochs", "1", "--batch-size", "8", "--verbose", "0"])
    assert status == 0, capsys.readouterr().err
    assert "a new 10-class head (the preset has no head)" in capsys.readouterr().out
    log = json.loads((out / "training_log.json").read_text())
    assert log["plan"]["recipe"] == "v2_fcmae_ft_in1k" and log["num_val"] == 30

    # --init OUT continues with the decoder too.
    from convnext_zoo import pretrain

    options = {"variant": "atto", "image_size": 32, "mask_ratio": 0.6, "seed": 0, "init": str(pretrained)}
    model = pretrain.build_fcmae(options)
    saved = keras_variables(load_fcmae(pretrained / "fcmae"))
    for name, variable in keras_variables(model).items():
        np.testing.assert_array_equal(np.asarray(variable), np.asarray(saved[name]), err_msg=name)


def test_crop_scale_one_trains_on_whole_images_and_the_default_crops(digits):
    """`--crop-scale 1.0` feeds each whole image (normalised); the official 0.2 feeds crops."""
    from convnext_zoo import finetune_data, pretrain
    from convnext_zoo.variants import IMAGENET_MEAN, IMAGENET_STD

    folder = finetune_data.scan_unlabelled(str(digits))
    whole = np.stack([np.asarray(Image.open(path).convert("RGB"), "float32") for path in folder.files])
    whole = (whole - np.array(IMAGENET_MEAN, "float32") * 255) / (np.array(IMAGENET_STD, "float32") * 255)
    options = {"epochs": 1, "batch_size": len(folder.files), "image_size": 32, "seed": 0, "flip": False}
    for crop_scale, crops in ((1.0, False), (None, True)):
        plan = pretrain.training_plan({**options, "crop_scale": crop_scale}, steps_per_epoch=1)
        assert plan["crop_scale"] == [crop_scale or 0.2, 1.0] and plan["flip"] is False
        batch = next(iter(pretrain._dataset(folder, options, plan))).numpy()
        # Each fed image against its nearest whole image (the dataset shuffles).
        nearest = np.abs(batch[:, None] - whole[None]).max(axis=(2, 3, 4)).min(axis=1)
        if crops:
            assert (nearest > 0.5).mean() > 0.5, nearest
        else:
            assert nearest.max() < 1e-3, nearest


@pytest.mark.slow  # two processes, one killed: about a minute
def test_killed_run_resumes_from_its_last_finished_epoch(digits, tmp_path):
    """SIGKILL after two epochs, then --resume: epochs 3-4 only, the first records and grids kept."""
    out, work = tmp_path / "out", tmp_path / "out.partial"
    argv = [sys.executable, "-m", "convnext_zoo", "pretrain", str(digits), "--output", str(out),
            "--epochs", "4", "--batch-size", "8", "--verbose", "2"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    before = kill_after_epochs(argv, env, work / "epochs.json")
    done = len(before)
    assert 2 <= done < 4 and not out.exists()

    shown = resumed_epochs(argv, env)
    assert shown == list(range(done + 1, 5))  # nothing before the kill is trained again
    log = json.loads((out / "pretraining_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2, 3, 4]
    assert log["epochs"][:done] == before
    assert len(os.listdir(out / "reconstructions")) == 4 and not work.exists()


def _images(folder, count=4, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((size, size, 3), i * 40, "uint8")).save(folder / f"{i}.png")


@pytest.mark.parametrize("case, message", [
    ("mask_high", "--mask-ratio must be in (0, 1). Received: 1.0"),
    ("mask_zero", "--mask-ratio must be in (0, 1). Received: 0.0"),
    ("mask_few", "--mask-ratio 0.97 keeps 0 of the 16 patches at 32 px"),
    ("crop_zero", "--crop-scale must be in (0, 1]. Received: 0.0"),
    ("crop_high", "--crop-scale must be in (0, 1]. Received: 1.5"),
    ("size", "--image-size 36: the patch grid does not divide it (patch size 8"),
    ("init_classifier", "--init convnext_v2_atto_imagenet is not an FCMAE encoder of ConvNeXt V2-atto: "
                        "it is a ConvNeXt V2-atto with a 1000-class head"),
    ("init_variant", "--init convnext_v2_femto_fcmae is not an FCMAE encoder of ConvNeXt V2-atto: "
                     "it is a ConvNeXt V2-femto encoder"),
    ("init_v1", "is not an FCMAE encoder of ConvNeXt V2-atto: it is a ConvNeXt V1-tiny"),
    ("init_unknown", "--init convnext_v2_attoo_fcmae cannot be read"),
    ("empty", "No images in"),
    ("missing", "No such data folder"),
    ("batch", "--batch-size 64 is larger than the 4 images"),
    ("exists", "already exists; choose a new --output or pass --overwrite"),
    ("interrupted", "pass --resume"),
    ("resume_nothing", "Nothing to resume"),
    ("resume_other", "--resume of another run"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(case, message, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    argv = [data, "--output", out, "--image-size", 32, "--batch-size", 2]
    if case != "empty":
        _images(data / "any" / "folder")
    else:
        data.mkdir()
        (data / "sub").mkdir()
    extra = {"mask_high": ["--mask-ratio", 1.0], "mask_zero": ["--mask-ratio", 0.0],
             "mask_few": ["--mask-ratio", 0.97], "crop_zero": ["--crop-scale", 0.0],
             "crop_high": ["--crop-scale", 1.5],
             "init_classifier": ["--init", "convnext_v2_atto_imagenet"],
             "init_variant": ["--init", "convnext_v2_femto_fcmae"],
             "init_v1": ["--init", "convnext_v1_tiny"],
             "init_unknown": ["--init", "convnext_v2_attoo_fcmae"]}.get(case, [])
    if case == "size":
        argv[4] = 36
    elif case == "missing":
        argv[0] = tmp_path / "nowhere"
    elif case == "batch":
        argv[-1] = 64
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case in ("interrupted", "resume_other"):
        (tmp_path / "out.partial").mkdir()
        (tmp_path / "out.partial" / "run.json").write_text(json.dumps({"variant": "tiny"}))
    if case.startswith("resume"):
        extra.append("--resume")
    before = sorted(os.listdir(tmp_path))
    status, _, stderr = _run(capsys, *argv, *extra)
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convnext-zoo: error: "), stderr
    assert message in lines[0]
    assert sorted(os.listdir(tmp_path)) == before
    if case == "exists":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not out.exists()


def test_script_is_the_command(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "pretrain.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--variant", "--epochs", "--batch-size", "--image-size", "--mask-ratio", "--crop-scale", "--init",
                 "--dtype", "--distribute", "--resume", "--overwrite", "--seed"):
        assert flag in result.stdout


@pytest.mark.slow
def test_the_digits_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/fcmae_digits.py --quick: pre-training, both fine-tunings, the results files."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fcmae_digits.py"), "--quick",
                             "--head-init-scale", "0.001", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["fcmae_digits.json", "fcmae_digits.md", "reconstruction.png"]
    out = json.loads((tmp_path / "fcmae_digits.json").read_text())
    assert [(r["start"], r["seed"]) for r in out["runs"]] == [("pretrained", 0), ("random", 0)]
    assert all(r["labelled_images"] == 10 and r["test_images"] == 120 for r in out["runs"])
    assert out["pretraining"]["plan"]["epochs"] == 2 and out["pretraining"]["grid"] == [4, 4]
    for start in ("pretrained", "random"):
        assert 0.0 <= out["results"][start]["mean"] <= 1.0
    assert out["finetuning"]["head_init_scale"] == 0.001  # given to both starts' fine-tuning
    text = (tmp_path / "fcmae_digits.md").read_text()
    assert "| FCMAE encoder |" in text and "head init scale 0.001" in text
