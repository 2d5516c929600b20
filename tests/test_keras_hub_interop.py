"""keras-hub presets both ways: `save_to_preset` output loads in convnext_zoo and keras-hub.

Every model is randomised (pitfall 5) and compared on real photographs.
"""

import json

import keras_hub
import numpy as np
import pytest

import convnext_zoo
from convnext_zoo import (
    ConvNeXtBackbone,
    ConvNeXtImageClassifier,
    create_convnext_v1,
    create_convnext_v2,
    weights,
)
from convnext_zoo.build import attach_preprocessing
from convnext_zoo.readers import registry_config
from convnext_zoo.registry import preset_info
from tests.conftest import photo
from tests.test_models import _randomize

CASES = {
    # (factory, variant, input shape): the V1 and V2 trunks; a static 64 px
    # V2 model has lowered strides, which the preset must keep.
    "v1-tiny": (create_convnext_v1, "tiny", (None, None, 3)),
    "v2-atto-64px": (create_convnext_v2, "atto", (64, 64, 3)),
}


def _photos(size):
    return np.stack([photo("astronaut", size), photo("coffee", size)]).astype("float32") / 255.0


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """A randomised classifier and its backbone, each saved with keras-hub's `save_to_preset`."""
    create, variant, shape = CASES[request.param]
    model = create(variant, num_classes=5, input_shape=shape)
    _randomize(model, np.random.default_rng(len(request.param)), scale=0.5)
    root = tmp_path_factory.mktemp(request.param)
    model.save_to_preset(str(root / "classifier"))
    model.backbone.save_to_preset(str(root / "backbone"))
    return model, root, shape


def test_classifier_preset_loads_in_both_libraries_with_equal_logits(saved):
    model, root, shape = saved
    x = _photos((shape[1] or 96, shape[0] or 96))
    expected = np.asarray(model(x, training=False))
    ours = convnext_zoo.from_preset(str(root / "classifier"))
    theirs = keras_hub.models.ImageClassifier.from_preset(str(root / "classifier"))
    assert isinstance(ours, ConvNeXtImageClassifier) and ours.num_classes == 5
    np.testing.assert_array_equal(np.asarray(ours(x, training=False)), expected)
    np.testing.assert_array_equal(np.asarray(theirs(x, training=False)), expected)
    # The network keeps the strides it was saved with.
    assert tuple(ours.backbone.strides) == tuple(model.backbone.strides)
    classifier = ConvNeXtImageClassifier.from_preset(str(root / "classifier"))
    np.testing.assert_array_equal(np.asarray(classifier(x, training=False)), expected)


def test_backbone_preset_and_the_classifiers_trunk_load_as_backbones(saved):
    model, root, shape = saved
    x = _photos((shape[1] or 96, shape[0] or 96))
    expected = np.asarray(model.backbone(x, training=False))
    for directory in ("backbone", "classifier"):
        backbone = ConvNeXtBackbone.from_preset(str(root / directory))
        assert isinstance(backbone, ConvNeXtBackbone)
        np.testing.assert_array_equal(np.asarray(backbone(x, training=False)), expected)
    # A backbone-only preset gives a backbone by default too, and a fresh head on request.
    assert isinstance(convnext_zoo.from_preset(str(root / "backbone")), ConvNeXtBackbone)
    fresh = convnext_zoo.from_preset(str(root / "backbone"), num_classes=3)
    assert fresh.output.shape == (None, 3)
    assert isinstance(keras_hub.models.Backbone.from_preset(str(root / "backbone")), ConvNeXtBackbone)


def test_a_new_head_keeps_the_trunk(saved):
    model, root, _ = saved
    tuned = convnext_zoo.from_preset(str(root / "classifier"), num_classes=3)
    assert tuned.output.shape == (None, 3)
    mine, theirs = weights.keras_variables(tuned), weights.keras_variables(model)
    for name, variable in mine.items():
        if not name.startswith("head_fc/"):
            np.testing.assert_array_equal(variable.numpy(), theirs[name].numpy())


def test_a_loaded_preset_saved_again_with_its_preprocessor_reloads_in_both(tmp_path):
    """`from_preset` -> `save_to_preset` -> both libraries: same predictions on raw photographs."""
    model = create_convnext_v2("atto", num_classes=4, input_shape=(None, None, 3))
    _randomize(model, np.random.default_rng(7), scale=0.5)
    attach_preprocessing(model, registry_config(preset_info("convnext_v2_atto_imagenet")))
    model.save_to_preset(str(tmp_path / "with_preprocessor"))
    task = json.loads((tmp_path / "with_preprocessor" / "task.json").read_text())
    assert task["registered_name"] == "convnext_zoo>ConvNeXtImageClassifier"
    images = np.stack([photo("astronaut", (300, 240)), photo("chelsea", (300, 240))])
    expected = model.predict(images, verbose=0)
    ours = convnext_zoo.from_preset(str(tmp_path / "with_preprocessor"))
    theirs = keras_hub.models.ImageClassifier.from_preset(str(tmp_path / "with_preprocessor"))
    np.testing.assert_array_equal(ours.predict(images, verbose=0), expected)
    np.testing.assert_array_equal(theirs.predict(images, verbose=0), expected)
    assert ours.preprocessor.image_converter.get_config()["crop_pct"] == 0.875


def test_a_keras_hub_preset_of_another_model_is_refused_clearly(tmp_path):
    from convnext_zoo.preset_dir import PresetError

    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"module": "keras_hub.src.models.resnet.resnet_backbone", "class_name": "ResNetBackbone",
         "config": {}, "registered_name": "keras_hub>ResNetBackbone"}))
    with pytest.raises(PresetError, match="not of a convnext_zoo model.*keras_hub.models"):
        convnext_zoo.from_preset(str(folder))
