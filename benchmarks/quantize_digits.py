"""Quantised LiteRT (and ONNX) exports of a fine-tuned digits model: size, accuracy, agreement.

Issue 20's int8 figures on a trained model. For each export of the
fine-tuned digits preset (`convnext_zoo.export`: LiteRT float32, float16,
dynamic_int8, full int8 calibrated on representative training images; ONNX
float32 and dynamic_int8), measured on the held-out digits (`val/`, never
seen in training or calibration):

- file size;
- top-1 accuracy of the file against the labels;
- top-1 agreement with the Keras float32 model;
- relative logit error: max |diff| / max |Keras logit| over the test set
  (and the mean |diff| over the mean |Keras logit|);
- for full int8, the operators left in float32 (`float_ops`).

The same exports of an ImageNet-shaped V2 atto (1000 classes, 224 px,
random weights with live residual branches, as the tests randomise) are
measured on scikit-image photographs, calibrated on the package's four
photographs; a random network's top-1 is only a coarse check there (its
logits barely differ between images), the logit error is the finer one.

Where full int8 costs more than `--max-drop` points of accuracy (of top-1
agreement without labels), or always with `--always-norms-float`, the export
is repeated with the layer norms and GRN kept in float (TensorFlow Lite's
`QuantizationDebugger` deny-lists their operators) and both rows are kept.

Usage (from the repository root):
    python examples/write_digits.py DIGITS
    convnext-zoo finetune convnext_v2_atto DIGITS --from-scratch --output OUT --epochs 12 \\
        --batch-size 32 --image-size 32 --lr 2e-3 --mixup 0 --cutmix 0 --randaugment 0 \\
        --reprob 0 --no-flip
    python benchmarks/quantize_digits.py --preset OUT --data DIGITS --always-norms-float

Results: benchmarks/results/deploy/quantize_digits.json and .md.
"""

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_cpu  # noqa: E402
import bench_deploy  # noqa: E402
import workers  # noqa: E402  (machine facts: CPU model, AVX-512)

LITERT_MODES = (None, "float16", "dynamic_int8", "int8")
ONNX_MODES = (None, "dynamic_int8")
# scikit-image photographs for the ImageNet-shaped model (grey ones as RGB).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "colorwheel", "coins", "camera")
# The layer norms' and GRN's operators, as LiteRT's converter names them in the
# float graph it quantises (the layer norm is mean, squared difference, rsqrt;
# GRN is square, sum, sqrt, mean, division).
NORM_OPS = ("MEAN", "SQUARED_DIFFERENCE", "RSQRT", "SQUARE", "SUM", "SQRT", "DIV")


# === Data ===


def load_split(data_dir, split, class_names):
    """uint8 RGB images and labels of `data_dir/split/<class>/*.png`, classes in the preset's order."""
    from PIL import Image

    images, labels = [], []
    for index, name in enumerate(class_names):
        folder = os.path.join(data_dir, split, name)
        for file in sorted(os.listdir(folder)):
            images.append(np.asarray(Image.open(os.path.join(folder, file)).convert("RGB")))
            labels.append(index)
    return np.stack(images), np.asarray(labels)


def representative(images, labels, per_class, seed=0):
    """`per_class` training images of each class (a fixed random draw): the int8 calibration set."""
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                             for c in np.unique(labels)])
    return images[np.sort(chosen)]


