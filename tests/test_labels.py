"""Tests of the shipped ImageNet class names and `decode_predictions`."""

import importlib
import numpy as np
import pytest

import convnext_zoo
from convnext_zoo.class_names import class_names


def test_label_sets_have_expected_sizes_and_order():
    names_1k = class_names("imagenet-1k")
    names_22k = class_names("imagenet-22k")
    assert len(names_1k) == 1000 and len(names_22k) == 21841
    assert names_1k[0] == ("n01440764", "tench, Tinca tinca")
    assert names_1k[-1][0] == "n15075141"
    assert names_22k[0][0] == "n00004475" and names_22k[-1][0] == "n15102894"
    assert len({s for s, _ in names_22k}) == 21841
    # The fall-2011 22k release lacks exactly one 1k synset (teddy bear).
    assert {s for s, _ in names_1k} - {s for s, _ in names_22k} == {"n04399382"}


def test_labels_match_timm_tables():
    info = importlib.import_module("timm.data.imagenet_info")
    timm_1k = info.ImageNetInfo("imagenet-1k")
    assert [s for s, _ in class_names("imagenet-1k")] == timm_1k.label_names()
    timm_22k = info.ImageNetInfo("imagenet-22k")
    assert [s for s, _ in class_names("imagenet-22k")] == timm_22k.label_names()


def test_decode_predictions_1k():
    scores = np.zeros((2, 1000), "float32")
    scores[0, [1, 2, 3]] = [0.5, 0.9, 0.1]
    scores[1, 999] = 3.0
    decoded = convnext_zoo.decode_predictions(scores, top=2)
    assert decoded[0] == [("n01484850", "great white shark", pytest.approx(0.9)),
                          ("n01443537", "goldfish", 0.5)]
    assert decoded[1][0][:2] == ("n15075141", "toilet tissue")
    assert len(decoded[1]) == 2


def test_decode_predictions_22k():
    scores = np.zeros((1, 21841))
    scores[0, 21840] = 1.0
    assert convnext_zoo.decode_predictions(scores, top=1) == [[("n15102894", "knothole", 1.0)]]


def test_decode_predictions_errors():
    with pytest.raises(ValueError, match=r"10 classes.*1000 classes \(ImageNet-1k\)"):
        convnext_zoo.decode_predictions(np.zeros((1, 10)))
    with pytest.raises(ValueError, match=r"\(batch, classes\).*preds\[None\]"):
        convnext_zoo.decode_predictions(np.zeros(1000))
    with pytest.raises(ValueError, match="top"):
        convnext_zoo.decode_predictions(np.zeros((1, 1000)), top=0)
    with pytest.raises(ValueError, match="imagenet-1k, imagenet-12k, imagenet-22k"):
        class_names("imagenet21k")
