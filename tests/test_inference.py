"""The compiled inference paths: `inference_function` and `openvino_function`."""

import re
import sys

import keras
import numpy as np
import pytest

from convnext_zoo import create_convnext_v1, create_convnext_v2, inference_function, openvino_function
from convnext_zoo.inference import OpenVINOFunction
from tests.conftest import photo
from tests.test_models import _randomize


def _photos(size, count=2):
    names = ("astronaut", "coffee", "chelsea", "rocket")[:count]
    images = np.stack([photo(name, (size, size)) for name in names]).astype("float32")
    return (images / 255.0 - 0.45) / 0.25


@pytest.fixture(scope="module")
def v2_atto():
    model = create_convnext_v2("atto", num_classes=7, input_shape=(64, 64, 3))
    _randomize(model, np.random.default_rng(1))
    return model


def test_inference_function_matches_the_model_and_sees_new_weights(v2_atto, rng):
    images = _photos(64)
    forward = inference_function(v2_atto)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(forward(images)), keras.ops.convert_to_numpy(v2_atto(images)),
        rtol=1e-5, atol=1e-5,
    )
    before = v2_atto.get_weights()
    try:
        _randomize(v2_atto, rng, scale=0.5)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(forward(images)), keras.ops.convert_to_numpy(v2_atto(images)),
            rtol=1e-5, atol=1e-5,
        )
    finally:
        v2_atto.set_weights(before)


@pytest.mark.parametrize("build", [
    lambda: create_convnext_v1("tiny", num_classes=5, input_shape=(64, 64, 3)),
    lambda: create_convnext_v2("atto", num_classes=5, input_shape=(64, 64, 3)),
], ids=["v1_tiny", "v2_atto"])
def test_openvino_matches_the_keras_model_on_photographs(build):
    model = build()
    _randomize(model, np.random.default_rng(2))
    images = _photos(64, count=3)
    expected = keras.ops.convert_to_numpy(model(images))
    predict = openvino_function(model, num_threads=2)
    out = predict(images)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, 5)
    # Float32 all the way: round-off only (a bfloat16 run would differ by ~1e-2).
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert (out.argmax(-1) == expected.argmax(-1)).all()
    # Backend tensors are accepted as well as NumPy arrays.
    np.testing.assert_array_equal(predict(keras.ops.convert_to_tensor(images)), out)


def test_openvino_fuses_every_layer_norm_into_one_mvn_kernel(v2_atto):
    """OpenVINO recognises PointwiseLayerNorm's TensorFlow graph as a layer norm.

    Each layer norm then runs as one MVN kernel instead of reductions and
    element-wise ops; a form OpenVINO does not match (e.g. multiplying by
    `rsqrt(var) * gamma`, or reducing over a scalar axis) leaves none.
    """
    from convnext_zoo.layers import PointwiseLayerNorm

    predict = openvino_function(v2_atto)
    images = _photos(64)
    predict(images)
    compiled = predict._request(images.shape).get_compiled_model()
    kinds = [op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()]
    layers = list(v2_atto.backbone.layers) + list(v2_atto.layers)
    norms = [layer for layer in layers if isinstance(layer, PointwiseLayerNorm)]
    assert len(norms) == 17  # stem, 3 downsamples, 12 blocks, the head
    assert kinds.count("MVN") == len(norms), sorted(set(kinds))


