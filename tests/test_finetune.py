"""`convnext-zoo finetune`: a real (short) run on scikit-learn's digits, and bad input."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from tests.run_helpers import kill_after_epochs, resumed_epochs, run_cli, write_shallow_preset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from write_digits import write_digits  # noqa: E402


def _run(capsys, *argv):
    return run_cli(capsys, "finetune", *argv)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    counts = write_digits(str(root), per_class=4)
    assert counts == {"train": 40, "val": 40}
    # Other colour modes, converted on reading: a grayscale and an RGBA image.
    folder = root / "train" / "3"
    first = sorted(folder.iterdir())[0]
    with Image.open(first) as image:
        image.convert("L").save(folder / "gray.png")
        image.convert("RGBA").save(folder / "rgba.png")
    (root / "train" / "notes.txt").write_text("not an image")
    # One unreadable image: left out with a count, the run goes on.
    (root / "train" / "5" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def test_finetune_writes_a_loadable_preset(digits, tmp_path, capsys):
    out = tmp_path / "out"
    status, stdout, stderr = _run(
        capsys, "convnext_v2_atto", digits, "--output", out, "--from-scratch", "--epochs", 1,
        "--batch-size", 8, "--mixup", 0.2, "--head-init-scale", 0.001, "--verbose", 0)
    assert status == 0, stderr
    assert "10 classes, 42 training images, 40 validation images" in stdout
    assert "1 unreadable image files skipped" in stdout and "broken.jpg" in stdout
    # No --image-size: the 32-px digits train at 32 px, not the preset's 224.
    assert "training at 32 px for 1 epochs" in stdout
    assert "L/RGBA images converted to RGB" in stdout
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors",
                                       "training_curves.png", "training_log.json"]
    assert not os.path.exists(str(out) + ".partial")
    log = json.loads((out / "training_log.json").read_text())
    assert log["class_names"] == [str(d) for d in range(10)]
    assert len(log["epochs"]) == 1 and log["plan"]["recipe"] == "small_from_scratch"
    assert log["plan"]["mixup"] == 0.2 and log["plan"]["ema"] and log["image_size"] == 32
    assert log["plan"]["head_init_scale"] == 0.001  # the recipe's is 1.0
    assert log["num_train"] == 42 and log["unreadable_files"] == [os.path.join("5", "broken.jpg")]
    with Image.open(out / "training_curves.png") as png:
        assert png.size[0] > 300

    import convnext_zoo
    from convnext_zoo import preset_dir

    config = preset_dir.read_config(str(out)) if hasattr(preset_dir, "read_config") else None
    raw = json.loads((out / "config.json").read_text())
    section = raw.get("convnext_zoo", raw)
    assert section["class_names"] == [str(d) for d in range(10)]
    assert config is None or config["class_names"] == section["class_names"]
    model = convnext_zoo.from_preset(str(out))
    # The attached preprocessing reproduces training's: same accuracy on the
    # raw validation PNGs as the log's final (EMA) evaluation.
    images, labels = [], []
    for digit in range(10):
        for path in sorted((digits / "val" / str(digit)).iterdir()):
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
            labels.append(digit)
    scores = np.asarray(model.predict(np.stack(images), verbose=0))
    accuracy = float(np.mean(scores.argmax(-1) == np.array(labels)))
    assert scores.shape == (40, 10)
    assert abs(accuracy - log["final"]["val_accuracy"]) <= 1 / 40 + 1e-9


def test_the_plans_head_init_scale_scales_the_new_head():
    """`--head-init-scale` reaches the model: the new head's initial weights shrink by that factor."""
    import keras

    from convnext_zoo import finetune

    def head_std(scale):
        plan = {"drop_path": 0.0, "head_init_scale": scale}
        model = finetune._build({"preset": "convnext_v2_atto", "image_size": 32}, 10, plan, load_weights=False)
        return float(keras.ops.convert_to_numpy(model.get_layer("head_fc").kernel).std())

    assert head_std(0.001) / head_std(1.0) == pytest.approx(0.001, rel=0.1)


def _class_dirs(root, classes, per_class=2):
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), i * 40, "uint8")).save(folder / f"{i}.png")


