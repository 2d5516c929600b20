"""Reading source checkpoints lazily and safely, and naming their layout.

Every reader has the same small interface: `keys()`, `shape(key)` (without
reading data) and `get(key)` (a numpy array). Source safetensors files are
parsed here directly (JSON header, then one positioned read per tensor) because
`safetensors.safe_open(framework="numpy")` cannot return bfloat16 tensors,
and so that a truncated file is named in the error before any tensor is
read. Pickles are read only with `torch.load(..., weights_only=True)`.

The three layouts (official, timm, transformers) are told apart by their
tensor names; renaming to Keras lives in `convnext_zoo.layout`.
"""

import json
import os
import struct

import numpy as np


SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
PICKLE_CONTAINER_KEYS = ("model", "model_ema", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, or of an unknown layout."""


def _bfloat16():
    import ml_dtypes  # shipped with TensorFlow and JAX

    return ml_dtypes.bfloat16


def _numpy_dtype(code):
    if code == "BF16":
        return _bfloat16()
    return SAFETENSORS_DTYPES.get(code)


class SafetensorsReader:
    """Lazy, read-only view of one safetensors file: `keys()`, `shape(k)`, `get(k)`.

    Like every reader here it also has `path` and `files` (the files read).

    Example:
        >>> reader = SafetensorsReader("model.safetensors")  # doctest: +SKIP
        >>> reader.get("stem.0.weight").shape  # doctest: +SKIP
        (40, 3, 4, 4)
    """

    def __init__(self, path):
        self.path = str(path)
        self.files = [self.path]
        size = os.path.getsize(self.path)
        try:
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise ValueError("shorter than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > size - 8:
                    raise ValueError(
                        f"header claims {header_len} bytes, the file has {size}"
                    )
                header = json.loads(f.read(header_len))
            self.metadata = header.pop("__metadata__", None) or {}
            self._start = 8 + header_len
            self._entries = {}
            for key, entry in header.items():
                begin, end = entry["data_offsets"]
                dtype = _numpy_dtype(entry["dtype"])
                if dtype is None:
                    raise ValueError(f"unsupported dtype {entry['dtype']} for {key!r}")
                count = int(np.prod(entry["shape"], dtype=np.int64))
                if end - begin != count * np.dtype(dtype).itemsize or end < begin:
                    raise ValueError(f"byte range of {key!r} does not match its shape")
                if self._start + end > size:
                    raise ValueError(
                        f"tensor {key!r} ends at byte {self._start + end}, past the "
                        f"end of the file ({size} bytes)"
                    )
                self._entries[key] = (dtype, tuple(entry["shape"]), begin, end)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise CheckpointError(
                f"{self.path} is not a valid safetensors file (truncated or "
                f"corrupt?): {error}. Download or export it again."
            ) from None

    def keys(self):
        return list(self._entries)

    def shape(self, key):
        return self._entries[key][1]

    def get(self, key):
        """Reads one tensor with a positioned read (a read-only numpy array).

        Plain reads, not a memory map: a map keeps every page it touched
        resident, which would count one more copy of the weights against
        the converter's peak memory.
        """
        dtype, shape, begin, end = self._entries[key]
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            data = f.read(end - begin)
        if len(data) != end - begin:
            raise CheckpointError(
                f"{self.path} ended while reading {key!r} (truncated?). Download it again."
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)


class DictReader:
    """The reader interface over an in-memory mapping of name -> array."""

    def __init__(self, tensors, path):
        self.tensors = tensors
        self.path = str(path)
        self.files = [self.path]
        self.metadata = {}

    def keys(self):
        return list(self.tensors)

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def get(self, key):
        return self.tensors[key]


class MultiReader:
    """Several readers (a sharded checkpoint) seen as one."""

    def __init__(self, readers, path):
        self.path = str(path)
        self.files = [self.path] + [f for reader in readers for f in reader.files]
        self.metadata = {}
        self._owner = {}
        for reader in readers:
            for key in reader.keys():
                self._owner[key] = reader

    def keys(self):
        return list(self._owner)

    def shape(self, key):
        return self._owner[key].shape(key)

    def get(self, key):
        return self._owner[key].get(key)


def _torch_to_numpy(tensor):
    import torch  # already imported through convnext_zoo.optional.require

    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy()
    return tensor.numpy()


def read_pickle(path, checkpoint_key=None):
    """Loads a `.pth` / `.pt` / `.bin` state dict safely (`weights_only=True`).

    Args:
        path: the file.
        checkpoint_key: which entry holds the weights when the file is a
            training checkpoint; default: the bare dict, else "model", then
            "model_ema", then "state_dict".

    Returns:
        A `DictReader` of numpy arrays.
    """
    from convnext_zoo.optional import require

    torch = require("torch", f"Reading the pickled checkpoint {path}")
    import pickle
    import zipfile

    path = str(path)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error) and "zip" not in str(error).lower():
                raise
            # Legacy (non-zip) serialisation cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "global" not in message.lower():
            # Not a refused class: the byte stream itself is not a valid pickle.
            raise CheckpointError(
                f"Cannot read {path}: the file is truncated or corrupt, or not a "
                "PyTorch checkpoint (the restricted unpickler found invalid data). "
                "Download it again."
            ) from None
        detail = next((line for line in message.splitlines() if "global" in line.lower()), "")
        raise CheckpointError(
            f"Refused to load {path}: it holds Python objects beyond tensors and "
            "plain containers, and only `torch.load(..., weights_only=True)` is "
            "used here, never full unpickling. Re-save just the state dict "
            "(`torch.save(model.state_dict(), path)`) from a trusted environment. "
            f"Detail: {detail.strip()}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(
            f"Cannot read {path}: the file is truncated or corrupt "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Download it again."
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a state dict. Save "
            "`model.state_dict()` instead of the model object."
        )
    if checkpoint_key is not None:
        if checkpoint_key not in state:
            raise CheckpointError(
                f"Received checkpoint_key={checkpoint_key!r}, but {path} has only "
                f"the top-level keys {sorted(map(str, state))[:10]}."
            )
        state = state[checkpoint_key]
    elif not any(torch.is_tensor(v) for v in state.values()):
        for key in PICKLE_CONTAINER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
        else:
            raise CheckpointError(
                f"{path} holds no tensors at the top level and none of the "
                f"usual entries {PICKLE_CONTAINER_KEYS}. Top-level keys: "
                f"{sorted(map(str, state))[:10]}. Pass checkpoint_key=... to "
                "choose the entry that holds the weights."
            )
    tensors = {}
    for key, value in state.items():
        if torch.is_tensor(value):
            tensors[str(key)] = _torch_to_numpy(value)
    return DictReader(tensors, path)


def open_source(path, checkpoint_key=None):
    """Returns a lazy reader for one weights file or a sharded index."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"No such file: {path}.")
    if path.endswith(".safetensors"):
        return SafetensorsReader(path)
    if path.endswith(".index.json"):
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{path} is not a valid shard index: {error}.") from None
        folder = os.path.dirname(path)
        shards = sorted(set(weight_map.values()))
        return MultiReader([open_source(os.path.join(folder, s)) for s in shards], path)
    if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
        return read_pickle(path, checkpoint_key)
    raise CheckpointError(
        f"Unknown weights file type: {path}. Accepted: .safetensors, "
        ".safetensors.index.json, .pth, .pt, .bin."
    )


# === Layouts ===

def detect_format(keys, path="the checkpoint"):
    """Names the layout of a state dict from its tensor names.

    Example:
        >>> detect_format(["stem.0.weight", "stem.0.bias"])
        'timm'
    """
    keys = set(keys)
    if "downsample_layers.0.0.weight" in keys:
        return "official"
    if "stem.0.weight" in keys:
        return "timm"
    if {"convnext.embeddings.patch_embeddings.weight",
            "convnextv2.embeddings.patch_embeddings.weight"} & keys:
        return "transformers"
    sample = sorted(keys)[:6]
    raise CheckpointError(
        f"Unknown checkpoint layout in {path}: found none of "
        "'downsample_layers.0.0.weight' (official), 'stem.0.weight' (timm), "
        "'convnext[v2].embeddings.patch_embeddings.weight' (transformers). "
        f"First tensor names: {sample}. If this is a ConvNeXt with a prefix "
        "(e.g. 'module.' or 'backbone.'), re-save it without the prefix."
    )
