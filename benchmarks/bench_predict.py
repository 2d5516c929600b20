"""Folder scoring throughput: streaming from disk against `model.predict` on arrays in memory.

For each model (default ConvNeXt V2 atto and V1 tiny at 224 px, random
weights saved as a local preset and loaded with `from_preset`, so the
preset's own preprocessing runs), in one process and alternating turn by
turn (the speed of a shared machine drifts; alternating lets the drift fall
on both alike):

- streaming: `convnext_zoo.scoring.score_folder` on a folder of N JPEG
  photographs (scikit-image's, repeated under distinct names): listing,
  parallel decoding and preprocessing in tf.data, batches through Keras'
  predict, top-5 JSON lines written and flushed per batch;
- in memory: `model.predict(images, batch_size=B)` of the same model
  (loaded with `preprocessing=False`) on the same photographs, decoded and
  preprocessed beforehand by the same transform (not timed).

Reports the median images/s of each, their ratio (streaming / in memory:
1.0 means reading, decoding and writing cost nothing extra), that the two
agree (top-1 class and probabilities), and the machine: CPU model, AVX-512,
whether TensorFlow runs oneDNN. Results: benchmarks/results/predict/
bench_predict.{json,md} (via `bench_cpu.write_json_and_markdown`).

Usage:
    .venv/bin/python benchmarks/bench_predict.py               # V2 atto, V1 tiny, 224 px, N=96
    .venv/bin/python benchmarks/bench_predict.py --quick       # smoke test: V2 atto, 64 px, N=8
"""

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_cpu  # noqa: E402
import workers  # noqa: E402  (machine facts: CPU model, AVX-512)

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
          "coins", "camera")