def test_openvino_after_the_attached_preprocessor_matches_predict(v2_atto):
    from convnext_zoo.build import attach_preprocessing as attach_preprocessor
    from convnext_zoo.readers import registry_config
    from convnext_zoo.registry import preset_info

    model = create_convnext_v2("atto", num_classes=7, input_shape=(64, 64, 3))
    model.set_weights(v2_atto.get_weights())
    attach_preprocessor(model, registry_config(preset_info("convnext_v2_atto_imagenet")), (64, 64, 3))
    images = np.stack([photo("astronaut", (80, 80)), photo("coffee", (80, 80))])  # uint8, resized by it
    expected = model.predict(images)
    out = openvino_function(model)(model.preprocessor(images))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_openvino_backbone_of_any_input_size(rng):
    backbone = create_convnext_v2("atto", include_top=False, input_shape=(None, None, 3))
    _randomize(backbone, rng)
    predict = openvino_function(backbone)
    assert predict.input_shape == (None, None, None, 3)
    for size in (64, 96):
        images = _photos(size)
        expected = keras.ops.convert_to_numpy(backbone(images))
        out = predict(images)
        assert out.shape == expected.shape == (2, size // 32, size // 32, 320)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_openvino_is_a_snapshot_of_the_weights(v2_atto, rng):
    images = _photos(64)
    predict = openvino_function(v2_atto)
    old = predict(images)
    before = v2_atto.get_weights()
    try:
        _randomize(v2_atto, rng, scale=0.5)
        new = keras.ops.convert_to_numpy(v2_atto(images))
        assert np.abs(new - old).max() > 1e-2
        # The compiled copy keeps the weights it was made from, as documented,
        # also for a shape compiled after the change...
        np.testing.assert_array_equal(predict(images), old)
        np.testing.assert_allclose(predict(images[:1]), old[:1], rtol=1e-5, atol=1e-5)
        # ...and a new call to openvino_function picks up the new ones.
        np.testing.assert_allclose(openvino_function(v2_atto)(images), new, rtol=1e-4,
                                   atol=1e-4 * np.abs(new).max())
    finally:
        v2_atto.set_weights(before)


def test_openvino_keeps_the_most_recent_shapes_compiled(v2_atto, rng):
    predict = openvino_function(v2_atto)
    batches = [rng.normal(size=(n, 64, 64, 3)).astype("float32") for n in range(1, 7)]
    for x in batches + batches[:2]:
        np.testing.assert_allclose(
            predict(x), keras.ops.convert_to_numpy(v2_atto(x)), rtol=1e-4, atol=1e-4,
        )
        assert len(predict._compiled) <= OpenVINOFunction.max_compiled
    # Least recently used first: the shapes of the last four calls are kept.
    assert list(predict._compiled) == [(5, 64, 64, 3), (6, 64, 64, 3), (1, 64, 64, 3), (2, 64, 64, 3)]


def test_openvino_bad_input_and_arguments_are_clear_errors(v2_atto, monkeypatch):
    predict = openvino_function(v2_atto)
    for shape in [(2, 96, 96, 3), (2, 64, 64, 1), (64, 64, 3)]:
        with pytest.raises(ValueError, match=r"takes images of shape \(None, 64, 64, 3\).*Received: shape "
                                             + re.escape(str(shape))):
            predict(np.zeros(shape, "float32"))
    for threads in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_threads must be a positive int"):
            openvino_function(v2_atto, num_threads=threads)
    monkeypatch.setattr(keras.config, "backend", lambda: "jax")
    with pytest.raises(ValueError, match=r"tensorflow Keras backend. Received: backend='jax'"):
        openvino_function(v2_atto)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match=r"pip install \"convnext_zoo\[openvino\]\""):
        openvino_function(v2_atto)


