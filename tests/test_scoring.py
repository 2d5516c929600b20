"""`convnext-zoo predict DIR --output results.jsonl` and `convnext_zoo.scoring`.

A random-weight V2 atto preset at 64 px scores scikit-image photographs in
nested folders: the JSON lines equal `model.predict` on the raw images, an
interrupted run resumes without redoing or losing an image, corrupt files are
skipped and listed, bad input is one line and exit status 2.
"""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from PIL import Image

import convnext_zoo
from convnext_zoo import cli, scoring
from convnext_zoo.writer import model_config, save_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["ant", "bee", "cat", "dog", "eel"]
PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket", "hubble_deep_field", "immunohistochemistry")


def _randomise(model, seed=0):
    # Distinct outputs per image: unit-scale norms and a wide head (default
    # initial weights give nearly uniform probabilities).
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if v.path.startswith("head_"):
            value = {"gamma": 1.0, "kernel": rng.normal(0, 0.1, v.shape)}.get(v.name, 0.0)
        else:
            value = rng.normal(0, 0.05, v.shape) + (0.5 if len(v.shape) == 1 else 0)
        v.assign(np.broadcast_to(value, v.shape).astype("float32"))


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A 5-class V2 atto classifier preset at 64 px, with its class names."""
    model = convnext_zoo.create_convnext_v2("atto", num_classes=len(CLASSES), input_shape=(None, None, 3))
    _randomise(model)
    path = str(tmp_path_factory.mktemp("presets") / "atto5")
    save_preset(model, path, config=model_config(model, image_size=[64, 64], class_names=CLASSES,
                                                 label_set=None))
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A headless V2 atto preset (as an FCMAE encoder is) at 64 px."""
    model = convnext_zoo.create_convnext_v2("atto", include_top=False, input_shape=(None, None, 3))
    _randomise(model, seed=1)
    path = str(tmp_path_factory.mktemp("presets") / "encoder")
    save_preset(model, path, config=model_config(model, image_size=[64, 64]))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Photographs as PNG in nested folders, grayscale and RGBA ones among them, and a text file."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    folders = [root, root / "b", root / "b" / "c"]
    for folder in folders[1:]:
        folder.mkdir()
    for i, name in enumerate(PHOTOS):
        image = Image.fromarray(getattr(skimage.data, name)())
        image.thumbnail((160, 160))  # small files, still of differing sizes and aspect ratios
        image.save(folders[i % 3] / f"{name}.png")
    with Image.open(folders[1] / "chelsea.png") as image:
        image.convert("RGBA").save(folders[2] / "chelsea_rgba.png")
        image.convert("L").save(folders[1] / "chelsea_gray.PNG")
    (root / "notes.txt").write_text("not an image")
    return root


