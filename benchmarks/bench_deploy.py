"""Deployment benchmark: exported ConvNeXt files in their runtimes against timm eager, on this CPU.

For V2 atto, V2 nano and V1 tiny at 224 px, batch 1, float32, with the same
thread count everywhere (default 2), in one run:

- the LiteRT interpreter (`ai_edge_litert`, XNNPACK delegate, `num_threads`)
  on the file of `convnext_zoo.export(format="litert", batch_size=1)`;
- onnxruntime (CPU provider, `intra_op_num_threads`) on the file of
  `convnext_zoo.export(format="onnx", batch_size=1)`;
- `convnext_zoo.openvino_function(model, num_threads=...)`;
- timm eager (`torch.inference_mode`, torch threads), the reference.

Every runtime runs the same random weights (randomised as the tests do,
pitfall 5): the Keras model is written once as a timm-layout preset, which
timm loads and `openvino_function` rebuilds from. Parity is the relative
logit error (max |diff| / max |Keras logit|) of each runtime, as it is timed
(same delegate, same threads), against the Keras model on the photographs
that `convnext_zoo.export` checks on.

Timing reuses bench_cpu.py's machinery: one long-lived worker process per
runtime, warmed up, then one turn per runtime in rotation, repetition after
repetition (`bench_cpu._alternate`), so a slow spell of the shared machine
hits every runtime alike. Reported: the median latency over all turns, and
`vs timm` = timm's median over the runtime's (> 1: faster than timm).

Results: benchmarks/results/deploy/bench_deploy.json and bench_deploy.md
(the markdown is printed last).

Usage:
    .venv/bin/python benchmarks/bench_deploy.py            # three models, 224 px
    .venv/bin/python benchmarks/bench_deploy.py --quick    # V2 atto at 64 px, one turn
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_cpu  # noqa: E402
import workers  # noqa: E402  (machine facts: CPU model, AVX-512)

ROOT = bench_cpu.ROOT
REFERENCE = "timm eager"
# timm on one thread: torch's OpenMP threads wait on each other at every op,
# and on a shared, oversubscribed machine that made 2-thread timm eager 10x
# slower than 1-thread (checked here while other work ran). Timed beside the
# reference so that a reader sees when the load inflates the ratios.
ONE_THREAD = "timm eager, 1 thread"
# Runtime key -> (name in the results, the worker's calls in this module).
RUNTIMES = {
    "litert": ("LiteRT interpreter (XNNPACK)", "bench_deploy:calls_litert"),
    "onnxruntime": ("onnxruntime", "bench_deploy:calls_onnxruntime"),
    "openvino": ("openvino_function", "bench_deploy:calls_openvino"),
    "timm": (REFERENCE, "bench_deploy:calls_timm"),
    "timm-1": (ONE_THREAD, "bench_deploy:calls_timm_one_thread"),
}
PACKAGES = ("tensorflow", "keras", "keras-hub", "torch", "timm", "ai-edge-litert", "onnxruntime",
            "onnx", "tf2onnx", "openvino", "numpy")


# === Worker side (fresh processes started by bench_cpu) ===


def _randomize(model, seed):
    """Random weights with live residual branches (as tests/test_models.py's `_randomize`)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    model.set_weights([
        (rng.normal(size=w.shape) * (0.5 if w.ndim == 1 else 1 / np.sqrt(np.prod(w.shape[:-1])))
         + (1.0 if w.ndim == 1 else 0.0)).astype("float32")
        for w in model.get_weights()
    ])