@pytest.mark.parametrize("case, message", [
    ("missing", "No such data folder"),
    ("empty", "No images in"),
    ("single", "Only one class ('a')"),
    ("empty_class", "Class folder(s) without images"),
    ("corrupt", "4 of 8 image files cannot be read"),
    ("batch", "--batch-size 64 is larger than the 4 training images"),
    ("exists", "already exists"),
    ("resume_nothing", "Nothing to resume"),
    ("resume_other", "--resume of another run (preset: 'convnext_v1_tiny' -> 'convnext_v2_atto'"),
    ("interrupted", "pass --resume"),
    ("head_scale", "--head-init-scale must be > 0. Received: 0.0."),
])
def test_bad_input_is_one_line_exit_2_output_untouched(case, message, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    argv = ["convnext_v2_atto", data, "--output", out, "--image-size", 32, "--batch-size", 2]
    if case == "missing":
        argv[1] = tmp_path / "nowhere"
    elif case == "single":
        _class_dirs(data, ["a"])
    elif case == "empty_class":
        _class_dirs(data, ["a", "b"])
        (data / "c").mkdir()
    elif case == "corrupt":
        _class_dirs(data, ["a", "b"], per_class=2)
        for i in range(4):  # more than the few that are skipped
            (data / "b" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    elif case == "batch":
        _class_dirs(data, ["a", "b"])
        argv[-1] = 64
    elif case == "exists":
        _class_dirs(data, ["a", "b"])
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case in ("resume_nothing", "resume_other", "interrupted"):
        _class_dirs(data, ["a", "b"])
        if case != "resume_nothing":
            work = tmp_path / "out.partial"
            work.mkdir()
            (work / "run.json").write_text(json.dumps({"preset": "convnext_v1_tiny"}))
        if case != "interrupted":
            argv.append("--resume")
    elif case == "head_scale":
        _class_dirs(data, ["a", "b"])
        argv += ["--head-init-scale", 0]
    before = sorted(os.listdir(tmp_path))
    status, _, stderr = _run(capsys, *argv)
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convnext-zoo: error: "), stderr
    assert message in lines[0]
    assert sorted(os.listdir(tmp_path)) == before
    if case == "exists":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not out.exists()


@pytest.mark.slow
def test_digits_from_scratch_learns_the_digits(tmp_path, capsys):
    """The README's digits run (issue 18), on a 12-epoch schedule: the 80/20 split of all 1,797 digits.

    Every other setting is the bare command's (the small_from_scratch recipe,
    32 px, batch 32). The README's 40-epoch figure (99.72 %) is the
    benchmark's (benchmarks/results/finetune): 800 s of training on a 2-core
    AVX2 CPU, too long for every CI run. 12 epochs reached 99.16 % there
    (285 s); the bar leaves two images of room for another CPU's round-off.
    """
    write_digits(str(tmp_path / "digits"))
    out = tmp_path / "out"
    status, stdout, stderr = _run(
        capsys, "convnext_v2_atto", tmp_path / "digits", "--output", out, "--from-scratch",
        "--epochs", 12, "--verbose", 0)
    assert status == 0, stderr
    assert "training at 32 px for 12 epochs" in stdout
    log = json.loads((out / "training_log.json").read_text())
    assert log["num_val"] == 359
    assert (log["plan"]["recipe"], log["plan"]["batch_size"]) == ("small_from_scratch", 32)
    assert log["final"]["val_accuracy"] >= 0.985


@pytest.mark.slow  # two processes, one killed: about a minute
def test_killed_run_resumes_from_its_last_finished_epoch(digits, tmp_path):
    """A run killed with SIGKILL after an epoch continues there with --resume; OUT_DIR only at the end."""
    out = tmp_path / "out"
    work = tmp_path / "out.partial"
    preset = write_shallow_preset(str(tmp_path / "shallow"))
    argv = [sys.executable, "-m", "convnext_zoo", "finetune", preset, str(digits),
            "--output", str(out), "--from-scratch", "--epochs", "6", "--batch-size", "8",
            "--verbose", "2"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    before = kill_after_epochs(argv, env, work / "epochs.json")
    done = len(before)
    assert 2 <= done < 6 and not out.exists()

    shown = resumed_epochs(argv, env)
    assert shown == list(range(done + 1, 7))  # nothing before the kill is trained again
    log = json.loads((out / "training_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == list(range(1, 7))
    assert log["epochs"][:done] == before  # the first run's records, kept as they were
    assert not work.exists()
    import convnext_zoo

    assert convnext_zoo.from_preset(str(out)).num_classes == 10


def test_finetune_from_a_preset_directory_replaces_its_head_and_says_so(digits, tmp_path, capsys):
    """The user's path: pretrained weights (here a random 3-class preset) -> 10 digit classes."""
    import convnext_zoo
    from convnext_zoo import writer

    source = convnext_zoo.create_convnext_v2("atto", num_classes=3, input_shape=(32, 32, 3))
    writer.save_preset(source, str(tmp_path / "pretrained"))
    out = tmp_path / "out"
    status, stdout, stderr = _run(capsys, tmp_path / "pretrained", digits, "--output", out,
                                  "--epochs", 1, "--batch-size", 8, "--verbose", 0)
    assert status == 0, stderr
    assert "a new 10-class head (the preset has its 3-class head)" in stdout
    log = json.loads((out / "training_log.json").read_text())
    assert log["plan"]["recipe"] == "v2_fcmae_ft_in1k" and log["plan"]["layer_decay"] < 1.0
    tuned = convnext_zoo.from_preset(str(out))
    assert tuned.num_classes == 10