def photo(name):
    """A scikit-image photograph as uint8 RGB (grey ones repeated, alpha dropped)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


# === Measurements ===


def run_file(fmt, path, x, batch=64):
    """Logits of an exported file on `x`, in its runtime (LiteRT with XNNPACK, onnxruntime CPU)."""
    from convnext_zoo import deploy

    if fmt == "litert":
        interpreter = deploy.litert_interpreter(path)
        detail = interpreter.get_input_details()[0]
        step = 1 if detail["shape_signature"][0] != -1 else batch  # a fixed batch of 1
        return np.concatenate([deploy.run_litert(interpreter, x[i:i + step]).copy()
                               for i in range(0, len(x), step)])
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def compare(logits, reference, labels=None):
    """Top-1 accuracy (with labels), agreement with the reference, max and mean relative logit error."""
    logits, reference = np.asarray(logits, np.float64), np.asarray(reference, np.float64)
    diff = np.abs(logits - reference)
    out = {"top1_agreement": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
           "relative_max": float(diff.max() / np.abs(reference).max()),
           "relative_mean": float(diff.mean() / np.abs(reference).mean())}
    if labels is not None:
        out["accuracy"] = float(np.mean(logits.argmax(-1) == labels))
    return out


def keep_norms_float(model, path, calibration, converter):
    """Full int8 with the layer-norm and GRN operators in float32, written to `path`.

    TensorFlow Lite's `QuantizationDebugger` (public, `tf.lite.experimental`)
    requantises the converter's calibrated model with `denylisted_ops` left
    in float; the file is checked like every other (builtins only).
    """
    import tensorflow as tf

    from convnext_zoo import deploy

    x = deploy._network_inputs(list(calibration), tuple(model.input_shape[1:3]), converter)
    # Through a SavedModel, as convnext_zoo.export does (the variables become constants).
    saved = path + ".saved_model"
    deploy._write_saved_model(deploy._forward(model, None), (None,) + tuple(model.input_shape[1:]),
                              "float32", saved, None, None, model, None)
    lite = tf.lite.TFLiteConverter.from_saved_model(saved)
    lite.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    lite.optimizations = [tf.lite.Optimize.DEFAULT]

    def samples():
        for sample in x:
            yield [sample[None]]

    lite.representative_dataset = samples
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(NORM_OPS))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=lite, debug_dataset=samples, debug_options=options)
    try:
        flatbuffer = debugger.get_nondebug_quantized_model()
    finally:
        shutil.rmtree(saved, ignore_errors=True)
    with open(path, "wb") as file:
        file.write(flatbuffer)
    ops = deploy.litert_operators(path)
    foreign = [op for op in ops if not op.isupper()]
    if foreign:
        raise RuntimeError(f"non-builtin operators in {path}: {foreign}")
    return deploy.litert_float_ops(path)


def measure(name, model, x_raw, labels, calibration, work, max_drop, always_norms_float=False,
            onnx=True):
    """Every export of `model`, measured on the raw images `x_raw`; the rows."""
    import convnext_zoo
    from convnext_zoo import deploy

    converter = deploy._converter(model, False)
    size = tuple(model.input_shape[1:3])
    x = deploy._network_inputs(list(x_raw), size, converter)
    reference = deploy._keras_outputs(model, x)
    rows = [dict(model=name, file="Keras float32", quantize="float32", bytes=None,
                 **compare(reference, reference, labels))]
    jobs = [("litert", q) for q in LITERT_MODES] + ([("onnx", q) for q in ONNX_MODES] if onnx else [])
    for fmt, quantize in jobs:
        path = os.path.join(work, f"{name}_{quantize or 'float32'}{deploy.SUFFIXES[fmt]}")
        start = time.perf_counter()
        report = convnext_zoo.export(model, path, format=fmt, quantize=quantize, overwrite=True,
                                     representative_images=calibration)
        row = dict(model=name, file=fmt, quantize=quantize or "float32", bytes=report["bytes"],
                   export_s=round(time.perf_counter() - start, 1),
                   **compare(run_file(fmt, path, x), reference, labels))
        if "float_ops" in report:
            row["float_ops"] = report["float_ops"]
        rows.append(row)
        bench_cpu._log(f"{name} {fmt} {row['quantize']}: {_line(row)}")
    int8 = next(r for r in rows if r["file"] == "litert" and r["quantize"] == "int8")
    drop = rows[0].get("accuracy", 1.0) - int8.get("accuracy", int8["top1_agreement"])
    if always_norms_float or drop * 100 > max_drop:
        path = os.path.join(work, f"{name}_int8_norms_float.tflite")
        float_ops = keep_norms_float(model, path, calibration, converter)
        row = dict(model=name, file="litert", quantize="int8, norms float", bytes=os.path.getsize(path),
                   float_ops=float_ops, **compare(run_file("litert", path, x), reference, labels))
        rows.append(row)
        bench_cpu._log(f"{name} litert int8 with norms float: {_line(row)}")
    return rows


def _line(row):
    accuracy = f"accuracy {row['accuracy']:.4f}, " if "accuracy" in row else ""
    return (f"{accuracy}agreement {row['top1_agreement']:.4f}, relative max {row['relative_max']:.2e}, "
            f"mean {row['relative_mean']:.2e}, {row['bytes'] or 0} bytes")


# === Orchestration ===


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help="the fine-tuned digits preset directory")
    p.add_argument("--data", required=True, help="examples/write_digits.py's folder (train/, val/)")
    p.add_argument("--per-class", type=int, default=20,
                   help="calibration images per class, drawn from train/ (default 20)")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="accuracy points full int8 may lose before norms are kept float (default 1)")
    p.add_argument("--always-norms-float", action="store_true",
                   help="add the int8 export with norms kept float even without an accuracy drop")
    p.add_argument("--no-photographs", action="store_true", help="skip the ImageNet-shaped V2 atto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=os.path.join(HERE, "results", "deploy"))
    p.add_argument("--work-dir", default=None, help="exported files (default: a temporary directory)")
    return p.parse_args(argv)


def run(args):
    import keras

    import convnext_zoo
    from convnext_zoo import deploy, internals

    started = datetime.datetime.now(datetime.timezone.utc)
    work = args.work_dir or tempfile.mkdtemp(prefix="quantize_digits.")
    os.makedirs(work, exist_ok=True)
    model = convnext_zoo.from_preset(args.preset)
    # The fine-tuned preset records its classes in the order of its logits.
    with open(os.path.join(args.preset, "config.json")) as file:
        class_names = json.load(file)["convnext_zoo"].get("class_names")
    class_names = class_names or sorted(os.listdir(os.path.join(args.data, "val")))
    train, train_labels = load_split(args.data, "train", class_names)
    test, test_labels = load_split(args.data, "val", class_names)
    calibration = representative(train, train_labels, args.per_class, args.seed)
    out = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "started_utc": started.isoformat(timespec="seconds"), "machine": workers.machine(),
           "versions": bench_deploy.versions(), "onednn": internals.onednn_enabled(),
           "settings": {"preset": os.path.abspath(args.preset), "data": os.path.abspath(args.data),
                        "per_class": args.per_class, "max_drop": args.max_drop, "seed": args.seed,
                        "backend": keras.config.backend()},
           "digits": {"test_images": len(test), "calibration_images": len(calibration),
                      "train_images": len(train), "input_shape": list(model.input_shape)},
           "rows": []}
    bench_cpu._log(f"digits: {len(test)} test images, {len(calibration)} calibration images")
    out["rows"] += measure("digits_v2_atto", model, test, test_labels, calibration, work, args.max_drop,
                           args.always_norms_float)
    if not args.no_photographs:
        imagenet = convnext_zoo.create_convnext_v2("atto", num_classes=1000, input_shape=(224, 224, 3))
        bench_deploy._randomize(imagenet, args.seed)
        photos = [photo(name) for name in PHOTOS]
        out["photographs"] = {"names": list(PHOTOS), "calibration": "the package's four photographs"}
        out["rows"] += measure("photos_v2_atto_random", imagenet, photos, None,
                               deploy._photographs(None, None), work, args.max_drop,
                               args.always_norms_float)
    out["machine"]["load_average_at_end"] = list(os.getloadavg())
    out["wall_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    return out


def markdown(out):
    m, d = out["machine"], out["digits"]
    onednn = {True: "on", False: "off", None: "unknown"}[out.get("onednn")]
    lines = [
        "# Quantised exports: the fine-tuned digits model and an ImageNet-shaped V2 atto",
        "",
        f"Command: `{out['command']}`  ",
        f"Started (UTC): {out['started_utc']}, wall {out.get('wall_s', 0):.0f} s  ",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, AVX-512 {'yes' if m['avx512'] else 'no'}, "
        f"TensorFlow oneDNN {onednn}; {m['platform']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items() if v),
        "",
        f"digits_v2_atto: the fine-tuned preset ({out['settings']['preset']}), input "
        f"{'x'.join(str(s) for s in d['input_shape'][1:])}, measured on the {d['test_images']} "
        f"held-out digits; full int8 calibrated on {d['calibration_images']} training images "
        f"({out['settings']['per_class']} per class). photos_v2_atto_random: V2 atto, 1000 classes, "
        "224 px, random weights, on " + str(len(out.get("photographs", {}).get("names", [])))
        + " scikit-image photographs, calibrated on the package's four.",
        "",
        "Agreement: top-1 equal to the Keras float32 model's. Relative error: max |logit diff| / "
        "max |Keras logit| (mean |diff| / mean |logit|). float ops: operators the full-int8 file "
        "runs in float32 (between DEQUANTIZE and QUANTIZE).",
        "",
        "| model | file | weights | MB | top-1 acc. | agreement | rel. error max (mean) | float ops |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in out["rows"]:
        accuracy = f"{r['accuracy']:.2%}" if "accuracy" in r else ""
        size = "" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f}"
        error = "" if r["file"] == "Keras float32" else f"{r['relative_max']:.1e} ({r['relative_mean']:.1e})"
        ops = ", ".join(f"{k} {v}" for k, v in r.get("float_ops", {}).items())
        if "float_ops" in r and not ops:
            ops = "none"
        lines.append(f"| {r['model']} | {r['file']} | {r['quantize']} | {size} | {accuracy} | "
                     f"{r['top1_agreement']:.2%} | {error} | {ops} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    out = run(args)
    paths = bench_cpu.write_json_and_markdown(out, args.output_dir, "quantize_digits", markdown(out))
    print("Wrote " + ", ".join(paths.values()))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
