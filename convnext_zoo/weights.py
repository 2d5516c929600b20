"""Keras variable naming, strict weight assignment and the Keras-layout file.

A Keras variable is named `"{layer name}/{variable name}"`, e.g.
`"stages_0_blocks_1_mlp_fc1/kernel"` or `"head_norm/gamma"`; the nested
backbone adds no prefix. `model.safetensors` in a preset stores every
variable under that name, already in Keras layout.

Assignment is strict (after big_vision's `merge_params`): every source
tensor is consumed and every variable assigned, or `WeightMismatchError`
lists the unused source tensors (`+`) and the unassigned variables (`-`);
a shape mismatch names the source key, the target variable and both shapes.
Deliberate gaps (a head being replaced) are explicit arguments.

Example:
    >>> import tempfile
    >>> path = tempfile.mkdtemp() + "/model.safetensors"
    >>> model = convnext_zoo.create_convnext_v2("atto", input_shape=(None, None, 3))
    >>> save_weights(model, path)  # the number of tensors written
    140
    >>> len(load_weights(model, path))  # the variables assigned
    140
"""

import collections
import concurrent.futures
import os

import numpy as np

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
# How many names an error lists before it says "... and N more".
_LIST_LIMIT = 30


class WeightMismatchError(ValueError):
    """Source tensors and model variables do not correspond one to one."""


def variable_name(variable):
    """`"{layer name}/{variable name}"` of a Keras variable."""
    parts = variable.path.split("/")
    return "/".join(parts[-2:])


def keras_variables(model):
    """Returns `{name: variable}` for every weight of `model`, in model order.

    Raises:
        ValueError: two variables share a name (a model built outside this
            package, or layers renamed by hand).
    """
    variables = {}
    for variable in model.weights:
        name = variable_name(variable)
        if name in variables:
            raise ValueError(
                f"Two variables of model '{model.name}' are both named {name!r}; "
                "weights are matched by '{layer name}/{variable name}', so every "
                "layer needs a unique name. Build the model with "
                "convnext_zoo's factories."
            )
        variables[name] = variable
    return variables


class SourceTensor:
    """One source tensor on its way to a Keras variable.

    Args:
        key: the name in the source (reported in errors).
        target: the Keras variable name, or `None` if the key maps to none.
        shape: the tensor's shape after the layout change (Keras layout),
            or `None` when no layout change applies to the source shape.
        source_shape: the shape in the source file.
        load: callable returning the tensor as a numpy array in Keras layout.
    """

    __slots__ = ("key", "target", "shape", "source_shape", "load")

    def __init__(self, key, target, shape, source_shape, load):
        self.key = key
        self.target = target
        self.shape = None if shape is None else tuple(shape)
        self.source_shape = tuple(source_shape)
        self.load = load


def _matches(name, prefixes):
    return any(name == p or name.startswith(p) for p in prefixes)


def _allowed_unused(tensor, allow_unused):
    # By source key (a converter's choice) or by Keras name (a loader's).
    return _matches(tensor.key, allow_unused) or (
        tensor.target is not None and _matches(tensor.target, allow_unused)
    )


def _listing(sign, title, names):
    names = list(names)
    shown = ", ".join(names[:_LIST_LIMIT])
    more = f" ... and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return f"  {sign} {title} ({len(names)}): {shown}{more}"