def _raw(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _lines(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _softmax(logits):
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _cli(capsys, *argv):
    status = cli.main(["predict", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_listing_is_recursive_sorted_and_image_files_only(photos):
    images = scoring.list_images(photos)
    assert len(images) == len(PHOTOS) + 2
    assert "notes.txt" not in images and "b/chelsea_gray.PNG" in images and "b/c/chelsea_rgba.png" in images
    assert all((photos / p).is_file() for p in images)


def test_predictions_equal_model_predict_on_the_raw_images(preset, photos, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    status, stdout, stderr = _cli(capsys, photos, "--output", out, "--preset", preset, "--batch-size", 3,
                                  "--top", len(CLASSES))
    assert status == 0, stderr
    images = scoring.list_images(photos)
    assert f"Wrote {out}: {len(images)} images scored" in stdout
    assert "images/s" in stderr  # the progress bar
    lines = _lines(out)
    assert [line["image"] for line in lines] == images
    model = convnext_zoo.from_preset(preset)
    spread = []
    for line in lines:
        expected = _softmax(model.predict(_raw(photos / line["image"])[None], verbose=0)[0])
        got = np.zeros(len(CLASSES))
        for p in line["predictions"]:
            got[p["class"]] = p["probability"]
            assert p["label"] == CLASSES[p["class"]] and p["synset"] is None
        np.testing.assert_allclose(got, expected, atol=1e-5)
        probabilities = [p["probability"] for p in line["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True)
        spread.append(expected)
    # The photographs give outputs further apart than the tolerance: a line paired
    # with the next image (a shifted pairing) would fail.
    spread = np.array(spread)
    assert np.abs(spread - np.roll(spread, 1, axis=0)).max(axis=1).min() > 1e-4
    meta = json.loads((tmp_path / "results.jsonl.meta.json").read_text())["settings"]
    assert meta == scoring.run_settings(photos, os.path.abspath(preset), False, len(CLASSES))


def test_features_equal_the_pooled_embedding(preset, encoder, photos, tmp_path, capsys):
    embedding = convnext_zoo.from_preset(preset, include_top=False, pooling="avg")
    images = scoring.list_images(photos)
    expected = np.concatenate([embedding.predict(_raw(photos / p)[None], verbose=0) for p in images])
    # The CLI (an embedding model) and the API on the classifier (its head_norm output) agree with it.
    out = tmp_path / "features.jsonl"
    status, _, stderr = _cli(capsys, photos, "--output", out, "--preset", preset, "--features")
    assert status == 0, stderr
    api = tmp_path / "api.jsonl"
    summary = scoring.score_folder(convnext_zoo.from_preset(preset), photos, api, features=True,
                                   batch_size=4, progress=False)
    assert summary["scored"] == len(images) and summary["errors"] == []
    for path in (out, api):
        lines = _lines(path)
        assert [line["image"] for line in lines] == images
        got = np.array([line["features"] for line in lines])
        assert got.shape == (len(images), 320)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)

    # A headless preset: features only.
    status, _, stderr = _cli(capsys, photos, "--output", tmp_path / "none.jsonl", "--preset", encoder)
    assert status == 2 and len(stderr.strip().splitlines()) == 1 and "--features" in stderr
    assert not (tmp_path / "none.jsonl").exists()
    status, _, stderr = _cli(capsys, photos, "--output", tmp_path / "enc.jsonl", "--preset", encoder,
                             "--features")
    assert status == 0, stderr
    reference = convnext_zoo.from_preset(encoder, include_top=False, pooling="avg")
    first = _lines(tmp_path / "enc.jsonl")[0]
    np.testing.assert_allclose(first["features"], reference.predict(_raw(photos / first["image"])[None],
                                                                    verbose=0)[0], rtol=1e-5, atol=1e-4)


class Stop(Exception):
    pass


def test_an_interrupted_run_resumes_without_redoing_an_image(preset, photos, tmp_path):
    out = tmp_path / "results.jsonl"
    model = convnext_zoo.from_preset(preset)
    images = scoring.list_images(photos)

    def stop(done):
        raise Stop(done)

    with pytest.raises(Stop):
        scoring.score_folder(model, photos, out, batch_size=3, top=2, progress=False, on_batch=stop)
    first = out.read_bytes()
    assert [line["image"] for line in _lines(out)] == images[:3]  # flushed before the interruption
    # A process killed mid-write leaves a torn last line.
    with open(out, "ab") as handle:
        handle.write(b'{"image": "' + images[3].encode() + b'", "predictions": [{"cla')

    done = []
    summary = scoring.score_folder(model, photos, out, batch_size=3, top=2, progress=False,
                                   on_batch=done.append)
    assert summary["previous"] == 3 and summary["scored"] == len(images) - 3
    assert done == list(range(3, len(images) - 3, 3)) + [len(images) - 3]
    text = out.read_bytes()
    assert text.startswith(first) and text.endswith(b"\n")
    lines = _lines(out)
    assert [line["image"] for line in lines] == images  # each image once, in order
    # A finished run has nothing left to do.
    again = scoring.score_folder(model, photos, out, batch_size=3, top=2, progress=False)
    assert again["scored"] == 0 and again["previous"] == len(images) and out.read_bytes() == text


@pytest.mark.slow
def test_a_killed_process_resumes(preset, photos, tmp_path, capsys):
    """SIGKILL of the command after its first batch, then the same command again."""
    folder, out = tmp_path / "many", tmp_path / "results.jsonl"
    folder.mkdir()
    for i in range(40):  # enough batches that the kill lands mid-run
        (folder / f"{i:02d}.png").write_bytes((photos / "astronaut.png").read_bytes())
    argv = ["predict", str(folder), "--output", str(out), "--preset", preset, "--batch-size", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "convnext_zoo", *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 2):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    text = out.read_bytes()
    whole = text[:text.rfind(b"\n") + 1].count(b"\n")
    assert 2 <= whole < 40, whole
    status, stdout, _ = _cli(capsys, *argv[1:])
    assert status == 0 and f"{40 - whole} images scored" in stdout and f"{whole} already there" in stdout
    assert [line["image"] for line in _lines(out)] == scoring.list_images(folder)


def test_corrupt_files_are_counted_and_skipped(preset, photos, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("astronaut.png", "camera.png"):
        (folder / name).write_bytes((photos / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "z.gif").write_bytes((photos / "astronaut.png").read_bytes()[:300])  # truncated
    out = tmp_path / "out.jsonl"
    status, stdout, _ = _cli(capsys, folder, "--output", out, "--preset", preset, "--batch-size", 2)
    assert status == 0
    lines = _lines(out)
    assert [line["image"] for line in lines] == ["astronaut.png", "broken.jpg", "camera.png", "empty.png", "z.gif"]
    bad = [line["image"] for line in lines if "error" in line]
    assert bad == ["broken.jpg", "empty.png", "z.gif"]
    assert all("predictions" in line for line in lines if "error" not in line)
    assert "2 images scored" in stdout and "3 unreadable, skipped" in stdout
    assert all(name in stdout for name in bad)


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="tf.distribute: TensorFlow backend")
def test_runs_inside_a_distribution_scope(preset, photos, tmp_path):
    import tensorflow as tf

    plain = tmp_path / "plain.jsonl"
    scoring.score_folder(convnext_zoo.from_preset(preset), photos, plain, progress=False, batch_size=4)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = convnext_zoo.from_preset(preset)
        scoring.score_folder(model, photos, tmp_path / "mirrored.jsonl", progress=False, batch_size=4)
    for a, b in zip(_lines(plain), _lines(tmp_path / "mirrored.jsonl"), strict=True):
        assert a["image"] == b["image"]
        np.testing.assert_allclose([p["probability"] for p in a["predictions"]],
                                   [p["probability"] for p in b["predictions"]], atol=1e-6)


def test_labels_and_api_arguments(preset, photos, tmp_path):
    assert scoring.preset_labels({"label_set": "imagenet-1k"})[1] == ("n01443537", "goldfish")
    assert scoring.preset_labels({"class_names": ["x", "y"], "label_set": None}) == [(None, "x"), (None, "y")]
    assert scoring.preset_labels({"label_set": None}) is None
    assert scoring.imagenet_labels(21841)[0][0].startswith("n") and scoring.imagenet_labels(5) is None
    model = convnext_zoo.from_preset(preset)
    with pytest.raises(scoring.ScoringError, match="features=True writes embeddings"):
        scoring.score_folder(model, photos, tmp_path / "r.jsonl", features=True, top=3)
    with pytest.raises(scoring.ScoringError, match="class_names has 2 names for a model of 5 classes"):
        scoring.score_folder(model, photos, tmp_path / "r.jsonl", class_names=["x", "y"])
    with pytest.raises(scoring.ScoringError, match="has no preprocessor"):
        scoring.score_folder(convnext_zoo.from_preset(preset, preprocessing=False), photos, tmp_path / "r.jsonl")
    assert not list(tmp_path.iterdir())


def test_read_previous_drops_a_torn_line_and_refuses_a_damaged_one(tmp_path):
    out = tmp_path / "r.jsonl"
    settings = scoring.run_settings(tmp_path, "m", False, 5)
    scoring._write_meta(str(out), settings)
    good = b'{"image": "a.png", "predictions": []}\n{"image": "b.png", "error": "x"}\n'
    out.write_bytes(good + b'{"image": "c.p')
    assert scoring.read_previous(out, settings) == ({"a.png", "b.png"}, len(good))
    assert scoring.read_previous(out, settings, overwrite=True) == (set(), None)
    out.write_bytes(b'{"image": "a.png"}\nnot json\n{"image": "c.png"}\n')
    with pytest.raises(scoring.ScoringError, match="Line 2 of .* is damaged"):
        scoring.read_previous(out, settings)
    with pytest.raises(scoring.ScoringError, match=r"other settings \(top: 5 -> 3\)"):
        scoring.read_previous(out, scoring.run_settings(tmp_path, "m", False, 3))


@pytest.mark.parametrize("case, message", [
    ("missing", "No such folder"),
    ("no_images", "No images in"),
    ("batch", "--batch-size must be >= 1. Received: 0."),
    ("top", "--top must be >= 1. Received: 0."),
    ("output_dir", "does not exist"),
    ("features_top", "--features writes embeddings, not top-k classes. Received: --top 3"),
    ("no_output", "is a directory: pass --output results.jsonl"),
    ("two_dirs", "--output scores one folder: pass one DIR. Received 2 paths"),
    ("files_features", "--features applies to scoring a folder"),
    ("other_settings", "was written with other settings (top: 5 -> 2)"),
    ("foreign", "has no results.jsonl.meta.json"),
    ("unknown_preset", "convnext_v9"),
    ("headless_registered", "has no classification head (head 'none'"),
])
def test_bad_input_is_one_line_exit_2_output_untouched(case, message, preset, photos, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    argv = [photos, "--output", out, "--preset", preset]
    if case == "missing":
        argv[0] = tmp_path / "nowhere"
    elif case == "no_images":
        argv[0] = tmp_path / "empty"
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    elif case == "batch":
        argv += ["--batch-size", 0]
    elif case == "top":
        argv += ["--top", 0]
    elif case == "output_dir":
        argv[2] = tmp_path / "nowhere" / "results.jsonl"
    elif case == "features_top":
        argv += ["--features", "--top", 3]
    elif case == "no_output":
        argv = [photos, "--preset", preset]
    elif case == "two_dirs":
        argv.insert(1, photos)
    elif case == "files_features":
        argv = [photos / "astronaut.png", "--features", "--preset", preset]
    elif case in ("other_settings", "foreign"):
        out.write_text('{"image": "astronaut.png", "predictions": []}\n')
        if case == "other_settings":
            scoring._write_meta(str(out), scoring.run_settings(photos, os.path.abspath(preset), False, 5))
            argv += ["--top", 2]
    elif case == "unknown_preset":
        argv[-1] = "convnext_v9_atto"
    elif case == "headless_registered":  # read from the registry: nothing is downloaded
        argv[-1] = "convnext_v2_atto_fcmae"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    status, stdout, stderr = _cli(capsys, *argv)
    assert status == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convnext-zoo: error: "), stderr
    assert message in lines[0]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_image_files_mode_uses_a_fine_tuned_presets_class_names(preset, photos, capsys):
    """`predict IMAGE... --preset DIR` labels with the preset's own class names, as the folder mode."""
    path = photos / "astronaut.png"
    status, out, err = _cli(capsys, path, "--preset", preset, "--top", 2, "--json")
    assert status == 0, err
    predictions = json.loads(out)["results"][0]["predictions"]
    model = convnext_zoo.from_preset(preset)
    probabilities = _softmax(model.predict(_raw(path)[None], verbose=0)[0])
    best = np.argsort(-probabilities)[:2]
    assert [p["label"] for p in predictions] == [CLASSES[i] for i in best]
    np.testing.assert_allclose([p["probability"] for p in predictions], probabilities[best], atol=1e-5)


@pytest.mark.parametrize("backend", [
    pytest.param("jax", marks=pytest.mark.slow),  # about 30 s; the slow group also fine-tunes data-parallel on JAX
    "tensorflow",
])
def test_distribute_data_on_two_devices_equals_one_device(backend, preset, photos, tmp_path, capsys):
    """`predict DIR --distribute data` on 2 virtual CPU devices: the same lines as one device.

    9 images at batch 4: the last batch (1 image) does not split over 2 replicas and is padded.
    """
    import subprocess
    import sys

    plain = tmp_path / "plain.jsonl"
    status, _, err = _cli(capsys, photos, "--output", plain, "--preset", preset, "--batch-size", 4)
    assert status == 0, err
    env = {**os.environ, "KERAS_BACKEND": backend, "CONVNEXT_ZOO_CPU_DEVICES": "2",
           "PYTHONPATH": ROOT}
    spread = tmp_path / "spread.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "convnext_zoo", "predict", str(photos), "--output", str(spread),
         "--preset", preset, "--batch-size", "4", "--distribute", "data"],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    ours, theirs = _lines(plain), _lines(spread)
    assert len(ours) == len(theirs) == 9
    for a, b in zip(ours, theirs, strict=True):
        assert a["image"] == b["image"]
        np.testing.assert_allclose([p["probability"] for p in a["predictions"]],
                                   [p["probability"] for p in b["predictions"]], atol=1e-5)
    odd = subprocess.run(
        [sys.executable, "-m", "convnext_zoo", "predict", str(photos), "--output",
         str(tmp_path / "odd.jsonl"), "--preset", preset, "--batch-size", "3", "--distribute", "data"],
        env=env, capture_output=True, text=True, timeout=600)
    assert odd.returncode == 2 and not (tmp_path / "odd.jsonl").exists()
    last = odd.stderr.strip().splitlines()[-1]
    assert last.startswith("convnext-zoo: error: ") and "batch size 3 does not divide by the 2" in last
