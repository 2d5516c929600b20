"""Evaluation preprocessing of ConvNeXt checkpoints, as keras-hub layers.

`ConvNeXtImageConverter` reproduces timm's eval transform
(`timm.data.transforms_imagenet_eval`) in TensorFlow ops, so it runs inside
`tf.data` and inside `model.predict`:

- crop_mode "center": bicubic resize of the short side to
  `floor(image_size / crop_pct)` (the long side scaled to keep the aspect
  ratio, as torchvision's `Resize(int)`), then a center crop of `image_size`;
- crop_mode "squash": resize both sides to `floor(image_size / crop_pct)`,
  then a center crop (no crop at crop_pct 1.0, the 384/512 px checkpoints);
- scale to [0, 1], normalise with mean / std.

Inputs are RGB pixel values in [0, 255] (uint8 or float), channels last,
one image `(h, w, 3)` or a batch `(n, h, w, 3)` of equal sizes; a Python
list of differently sized images is processed image by image.

PIL (which timm uses) and TensorFlow implement bicubic resampling slightly
differently. With antialiasing on (PIL always filters when downscaling) and
the resized image rounded to uint8 as PIL does (`quantize=True`), the
outputs agree to within one or two uint8 levels on a few pixels:
`tests/test_preprocessing.py` measures it on real photographs.
"""

import math

import keras
import numpy as np
from keras_hub.layers import ImageConverter
from keras_hub.models import ImageClassifierPreprocessor

from convnext_zoo.backbone import ConvNeXtBackbone
from convnext_zoo.internals import PreprocessingLayer, preprocessing_function
from convnext_zoo.variants import IMAGENET_MEAN, IMAGENET_STD, suggest