def test_openvino_mixed_float16_converts_and_mixed_bfloat16_is_a_clear_error():
    images = _photos(64)
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        model = create_convnext_v2("atto", num_classes=5, input_shape=(64, 64, 3))
        _randomize(model, np.random.default_rng(3), scale=0.2)
        expected = keras.ops.convert_to_numpy(model(images)).astype("float32")
        out = openvino_function(model)(images)
        assert out.dtype == np.float16
        np.testing.assert_allclose(out.astype("float32"), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        model = create_convnext_v2("atto", num_classes=5, input_shape=(64, 64, 3))
        with pytest.raises(ValueError, match=r"could not convert .*'mixed_bfloat16'.*use inference_function"):
            openvino_function(model)
    finally:
        keras.mixed_precision.set_global_policy("float32")


_FROZEN_WEIGHTS_SCRIPT = """
import numpy as np
import convnext_zoo
from convnext_zoo.internals import onednn_enabled
print("oneDNN", {True: "on", False: "off"}.get(onednn_enabled(), "unknown"))
model = convnext_zoo.create_convnext_v2("atto", input_shape=(64, 64, 3), num_classes=10)
x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
before = model.predict(x, verbose=0)
rng = np.random.default_rng(1)
model.set_weights([(rng.normal(size=w.shape) * 0.1).astype("float32") for w in model.get_weights()])
after = model.predict(x, verbose=0)
reference = convnext_zoo.create_convnext_v2("atto", input_shape=(64, 64, 3), num_classes=10)
reference.set_weights(model.get_weights())  # a new model, whose kernels pack the new weights
expected = reference.predict(x, verbose=0)
assert not np.allclose(before, expected, atol=1e-3)
print("fresh" if np.allclose(after, expected, atol=1e-4) else "stale")
"""


@pytest.mark.parametrize("flag, switch", [
    (None, None),           # no flag, oneDNN as the environment has it: this CPU's choice unless set
    ("1", "0"), ("1", "1"),  # the flag with oneDNN forced off and on: both cases on any x86 CPU
])
def test_tensorflows_frozen_weights_flag_serves_the_old_weights(flag, switch):
    """Why the library leaves TF_ONEDNN_ASSUME_FROZEN_WEIGHTS alone (README, "Speed on a CPU").

    The flag makes oneDNN pack each weight once (`profile_ops.py --frameworks
    onednn` shows its faster kernels), and never again: after `set_weights`,
    `predict` still multiplies by the old matmul and convolution weights, and
    its outputs are not those of a model built with the new ones. Without
    the flag, they are; and where TensorFlow runs without oneDNN (a CPU
    without AVX-512, or `TF_ENABLE_ONEDNN_OPTS=0`, `switch`), the flag has
    nothing to act on and `predict` sees the new weights too. The child
    says which case it is in, from its own TensorFlow.
    """
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TF_ONEDNN_ASSUME_FROZEN_WEIGHTS"}
    if flag:
        env["TF_ONEDNN_ASSUME_FROZEN_WEIGHTS"] = flag
    if switch:
        env["TF_ENABLE_ONEDNN_OPTS"] = switch
    env.update(KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", _FROZEN_WEIGHTS_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = re.search(r"^oneDNN (on|off)$", result.stdout, re.M)
    assert state, result.stdout  # "unknown": TensorFlow took away the API onednn_enabled reads
    if switch:
        assert state.group(1) == {"0": "off", "1": "on"}[switch]
    stale = flag and state.group(1) == "on"
    assert result.stdout.split()[-1] == ("stale" if stale else "fresh")


_TORCH_SCRIPT = """
import json, sys, warnings
import keras, numpy as np, torch
from convnext_zoo import ConvNeXtBackbone, ConvNeXtImageClassifier, inference_function
from convnext_zoo.inference import TorchGraphFunction
from convnext_zoo import internals
from tests.test_models import _randomize

out = sys.argv[1]
photos = np.load(out + "/photos.npy")
facts = {"missing_hooks": internals.missing_hooks()}

def relative(a, b):
    a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
    return float(np.abs(a - b).max() / np.abs(b).max())

def plain(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x), training=False)

def shallow(image_shape, seed, policy=None):
    # GRN and layer scale in one shallow network, any image size.
    backbone = ConvNeXtBackbone(depths=(1, 1, 2, 1), hidden_dims=(16, 32, 48, 64), use_grn=True,
                                layer_scale_init_value=0.5, image_shape=image_shape, dtype=policy)
    model = ConvNeXtImageClassifier(backbone, num_classes=5, dtype=policy)
    _randomize(model, np.random.default_rng(seed))
    return model

model = shallow((None, None, 3), 0)
forward = inference_function(model)
facts["type"] = type(forward).__name__
x64, x96 = photos[:, :64, :64], photos
facts["batch 3"] = relative(forward(x64), plain(model, x64))
facts["batch 1"] = relative(forward(x64[:1]), plain(model, x64[:1]))
facts["captured after two batch sizes"] = len(forward._captured)
graph = next(iter(forward._captured.values())).graph
ops = [str(node.target) for node in graph.nodes if node.op == "call_function"]
facts["ops"] = sorted(set(ops))
facts["contiguous"] = ops.count("aten.contiguous.default")
facts["convolutions"] = ops.count("aten.conv2d.default")
facts["96 px"] = relative(forward(x96), plain(model, x96))
facts["captured after a new size"] = len(forward._captured)
facts["tensor input"] = relative(forward(torch.as_tensor(x64)), plain(model, x64))

# Weight changes through Keras: set_weights, load_weights, a training step.
old = keras.ops.convert_to_numpy(forward(x64))
_randomize(model, np.random.default_rng(1), scale=0.5)
facts["set_weights"] = [relative(forward(x64), plain(model, x64)), relative(old, plain(model, x64))]
source = shallow((None, None, 3), 2)
source.save_weights(out + "/other.weights.h5")
model.load_weights(out + "/other.weights.h5")
facts["load_weights"] = relative(forward(x64), plain(source, x64))
before = keras.ops.convert_to_numpy(forward(x64))
model.compile(optimizer=keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy")
model.train_on_batch(x64, np.array([0, 1, 2]))
facts["train step"] = [relative(forward(x64), plain(model, x64)), relative(before, plain(model, x64))]

# Without the hook naming torch.export's metadata checks, they stay in the graph: same outputs.
hook = internals.torch_export_checks
internals.torch_export_checks = lambda: ()
checked = inference_function(model)
facts["checks kept"] = relative(checked(x64), plain(model, x64))
graph = next(iter(checked._captured.values())).graph
facts["checks kept ops"] = sum("assert" in str(node.target) for node in graph.nodes)
internals.torch_export_checks = hook

# Errors and the fallbacks.
try:
    forward(np.zeros((3,), "float32"))
except ValueError as error:
    facts["rank error"] = str(error)

class DataDependent(keras.Model):
    # A branch on a value: torch.export cannot capture it.
    def call(self, images, training=False):
        mean = float(keras.ops.convert_to_numpy(keras.ops.mean(images)))
        return images * 2.0 if mean > 0 else images
branchy = DataDependent()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    facts["fallback"] = relative(inference_function(branchy)(x64), x64 * 2.0 if x64.mean() > 0 else x64)
facts["fallback warnings"] = [str(w.message) for w in caught if "torch.export" in str(w.message)]
mixed = shallow((64, 64, 3), 3, policy="mixed_bfloat16")
mixed_forward = inference_function(mixed)
facts["mixed"] = relative(mixed_forward(x64), plain(mixed, x64))
facts["mixed captured"] = len(mixed_forward._captured)
json.dump(facts, open(out + "/facts.json", "w"))
"""


def test_torch_inference_function_runs_the_captured_graph(tmp_path):
    """PyTorch backend: one `torch.export` capture per image size, equal to the Keras call, live weights."""
    import json
    import os
    import subprocess

    np.save(tmp_path / "photos.npy", _photos(96, count=3))
    env = dict(os.environ, KERAS_BACKEND="torch", CUDA_VISIBLE_DEVICES="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _TORCH_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, env=env, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["missing_hooks"] == []
    assert facts["type"] == "TorchGraphFunction"
    for key in ("batch 3", "batch 1", "96 px", "tensor input", "load_weights", "mixed", "checks kept"):
        assert facts[key] <= 1e-5, (key, facts[key])
    # One capture serves every batch size of an image size; a new size is a second capture.
    assert facts["captured after two batch sizes"] == 1 and facts["captured after a new size"] == 2
    # The lean graph: no metadata checks or dtype no-ops; each convolution's layout switch is one
    # `contiguous` (into channels-last memory, free on Keras' permuted view), not Keras' two copies.
    assert not [op for op in facts["ops"] if "assert" in op or op.startswith("aten.to.")], facts["ops"]
    assert facts["contiguous"] == 2 * facts["convolutions"] > 0  # the input's and the kernel's
    # Each Dense (fc1, fc2 of 5 blocks, the head) is one linear: no separate matmul and bias add.
    assert "aten.linear.default" in facts["ops"] and "aten.matmul.default" not in facts["ops"]
    assert facts["checks kept ops"] > 0
    # Weight changes are seen: the outputs follow the new weights, not the old ones.
    for key in ("set_weights", "train step"):
        new, old = facts[key]
        assert new <= 1e-5 and old > 1e-3, (key, facts[key])
    assert "(batch, height, width, 3)" in facts["rank error"] and "shape (3,)" in facts["rank error"]
    assert "\n" not in facts["rank error"]
    # A model torch.export cannot capture still runs (the plain call), with a warning naming why.
    assert facts["fallback"] <= 1e-6 and len(facts["fallback warnings"]) == 1, facts["fallback warnings"]
    assert "running the plain Keras call" in facts["fallback warnings"][0]
    # Mixed precision runs the plain call: a capture would freeze Keras' per-call casts of the weights.
    assert facts["mixed captured"] == 0
