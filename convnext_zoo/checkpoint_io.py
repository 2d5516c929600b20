"""Reading source checkpoints lazily and safely, and naming their layout.

Every reader has the same small interface: `keys()`, `shape(key)` (without
reading data) and `get(key)` (a numpy array). Safetensors files are read
through the safetensors library, one tensor at a time; pickles only with
`torch.load(..., weights_only=True)`.

The three layouts (official, timm, transformers) are told apart by their
tensor names; renaming to Keras lives in `convnext_zoo.layout`.
"""

import json
import os


PICKLE_CONTAINER_KEYS = ("model", "model_ema", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, or of an unknown layout."""


def sha256_file(path, chunk=1 << 24):
    """The sha256 of a file, read in 16 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class SafetensorsReader:
    """Lazy, read-only view of one safetensors file: `keys()`, `shape(k)`, `get(k)`.

    Reading goes through the safetensors library, which validates the
    header and the byte ranges when the file is opened (a truncated file is
    named here, before any tensor is read). The file is opened again for
    each tensor: the library memory-maps it, and a map held open for the
    whole conversion keeps every page it touched resident, one more copy of
    the weights in the process. Like every reader here it also has `path`,
    `files` (the files read) and `metadata`.

    Example:
        >>> reader = SafetensorsReader("model.safetensors")  # doctest: +SKIP
        >>> reader.get("stem.0.weight").shape  # doctest: +SKIP
        (40, 3, 4, 4)
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.files = [self.path]
        try:
            with self._open() as handle:
                self.metadata = handle.metadata() or {}
                self._shapes = {
                    key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()
                }
        except Exception as error:  # the library raises its own error types
            raise CheckpointError(
                f"{self.path} is not a valid safetensors file: it is corrupt or "
                f"truncated ({error}). Download or export it again."
            ) from None

    def _open(self):
        from safetensors import safe_open

        return safe_open(self.path, framework="numpy")

    def keys(self):
        return list(self._shapes)

    def shape(self, key):
        return self._shapes[key]

    def get(self, key):
        """Reads one tensor (a numpy array; bfloat16 as `ml_dtypes.bfloat16`)."""
        try:
            with self._open() as handle:
                return handle.get_tensor(key)
        except Exception as error:
            raise CheckpointError(
                f"Cannot read tensor {key!r} from {self.path} ({error}): the file "
                "changed or is corrupt. Download or export it again."
            ) from None


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
    except Exception as error:  # noqa: BLE001
        # Besides RuntimeError / EOFError / BadZipFile, the restricted
        # unpickler meets a corrupt byte stream with IndexError, KeyError or
        # UnicodeDecodeError (an empty stack, an unknown memo key): all of
        # them mean the file cannot be read.
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
    if "encoder.downsample_layers.0.0.weight" in keys:  # models/fcmae.py's pre-training file
        return "fcmae"
    if "stem.0.weight" in keys:
        return "timm"
    if {"convnext.embeddings.patch_embeddings.weight",
            "convnextv2.embeddings.patch_embeddings.weight"} & keys:
        return "transformers"
    if "visual.trunk.stem.0.weight" in keys:
        return "open_clip"
    if {"stages.0.downsample_layers.0.weight", "model.stages.0.downsample_layers.0.weight"} & keys:
        return "dinov3"
    sample = sorted(keys)[:6]
    raise CheckpointError(
        f"Unknown checkpoint layout in {path}: found none of "
        "'downsample_layers.0.0.weight' (official), 'encoder.downsample_layers.0.0.weight' "
        "(official FCMAE pre-training), 'stem.0.weight' (timm), "
        "'convnext[v2].embeddings.patch_embeddings.weight' (transformers), "
        "'visual.trunk.stem.0.weight' (OpenCLIP), "
        "'stages.0.downsample_layers.0.weight' (transformers DINOv3). "
        f"First tensor names: {sample}. If this is a ConvNeXt with a prefix "
        "(e.g. 'module.' or 'backbone.'), re-save it without the prefix."
    )