STREAMING = "streaming from disk (score_folder)"
IN_MEMORY = "model.predict on preprocessed arrays in memory"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="v2_atto,v1_tiny", help="family_variant, comma-separated")
    parser.add_argument("--images", type=int, default=96, help="photographs in the folder (N)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="timed turns of each path")
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results", "predict"))
    parser.add_argument("--work-dir", help="presets, photographs and JSON lines (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="V2 atto, 64 px, 8 images, batch 4, 1 turn")
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    if args.quick:
        args.models, args.images, args.batch_size, args.image_size, args.repeats = ["v2_atto"], 8, 4, 64, 1
    return args


def write_photos(folder, count):
    """`count` JPEG photographs (scikit-image's, at their own sizes) in two sub-folders."""
    import numpy as np
    import skimage.data
    from PIL import Image

    images = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        images.append(np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3])
    for i in range(count):
        sub = os.path.join(folder, f"part{i % 2}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(images[i % len(images)]).save(os.path.join(sub, f"{i:05d}.jpg"), quality=90)


def make_preset(family, variant, size, path):
    import numpy as np

    import convnext_zoo
    from convnext_zoo.writer import model_config, save_preset

    create = convnext_zoo.create_convnext_v1 if family == "v1" else convnext_zoo.create_convnext_v2
    model = create(variant, num_classes=1000, input_shape=(None, None, 3))
    rng = np.random.default_rng(0)
    for v in model.weights:  # random weights with outputs that differ between photographs
        v.assign((rng.normal(0, 0.05, v.shape) + (0.5 if len(v.shape) == 1 else 0)).astype("float32"))
    save_preset(model, path, config=model_config(model, image_size=[size, size]))


def preprocessed(model, folder, paths):
    """The photographs decoded and transformed as the streaming path does, stacked."""
    import numpy as np
    import tensorflow as tf

    return np.stack([
        np.asarray(model.preprocess_samples(tf.io.decode_image(
            tf.io.read_file(os.path.join(folder, p)), channels=3, expand_animations=False)))
        for p in paths])


def bench_model(args, name, work):
    import json

    import numpy as np

    import convnext_zoo
    from convnext_zoo import scoring

    family, variant = name.split("_")
    preset = os.path.join(work, f"preset_{name}_{args.image_size}")
    if not os.path.exists(preset):
        make_preset(family, variant, args.image_size, preset)
    folder = os.path.join(work, f"photos_{args.images}")
    if not os.path.exists(folder):
        write_photos(folder, args.images)
    output = os.path.join(work, f"{name}.jsonl")
    model = convnext_zoo.from_preset(preset)
    bare = convnext_zoo.from_preset(preset, preprocessing=False)
    paths = scoring.list_images(folder)
    arrays = preprocessed(model, folder, paths)

    def stream():
        summary = scoring.score_folder(model, folder, output, batch_size=args.batch_size, top=5,
                                       overwrite=True, progress=False)
        assert summary["scored"] == len(paths), summary

    def in_memory():
        return bare.predict(arrays, batch_size=args.batch_size, verbose=0)

    times = {STREAMING: [], IN_MEMORY: []}
    stream(), in_memory()  # warm-up: tracing for both batch sizes
    for _ in range(args.repeats):
        for label, call in ((STREAMING, stream), (IN_MEMORY, in_memory)):
            start = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - start)

    logits = np.asarray(in_memory(), np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    with open(output, encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle]
    top1 = [line["predictions"][0] for line in lines]
    agreement = float(np.mean([t["class"] == int(np.argmax(p)) for t, p in zip(top1, probabilities)]))
    difference = float(max(abs(t["probability"] - p[t["class"]]) for t, p in zip(top1, probabilities)))
    rows = []
    for label, seconds in times.items():
        median = statistics.median(seconds)
        rows.append({"model": name, "path": label, "images": len(paths), "times_s": seconds,
                     "median_s": median, "images_per_s": len(paths) / median})
    rows[0]["vs_in_memory"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    rows[1]["vs_in_memory"] = 1.0
    return rows, {"top1_agreement": agreement, "max_probability_difference": difference}


def run(args):
    from convnext_zoo import internals

    started = datetime.datetime.now(datetime.timezone.utc)
    out = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "started_utc": started.isoformat(timespec="seconds"), "machine": workers.machine(),
           "onednn": internals.onednn_enabled(),
           "settings": {"models": args.models, "images": args.images, "batch_size": args.batch_size,
                        "image_size": args.image_size, "repeats": args.repeats, "dtype": "float32",
                        "backend": __import__("keras").config.backend()},
           "versions": bench_cpu._versions(), "rows": [], "parity": {}, "errors": []}
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_predict.")
    for name in args.models:
        bench_cpu._log(f"{name}: {args.images} photographs, batch {args.batch_size}, {args.image_size} px")
        try:
            rows, parity = bench_model(args, name, work)
        except Exception as error:  # noqa: BLE001 - reported in the results
            out["errors"].append(f"{name}: {type(error).__name__}: {error}")
            continue
        out["rows"] += rows
        out["parity"][name] = parity
    out["machine"]["load_average_at_end"] = list(os.getloadavg())
    out["wall_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    return out


def markdown(out):
    m, s = out["machine"], out["settings"]
    onednn = {True: "on", False: "off", None: "unknown"}[out.get("onednn")]
    lines = [
        "# Folder scoring: streaming from disk against model.predict in memory",
        "",
        f"Command: `{out['command']}`  ",
        f"Started (UTC): {out['started_utc']}, wall {out.get('wall_s', 0):.0f} s; {s['images']} JPEG "
        f"photographs, {s['image_size']} px, batch {s['batch_size']}, {s['dtype']}, "
        f"Keras backend {s['backend']}  ",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, AVX-512 {'yes' if m['avx512'] else 'no'}, "
        f"TensorFlow oneDNN {onednn}; {m['platform']}  ",
        f"Load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}, "
        f"at end {', '.join(f'{x:.2f}' for x in m.get('load_average_at_end', []))} "
        "(a shared machine: other work ran beside this; the two paths alternate so it falls on both)  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items() if v),
        "",
        "Median over alternated turns. Streaming includes listing, reading, decoding, the preset's "
        "preprocessing, the forward pass and writing top-5 JSON lines; in memory is the forward pass "
        "of images decoded and preprocessed beforehand. Ratio: streaming images/s over in-memory "
        "images/s (1.00: the I/O is hidden behind the compute).",
        "",
        "| model | path | images/s | median s | turns | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        lines.append(f"| {r['model']} | {r['path']} | {r['images_per_s']:.1f} | {r['median_s']:.2f} | "
                     f"{len(r['times_s'])} | {r['vs_in_memory']:.2f} |")
    if out["parity"]:
        lines += ["", "Agreement of the two paths (top-1 class; largest difference of the top-1 "
                  "probability): " + "; ".join(
                      f"{k} {v['top1_agreement']:.2f}, {v['max_probability_difference']:.1e}"
                      for k, v in out["parity"].items()) + "."]
    if out["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e.splitlines()[0]}" for e in out["errors"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    out = run(args)
    text = markdown(out)
    paths = bench_cpu.write_json_and_markdown(out, args.output_dir, "bench_predict", text)
    print(text)
    bench_cpu._log("wrote " + ", ".join(paths.values()))
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