def check_correspondence(
    variables, tensors, source, allow_unused=(), allow_unassigned=()
):
    """Checks names and shapes without reading any tensor data.

    Args:
        variables: `{name: variable}` (see `keras_variables`).
        tensors: list of `SourceTensor`.
        source: what the tensors come from (a file name), for the message.
        allow_unused: prefixes of source keys, or of the Keras names they
            map to, deliberately left unused.
        allow_unassigned: name prefixes of variables deliberately left as
            initialised.

    Returns:
        The list of `SourceTensor` to assign.

    Raises:
        WeightMismatchError: listing unused (+) and unassigned (-) names and
            every shape mismatch.
    """
    unused, mismatches, duplicates, to_assign = [], [], [], []
    claimed = {}
    for tensor in tensors:
        if tensor.target is None or tensor.target not in variables:
            if not _allowed_unused(tensor, allow_unused):
                unused.append(tensor.key)
            continue
        if _matches(tensor.target, allow_unassigned):
            # The variable is deliberately left as initialised, so its
            # source tensor must be deliberately unused too.
            if not _allowed_unused(tensor, allow_unused):
                unused.append(tensor.key)
            continue
        if tensor.target in claimed:
            duplicates.append(
                f"  source keys {claimed[tensor.target]!r} and {tensor.key!r} "
                f"both map to Keras variable {tensor.target!r}"
            )
            continue
        claimed[tensor.target] = tensor.key
        expected = tuple(variables[tensor.target].shape)
        if tensor.shape != expected:
            converted = (
                f", {tensor.shape} in Keras layout" if tensor.shape is not None else ""
            )
            mismatches.append(
                f"  shape mismatch: source key {tensor.key!r} has shape "
                f"{tensor.source_shape}{converted}; Keras variable "
                f"{tensor.target!r} has shape {expected}"
            )
            continue
        to_assign.append(tensor)
    unassigned = [
        name
        for name in variables
        if name not in claimed and not _matches(name, allow_unassigned)
    ]
    if unused or unassigned or mismatches or duplicates:
        lines = [
            f"The weights in {source} do not match the model one to one "
            f"({len(variables)} variables, {len(tensors)} source tensors)."
        ]
        if unused:
            lines.append(_listing("+", "unused source tensors", unused))
        if unassigned:
            lines.append(_listing("-", "unassigned Keras variables", unassigned))
        lines.extend(mismatches)
        lines.extend(duplicates)
        lines.append(
            "Check that the checkpoint is a ConvNeXt of this family and variant "
            "(or pass the matching family=/variant=/num_classes= overrides); "
            "a head being replaced on purpose needs an explicit argument "
            "(init_head=True, or a different num_classes= when loading a preset)."
        )
        raise WeightMismatchError("\n".join(lines))
    return to_assign


def assign_strict(
    variables, tensors, source, allow_unused=(), allow_unassigned=(), description=None,
    prefetch=None,
):
    """Checks, then assigns one tensor at a time.

    Args: as `check_correspondence`, plus `description`: the label of a
        progress bar over the tensors (huggingface_hub's tqdm: shown on a
        terminal, silenced by HF_HUB_DISABLE_PROGRESS_BARS=1); `None` shows
        none. `prefetch`: a `TensorPrefetch` over `tensors` that has been
        reading them ahead (then its window of tensors is in memory too);
        without it, one extra tensor is.

    Returns:
        The names of the assigned variables.
    """
    from convnext_zoo.internals import initialize_pending, load_value

    to_assign = check_correspondence(
        variables, tensors, source, allow_unused, allow_unassigned
    )
    steps = to_assign
    if description is not None:
        from huggingface_hub.utils import tqdm

        # disable=None: the bar shows on a terminal only, never in logs.
        steps = tqdm(to_assign, desc=description, unit="tensor", disable=None)
    for tensor in steps:
        variable = variables[tensor.target]
        value = None if prefetch is None else prefetch.take(tensor)
        # A value read ahead is ready unless the variable's dtype is not the
        # one expected before the model existed.
        ready = value is not None and value.dtype == np.dtype(variable.dtype)
        if value is None:
            value = np.asarray(tensor.load())
        if tuple(value.shape) != tuple(variable.shape):
            raise WeightMismatchError(
                f"Source key {tensor.key!r} in {source} loaded with shape "
                f"{tuple(value.shape)}, but Keras variable {tensor.target!r} has "
                f"shape {tuple(variable.shape)}. The file's header and data "
                "disagree: the file is probably corrupt."
            )
        load_value(variable, value, prepared=ready)
    # Variables left pending by weights_to_be_loaded (none in a strict load
    # of the backbone) get their own initializers now: none may escape.
    initialize_pending(variables.values())
    return [tensor.target for tensor in to_assign]


