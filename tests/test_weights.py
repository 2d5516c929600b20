"""Strict weight accounting and the Keras-layout safetensors file."""

import numpy as np
import pytest

from convnext_zoo import weights


@pytest.fixture(scope="module")
def model():
    from convnext_zoo import create_convnext_v2

    model = create_convnext_v2("atto", num_classes=7, input_shape=(None, None, 3))
    rng = np.random.default_rng(1)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "model.safetensors"
    assert weights.save_weights(model, path) == len(model.weights)
    return path


def _fresh(num_classes=7):
    from convnext_zoo import create_convnext_v2

    return create_convnext_v2("atto", num_classes=num_classes, input_shape=(None, None, 3))


def test_variable_names_are_layer_slash_variable(model):
    names = list(weights.keras_variables(model))
    assert len(names) == len(set(names)) == len(model.weights)
    for name in ["stem_0/kernel", "stages_0_blocks_1_conv_dw/kernel",
                 "stages_2_blocks_5_mlp_fc1/kernel", "stages_1_blocks_0_mlp_grn/gamma",
                 "head_norm/gamma", "head_fc/bias"]:
        assert name in names


def test_round_trip_float32_is_exact(model, saved):
    from safetensors import safe_open

    other = _fresh()
    assigned = weights.load_weights(other, saved)
    assert len(assigned) == len(model.weights)
    for a, b in zip(model.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with safe_open(str(saved), framework="numpy") as f:
        assert f.metadata()["format"] == "keras"
        kernel = f.get_tensor("stem_0/kernel")
        assert kernel.dtype == np.float32 and kernel.shape == (4, 4, 3, 40)


@pytest.mark.parametrize("dtype, rtol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_half_precision_storage(model, tmp_path, dtype, rtol):
    from safetensors import safe_open

    path = tmp_path / "half.safetensors"
    weights.save_weights(model, path, dtype=dtype)
    with safe_open(str(path), framework="numpy") as f:
        assert str(f.get_tensor("head_fc/kernel").dtype) == dtype
    other = _fresh()
    weights.load_weights(other, path)
    for a, b in zip(model.weights, other.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=rtol, atol=rtol)


def test_unknown_storage_dtype(model, tmp_path):
    with pytest.raises(ValueError, match=r"dtype='int8'.*float32, float16, bfloat16"):
        weights.save_weights(model, tmp_path / "x.safetensors", dtype="int8")


def _tensors(model):
    out = []
    for name, variable in weights.keras_variables(model).items():
        value = variable.numpy()
        out.append(weights.SourceTensor(name, name, value.shape, value.shape, lambda v=value: v))
    return out


def test_accounting_lists_unused_and_unassigned(model):
    tensors = _tensors(model)
    tensors = [t for t in tensors if t.key != "stages_3_blocks_1_mlp_fc2/bias"]
    tensors.append(weights.SourceTensor("extra.weight", None, (3,), (3,), lambda: None))
    with pytest.raises(weights.WeightMismatchError) as info:
        weights.assign_strict(weights.keras_variables(_fresh()), tensors, "ckpt.safetensors")
    message = str(info.value)
    assert "ckpt.safetensors" in message
    assert "+ unused source tensors (1): extra.weight" in message
    assert "- unassigned Keras variables (1): stages_3_blocks_1_mlp_fc2/bias" in message


def test_shape_mismatch_names_key_variable_and_both_shapes(model):
    tensors = _tensors(model)
    bad = weights.SourceTensor(
        "stages.0.blocks.0.mlp.fc1.weight", "stages_0_blocks_0_mlp_fc1/kernel",
        (40, 99), (99, 40), lambda: None,
    )
    tensors = [bad if t.target == bad.target else t for t in tensors]
    with pytest.raises(weights.WeightMismatchError) as info:
        weights.assign_strict(weights.keras_variables(_fresh()), tensors, "src")
    message = str(info.value)
    assert ("source key 'stages.0.blocks.0.mlp.fc1.weight' has shape (99, 40), (40, 99) in "
            "Keras layout; Keras variable 'stages_0_blocks_0_mlp_fc1/kernel' has shape (40, 160)") in message


def test_nothing_is_assigned_when_accounting_fails(model):
    target = _fresh()
    before = target.weights[0].numpy().copy()
    tensors = _tensors(model)[:-1]
    with pytest.raises(weights.WeightMismatchError):
        weights.assign_strict(weights.keras_variables(target), tensors, "src")
    np.testing.assert_array_equal(target.weights[0].numpy(), before)


def test_deliberate_gaps_are_explicit(model, saved):
    other = _fresh(num_classes=3)
    with pytest.raises(weights.WeightMismatchError, match="head_fc/kernel"):
        weights.load_weights(other, saved)
    assigned = weights.load_weights(
        other, saved, allow_unused=("head_fc/",), allow_unassigned=("head_fc/",)
    )
    assert "head_fc/kernel" not in assigned and "head_norm/gamma" in assigned
    # Allowing the variable to stay unassigned does not silently drop the tensor.
    with pytest.raises(weights.WeightMismatchError, match=r"\+ unused source tensors \(2\)"):
        weights.load_weights(_fresh(num_classes=3), saved, allow_unassigned=("head_fc/",))


def test_write_is_reloaded_and_compared(model, tmp_path, monkeypatch):
    # Simulate what safetensors 0.8.0 does to a non-contiguous array: the
    # right bytes in the wrong element order.
    monkeypatch.setattr(
        weights, "_contiguous",
        lambda a: np.ascontiguousarray(np.asarray(a).reshape(-1)[::-1].reshape(a.shape)))
    with pytest.raises(OSError, match="'stem_0/kernel'.*reads back different"):
        weights.save_weights(model, tmp_path / "bad.safetensors")


def test_file_is_valid_for_the_safetensors_library(model, saved):
    from safetensors.numpy import load_file

    loaded = load_file(str(saved))
    variables = weights.keras_variables(model)
    assert list(loaded) == sorted(variables) or set(loaded) == set(variables)
    np.testing.assert_array_equal(loaded["stages_2_blocks_5_mlp_fc1/kernel"],
                                  variables["stages_2_blocks_5_mlp_fc1/kernel"].numpy())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file_error_names_the_file(saved, tmp_path, damage):
    data = saved.read_bytes()
    path = tmp_path / f"{damage}.safetensors"
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint" * 8)
    with pytest.raises(ValueError, match=rf"{damage}.safetensors.*corrupt or truncated"):
        weights.load_weights(_fresh(), path)


@pytest.mark.parametrize("shape", [(3, 5), (300, 700), (256, 512), (1, 600), (600, 1)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_transposed_matrices_are_copied_tile_by_tile_into_c_order(shape, dtype, monkeypatch):
    """The loader's copy of a transposed (PyTorch-layout) matrix is exact."""
    import ml_dtypes

    from convnext_zoo.internals import c_contiguous

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    source = np.random.default_rng(2).normal(size=shape[::-1]).astype(np_dtype)
    view = source.T  # what the layout functions hand over for a Linear weight
    # A freshly allocated output may reuse memory that already holds these
    # values; start from NaNs so that a tile left uncopied shows.
    full = np.full
    monkeypatch.setattr(np, "empty", lambda shape, dtype: full(shape, np.nan, dtype))
    out = c_contiguous(view)
    monkeypatch.undo()
    assert out.flags.c_contiguous and out.shape == shape and out.dtype == view.dtype
    np.testing.assert_array_equal(out.astype("float32"), view.astype("float32"))


@pytest.mark.parametrize("source_dtype,target", [("float16", "float32"), ("float32", "bfloat16"),
                                                  ("float64", "float32")])
def test_a_transposed_matrix_is_cast_in_the_same_single_copy(source_dtype, target):
    """A half-precision checkpoint into float32 variables: one output, no transposed cast first.

    Casting first (`astype`) keeps the transposed order, so the tile copy
    would need a second full-size array; the peak allocation shows it.
    """
    import tracemalloc

    import ml_dtypes

    from convnext_zoo.internals import TILE as _TILE, c_contiguous

    source = np.random.default_rng(3).normal(size=(1500, 1000)).astype(source_dtype)
    view = source.T
    tracemalloc.start()
    try:
        out = c_contiguous(view, target)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = view.astype(ml_dtypes.bfloat16 if target == "bfloat16" else target)
    assert out.dtype == expected.dtype and out.flags.c_contiguous and out.shape == (1000, 1500)
    np.testing.assert_array_equal(out.astype("float32"), expected.astype("float32"))
    # The output itself, plus at most one tile's worth of temporaries.
    assert peak < out.nbytes + _TILE * _TILE * 8, (peak, out.nbytes)


def test_other_arrays_keep_numpys_contiguous_copy():
    from convnext_zoo.internals import c_contiguous

    already = np.arange(12.0).reshape(3, 4)
    assert c_contiguous(already) is already  # no copy
    conv = np.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5).transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(c_contiguous(conv), conv)
    assert c_contiguous(conv).flags.c_contiguous
    strided = np.arange(40.0).reshape(4, 10)[:, ::2]  # neither C nor F order
    np.testing.assert_array_equal(c_contiguous(strided), strided)
    # Cast and reorder in one go; an array already of the dtype and in C order is kept.
    cast = c_contiguous(conv, "float32")
    assert cast.dtype == np.float32 and cast.flags.c_contiguous
    np.testing.assert_array_equal(cast, conv.astype("float32"))
    assert c_contiguous(already, already.dtype) is already


@pytest.mark.parametrize("shape", [(), (0, 4), (3,), (7, 5), (2, 3, 4, 5), (1000, 33)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64"])
def test_aligned_empty_starts_on_a_64_byte_boundary(shape, dtype):
    from convnext_zoo.internals import aligned_empty

    for _ in range(5):  # numpy's own allocations of these sizes are mostly not 64-aligned
        out = aligned_empty(shape, dtype)
        assert out.shape == shape and out.dtype == np.dtype(dtype) and out.flags.c_contiguous
        assert out.flags.writeable and (out.size == 0 or out.ctypes.data % 64 == 0)
        out[...] = 1  # the whole view is writable memory of its own
        assert out.sum() == out.size


def test_copy_into_a_given_output_is_always_one_exact_copy():
    from convnext_zoo.internals import aligned_empty, c_contiguous

    rng = np.random.default_rng(4)
    for source in (rng.normal(size=(600, 300)).T, rng.normal(size=(5, 6)),
                   rng.normal(size=(2, 3, 4, 5)).transpose(2, 3, 1, 0)):
        out = np.full(source.shape, np.nan, np.float32)
        assert c_contiguous(source, "float32", out=out) is out
        np.testing.assert_array_equal(out, source.astype("float32"))
    already = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    out = aligned_empty((3, 4), "float32")
    assert c_contiguous(already, out=out) is out and not np.shares_memory(out, already)
    np.testing.assert_array_equal(out, already)
    for bad in (np.empty((4, 3), np.float32), np.empty((3, 4), np.float64),
                np.empty((4, 3), np.float32).T):
        with pytest.raises(ValueError, match=r"`out` must be a C-order array of shape \(3, 4\) "
                                             r"and dtype float32\. Received: "):
            c_contiguous(already, out=bad)


@pytest.mark.skipif(__import__("keras").config.backend() != "tensorflow", reason="TensorFlow's handover")
@pytest.mark.parametrize("transposed", [False, True])
def test_tensorflow_variables_keep_the_one_loaded_copy(transposed):
    """The value is copied once, 64-byte aligned; the tensor and the variable keep that buffer.

    A NumPy array given to TensorFlow would be copied twice more (see
    `backend_value`); a misaligned buffer would crash TensorFlow's kernels.
    """
    import tensorflow as tf

    from convnext_zoo.internals import backend_value

    source = np.random.default_rng(5).normal(size=(300, 200)).astype("float16")
    source = source.T if transposed else source
    tensor = backend_value(source, "float32")
    assert isinstance(tensor, tf.Tensor) and tensor.dtype == tf.float32
    buffer = np.asarray(tensor)
    assert buffer.ctypes.data % 64 == 0 and not np.shares_memory(buffer, source)
    np.testing.assert_array_equal(buffer, source.astype("float32"))
    variable = tf.Variable(tensor)  # what Keras does with a pending variable's value
    assert np.asarray(variable.value()).ctypes.data == buffer.ctypes.data
    # The buffer now belongs to the variable: TensorFlow kernels read and
    # update it in place, and the caller's array is untouched.
    expected = source.astype("float32") + 1
    variable.assign_add(tf.ones_like(variable))
    np.testing.assert_array_equal(variable.numpy(), expected)
    np.testing.assert_array_equal(tf.transpose(variable).numpy(), expected.T)
    source[...] = 0
    np.testing.assert_array_equal(variable.numpy(), expected)


def test_bfloat16_values_go_to_the_backend_as_numpy():
    import keras
    import ml_dtypes

    from convnext_zoo.internals import backend_value

    source = np.random.default_rng(6).normal(size=(40, 30)).astype(ml_dtypes.bfloat16).T
    value = backend_value(source, ml_dtypes.bfloat16)
    assert isinstance(value, np.ndarray) and value.flags.c_contiguous
    assert not np.shares_memory(value, source)
    np.testing.assert_array_equal(value.astype("float32"), source.astype("float32"))
    variable = keras.Variable(np.zeros((30, 40), "float32"), dtype="bfloat16")
    variable.assign(value)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable).astype("float32"),
                                  source.astype("float32"))


# === Reading ahead on a loader thread (TensorPrefetch) ===


def _recorded(model, calls):
    """`_tensors(model)` whose loads append (key, thread id) to `calls`."""
    import threading

    def load(tensor):
        calls.append((tensor.key, threading.get_ident()))
        return tensor.load()

    return [weights.SourceTensor(t.key, t.target, t.shape, t.source_shape, lambda t=t: load(t))
            for t in _tensors(model)]


@pytest.mark.parametrize("window", ["auto", None, 2])
def test_prefetched_tensors_are_read_off_the_main_thread_once_each(model, window):
    import threading

    calls = []
    tensors = _recorded(model, calls)
    target = _fresh()
    with weights.TensorPrefetch(tensors, "float32", window=window) as prefetch:
        weights.assign_strict(weights.keras_variables(target), tensors, "src", prefetch=prefetch)
    for a, b in zip(model.weights, target.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert sorted(key for key, _ in calls) == sorted(t.key for t in tensors)
    assert threading.get_ident() not in {thread for _, thread in calls}


def test_a_bounded_window_reads_no_further_ahead_and_stops_on_close(model):
    import time

    def settle(count, patience=30.0):  # waits for the loader (slow on a loaded machine), then a little more
        deadline = time.monotonic() + patience
        while len(calls) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        return len(calls)

    calls = []
    tensors = _recorded(model, calls)
    prefetch = weights.TensorPrefetch(tensors, "float32", window=3)
    assert settle(3) == 3
    assert prefetch.take(tensors[0]) is not None
    assert settle(4) == 4
    prefetch.close()
    assert settle(5, patience=0.5) == 4


def test_skipped_and_out_of_order_tensors_are_loaded_by_the_caller(model):
    calls = []
    tensors = _recorded(model, calls)
    with weights.TensorPrefetch(tensors, "float32", skip=("head_fc/",)) as prefetch:
        head = [t for t in tensors if t.target.startswith("head_fc/")]
        assert head and all(prefetch.take(t) is None for t in head)
        # Taking a later tensor drops the ones before it; they are not handed out again.
        assert prefetch.take(tensors[5]) is not None
        assert prefetch.take(tensors[0]) is None
    assert not any(key.startswith("head_fc/") for key, _ in calls)


def test_a_prefetched_value_of_another_dtype_is_cast_at_assignment(model):
    import keras

    from convnext_zoo import create_convnext_v2

    tensors = _tensors(model)

    target = create_convnext_v2("atto", num_classes=7, input_shape=(None, None, 3), dtype="bfloat16")
    with weights.TensorPrefetch(tensors, "float32") as prefetch:
        weights.assign_strict(weights.keras_variables(target), tensors, "src", prefetch=prefetch)
    for a, b in zip(model.weights, target.weights):
        assert b.dtype == "bfloat16"
        np.testing.assert_array_equal(
            np.asarray(keras.ops.convert_to_numpy(b), np.float32),
            a.numpy().astype(keras.backend.standardize_dtype("bfloat16")).astype(np.float32),
        )


def test_a_prefetched_tensor_whose_data_is_not_its_header_is_refused(model):
    tensors = _tensors(model)
    bad = tensors[3]
    tensors[3] = weights.SourceTensor(bad.key, bad.target, bad.shape, bad.source_shape,
                                      lambda: np.zeros((2, 2), np.float32))
    with weights.TensorPrefetch(tensors, "float32") as prefetch:
        with pytest.raises(weights.WeightMismatchError, match="header and data disagree"):
            weights.assign_strict(weights.keras_variables(_fresh()), tensors, "src", prefetch=prefetch)


def test_from_preset_reads_the_file_on_the_loader_thread(model, saved, tmp_path, monkeypatch):
    import threading

    import convnext_zoo
    from convnext_zoo import checkpoint_io

    folder = tmp_path / "preset"
    convnext_zoo.save_preset(model, folder)
    threads = []
    get = checkpoint_io.SafetensorsReader.get

    def recorded(self, key):
        threads.append(threading.get_ident())
        return get(self, key)

    monkeypatch.setattr(checkpoint_io.SafetensorsReader, "get", recorded)
    loaded = convnext_zoo.from_preset(str(folder), preprocessing=False)
    assert len(threads) == len(model.weights)
    assert threading.get_ident() not in threads
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
