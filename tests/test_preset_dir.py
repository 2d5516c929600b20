"""Preset directories of schema 1 (Keras layout, config at the top level): schema, atomic writing, loading.

Presets written by earlier versions look like these and must keep loading.
"""

import json
import logging
import os

import numpy as np
import pytest

import convnext_zoo
from convnext_zoo import preset_dir, weights, writer

from_preset = convnext_zoo.from_preset


def make_config(family="v2", variant="atto", num_classes=7, head=None):
    return {
        "schema_version": 1,
        "family": family,
        "variant": variant,
        "num_classes": num_classes,
        "head": head or ("fc" if num_classes else "norm"),
        "image_size": [224, 224],
        "preprocessing": {
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic",
        },
        "label_set": None,
        "license": "cc-by-nc-4.0",
        "weights_dtype": "float32",
        "provenance": {"source_format": "timm", "file_name": "model.safetensors", "sha256": "0" * 64},
    }


def _randomise(model, seed=0):
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.normal(0, 0.2, size=variable.shape).astype("float32"))
    return model


def write(model, path, config, dtype="float32", reference=None, overwrite=False):
    """A schema-1 preset as earlier versions wrote it, checked against `reference` (a model)."""
    with preset_dir.atomic_directory(path, overwrite=overwrite) as tmp:
        weights.save_weights(model, os.path.join(tmp, "model.safetensors"), dtype=dtype)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(preset_dir.validate_config(config) and config, f)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(preset_dir.render_readme(preset_dir.validate_config(config)))
        writer.verify_preset(tmp, reference)
    return path


@pytest.fixture(scope="module")
def source():
    from convnext_zoo import create_convnext_v2

    return _randomise(create_convnext_v2("atto", num_classes=7, input_shape=(None, None, 3)))


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).uniform(-1, 1, size=(1, 64, 80, 3)).astype("float32")