class TensorPrefetch:
    """Reads a checkpoint's tensors on loader threads, ahead of their assignment.

    Made before the model is built, so that reading each tensor and copying
    it into Keras' layout and the variables' dtype (`internals.backend_buffer`)
    runs on other cores while Keras builds the graph: together they are
    most of a cold start (`benchmarks/bench_cpu.py --cold-start-only`). NumPy
    and safetensors release the GIL for their copies. `THREADS` loader
    threads: with one, a checkpoint in PyTorch's layout (transposed copies)
    was still being read when the graph was done.

    On TensorFlow every prepared buffer becomes its variable's own memory
    (DLPack), so reading the whole checkpoint ahead adds nothing to the
    peak: the window is unbounded there. Other backends copy the value into
    their own buffers, so at most `WINDOW` tensors wait.

    Args:
        tensors: the `SourceTensor`s, in the order `assign_strict` takes them.
        dtype: the variables' dtype, as expected before the model exists
            (a value of another dtype is converted again at assignment).
        skip: source keys or Keras-name prefixes never assigned (a
            checkpoint's deliberately unused tensors): not read.
        window: how many tensors may wait; `None` for no limit; "auto" as
            above.

    Use as a context manager: leaving it stops the thread and drops what
    was not taken (a failed build or check reads no further).
    """

    WINDOW = 4
    THREADS = 2

    def __init__(self, tensors, dtype, skip=(), window="auto"):
        import keras

        self._dtype = np.dtype(dtype)
        self._upcoming = iter(
            [t for t in tensors if t.target is not None and not _allowed_unused(t, skip)]
        )
        if window == "auto":
            window = None if keras.config.backend() == "tensorflow" else self.WINDOW
        self._window = window
        self._pending = collections.deque()
        self._pool = concurrent.futures.ThreadPoolExecutor(self.THREADS, thread_name_prefix="convnext_zoo_loader")
        self._fill()

    def _fill(self):
        while self._window is None or len(self._pending) < self._window:
            tensor = next(self._upcoming, None)
            if tensor is None:
                return
            self._pending.append((tensor.key, self._pool.submit(self._prepare, tensor)))

    def _prepare(self, tensor):
        from convnext_zoo.internals import backend_buffer

        value = np.asarray(tensor.load())
        if tensor.shape is not None and tuple(value.shape) != tensor.shape:
            return value  # assign_strict reports the mismatch
        return backend_buffer(value, self._dtype)

    def take(self, tensor):
        """`tensor`'s value read ahead (`None` if it was not: the caller loads it).

        In Keras' layout and the expected dtype (`internals.backend_buffer`),
        except a value whose shape is not its header's, returned as read
        for `assign_strict` to report.
        """
        if not any(key == tensor.key for key, _ in self._pending):
            return None
        while True:
            key, future = self._pending.popleft()
            if key == tensor.key:
                break
            future.cancel()  # skipped by the assignment (a head left fresh)
        self._fill()
        return future.result()

    def close(self):
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# === The Keras-layout safetensors file ===