def worker_prepare(task):
    """TensorFlow backend: the model, its two exports, the photographs and the Keras logits."""
    import numpy as np

    bench_cpu._tf_threads(task["threads"])
    import convnext_zoo
    from convnext_zoo import deploy, internals
    from convnext_zoo.writer import save_preset

    work, size = task["work"], task["size"]
    create = convnext_zoo.create_convnext_v1 if task["family"] == "v1" else convnext_zoo.create_convnext_v2
    # Standard strides at any size (timm has no others), also at --quick's 64 px.
    model = create(task["variant"], num_classes=1000, input_shape=(size, size, 3), adapt_small_inputs=False)
    _randomize(model, seed=task["seed"])
    save_preset(model, os.path.join(work, "preset"), layout="timm", check=False, overwrite=True)
    photos = deploy._photographs(None, None)
    x = deploy._network_inputs(photos, (size, size), deploy._converter(model, False))
    np.save(os.path.join(work, "x.npy"), x)
    np.save(os.path.join(work, "reference.npy"), deploy._keras_outputs(model, x))
    exports = {}
    for fmt, name in (("litert", "model.tflite"), ("onnx", "model.onnx")):
        report = convnext_zoo.export(model, os.path.join(work, name), format=fmt, batch_size=1,
                                     overwrite=True)  # the work dir is scratch space
        exports[fmt] = {k: report.get(k) for k in ("path", "bytes", "relative", "top1_agreement",
                                                   "opset", "input_shape", "seconds")}
    weights = os.path.join(work, "preset", "model.safetensors")
    return {"exports": exports, "weights_bytes": os.path.getsize(weights),
            "images": len(x), "onednn": internals.onednn_enabled()}


def _parity(task, runtime, run):
    """Writes the runtime's relative logit error on the photographs (one image per call)."""
    import numpy as np

    x = np.load(os.path.join(task["work"], "x.npy"))
    reference = np.load(os.path.join(task["work"], "reference.npy")).astype(np.float64)
    ours = np.concatenate([np.asarray(run(x[i:i + 1]), np.float64) for i in range(len(x))])
    result = {"relative": float(np.abs(ours - reference).max() / np.abs(reference).max()),
              "top1_agreement": float(np.mean(ours.argmax(-1) == reference.argmax(-1)))}
    with open(os.path.join(task["work"], f"parity_{runtime}.json"), "w") as f:
        json.dump(result, f)
    return x[:1]


def calls_litert(task):
    from convnext_zoo.deploy import litert_interpreter, run_litert

    interpreter = litert_interpreter(os.path.join(task["work"], "model.tflite"),
                                     num_threads=task["threads"], xnnpack=True)
    x = _parity(task, "litert", lambda b: run_litert(interpreter, b).copy())
    return {("run", 1): lambda: run_litert(interpreter, x).copy()}


def calls_onnxruntime(task):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = task["threads"]
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(os.path.join(task["work"], "model.onnx"), options,
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = _parity(task, "onnxruntime", lambda b: session.run(None, {name: b})[0])
    return {("run", 1): lambda: session.run(None, {name: x})[0]}


def calls_openvino(task):
    bench_cpu._tf_threads(task["threads"])
    import convnext_zoo

    size = task["size"]
    model = convnext_zoo.from_preset(os.path.join(task["work"], "preset"),
                                     input_shape=(size, size, 3))
    forward = convnext_zoo.openvino_function(model, num_threads=task["threads"])
    x = _parity(task, "openvino", forward)
    return {("run", 1): lambda: forward(x)}


def calls_timm_one_thread(task):
    return calls_timm(dict(task, threads=1), runtime="timm-1")


def calls_timm(task, runtime="timm"):
    import numpy as np
    import torch
    import timm

    bench_cpu._torch_threads(torch, task["threads"])
    net = timm.create_model("local-dir:" + os.path.join(task["work"], "preset"),
                            pretrained=True).eval()

    def run(batch):
        with torch.inference_mode():
            return net(torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))).numpy()

    x = _parity(task, runtime, run)
    return {("run", 1): lambda: run(x)}


