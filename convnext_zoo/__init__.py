"""ConvNeXt V1 and V2 for Keras 3 and keras-hub."""

import importlib
import os
import sys

__version__ = "0.1.0"

# Public names are imported on first use (PEP 562): `list_presets` and
# `preset_info` must not pay for importing Keras (~7 s with TensorFlow).
_LAZY = {
    "ConvNeXtBackbone": "convnext_zoo.backbone",
    "ConvNeXtImageClassifier": "convnext_zoo.classifier",
    "create_convnext_v1": "convnext_zoo.convnext_v1",
    "create_convnext_v2": "convnext_zoo.convnext_v2",
    "DropPath": "convnext_zoo.layers",
    "FCMAE": "convnext_zoo.fcmae",
    "GlobalResponseNorm": "convnext_zoo.layers",
    "LayerScale": "convnext_zoo.layers",
    "list_presets": "convnext_zoo.registry",
    "preset_info": "convnext_zoo.registry",
    "decode_predictions": "convnext_zoo.class_names",
    "from_preset": "convnext_zoo.factory",
    "convert_checkpoint": "convnext_zoo.convert",
    "verify": "convnext_zoo.verification",
    "push_to_hub": "convnext_zoo.publish",
    "save_preset": "convnext_zoo.writer",
    "inference_function": "convnext_zoo.inference",
    "openvino_function": "convnext_zoo.inference",
    "export": "convnext_zoo.deploy",
    "ConvNeXtImageConverter": "convnext_zoo.preprocessing",
    "ConvNeXtImageClassifierPreprocessor": "convnext_zoo.preprocessing",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convnext_zoo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def _light_import():
    """True for the command line, which must answer `list` without Keras.

    The `convnext-zoo` launcher sets CONVNEXT_ZOO_LIGHT_IMPORT=1; under
    `python -m convnext_zoo`, sys.argv[0] is "-m" while the package is
    being imported.
    """
    return os.environ.get("CONVNEXT_ZOO_LIGHT_IMPORT") == "1" or sys.argv[:1] == ["-m"]


if not _light_import():
    # Importing the model modules registers their Keras serializables, so
    # `import convnext_zoo` is enough for `keras.saving.load_model`.
    for _name in ("ConvNeXtBackbone", "ConvNeXtImageClassifier", "GlobalResponseNorm", "FCMAE"):
        __getattr__(_name)