@pytest.fixture(scope="module")
def preset(source, image, tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "atto"
    return write(source, path, make_config(), reference=source)


def test_directory_holds_three_files(preset):
    assert sorted(os.listdir(preset)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((preset / "config.json").read_text())
    assert config["schema_version"] == 1 and config["image_size"] == [224, 224]
    assert "ConvNeXt V2-atto" in (preset / "README.md").read_text()
    # No temporary directory is left beside it.
    assert os.listdir(preset.parent) == ["atto"]


def test_from_preset_reproduces_the_model(preset, source, image):
    model = from_preset(preset)
    np.testing.assert_array_equal(np.asarray(model(image)), np.asarray(source(image)))
    assert model.output.shape == (None, 7)


def test_include_top_false_gives_the_backbone(preset, source, image):
    from convnext_zoo import ConvNeXtBackbone

    backbone = from_preset(preset, include_top=False)
    assert isinstance(backbone, ConvNeXtBackbone)
    np.testing.assert_array_equal(np.asarray(backbone(image)), np.asarray(source.backbone(image)))
    pooled = from_preset(preset, include_top=False, pooling="avg")
    assert pooled.output.shape == (None, 320)


def test_new_num_classes_keeps_everything_but_the_head(preset, source, image, caplog):
    with caplog.at_level(logging.WARNING, logger="convnext_zoo"):
        model = from_preset(preset, num_classes=3)
    messages = [r.getMessage() for r in caplog.records if r.name == "convnext_zoo"]
    assert len(messages) == 1 and "head_fc" in messages[0] and "3 classes" in messages[0]
    assert model.output.shape == (None, 3)
    mine = weights.keras_variables(model)
    theirs = weights.keras_variables(source)
    for name, variable in mine.items():
        if not name.startswith("head_fc/"):
            np.testing.assert_array_equal(variable.numpy(), theirs[name].numpy())
    np.testing.assert_array_equal(mine["head_fc/bias"].numpy(), np.zeros(3))
    # The backbone's init is skipped while loading; the fresh head's is not.
    kernel = mine["head_fc/kernel"].numpy()
    assert 0.01 < kernel.std() < 0.03 and np.abs(kernel).max() <= 0.04 + 1e-6
    fresh = from_preset(preset, load_weights=False)
    first = weights.keras_variables(fresh)["stem_0/kernel"].numpy()
    assert 0.01 < first.std() < 0.03


def test_input_shape_and_dtype(preset, image):
    model = from_preset(preset, input_shape=(64, 80, 3), dtype="bfloat16")
    assert model.input.shape == (None, 64, 80, 3)
    assert model.compute_dtype == "bfloat16"
    fresh = from_preset(preset, load_weights=False)
    assert fresh.output.shape == (None, 7)


def test_half_precision_preset(source, image, tmp_path):
    path = write(source, tmp_path / "half", {**make_config(), "weights_dtype": "bfloat16"}, dtype="bfloat16")
    model = from_preset(path)
    ref = np.asarray(source(image))
    assert np.max(np.abs(np.asarray(model(image)) - ref)) < 0.05 * np.max(np.abs(ref))


def test_headless_preset(source, tmp_path):
    from convnext_zoo import create_convnext_v2

    backbone = _randomise(create_convnext_v2("atto", include_top=False, input_shape=(None, None, 3)), 5)
    path = write(backbone, tmp_path / "fcmae", make_config(num_classes=0, head="none"))
    from convnext_zoo import ConvNeXtBackbone, ConvNeXtImageClassifier

    # A headless encoder loads as its backbone; a classifier needs num_classes.
    assert isinstance(from_preset(path), ConvNeXtBackbone)
    with pytest.raises(ValueError, match="no classification head.*num_classes=N"):
        ConvNeXtImageClassifier.from_preset(path)
    loaded = from_preset(path, include_top=False)
    np.testing.assert_array_equal(loaded.weights[0].numpy(), backbone.weights[0].numpy())
    classifier = from_preset(path, num_classes=4)
    names = weights.keras_variables(classifier)
    np.testing.assert_array_equal(names["head_norm/gamma"].numpy(), np.ones(320))


def test_failed_write_leaves_nothing(source, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with preset_dir.atomic_directory(target) as tmp:
            weights.save_weights(source, os.path.join(tmp, "model.safetensors"))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_verification_failure_leaves_nothing(source, image, tmp_path):
    from convnext_zoo import create_convnext_v2

    other = _randomise(create_convnext_v2("atto", num_classes=7, input_shape=(None, None, 3)), 9)
    with pytest.raises(preset_dir.PresetError, match="differs from the source model"):
        write(source, tmp_path / "out", make_config(), reference=other)
    assert os.listdir(tmp_path) == []


def test_existing_directory_needs_overwrite(preset, source, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with preset_dir.atomic_directory(target):
            pass
    assert os.listdir(target) == ["keep.txt"]
    write(source, target, make_config(), overwrite=True)
    assert "keep.txt" not in os.listdir(target)
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"schema_version": 3}, "schema_version=3"),
        ({"variant": "atoo"}, "Did you mean 'atto'"),
        ({"family": "v3"}, "Valid: v1, v2"),
        ({"num_classes": -1}, "num_classes must be an int"),
        ({"head": "fc", "num_classes": 0}, "inconsistent"),
        ({"image_size": 224}, r"image_size must be \[height, width\]"),
        ({"label_set": "imagenet"}, "unknown label_set"),
        ({"preprocessing": {"mean": [0.5] * 3}}, "preprocessing needs"),
    ],
)
def test_invalid_configs(change, message):
    with pytest.raises(preset_dir.PresetError, match=message):
        preset_dir.validate_config({**make_config(), **change})


def test_missing_keys_and_directories(tmp_path):
    config = make_config()
    del config["license"]
    with pytest.raises(preset_dir.PresetError, match="lacks the keys license"):
        preset_dir.validate_config(config)
    with pytest.raises(preset_dir.PresetError, match="does not exist"):
        preset_dir.read_config(tmp_path / "nowhere")
    with pytest.raises(preset_dir.PresetError, match="has no config.json"):
        preset_dir.read_config(tmp_path)
    with pytest.raises(ValueError, match="Unknown preset.*path of an existing local directory"):
        from_preset(str(tmp_path / "nowhere"))
    with pytest.raises(OSError, match="No weights file in .*a preset of this package"):
        from_preset(str(tmp_path))


def test_loaded_model_trains_with_drop_path(tmp_path):
    """Regression: DropPath's random-number state is no checkpoint tensor; loading left it pending
    (None), so the first training step of a loaded model with drop path failed."""
    import convnext_zoo
    from convnext_zoo import writer

    writer.save_preset(convnext_zoo.create_convnext_v2("atto", num_classes=3, input_shape=(32, 32, 3)),
                       str(tmp_path / "p"))
    model = convnext_zoo.from_preset(str(tmp_path / "p"), preprocessing=False, drop_path_rate=0.3)
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32")
    trained = np.asarray(model(x, training=True))
    assert np.isfinite(trained).all()
    assert np.abs(trained - np.asarray(model(x, training=False))).max() > 0  # branches were dropped
