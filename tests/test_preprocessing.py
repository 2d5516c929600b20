"""ConvNeXtImageConverter against timm's own eval transform on real photographs.

Tolerance: PIL (timm) and TensorFlow resample bicubic slightly differently.
Measured on skimage's astronaut/coffee/chelsea/rocket with antialias and
uint8 rounding on: mean |difference| 0.13-0.20 uint8 levels, at most 0.03 %
of values more than one level apart, worst single value 8 levels (overshoot
at sharp edges). The assertions below allow mean < 0.3 levels, < 0.1 % of
values beyond 1.5 levels and max < 12 levels.
"""

import importlib
import numpy as np
import pytest

try:  # torchvision/triton crash when loaded after TensorFlow: load them first
    import timm.data  # noqa: F401
except ImportError:
    pass

from convnext_zoo.preprocessing import (
    ConvNeXtImageClassifierPreprocessor,
    ConvNeXtImageConverter,
)

STD = np.array([0.229, 0.224, 0.225])
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]


def photo(name):
    data = importlib.import_module("skimage.data")
    return getattr(data, name)()


def timm_eval(image, size, crop_pct, crop_mode):
    timm_data = importlib.import_module("timm.data")
    from PIL import Image

    transform = timm_data.create_transform(
        input_size=(3, size, size), crop_pct=crop_pct, crop_mode=crop_mode,
        interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=tuple(STD),
    )
    return transform(Image.fromarray(image)).numpy().transpose(1, 2, 0)


@pytest.mark.parametrize(
    "size,crop_pct,crop_mode", [(224, 0.875, "center"), (384, 1.0, "squash"), (224, 0.95, "center")]
)
@pytest.mark.parametrize("name", PHOTOS)
def test_matches_timm_eval_transform(name, size, crop_pct, crop_mode):
    image = photo(name)
    converter = ConvNeXtImageConverter(image_size=size, crop_pct=crop_pct, crop_mode=crop_mode)
    ours = np.asarray(converter(image))
    reference = timm_eval(image, size, crop_pct, crop_mode)
    assert ours.shape == reference.shape == (size, size, 3)
    levels = np.abs(ours - reference) * STD * 255
    assert levels.mean() < 0.3, levels.mean()
    assert (levels > 1.5).mean() < 1e-3
    assert levels.max() < 12


def test_resized_size_follows_torchvision():
    converter = ConvNeXtImageConverter(image_size=224, crop_pct=0.875)
    assert converter.resized_size(300, 451) == (256, 384)
    assert converter.resized_size(640, 427) == (383, 256)
    squash = ConvNeXtImageConverter(image_size=384, crop_pct=1.0, crop_mode="squash")
    assert squash.resized_size(300, 451) == (384, 384)


def test_batches_lists_and_tf_data():
    tf = importlib.import_module("tensorflow")
    converter = ConvNeXtImageConverter(image_size=64, crop_pct=0.875)
    image = photo("chelsea")
    single = np.asarray(converter(image))
    batch = np.asarray(converter(np.stack([image, image[:, ::-1]])))
    np.testing.assert_allclose(batch[0], single, atol=1e-6)
    mixed = converter([image, photo("coffee")])
    assert tuple(mixed.shape) == (2, 64, 64, 3)
    preprocessor = ConvNeXtImageClassifierPreprocessor(converter)
    ds = tf.data.Dataset.from_tensor_slices((np.stack([image] * 3), np.arange(3)))
    ds = ds.map(preprocessor).batch(2)
    x, y = next(iter(ds))
    assert tuple(x.shape) == (2, 64, 64, 3) and list(np.asarray(y)) == [0, 1]
    np.testing.assert_allclose(np.asarray(x[0]), single, atol=1e-6)


def test_config_round_trip():
    keras = importlib.import_module("keras")
    converter = ConvNeXtImageConverter(image_size=384, crop_pct=1.0, crop_mode="squash")
    preprocessor = ConvNeXtImageClassifierPreprocessor(converter)
    restored = keras.layers.deserialize(keras.layers.serialize(preprocessor))
    assert isinstance(restored.image_converter, ConvNeXtImageConverter)
    assert restored.image_converter.get_config() == converter.get_config()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"crop_mode": "centre"}, r"crop_mode='centre'.*Did you mean 'center'"),
        ({"crop_pct": 1.5}, r"crop_pct=1.5"),
        ({"image_size": 0}, r"positive int.*image_size=\(0, 0\)"),
        ({"interpolation": "bicubik"}, r"Did you mean 'bicubic'"),
        ({"std": (0.2, 0.0, 0.2)}, r"std > 0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvNeXtImageConverter(**kwargs)