# === Orchestrator ===


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: V2 atto at 64 px, one turn of one call")
    p.add_argument("--models", default=None, help="comma list (default v2_atto,v2_nano,v1_tiny)")
    p.add_argument("--image-size", type=int, default=None, help="default 224 (quick: 64)")
    p.add_argument("--threads", type=int, default=2, help="threads of every runtime (default 2)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES),
                   help=f"comma list of {', '.join(RUNTIMES)} (timm is the reference)")
    p.add_argument("--repeats", type=int, default=None, help="turns per runtime (default 15, quick 1)")
    p.add_argument("--burst", type=int, default=None, help="timed calls per turn (default 2, quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls at start (default 3, quick 1)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="time budget per runtime and model; turns stop once spent (default 30)")
    p.add_argument("--pause", type=float, default=0.05, help="seconds between turns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=os.path.join(HERE, "results", "deploy"))
    p.add_argument("--work-dir", default=None, help="exported files (default: a temporary directory)")
    args = p.parse_args(argv)
    args.models = (args.models or ("v2_atto" if args.quick else "v2_atto,v2_nano,v1_tiny")).split(",")
    args.image_size = args.image_size or (64 if args.quick else 224)
    args.runtimes = args.runtimes.split(",")
    unknown = [r for r in args.runtimes if r not in RUNTIMES]
    if unknown:
        p.error(f"Unknown runtime(s): {', '.join(unknown)}. Valid: {', '.join(RUNTIMES)}.")
    args.repeats = args.repeats or (1 if args.quick else 15)
    args.burst = args.burst or (1 if args.quick else 2)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.batch_sizes = [1]  # what bench_cpu._alternate reads
    return args


def versions():
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _row(runtime, model, timed, prepared, parity):
    name = RUNTIMES[runtime][0]
    if runtime in ("litert", "onnxruntime"):
        export = prepared["exports"]["litert" if runtime == "litert" else "onnx"]
        size, kind = export["bytes"], ".tflite" if runtime == "litert" else ".onnx"
    elif runtime.startswith("timm"):
        size, kind = prepared["weights_bytes"], "model.safetensors"
    else:
        size, kind = None, "compiled in memory"
    return {"model": model, "runtime": name, "file_bytes": size, "file": kind,
            "relative_error": parity.get("relative"), "top1_agreement": parity.get("top1_agreement"),
            "latency_s": timed["latency_s"], "times_s": timed["times_s"],
            "first_call_s": timed.get("first_call_s")}


def ratios(rows):
    """Each row's `vs_timm` (and `vs_timm_1_thread`): timm's median latency over the row's, same model."""
    for key, name in (("vs_timm", REFERENCE), ("vs_timm_1_thread", ONE_THREAD)):
        reference = {r["model"]: r["latency_s"] for r in rows if r["runtime"] == name}
        for r in rows:
            r[key] = reference[r["model"]] / r["latency_s"] if r["model"] in reference else None
    return rows


def target(rows):
    """The issue's target: every exported runtime at least as fast as timm eager (vs_timm >= 1)."""
    checked = [r for r in rows if r["runtime"] not in (REFERENCE, ONE_THREAD) and r["vs_timm"] is not None]
    return {"met": bool(checked) and all(r["vs_timm"] >= 1.0 for r in checked),
            "slower_than_timm": [f"{r['model']} {r['runtime']}" for r in checked if r["vs_timm"] < 1.0]}


def run(args):
    started = datetime.datetime.now(datetime.timezone.utc)
    out = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "started_utc": started.isoformat(timespec="seconds"), "machine": workers.machine(),
           "settings": {"models": args.models, "image_size": args.image_size, "batch": 1,
                        "dtype": "float32", "threads": args.threads, "runtimes": args.runtimes,
                        "repeats": args.repeats, "burst": args.burst, "warmup": args.warmup,
                        "max_seconds": args.max_seconds, "seed": args.seed},
           "versions": versions(), "rows": [], "errors": [], "load_average_per_model": {}}
    work_root = args.work_dir or tempfile.mkdtemp(prefix="bench_deploy.")
    for model in args.models:
        family, variant = model.split("_")
        work = os.path.join(work_root, model)
        os.makedirs(work, exist_ok=True)
        base = {"family": family, "variant": variant, "work": work, "seed": args.seed}
        bench_cpu._log(f"{model}: export (LiteRT, ONNX) and Keras reference")
        try:
            prepared, _ = bench_cpu.run_worker(bench_cpu._task(args, "bench_deploy:worker_prepare", **base))
        except Exception as error:  # noqa: BLE001 - reported in the results
            out["errors"].append(f"{model} export: {error}")
            continue
        out.setdefault("onednn", prepared["onednn"])
        out.setdefault("exports", {})[model] = prepared["exports"]
        jobs = [(RUNTIMES[r][1], "tensorflow", ["run"], {"run": RUNTIMES[r][0]}) for r in args.runtimes]
        timed, _ = bench_cpu._alternate(args, model, base, jobs, out["errors"])
        out["load_average_per_model"][model] = list(os.getloadavg())
        by_name = {t["framework"]: t for t in timed}
        for runtime in args.runtimes:
            if RUNTIMES[runtime][0] not in by_name:
                continue
            parity_file = os.path.join(work, f"parity_{runtime}.json")
            parity = json.load(open(parity_file)) if os.path.exists(parity_file) else {}
            out["rows"].append(_row(runtime, model, by_name[RUNTIMES[runtime][0]], prepared, parity))
    ratios(out["rows"])
    out["target"] = target(out["rows"])
    out["machine"]["load_average_at_end"] = list(os.getloadavg())
    out["wall_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    return out


def _mb(value):
    return "" if value is None else f"{value / 1e6:.1f}"


def markdown(out):
    m, s = out["machine"], out["settings"]
    onednn = {True: "on", False: "off", None: "unknown"}[out.get("onednn")]
    lines = [
        "# Deployment benchmark: exported runtimes against timm eager",
        "",
        f"Command: `{out['command']}`  ",
        f"Started (UTC): {out['started_utc']}, wall {out.get('wall_s', 0):.0f} s; "
        f"{s['image_size']} px, batch {s['batch']}, {s['dtype']}, {s['threads']} threads per runtime  ",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, AVX-512 {'yes' if m['avx512'] else 'no'}, "
        f"TensorFlow oneDNN {onednn}; {m['platform']}  ",
        f"Load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}, "
        f"at end {', '.join(f'{x:.2f}' for x in m.get('load_average_at_end', []))} "
        "(a shared machine: other work ran beside this; turns alternate so it falls on every runtime)  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items() if v),
        "",
        "Median latency over alternated turns. Parity: max |logit diff| / max |Keras logit| on "
        "the export check's photographs (random weights, same in every runtime). "
        "vs timm = timm eager's median over this row's (> 1: faster than timm); vs timm 1 thr. = "
        "the same against timm eager on one thread (torch's threads stall each other on a loaded "
        "machine: when that column is far below `vs timm`, the load inflated the ratios).",
        "",
        "| model | runtime | file MB | parity (rel.) | top-1 agree | latency ms | vs timm "
        "| vs timm 1 thr. | calls |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        parity = "" if r["relative_error"] is None else f"{r['relative_error']:.1e}"
        agree = "" if r["top1_agreement"] is None else f"{r['top1_agreement']:.2f}"
        ratio, one = ("" if r[k] is None else f"{r[k]:.2f}x" for k in ("vs_timm", "vs_timm_1_thread"))
        lines.append(f"| {r['model']} | {r['runtime']} | {_mb(r['file_bytes'])} | {parity} | {agree} | "
                     f"{r['latency_s'] * 1e3:.1f} | {ratio} | {one} | {len(r['times_s'])} |")
    t = out.get("target", {})
    lines += ["", "Target (each exported runtime at batch 1 at least as fast as timm eager): "
              + ("met" if t.get("met") else "not met: " + (", ".join(t.get("slower_than_timm", []))
                                                           or "nothing measured")) + "."]
    if out.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e.splitlines()[0]}" for e in out["errors"]]
    return "\n".join(lines) + "\n"


def write_results(out, output_dir):
    return list(bench_cpu.write_json_and_markdown(out, output_dir, "bench_deploy", markdown(out)).values())


def main(argv=None):
    args = parse_args(argv)
    out = run(args)
    paths = write_results(out, args.output_dir)
    print("Wrote " + ", ".join(paths))
    print(markdown(out))
    return 1 if out["errors"] and not out["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
