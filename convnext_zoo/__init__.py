"""ConvNeXt V1 and V2 for Keras 3 and keras-hub."""

from convnext_zoo.backbone import ConvNeXtBackbone
from convnext_zoo.classifier import ConvNeXtImageClassifier
from convnext_zoo.convnext_v1 import create_convnext_v1
from convnext_zoo.convnext_v2 import create_convnext_v2
from convnext_zoo.layers import DropPath, GlobalResponseNorm, LayerScale

__version__ = "0.1.0"

__all__ = [
    "ConvNeXtBackbone",
    "ConvNeXtImageClassifier",
    "DropPath",
    "GlobalResponseNorm",
    "LayerScale",
    "create_convnext_v1",
    "create_convnext_v2",
]
