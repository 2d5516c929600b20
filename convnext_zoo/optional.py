"""Imports of optional dependencies (torch, timm, transformers, open_clip, openvino) with install hints."""

import importlib
import sys

INSTALL_HINTS = {
    "torch": 'pip install "convnext_zoo[torch]"  (or: pip install torch)',
    "timm": "pip install timm",
    "transformers": "pip install transformers",
    "open_clip": "pip install open-clip-torch",
    "openvino": 'pip install "convnext_zoo[openvino]"  (or: pip install openvino)',
    "onnxscript": 'pip install "convnext_zoo[export]"  (or: pip install onnxscript)',
}


def keep_triton_away():
    """Stops torch from importing triton once TensorFlow is loaded.

    CUDA builds of torch ship triton, a GPU compiler; importing it after
    TensorFlow crashes the process with a segmentation fault (both bundle
    LLVM). Nothing here runs torch on a GPU, and torch treats a missing
    triton as "no triton", so it is hidden from torch in that case only.
    """
    if "tensorflow" in sys.modules:
        sys.modules.setdefault("triton", None)


def require(name, purpose):
    """Imports an optional dependency or raises an ImportError with a hint.

    Args:
        name: module name, e.g. "torch".
        purpose: what needs it, for the message ("reading .pth checkpoints").

    Example:
        >>> torch = require("torch", "reading .pth checkpoints")  # doctest: +SKIP
    """
    keep_triton_away()
    try:
        return importlib.import_module(name)
    except ImportError as error:
        hint = INSTALL_HINTS.get(name, f"pip install {name}")
        raise ImportError(
            f"{purpose} needs the optional package '{name}', which is not "
            f"installed ({error}). Install it with: {hint}"
        ) from None
