"""Every private Keras / keras-hub / TensorFlow hook is still there, and each fallback works.

A release that removes a hook fails `test_every_private_hook_is_present`
by name, instead of leaving the library silently slower.
"""

import keras
import numpy as np
import pytest

from convnext_zoo import create_convnext_v2, internals, layers


def test_every_private_hook_is_present():
    assert internals.missing_hooks() == []
    assert internals.can_defer_variables()
    assert internals.PreprocessingLayer is not keras.layers.Layer
    # Listed by missing_hooks on the PyTorch backend only (tests/test_inference.py runs it there).
    assert [str(op) for op in internals.torch_export_checks()] == ["aten._assert_tensor_metadata.default"]


def test_missing_hooks_names_what_a_release_took_away(monkeypatch):
    monkeypatch.setattr(internals, "_keras_state_modules", lambda: None)
    monkeypatch.setattr(internals, "_tf_control_flow_util", lambda: None)
    monkeypatch.setattr(internals, "_tf_kernel_registry", lambda: None)
    monkeypatch.setattr(internals, "_litert_converter_has_buffer_offsets", lambda: False)
    missing = internals.missing_hooks()
    assert any("_experimental_use_buffer_offset" in m for m in missing)
    assert any("global_state" in m for m in missing)
    assert any("GraphOrParentsInXlaContext" in m for m in missing)
    assert any("op_def_registry" in m for m in missing)


def test_without_keras_state_hooks_loading_builds_eagerly_with_zeros(monkeypatch):
    monkeypatch.setattr(internals, "_keras_state_modules", lambda: None)
    assert not internals.can_defer_variables()
    with internals.weights_to_be_loaded():
        model = create_convnext_v2("atto", include_top=False, input_shape=(32, 32, 3))
    assert not any(internals.is_pending(v) for v in model.weights)
    kernel = keras.ops.convert_to_numpy(model.get_layer("stem_0").kernel)
    assert not np.any(kernel)  # zeros, not random draws the loader would overwrite


def test_without_the_xla_probe_layers_take_the_portable_form(monkeypatch, rng):
    import tensorflow as tf

    layer = layers.GlobalResponseNorm()
    x = rng.normal(size=(2, 5, 5, 8)).astype("float32")
    layer.build(x.shape)
    layer.gamma.assign(rng.normal(size=8).astype("float32"))
    layer.beta.assign(rng.normal(size=8).astype("float32"))
    fast = tf.function(layer)(x)
    monkeypatch.setattr(internals, "_tf_control_flow_util", lambda: None)
    assert not layers._tensorflow_graph_kernels()
    portable = tf.function(layer)(x)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(portable), rtol=1e-5, atol=1e-5)


def test_without_the_kernel_registry_no_internal_kernel_is_claimed(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(internals, "_tf_kernel_registry", lambda: None)
    assert not internals.has_cpu_kernel("MatMul", tf.float32)
    monkeypatch.undo()
    assert internals.has_cpu_kernel("MatMul", tf.float32)
    assert not internals.has_cpu_kernel("NoSuchOpAnywhere", tf.float32)


@pytest.mark.parametrize("shape", [(3, 5), (300, 700)])
def test_aligned_transposed_copy_is_exact(shape, rng):
    source = rng.normal(size=shape).astype("float32")
    out = internals.aligned_empty(shape[::-1], "float32")
    assert out.ctypes.data % internals.ALIGN == 0
    np.testing.assert_array_equal(internals.c_contiguous(source.T, out=out), source.T)