def storage_dtype(dtype):
    """The NumPy dtype of a storage dtype name ("float32", "float16", "bfloat16")."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(
            f"Unknown storage dtype. Received: dtype={dtype!r}. "
            f"Valid: {', '.join(STORAGE_DTYPES)}."
        )
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def save_weights(model, path, dtype="float32", metadata=None):
    """Writes every variable of `model` to a Keras-layout safetensors file.

    The file is streamed one tensor at a time (so writing holds at most one
    tensor beyond the model's own variables), every tensor is made
    C-contiguous first (safetensors 0.8.0 writes non-contiguous arrays in
    the wrong element order, and this writer must not repeat that), and the
    file is read back with the safetensors library and compared tensor by
    tensor, so a bad write raises instead of publishing wrong weights.

    Args:
        model: a Keras model built by this package (or any model whose
            variable names are unique, see `keras_variables`).
        path: the file to write.
        dtype: storage dtype, "float32" (default), "float16" or "bfloat16".
        metadata: optional `{str: str}` stored in the safetensors header.

    Returns:
        The number of tensors written.

    Example:
        >>> save_weights(model, "out/model.safetensors", dtype="bfloat16")  # doctest: +SKIP
    """
    np_dtype = storage_dtype(dtype)
    variables = keras_variables(model)
    header = {"format": "keras", "layout": "convnext_zoo", "dtype": dtype}
    header.update(metadata or {})
    return write_safetensors(
        path,
        [
            (name, tuple(v.shape), lambda v=v: np.asarray(v.numpy()).astype(np_dtype))
            for name, v in variables.items()
        ],
        dtype,
        header,
    )


SAFETENSORS_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Indirection so a test can simulate a writer that scrambles element order.
_contiguous = np.ascontiguousarray


def write_safetensors(path, tensors, dtype, metadata):
    """Streams tensors of one storage dtype to a safetensors file, then checks the file.

    Every writer of weights goes through here (`save_weights`, and
    `convnext_zoo.timm_format.write_timm_weights`): one tensor in memory at
    a time, each made C-contiguous first (safetensors 0.8.0 writes
    non-contiguous arrays in the wrong element order, and this writer must
    not repeat that), and the written file read back with the safetensors
    library and compared tensor by tensor, so a bad write raises instead of
    publishing wrong weights.

    Args:
        path: the file to write.
        tensors: `[(name, shape, load)]`, `load()` giving the array in
            `dtype` (called once to write and once to compare).
        dtype: "float32", "float16" or "bfloat16".
        metadata: `{str: str}` for the header.

    Returns:
        The number of tensors written.

    Raises:
        OSError: the file reads back different (nothing may use it).
    """
    np_dtype = storage_dtype(dtype)
    _stream_safetensors(path, tensors, SAFETENSORS_CODES[dtype], np_dtype, metadata)
    _compare_file(tensors, path, np_dtype)
    return len(tensors)


def _stream_safetensors(path, tensors, code, np_dtype, metadata):
    """Writes `[(name, shape, load)]` as safetensors, one tensor in memory at a time."""
    import json
    import struct

    itemsize = np.dtype(np_dtype).itemsize
    header, offset = {}, 0
    for name, shape, _ in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    with open(os.fspath(path), "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, shape, load in tensors:
            array = _contiguous(load())
            if tuple(array.shape) != tuple(shape) or array.dtype != np_dtype:
                raise ValueError(
                    f"Tensor {name!r} changed while writing: expected {shape} "
                    f"{np.dtype(np_dtype).name}, got {array.shape} {array.dtype}."
                )
            handle.write(array.reshape(-1).view(np.uint8).data)
            del array
        handle.flush()
        os.fsync(handle.fileno())


def _compare_file(tensors, path, np_dtype):
    """Reads the written file back with the safetensors library, tensor by tensor."""
    from convnext_zoo.checkpoint_io import SafetensorsReader

    reader = SafetensorsReader(path)
    if set(reader.keys()) != {name for name, _, _ in tensors}:
        raise OSError(
            f"{path} was written with {len(reader.keys())} tensors, expected "
            f"{len(tensors)}; the disk may be full. Nothing was published."
        )
    for name, _, load in tensors:
        expected = np.asarray(load()).astype(np_dtype)
        stored = reader.get(name)
        if stored.shape != expected.shape or not np.array_equal(stored, expected):
            raise OSError(
                f"Tensor {name!r} in {path} reads back different from what "
                "was written (see the safetensors non-contiguous write bug); "
                "nothing was published."
            )


def weight_tensors(reader):
    """`SourceTensor`s of a Keras-layout file (names are Keras names).

    Args:
        reader: a `convnext_zoo.checkpoint_io.SafetensorsReader`; names and
            shapes come from its validated header, data is read per tensor.
    """
    return [
        SourceTensor(
            key, key, reader.shape(key), reader.shape(key),
            lambda key=key: reader.get(key),  # load_value casts to the variable's dtype
        )
        for key in reader.keys()
    ]


def load_weights(model, path, allow_unused=(), allow_unassigned=()):
    """Loads a Keras-layout safetensors file into `model`, strictly.

    Args:
        model: the model to fill.
        path: a file written by `save_weights`.
        allow_unused: prefixes of file tensors deliberately not loaded
            (e.g. `("head_fc/",)` when replacing the head).
        allow_unassigned: prefixes of variables deliberately left as
            initialised (e.g. `("head_fc/",)`).

    Returns:
        The names of the assigned variables.

    Raises:
        WeightMismatchError: unused (+) / unassigned (-) names or shapes.
        ValueError: the file is corrupt or truncated.

    Example:
        >>> load_weights(model, "preset/model.safetensors")  # doctest: +SKIP
    """
    from convnext_zoo.checkpoint_io import SafetensorsReader

    return assign_strict(
        keras_variables(model),
        weight_tensors(SafetensorsReader(path)),
        source=os.fspath(path),
        allow_unused=allow_unused,
        allow_unassigned=allow_unassigned,
    )
