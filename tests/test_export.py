"""Deployment exports (`convnext_zoo.export`, `model.export`): parity on photographs, op sets, errors.

Every model is randomised first (pitfall 5: fresh GRN and layer scale switch
the residual branches off). Each exported file is run again here in its own
runtime, independently of the check inside `export`, against `model.predict`
on scikit-image photographs.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import convnext_zoo
from convnext_zoo import deploy
from convnext_zoo.inference import OPENVINO_CONFIG
from convnext_zoo.layers import GlobalResponseNorm, PointwiseDense, export_forms

sys.path.insert(0, os.path.dirname(__file__))
from conftest import photo  # noqa: E402
from test_models import _randomize  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


def _network_inputs(size=224):
    converter = convnext_zoo.ConvNeXtImageConverter(image_size=size)
    return np.stack([np.asarray(converter(photo(name)), np.float32) for name in PHOTOS])


def _relative(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _random_model(family, variant, size=224, seed=0, **kwargs):
    create = convnext_zoo.create_convnext_v2 if family == "v2" else convnext_zoo.create_convnext_v1
    model = create(variant, num_classes=1000, input_shape=(size, size, 3), **kwargs)
    _randomize(model, np.random.default_rng(seed))
    return model


@pytest.fixture(scope="module")
def atto():
    return _random_model("v2", "atto")


def _assert_no_leftovers(directory, expected):
    assert sorted(os.listdir(directory)) == sorted(expected)


# === Export forms of the layers ===


def test_export_forms_match_the_fast_forms(rng):
    import tensorflow as tf

    grn = GlobalResponseNorm()
    dense = PointwiseDense(32, activation="gelu")
    x = tf.constant(rng.normal(size=(2, 7, 7, 16)).astype("float32") * 3)
    grn.build(x.shape)
    dense.build(x.shape)
    for variable in grn.weights + dense.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))

    def both(layer):
        fast = tf.function(lambda t: layer(t)).get_concrete_function(x)
        with export_forms():
            portable = tf.function(lambda t: layer(t)).get_concrete_function(x)
        return fast, portable

    for layer, fast_op, absent in ((grn, "EuclideanNorm", "EuclideanNorm"), (dense, "Erf", None)):
        fast, portable = both(layer)
        fast_ops = {op.type for op in fast.graph.get_operations()}
        portable_ops = {op.type for op in portable.graph.get_operations()}
        assert fast_op in fast_ops
        if absent:
            assert absent not in portable_ops and {"Square", "Sum", "Sqrt"} <= portable_ops
        np.testing.assert_allclose(portable(x).numpy(), fast(x).numpy(), rtol=1e-5, atol=1e-5)
    # Outside the context the fast form is back.
    assert "EuclideanNorm" in {
        op.type for op in tf.function(lambda t: grn(t)).get_concrete_function(x).graph.get_operations()
    }


# === LiteRT ===


def _litert_parity(model, path, size=224, **options):
    report = convnext_zoo.export(model, path, format="litert", **options)
    ops = deploy.litert_operators(path)
    assert ops == report["ops"]
    assert not [op for op in ops if not op.isupper()], ops  # no custom / Flex ops
    assert "GELU" in ops
    x = _network_inputs(size)
    # The plain interpreter, no delegate at all: builtin kernels only.
    interpreter = deploy.litert_interpreter(path, xnnpack=False)
    ours = np.concatenate([deploy.run_litert(interpreter, x[i:i + 1]).copy() for i in range(len(x))])
    return report, _relative(ours, model.predict(x, verbose=0))


@pytest.mark.parametrize("variant", ["atto", "femto"])
def test_litert_float32_builtins_only(variant, tmp_path):
    model = _random_model("v2", variant, seed=1)
    report, relative = _litert_parity(model, str(tmp_path / "m.tflite"), batch_size=1)
    assert relative <= 1e-4 and report["relative"] <= 1e-4, (relative, report["relative"])
    assert report["top1_agreement"] == 1.0
    assert report["input_shape"] == [1, 224, 224, 3]
    _assert_no_leftovers(tmp_path, ["m.tflite"])


def _buffer_offsets(path):
    """How many weight buffers of a `.tflite` file sit past the flatbuffer (addressed by offset)."""
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as file:
        model = schema.Model.GetRootAsModel(file.read(), 0)
    return sum(model.Buffers(i).Offset() > 1 for i in range(model.BuffersLength()))


def test_litert_weights_past_the_flatbuffer_keep_parity(atto, tmp_path, monkeypatch):
    """The layout of files over 2 GB (V2 huge, slow test), forced here on atto."""
    monkeypatch.setattr(deploy, "LITERT_OFFSET_BYTES", 0)
    report, relative = _litert_parity(atto, str(tmp_path / "m.tflite"), batch_size=1)
    assert relative <= 1e-4 and report["relative"] <= 1e-4, (relative, report["relative"])
    assert _buffer_offsets(tmp_path / "m.tflite") > 50  # every kernel, scale and bias
    monkeypatch.setattr(deploy, "LITERT_OFFSET_BYTES", 2**40)
    convnext_zoo.export(atto, str(tmp_path / "c.tflite"), batch_size=1)
    assert _buffer_offsets(tmp_path / "c.tflite") == 0  # smaller files keep the classic layout


def test_litert_over_2gb_without_the_offset_mode_is_refused(atto, tmp_path, monkeypatch):
    from convnext_zoo import internals

    monkeypatch.setattr(deploy, "LITERT_OFFSET_BYTES", 0)
    monkeypatch.setattr(internals, "litert_buffer_offsets", lambda converter: False)
    with pytest.raises(deploy.ExportError) as excinfo:
        convnext_zoo.export(atto, str(tmp_path / "m.tflite"), batch_size=1)
    _one_line(excinfo, "exceed a LiteRT flatbuffer's 2 GB", "quantize='float16'")
    _assert_no_leftovers(tmp_path, [])


def test_litert_builtins_only_with_an_overlapping_stem_and_simple_norm(tmp_path):
    """ExactGelu (the stem's activation) and ScaleNorm export as builtins, same outputs."""
    backbone = convnext_zoo.ConvNeXtBackbone((1, 1, 2, 1), (16, 32, 48, 64), stem="overlap_act",
                                             norm_layer="simple_norm", image_shape=(64, 64, 3))
    model = convnext_zoo.ConvNeXtImageClassifier(backbone, num_classes=10)
    _randomize(model, np.random.default_rng(2))
    report, relative = _litert_parity(model, str(tmp_path / "m.tflite"), size=64, batch_size=1)
    assert relative <= 1e-4 and report["relative"] <= 1e-4, (relative, report["relative"])
    assert "RSQRT" in report["ops"]


def test_litert_float16_half_the_file(atto, tmp_path):
    full = convnext_zoo.export(atto, str(tmp_path / "f32.tflite"))
    half, relative = _litert_parity(atto, str(tmp_path / "f16.tflite"), quantize="float16")
    assert 0.45 < half["bytes"] / full["bytes"] < 0.55, (half["bytes"], full["bytes"])
    assert relative <= 1e-2 and half["relative"] <= 1e-2
    assert 1e-7 < half["relative"]  # really reduced precision, not a float32 copy


# === ONNX, SavedModel, OpenVINO ===


def test_onnx_dynamic_batch_opset_and_parity(atto, tmp_path):
    import onnxruntime

    path = str(tmp_path / "atto.onnx")
    report = convnext_zoo.export(atto, path, format="onnx")
    assert report["opset"] == deploy.ONNX_OPSET
    assert set(report["domains"]) <= {"ai.onnx", "ai.onnx.ml"}
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert not isinstance(session.get_inputs()[0].shape[0], int)  # a named, dynamic batch
    x = _network_inputs()
    reference = atto.predict(x, verbose=0)
    for batch in (x[:1], x[1:4]):  # two batch sizes through one file
        ours = session.run(None, {session.get_inputs()[0].name: batch})[0]
        assert _relative(ours, atto.predict(batch, verbose=0)) <= 1e-4
    ours = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert _relative(ours, reference) <= 1e-4


def test_saved_model_and_openvino_parity(atto, tmp_path):
    import openvino
    import tensorflow as tf

    x = _network_inputs()
    reference = atto.predict(x, verbose=0)
    convnext_zoo.export(atto, str(tmp_path / "sm"), format="saved_model")
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    assert _relative(loaded.serve(tf.constant(x)).numpy(), reference) <= 1e-4
    convnext_zoo.export(atto, str(tmp_path / "ov"), format="openvino", batch_size=5)
    assert sorted(os.listdir(tmp_path / "ov")) == ["model.bin", "model.xml"]
    # Held to float32 as openvino_function does (OpenVINO picks bfloat16 on CPUs that have it:
    # 4e-3 relative here without the hint).
    compiled = openvino.Core().compile_model(str(tmp_path / "ov" / "model.xml"), "CPU",
                                             OPENVINO_CONFIG)
    assert _relative(compiled(x)[0], reference) <= 1e-4
    _assert_no_leftovers(tmp_path, ["ov", "sm"])


@pytest.mark.slow  # four exporters and their runtimes: about a minute
def test_keras_model_export_in_every_format(tmp_path):
    """`model.export` of this package's models, in each format Keras offers, runs and matches."""
    import onnxruntime
    import openvino
    import tensorflow as tf

    model = _random_model("v2", "atto", size=64, seed=2)
    x = _network_inputs(64)
    reference = model.predict(x, verbose=0)
    model.export(str(tmp_path / "sm"), format="tf_saved_model")
    assert _relative(tf.saved_model.load(str(tmp_path / "sm")).serve(x).numpy(), reference) <= 1e-4
    model.export(str(tmp_path / "m.onnx"), format="onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert _relative(session.run(None, {session.get_inputs()[0].name: x})[0], reference) <= 1e-4
    model.export(str(tmp_path / "m.xml"), format="openvino")
    compiled = openvino.Core().compile_model(str(tmp_path / "m.xml"), "CPU", OPENVINO_CONFIG)
    assert _relative(compiled(x)[0], reference) <= 1e-4
    model.export(str(tmp_path / "m.tflite"), format="litert")
    # Keras allows Flex ops; this package's forms need none, so the plain interpreter runs it.
    assert not [op for op in deploy.litert_operators(str(tmp_path / "m.tflite")) if not op.isupper()]
    interpreter = deploy.litert_interpreter(str(tmp_path / "m.tflite"), xnnpack=False)
    ours = np.concatenate([deploy.run_litert(interpreter, x[i:i + 1]).copy() for i in range(len(x))])
    assert _relative(ours, reference) <= 1e-4
    # The backbone alone (a feature map) exports too.
    model.backbone.export(str(tmp_path / "b.tflite"), format="litert")
    assert not [op for op in deploy.litert_operators(str(tmp_path / "b.tflite")) if not op.isupper()]


# === Preprocessing in the graph ===


def test_include_preprocessing_takes_uint8_photographs(tmp_path):
    """uint8 photographs in, the preset's eval transform inside: as `model.predict` on the raw images."""
    import onnxruntime

    from convnext_zoo.preprocessing import ConvNeXtImageClassifierPreprocessor

    model = _random_model("v2", "atto", seed=6)
    model.preprocessor = ConvNeXtImageClassifierPreprocessor(
        convnext_zoo.ConvNeXtImageConverter(image_size=224, crop_pct=0.875))
    raw = np.stack([photo(name, size=(320, 240)) for name in PHOTOS])  # 240 x 320, uint8
    reference = model.predict(raw, verbose=0)
    path = str(tmp_path / "pp.tflite")
    with pytest.raises(deploy.ExportError) as excinfo:
        convnext_zoo.export(model, path, include_preprocessing=True, image_size=(240, 320))
    _one_line(excinfo, "--batch-size N")
    report = convnext_zoo.export(model, path, include_preprocessing=True, image_size=(240, 320),
                                 batch_size=1)
    assert report["input_dtype"] == "uint8" and report["input_shape"] == [1, 240, 320, 3]
    assert "ROUND" in report["ops"] and not [op for op in report["ops"] if not op.isupper()]
    interpreter = deploy.litert_interpreter(path, xnnpack=False)
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    ours = np.concatenate([deploy.run_litert(interpreter, raw[i:i + 1]).copy() for i in range(len(raw))])
    assert _relative(ours, reference) <= 1e-4
    onnx_path = str(tmp_path / "pp.onnx")
    convnext_zoo.export(model, onnx_path, format="onnx", include_preprocessing=True,
                        image_size=(240, 320))
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    ours = session.run(None, {session.get_inputs()[0].name: raw})[0]
    assert _relative(ours, reference) <= 1e-4


# === Bad input: one-line errors, nothing written ===


def _one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_arguments(atto, tmp_path):
    out = str(tmp_path / "m.tflite")
    with pytest.raises(deploy.ExportError) as excinfo:
        convnext_zoo.export(atto, out, format="tflite")
    _one_line(excinfo, "format='tflite'", "Valid: litert, onnx")
    with pytest.raises(deploy.ExportError) as excinfo:
        convnext_zoo.export(atto, out, quantize="int4")
    _one_line(excinfo, "quantize='int4'", "Valid: None, float16")
    with pytest.raises(deploy.ExportError) as excinfo:
        convnext_zoo.export(atto, str(tmp_path / "m.onnx"), format="onnx", quantize="float16")
    _one_line(excinfo, "dynamic_int8", "litert")
    with pytest.raises(deploy.ExportError) as excinfo:
        convnext_zoo.export(atto, str(tmp_path / "m.onnx"), format="litert")
    _one_line(excinfo, ".tflite")
    for images, fragment in ((np.zeros((4, 64, 64, 3), "float32"), "dtype float32"),
                             (np.zeros((4, 64, 64), "uint8"), "shape (4, 64, 64)"),
                             (np.zeros((4, 64, 64, 4), "uint8"), "shape (64, 64, 4)")):
        with pytest.raises(deploy.ExportError) as excinfo:
            convnext_zoo.export(atto, out, representative_images=images)
        _one_line(excinfo, "uint8", fragment)
    (tmp_path / "taken.tflite").write_bytes(b"old")
    with pytest.raises(deploy.ExportError) as excinfo:
        convnext_zoo.export(atto, str(tmp_path / "taken.tflite"))
    _one_line(excinfo, "already exists", "overwrite=True")
    assert (tmp_path / "taken.tflite").read_bytes() == b"old"
    _assert_no_leftovers(tmp_path, ["taken.tflite"])


def test_dynamic_size_needs_the_image_size_flag_for_litert(tmp_path):
    model = convnext_zoo.create_convnext_v2("atto", num_classes=10, input_shape=(None, None, 3))
    _randomize(model, np.random.default_rng(3))
    with pytest.raises(deploy.ExportError) as excinfo:
        convnext_zoo.export(model, str(tmp_path / "m.tflite"))
    _one_line(excinfo, "static image size", "--image-size H W")
    # The flag fixes it.
    report = convnext_zoo.export(model, str(tmp_path / "m.tflite"), image_size=(96, 96))
    assert report["input_shape"] == [None, 96, 96, 3] and report["relative"] <= 1e-4


def test_missing_runtime_names_the_install_line(atto, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError) as excinfo:
        convnext_zoo.export(atto, str(tmp_path / "m.onnx"), format="onnx")
    _one_line(excinfo, "onnxruntime", 'pip install "convnext_zoo[export]"')
    _assert_no_leftovers(tmp_path, [])
    # From the PyTorch backend the converter is torch's exporter, which needs onnxscript.
    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError) as excinfo:
        deploy._require_runtime("onnx", "torch")
    _one_line(excinfo, "'onnxscript'", "pip install onnx onnxruntime onnxscript")
    deploy._require_runtime("onnx", "tensorflow")  # tf2onnx's path does not need it


def test_failed_check_writes_nothing_and_keeps_the_old_file(atto, tmp_path, monkeypatch):
    (tmp_path / "m.tflite").write_bytes(b"old")
    monkeypatch.setitem(deploy.TOLERANCES, None, 0.0)  # no export can pass
    with pytest.raises(deploy.ExportError) as excinfo:
        convnext_zoo.export(atto, str(tmp_path / "m.tflite"), overwrite=True)
    _one_line(excinfo, "relative logit error", "Nothing was written")
    assert (tmp_path / "m.tflite").read_bytes() == b"old"
    _assert_no_leftovers(tmp_path, ["m.tflite"])


# === Command line ===


def test_cli_export_and_its_errors(tmp_path):
    from test_cli import assert_error, run

    code = (
        "import sys, numpy as np, convnext_zoo;"
        "from convnext_zoo.publish import stage_preset;"
        "m = convnext_zoo.create_convnext_v2('atto', num_classes=1000);"
        "rng = np.random.default_rng(0);"
        "[v.assign((rng.normal(0, 0.05, v.shape) + (0.5 if len(v.shape) == 1 else 0)).astype('float32'))"
        " for v in m.weights];"
        "stage_preset(m, sys.argv[1])"
    )
    preset = tmp_path / "preset"
    done = subprocess.run([sys.executable, "-c", code, str(preset)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "atto.onnx"
    result = run("export", str(preset), str(out), "--format", "onnx", "--batch-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Wrote {out}: onnx (float32)" in result.stdout and "opset 17" in result.stdout
    assert "relative logit error" in result.stdout
    assert out.stat().st_size > 10e6
    assert_error(run("export", str(preset), str(out), "--format", "onnx"), "already exists",
                 "--overwrite")
    assert_error(run("export", str(preset), str(tmp_path / "x.onnx"), "--format", "onx"),
                 "Did you mean 'onnx'?")
    assert_error(run("export", str(preset), str(tmp_path / "x.tflite"), "--quantize", "int16"),
                 "Valid: None, float16, dynamic_int8, int8")
    _assert_no_leftovers(tmp_path, ["atto.onnx", "preset"])


# === Slow: every configuration, quantised LiteRT ===

# Every depth configuration of each family. V2 huge, the largest file, has its
# own test below (over 2 GB, in a fresh process); atto and femto run in the
# default suite (test_litert_float32_builtins_only). Left out: the same depths
# at another width, the same operators: V1 base, large and xlarge (small's
# depths; xlarge alone took 257 s plus its turn among the largest models),
# V2 pico (atto's) and large (base's).
ALL_CONFIGURATIONS = [("v1", v) for v in ("tiny", "small")] + [
    ("v2", v) for v in ("nano", "tiny", "base")]


@pytest.mark.slow
@pytest.mark.parametrize("family,variant", ALL_CONFIGURATIONS)
def test_litert_float32_every_configuration(family, variant, tmp_path):
    model = _random_model(family, variant, seed=4)
    report, relative = _litert_parity(model, str(tmp_path / "m.tflite"), batch_size=1)
    assert relative <= 1e-4 and report["relative"] <= 1e-4, (relative, report["relative"])


HUGE_SCRIPT = """
import json, os, resource, sys
sys.path[:0] = [sys.argv[2], os.path.dirname(sys.argv[2])]
from test_export import _buffer_offsets, _litert_parity, _random_model
model = _random_model("v2", "huge", seed=4)
report, relative = _litert_parity(model, sys.argv[1], batch_size=1)
print(json.dumps({"relative": relative, "checked": report["relative"], "bytes": os.path.getsize(sys.argv[1]),
                  "offsets": int(_buffer_offsets(sys.argv[1])),
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


# Peak resident memory of HUGE_SCRIPT: TensorFlow's converter holds about six
# copies of the 2.5 GiB of weights at once (measured with V2 large: 5.9x).
HUGE_PEAK_GIB = 18


def _available_gib():
    with open("/proc/meminfo") as file:
        fields = dict(line.split(":", 1) for line in file)
    return int(fields["MemAvailable"].split()[0]) / 2**20


@pytest.mark.slow
@pytest.mark.most_memory
def test_litert_float32_v2_huge_past_the_2gb_flatbuffer(tmp_path):
    """2.6 GB of float32 weights: written past the flatbuffer, run by the plain interpreter.

    In a fresh process: its peak (18 GiB, 4.5 minutes on the 24 GB machine)
    must not add to what this test process holds.
    """
    import ctypes
    import gc

    # What this process let go of goes back to the system first (glibc keeps
    # freed heap otherwise); then the converter's peak must fit.
    keras.backend.clear_session()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    available = _available_gib()
    if available < HUGE_PEAK_GIB + 2:
        pytest.skip(f"V2 huge's LiteRT conversion peaks at {HUGE_PEAK_GIB} GiB; {available:.1f} GiB "
                    "are available here. Run it alone: pytest -m slow -k v2_huge_past")
    path = tmp_path / "huge.tflite"
    out = subprocess.run([sys.executable, "-c", HUGE_SCRIPT, str(path), os.path.dirname(__file__)],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["relative"] <= 1e-4 and result["checked"] <= 1e-4, result
    assert result["bytes"] > 2**31 and result["offsets"] > 100, result


def test_litert_full_int8_lists_its_float_layers_and_keeps_top1(atto, tmp_path):
    """Full int8: everything int8 but the GRN's square (no int8 SQUARE kernel), and no collapse."""
    images = np.stack([photo(name, size=(256, 256)) for name in PHOTOS])
    path = str(tmp_path / "q.tflite")
    report = convnext_zoo.export(atto, path, quantize="int8", representative_images=images)
    # One float SQUARE per block (2 + 2 + 6 + 2 in atto), between a DEQUANTIZE and a QUANTIZE.
    assert report["float_ops"] == {"SQUARE": 12} == deploy.litert_float_ops(path)
    x = _network_inputs()
    reference = atto.predict(x, verbose=0)
    interpreter = deploy.litert_interpreter(path, xnnpack=False)
    ours = np.concatenate([deploy.run_litert(interpreter, x[i:i + 1]).copy() for i in range(len(x))])
    # A random network gives every photograph nearly the same logits (the same top-1, with a
    # margin of 2% of the logit range), so top-1 agreement only catches a gross collapse (NaN,
    # constant or zero output); the logit error bound is the finer check (2.3e-2 here).
    assert np.mean(ours.argmax(-1) == reference.argmax(-1)) >= 0.8
    assert report["top1_agreement"] >= 0.8
    assert 1e-4 < _relative(ours, reference) <= 5e-2  # really int8, and close


def _trained_digits_model(epochs=4):
    """A small ConvNeXt V2 (GRN, one block a stage) trained briefly on scikit-learn's digits.

    Returns the model, its image converter, and raw uint8 training and held-out images with labels.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    from convnext_zoo.backbone import ConvNeXtBackbone
    from convnext_zoo.classifier import ConvNeXtImageClassifier

    keras.utils.set_random_seed(0)
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.images))
    scans = (data.images[order] * (255 / 16)).round().astype("uint8")
    raw = np.stack([np.asarray(Image.fromarray(s).resize((32, 32), Image.BICUBIC).convert("RGB"))
                    for s in scans])
    labels = data.target[order]
    converter = convnext_zoo.ConvNeXtImageConverter(image_size=32)
    x = np.asarray(converter(raw), np.float32)
    model = ConvNeXtImageClassifier(ConvNeXtBackbone(
        depths=(1, 1, 1, 1), hidden_dims=(16, 32, 48, 64), use_grn=True, image_shape=(32, 32, 3)),
        num_classes=10)
    model.compile(optimizer=keras.optimizers.AdamW(2e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1400], labels[:1400], batch_size=32, epochs=epochs, verbose=0)
    return model, converter, (raw[:1400], labels[:1400]), (raw[1400:], labels[1400:])


def test_litert_full_int8_agrees_with_float32_on_a_trained_model(tmp_path):
    """Full int8 of a model trained on digits: >= 95% top-1 agreement with float32 on held-out digits.

    A trained network separates its classes by wide margins, unlike a random one, so top-1
    agreement is a real measure here (benchmarks/quantize_digits.py: 100% on the fine-tuned V2 atto).
    """
    model, converter, (train, _), (test, labels) = _trained_digits_model()
    x = np.asarray(converter(test), np.float32)
    reference = model.predict(x, verbose=0)
    accuracy = np.mean(reference.argmax(-1) == labels)
    assert accuracy >= 0.85, accuracy  # trained, not a constant or chance-level network
    path = str(tmp_path / "digits_int8.tflite")
    calibration = train[np.random.default_rng(1).permutation(len(train))[:100]]
    report = convnext_zoo.export(model, path, quantize="int8", representative_images=calibration)
    assert report["float_ops"] == {"SQUARE": 4}  # one GRN square a block, nothing else float
    interpreter = deploy.litert_interpreter(path)
    ours = np.concatenate([deploy.run_litert(interpreter, x[i:i + 64]).copy()
                           for i in range(0, len(x), 64)])
    agreement = np.mean(ours.argmax(-1) == reference.argmax(-1))
    assert agreement >= 0.95, (agreement, accuracy)
    assert np.mean(ours.argmax(-1) == labels) >= accuracy - 0.03
    assert 1e-3 < _relative(ours, reference) < 0.3  # really int8 (float32 is ~1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["dynamic_int8", "int8"])
def test_litert_int8_reports_its_accuracy(atto, quantize, tmp_path):
    images = np.stack([photo(name, size=(256, 256)) for name in PHOTOS])
    report = convnext_zoo.export(atto, str(tmp_path / "q.tflite"), quantize=quantize,
                                 representative_images=images)
    full = os.path.getsize(convnext_zoo.export(atto, str(tmp_path / "f.tflite"))["path"])
    assert report["bytes"] < 0.35 * full
    assert 0.0 <= report["top1_agreement"] <= 1.0 and np.isfinite(report["relative"])
    print(quantize, report["bytes"], report["top1_agreement"], report["relative"])


# === ONNX from the PyTorch backend ===

# Runs with KERAS_BACKEND=torch: builds each model, randomises it, saves its `predict` on the
# photographs, then exports it with convnext_zoo.export or Keras' model.export. Bad requests
# on that backend are tried first (they fail before any tracing) and their messages saved.
TORCH_SCRIPT = """
import json, sys
import numpy as np, keras, convnext_zoo
sys.path.insert(0, "tests")
from test_models import _randomize
from convnext_zoo.backbone import ConvNeXtBackbone
from convnext_zoo.classifier import ConvNeXtImageClassifier
assert keras.config.backend() == "torch"
out, size, configs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
x = np.load(out + "/x.npy")
errors, reports = {}, {}
for config in configs:
    if config == "v2_atto":
        model = convnext_zoo.create_convnext_v2("atto", num_classes=1000, input_shape=(size, size, 3))
    elif config == "v1_tiny":
        model = convnext_zoo.create_convnext_v1("tiny", num_classes=1000, input_shape=(size, size, 3))
    else:  # V1's code path (layer scale, no GRN) with tiny's widths, one block per stage
        model = ConvNeXtImageClassifier(ConvNeXtBackbone(
            depths=(1, 1, 1, 1), hidden_dims=(96, 192, 384, 768), use_grn=False,
            layer_scale_init_value=0.5, image_shape=(size, size, 3)), num_classes=10)
    _randomize(model, np.random.default_rng(5))
    np.save(f"{out}/{config}.npy", np.asarray(model.predict(x, verbose=0)))
    if config == configs[0]:
        for key, call in (
            ("litert", lambda: convnext_zoo.export(model, out + "/m.tflite")),
            ("preprocessing", lambda: convnext_zoo.export(
                model, out + "/p.onnx", format="onnx", include_preprocessing=True)),
            ("opset", lambda: convnext_zoo.export(model, out + "/o.onnx", format="onnx", opset=17)),
        ):
            try:
                call()
            except Exception as error:
                errors[key] = f"{type(error).__name__}: {error}"
        reports[config] = convnext_zoo.export(model, f"{out}/{config}.onnx", format="onnx")
    else:
        model.export(f"{out}/{config}.onnx", format="onnx", verbose=False)
json.dump({"errors": errors, "reports": reports}, open(out + "/result.json", "w"))
"""


def _export_on_torch(tmp_path, size, configs):
    """Runs TORCH_SCRIPT; returns its result and the photographs it saw."""
    import json

    x = _network_inputs(size)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, KERAS_BACKEND="torch", CUDA_VISIBLE_DEVICES="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", TORCH_SCRIPT, str(tmp_path), str(size), ",".join(configs)],
                          capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text()), x


def _check_torch_onnx(path, x, reference):
    """Parity on the photographs at batch 1 and 3 of one file, its opset and its operators."""
    import onnx
    import onnxruntime

    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    facts = deploy.onnx_facts(path)
    assert facts["opset"] == 18 and facts["domains"] == ["ai.onnx"], facts
    # Standard operators only: each one is in ONNX's own registry at the file's opset.
    assert all(onnx.defs.has(op, 18, "") for op in facts["ops"]), facts["ops"]
    assert not [f for f in proto.functions], [f.name for f in proto.functions]  # no local functions
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    batch = session.get_inputs()[0].shape[0]
    assert isinstance(batch, str), session.get_inputs()[0].shape  # a named, dynamic batch
    name = session.get_inputs()[0].name
    for chunk in (slice(0, 1), slice(1, 4)):
        ours = session.run(None, {name: x[chunk]})[0]
        assert ours.shape == reference[chunk].shape
        assert _relative(ours, reference[chunk]) <= 1e-4
    return facts


def test_onnx_from_the_pytorch_backend(tmp_path):
    """V2 atto through convnext_zoo.export and V1 (tiny's widths) through Keras' model.export, on torch."""
    result, x = _export_on_torch(tmp_path, 64, ["v2_atto", "v1_shallow"])
    for config in ("v2_atto", "v1_shallow"):
        reference = np.load(tmp_path / f"{config}.npy")
        facts = _check_torch_onnx(str(tmp_path / f"{config}.onnx"), x, reference)
        assert "Conv" in facts["ops"] and "Erf" in facts["ops"]  # the exact GELU
    report = result["reports"]["v2_atto"]
    assert report["backend"] == "torch" and report["relative"] <= 1e-4
    assert report["input_shape"] == [None, 64, 64, 3] and report["opset"] == 18
    errors = result["errors"]
    assert "litert from the TensorFlow backend only" in errors["litert"]
    assert "KERAS_BACKEND=tensorflow" in errors["litert"]
    assert "include_preprocessing=False" in errors["preprocessing"]
    assert "opset=17" in errors["opset"] and "opset 18 or newer" in errors["opset"]
    assert all("\n" not in message for message in errors.values()), errors
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["result.json", "x.npy", "v2_atto.npy", "v1_shallow.npy", "v2_atto.onnx", "v1_shallow.onnx"])


def test_torch_onnx_input_signature_and_backend_errors():
    """The input shape `model.export(..., format="onnx")` takes on torch, and its one-line errors."""
    from convnext_zoo import inference

    model = _random_model("v2", "atto", size=64, seed=8)
    assert inference._signature_shape(model, None) == (None, 64, 64, 3)  # the batch stays dynamic
    for signature in ([keras.InputSpec(shape=(None, 96, 96, 3))], keras.InputSpec(shape=(2, 96, 96, 3)),
                      [[keras.KerasTensor((None, 96, 96, 3))]]):
        assert inference._signature_shape(model, signature)[1:] == (96, 96, 3)
    with pytest.raises(ValueError) as excinfo:
        inference._signature_shape(model, [keras.InputSpec(shape=(None, 96, 3))])
    _one_line(excinfo, "(batch, height, width, 3)", "input_signature=")
    with pytest.raises(ValueError) as excinfo:  # this process runs TensorFlow
        inference.torch_onnx_export(model, "unused.onnx", (None, 64, 64, 3))
    _one_line(excinfo, "backend='tensorflow'", "KERAS_BACKEND=torch")


@pytest.mark.slow
def test_onnx_from_the_pytorch_backend_full_size(tmp_path):
    """V2 atto and V1 tiny at 224 px on the photographs, from the PyTorch backend."""
    _, x = _export_on_torch(tmp_path, 224, ["v2_atto", "v1_tiny"])
    for config in ("v2_atto", "v1_tiny"):
        _check_torch_onnx(str(tmp_path / f"{config}.onnx"), x, np.load(tmp_path / f"{config}.npy"))


# === Default photographs in an installed package ===


def test_default_photographs_ship_in_the_wheel(tmp_path):
    """Installed from a wheel (no checkout beside it), the default photographs are there."""
    import zipfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", root, "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [wheel] = os.listdir(tmp_path / "wheel")
    site = tmp_path / "site"
    zipfile.ZipFile(tmp_path / "wheel" / wheel).extractall(site)  # what pip install puts in place
    code = ("import os, convnext_zoo; from convnext_zoo import deploy, verification; "
            "assert os.path.samefile(deploy.DEFAULT_IMAGES, verification.DEFAULT_IMAGES); "
            "print(convnext_zoo.__file__); "
            "print([p.shape for p in deploy._photographs(None, None)])")
    env = dict(os.environ, PYTHONPATH=str(site))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    package_file, shapes = done.stdout.strip().splitlines()[-2:]
    assert package_file.startswith(str(site))  # the installed copy, not this checkout
    assert shapes == "[(320, 320, 3), (213, 320, 3), (213, 320, 3), (214, 320, 3)]"


def test_missing_default_photographs_name_the_argument(tmp_path, monkeypatch):
    model = _random_model("v2", "atto", size=64, seed=7)
    monkeypatch.setattr(deploy, "DEFAULT_IMAGES", str(tmp_path / "gone"))
    with pytest.raises(deploy.ExportError) as excinfo:
        convnext_zoo.export(model, str(tmp_path / "m.tflite"))
    _one_line(excinfo, "representative_images=", "uint8")
    _assert_no_leftovers(tmp_path, [])
    # Photographs passed explicitly make it work.
    images = np.stack([photo(name, size=(96, 96)) for name in PHOTOS[:2]])
    report = convnext_zoo.export(model, str(tmp_path / "m.tflite"), representative_images=images)
    assert report["images"] == 2 and report["relative"] <= 1e-4