CROP_MODES = ("center", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@keras.saving.register_keras_serializable(package="convnext_zoo")
class ConvNeXtImageConverter(ImageConverter):
    """Resize, crop and normalise raw RGB images for a ConvNeXt checkpoint.

    Args:
        image_size: output side length (int) or `(height, width)`.
        crop_pct: fraction of the resized image kept by the center crop
            (0.875 for the 224 px checkpoints, 1.0 at 384 and 512 px).
        crop_mode: "center" (resize the short side, keep the aspect ratio,
            center crop) or "squash" (resize both sides, ignore the aspect
            ratio).
        mean: per-channel mean of the [0, 1] images.
        std: per-channel standard deviation of the [0, 1] images.
        interpolation: "bicubic" (the checkpoints' choice), "bilinear" or
            "nearest".
        antialias: low-pass filter when downscaling, as PIL does.
        quantize: round the resized image to integers in [0, 255], as PIL's
            uint8 output does. Turn off for float inputs that are not pixels.
        **kwargs: `keras.layers.Layer` arguments (name, dtype).

    Example:
        >>> converter = ConvNeXtImageConverter(image_size=224, crop_pct=0.875)
        >>> converter(np.zeros((480, 640, 3), "uint8")).shape
        TensorShape([224, 224, 3])
    """

    backbone_cls = ConvNeXtBackbone

    def __init__(
        self,
        image_size=224,
        crop_pct=0.875,
        crop_mode="center",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bicubic",
        antialias=True,
        quantize=True,
        **kwargs,
    ):
        # Keys of ImageConverter's config that this layer derives itself.
        for key in ("scale", "offset", "crop_to_aspect_ratio", "pad_to_aspect_ratio",
                    "bounding_box_format", "data_format"):
            kwargs.pop(key, None)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if isinstance(image_size, list):
            image_size = tuple(image_size)
        if (
            image_size is None
            or not isinstance(image_size, tuple)
            or len(image_size) != 2
            or not all(isinstance(s, int) and s > 0 for s in image_size)
        ):
            raise ValueError(
                "`image_size` must be a positive int or (height, width). "
                f"Received: image_size={image_size!r}. Example: 224."
            )
        if crop_mode not in CROP_MODES:
            raise ValueError(
                f"Unknown crop mode. Received: crop_mode={crop_mode!r}."
                f"{suggest(crop_mode, CROP_MODES)} Valid: 'center', 'squash'."
            )
        if not 0 < crop_pct <= 1:
            raise ValueError(
                f"`crop_pct` must be in (0, 1]. Received: crop_pct={crop_pct!r}. "
                "The 224 px checkpoints use 0.875, the 384/512 px ones 1.0."
            )
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Unknown interpolation. Received: interpolation={interpolation!r}."
                f"{suggest(interpolation, INTERPOLATIONS)} Valid: {', '.join(INTERPOLATIONS)}."
            )
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(
                "`mean` and `std` need three values each (RGB) and std > 0. "
                f"Received: mean={mean!r}, std={std!r}."
            )
        scale = [1.0 / (255.0 * s) for s in std]
        offset = [-m / s for m, s in zip(mean, std)]
        # The parent's Resizing layer is left unused (image_size=None): the
        # resize-then-crop below replaces it.
        super().__init__(
            image_size=None, scale=scale, offset=offset, interpolation=interpolation,
            antialias=antialias, data_format="channels_last", **kwargs,
        )
        self._output_size = tuple(image_size)
        self.crop_pct = float(crop_pct)
        self.crop_mode = crop_mode
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.quantize = quantize

    @classmethod
    def from_preset_config(cls, preprocessing, **kwargs):
        """Builds the converter from a registry or config.json preprocessing dict."""
        return cls(
            image_size=int(preprocessing["image_size"]),
            crop_pct=float(preprocessing.get("crop_pct", 0.875)),
            crop_mode=preprocessing.get("crop_mode", "center"),
            mean=tuple(preprocessing.get("mean", IMAGENET_MEAN)),
            std=tuple(preprocessing.get("std", IMAGENET_STD)),
            interpolation=preprocessing.get("interpolation", "bicubic"),
            **kwargs,
        )

    @property
    def image_size(self):
        return self._output_size

    @image_size.setter
    def image_size(self, value):
        if value is None:  # the parent's __init__ sets None for its resizer
            return
        self._output_size = (value, value) if isinstance(value, int) else tuple(value)

    def resized_size(self, height, width):
        """The (height, width) after the resize step, for an input size (ints).

        Mirrors timm: `scale = floor(size / crop_pct)`; "center" resizes the
        short side to `scale` and the long side to `int(scale * long / short)`.
        """
        out_h, out_w = self._output_size
        scale_h = math.floor(out_h / self.crop_pct)
        scale_w = math.floor(out_w / self.crop_pct)
        if self.crop_mode == "squash":
            return scale_h, scale_w
        # torchvision Resize(int) needs a square target; timm uses
        # ResizeKeepRatio otherwise, which this layer does not mimic.
        if height <= width:
            return scale_h, int(scale_h * width / height)
        return int(scale_h * height / width), scale_h

    def _transform(self, images):
        import tensorflow as tf

        images = tf.convert_to_tensor(images)
        unbatched = images.shape.rank == 3
        if unbatched:
            images = images[None]
        if images.shape.rank != 4:
            raise ValueError(
                "ConvNeXtImageConverter expects images of shape (h, w, c) or "
                f"(n, h, w, c). Received: shape {images.shape}."
            )
        out_h, out_w = self._output_size
        scale_h = math.floor(out_h / self.crop_pct)
        scale_w = math.floor(out_w / self.crop_pct)
        shape = tf.shape(images)
        height, width = shape[1], shape[2]
        if self.crop_mode == "squash":
            new_h, new_w = tf.constant(scale_h), tf.constant(scale_w)
        else:
            h64, w64 = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
            short = tf.minimum(h64, w64)
            s = tf.constant(float(scale_h), tf.float64)
            new_h = tf.where(height <= width, scale_h, tf.cast(tf.floor(s * h64 / short), tf.int32))
            new_w = tf.where(height <= width, tf.cast(tf.floor(s * w64 / short), tf.int32), scale_h)
        x = tf.cast(images, tf.float32)
        x = tf.image.resize(
            x, tf.stack([new_h, new_w]), method=self.interpolation, antialias=self.antialias
        )
        if self.quantize:
            x = tf.clip_by_value(tf.round(x), 0.0, 255.0)
        # torchvision's CenterCrop: offset int(round((size - crop) / 2)),
        # round half to even as Python's round and tf.round both do.
        top = tf.cast(tf.round(tf.cast(new_h - out_h, tf.float32) / 2.0), tf.int32)
        left = tf.cast(tf.round(tf.cast(new_w - out_w, tf.float32) / 2.0), tf.int32)
        x = x[:, top:top + out_h, left:left + out_w, :]
        x = tf.ensure_shape(x, [None, out_h, out_w, None])
        scale = tf.constant(self.scale, tf.float32)
        offset = tf.constant(self.offset, tf.float32)
        x = x * scale + offset
        x = tf.cast(x, self.compute_dtype)
        return x[0] if unbatched else x

    @preprocessing_function
    def _call_tf(self, inputs):
        if isinstance(inputs, dict):
            inputs = dict(inputs)
            inputs["images"] = self._transform(inputs["images"])
            return inputs
        return self._transform(inputs)

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            shapes = {np.shape(x) for x in inputs}
            if len(shapes) > 1:  # differently sized images: one at a time
                import tensorflow as tf

                return tf.stack([self._call_tf(x) for x in inputs])
            inputs = np.stack([np.asarray(x) for x in inputs])
        return self._call_tf(inputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-3]) + self._output_size + (input_shape[-1],)

    def get_config(self):
        config = PreprocessingLayer.get_config(self)
        config.update(
            {
                "image_size": self._output_size,
                "crop_pct": self.crop_pct,
                "crop_mode": self.crop_mode,
                "mean": self.mean,
                "std": self.std,
                "interpolation": self.interpolation,
                "antialias": self.antialias,
                "quantize": self.quantize,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="convnext_zoo")
class ConvNeXtImageClassifierPreprocessor(ImageClassifierPreprocessor):
    """Preprocessor of `ConvNeXtImageClassifier`: a `ConvNeXtImageConverter`.

    Maps `x` (raw RGB images), and passes `y` and `sample_weight` through, so
    it fits `tf.data.Dataset.map` and the classifier's `fit`/`predict`.

    Example:
        >>> preprocessor = ConvNeXtImageClassifierPreprocessor(
        ...     ConvNeXtImageConverter(image_size=224))
        >>> x, y = preprocessor(np.zeros((2, 300, 400, 3), "uint8"), np.array([1, 2]))
        >>> x.shape
        TensorShape([2, 224, 224, 3])
    """

    backbone_cls = ConvNeXtBackbone
    image_converter_cls = ConvNeXtImageConverter
