"""GPU benchmark: bfloat16 inference and training images/s against timm + torch.compile.

Measures, in one run on one GPU, images/s of ConvNeXt V2 atto, V1 tiny and
V2 tiny at 224 px (more with --models, e.g. v2_base):

- inference, bfloat16 weights and activations, batch 1 and 64:
  convnext_zoo through `convnext_zoo.inference_function` (a `jax.jit` of the
  stateless call on JAX; `torch.no_grad` eager on the Keras torch backend)
  against timm (`.to(torch.bfloat16)`, channels_last, `torch.compile`);
- training, bfloat16 mixed precision (float32 weights), batch 64: one step of
  AdamW on the cross-entropy of random labels. Keras on JAX: a `jax.jit` of
  `stateless_call` + `optimizer.stateless_apply` with the state donated (the
  pattern of Keras' "training loop from scratch in JAX" guide); Keras on
  torch: `model.compile` + `train_on_batch`; timm: the `torch.compile`d
  module under `torch.autocast(bfloat16)` with `AdamW(fused=True)`.

Every (framework, model, task) runs in a persistent worker process of its
own (the Keras backend is fixed per process, and JAX and torch must not share
one; JAX does not preallocate GPU memory here), and all of them trace and
compile at once. Each worker then calibrates how many calls make one turn
of about --turn-seconds. The orchestrator gives each case one turn in
rotation, round after round (A, B, A, B...): a turn is one untimed call, then
that many calls timed together, with a device synchronisation
(`block_until_ready`, `torch.cuda.synchronize`) before each clock read. A
row's seconds per call is the median over its turns. Ratios divide a row's
images/s by timm's for the same model, task and batch size (> 1: faster than
timm). The worker protocol and the process plumbing are bench_cpu.py's.

Results: bench_gpu.json and bench_gpu.md in --output-dir (rewritten after
every round, so a run cut short keeps what it measured); the markdown table
is printed last. --quick runs on the CPU in under a minute (V2 atto, 64 px,
batch 2, timm without torch.compile, one turn) to exercise the script.

Usage:
    python benchmarks/bench_gpu.py                       # GPU, default models
    python benchmarks/bench_gpu.py --models v2_atto,v2_base --frameworks jax,torch,timm
    python benchmarks/bench_gpu.py --quick --output-dir /tmp/gpu   # smoke test, CPU
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_cpu  # noqa: E402  (worker plumbing, version list, timm names)
import workers  # noqa: E402  (the serve loop)

FRAMEWORKS = {  # --frameworks key: (worker calls, Keras backend, label)
    "jax": ("keras", "jax", "convnext_zoo jax"),
    "torch": ("keras", "torch", "convnext_zoo torch"),
    "timm": ("timm", "torch", "timm"),
}
INFERENCE, TRAINING = "inference", "training"
# GMACs of one 224x224 image (timm), bench_cpu's and the V2 base.
GMACS_224 = {**bench_cpu.GMACS_224, "v2_base": 15.38}


# === Worker side: runs inside a fresh subprocess ===


def _keras_model(family, variant, size, dtype):
    import convnext_zoo

    factory = convnext_zoo.create_convnext_v1 if family == "v1" else convnext_zoo.create_convnext_v2
    return factory(variant, num_classes=1000, input_shape=(size, size, 3), dtype=dtype)


def _labels(batch):
    import numpy as np

    return np.random.default_rng(batch + 1).integers(0, 1000, size=(batch,))


def steps_keras_jax(task, kind, batches):
    """{(kind, batch): (step, sync)} for convnext_zoo on JAX."""
    import functools

    import jax
    import jax.numpy as jnp
    import keras

    import convnext_zoo

    size, steps = task["size"], {}
    if kind == INFERENCE:
        model = _keras_model(task["family"], task["variant"], size, "bfloat16")
        forward = convnext_zoo.inference_function(model)
        for batch in batches:
            x = jax.device_put(jnp.asarray(bench_cpu._images(batch, size), dtype=jnp.bfloat16))
            steps[(INFERENCE, batch)] = (lambda x=x: forward(x), jax.block_until_ready)
        return steps

    model = _keras_model(task["family"], task["variant"], size, "mixed_bfloat16")
    optimizer = keras.optimizers.AdamW(learning_rate=1e-4)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_and_state(trainable, non_trainable, x, y):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return loss_fn(y, logits), non_trainable

    grad_fn = jax.value_and_grad(loss_and_state, has_aux=True)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, x, y):
        trainable, non_trainable, optimizer_vars = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, x, y)
        trainable, optimizer_vars = optimizer.stateless_apply(optimizer_vars, grads, trainable)
        return loss, (trainable, non_trainable, optimizer_vars)

    state = [([v.value for v in model.trainable_variables],
              [v.value for v in model.non_trainable_variables],
              [v.value for v in optimizer.variables])]
    for batch in batches:
        x = jax.device_put(jnp.asarray(bench_cpu._images(batch, size)))
        y = jax.device_put(jnp.asarray(_labels(batch)))

        def step(x=x, y=y):
            loss, state[0] = train_step(state[0], x, y)
            return loss

        steps[(TRAINING, batch)] = (step, jax.block_until_ready)
    return steps


def _torch_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def steps_keras_torch(task, kind, batches):
    """{(kind, batch): (step, sync)} for convnext_zoo on the Keras torch backend."""
    import keras
    import torch

    import convnext_zoo

    size, steps, device = task["size"], {}, _torch_device()
    if kind == INFERENCE:
        model = _keras_model(task["family"], task["variant"], size, "bfloat16")
        forward = convnext_zoo.inference_function(model)
        for batch in batches:
            x = torch.as_tensor(bench_cpu._images(batch, size), device=device).to(torch.bfloat16)
            steps[(INFERENCE, batch)] = (lambda x=x: forward(x), lambda _: _torch_sync())
        return steps
    model = _keras_model(task["family"], task["variant"], size, "mixed_bfloat16")
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for batch in batches:
        x = torch.as_tensor(bench_cpu._images(batch, size), device=device)
        y = torch.as_tensor(_labels(batch), device=device)
        steps[(TRAINING, batch)] = (lambda x=x, y=y: model.train_on_batch(x, y), lambda _: _torch_sync())
    return steps


def steps_timm(task, kind, batches):
    """{(kind, batch): (step, sync)} for timm, channels_last, torch.compile unless --no-timm-compile."""
    import timm
    import torch
    import torch.nn.functional as F

    size, steps, device = task["size"], {}, _torch_device()
    name = bench_cpu.TIMM_NAMES[task["family"]].format(task["variant"])
    model = timm.create_model(name, pretrained=False, num_classes=1000).to(device)
    model = model.to(memory_format=torch.channels_last)

    def compiled(module):
        return torch.compile(module, dynamic=False) if task["timm_compile"] else module

    def images(batch, dtype):
        x = torch.as_tensor(bench_cpu._images(batch, size, channels_first=True), device=device)
        return x.to(dtype).contiguous(memory_format=torch.channels_last)

    if kind == INFERENCE:
        net = compiled(model.eval().to(torch.bfloat16))
        for batch in batches:
            def step(x=images(batch, torch.bfloat16)):
                with torch.inference_mode():
                    return net(x)

            steps[(INFERENCE, batch)] = (step, lambda _: _torch_sync())
        return steps
    net = compiled(model.train())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    for batch in batches:
        def step(x=images(batch, torch.float32), y=torch.as_tensor(_labels(batch), device=device)):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            return loss

        steps[(TRAINING, batch)] = (step, lambda _: _torch_sync())
    return steps


STEPS = {("keras", "jax"): steps_keras_jax, ("keras", "torch"): steps_keras_torch,
         ("timm", "torch"): steps_timm}


def _run_steps(step, sync, count):
    """Seconds for `count` calls of `step`, the device synchronised before each clock read."""
    sync(None)
    start = time.perf_counter()
    out = None
    for _ in range(count):
        out = step()
    sync(out)
    return time.perf_counter() - start


def _device_info(backend):
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return {"platform": device.platform, "device": getattr(device, "device_kind", str(device))}
    import torch

    if torch.cuda.is_available():
        return {"platform": "cuda", "device": torch.cuda.get_device_name(0)}
    return {"platform": "cpu", "device": platform.processor() or "cpu"}


def worker_serve(task):
    """Prepares this worker's steps, then times turns on request (workers.serve).

    Prints `READY <json>`: per case its first-call seconds (trace and
    compile), its calls per turn (calibrated to about `turn_seconds`) and the
    device. Each `RUN <task> <batch> <count>` runs one untimed call, then
    `count` turns, and answers `TIME <seconds per call of each turn> ...`.
    """
    steps = {}
    for kind, batches in task["kinds"].items():
        steps.update(STEPS[(task["calls"], task["backend"])](task, kind, batches))
    ready = {"device": _device_info(task["backend"]), "cases": {}}
    calls = {}
    for (kind, batch), (step, sync) in steps.items():
        first = _run_steps(step, sync, 1)
        for _ in range(task["warmup"]):
            _run_steps(step, sync, 1)
        one = min(_run_steps(step, sync, 1) for _ in range(3))
        per_turn = max(1, min(task["max_calls"], round(task["turn_seconds"] / max(one, 1e-6))))
        calls[f"{kind} {batch}"] = (step, sync, per_turn)
        ready["cases"][f"{kind} {batch}"] = {"first_call_s": first, "calls_per_turn": per_turn}

    def turn(key, count):
        step, sync, per_turn = calls[key]
        _run_steps(step, sync, 1)
        return [_run_steps(step, sync, per_turn) / per_turn for _ in range(count)]

    workers.serve(ready, turn)


# === Orchestrator side ===


def _worker_command(task):
    env = dict(os.environ)
    env["KERAS_BACKEND"] = task["backend"]
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # JAX takes what it uses, torch the rest
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if task.get("compile_threads"):
        env["TORCHINDUCTOR_COMPILE_THREADS"] = str(task["compile_threads"])
    # TensorFlow is no part of this benchmark (the GPU machine has none): kept
    # out, so that a process here cannot load it beside torch (and triton).
    code = (
        "import sys, json; sys.modules['tensorflow'] = None; sys.path.insert(0, {here!r}); "
        "import bench_gpu; bench_gpu.worker_serve(json.loads(sys.argv[1]))"
    ).format(here=HERE)
    return [sys.executable, "-c", code, json.dumps(task)], env


class Server(bench_cpu.Server):
    """A `worker_serve` process, started without waiting for it to be ready."""

    def __init__(self, task, label):
        command, env = _worker_command(task)
        self.task, self.label, self.ready = task, label, None
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(command, env=env, cwd=ROOT, text=True, bufsize=1,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def wait_ready(self, deadline):
        """Reads READY; kills the worker at `deadline` (time.monotonic) if it is not ready by then."""
        timer = threading.Timer(max(deadline - time.monotonic(), 0.0), self.proc.kill)
        timer.start()
        try:
            self.ready = json.loads(self._expect("READY"))
        finally:
            timer.cancel()
        if self.proc.poll() is not None:  # ready just as the deadline killed it
            raise RuntimeError(f"worker exited with code {self.proc.returncode} at the deadline")
        return self.ready


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke test: V2 atto, 64 px, batch 2, timm eager, one turn")
    p.add_argument("--models", default=None, help="comma list of v2_atto,v1_tiny,v2_tiny,v2_base,... "
                   "(default v2_atto,v1_tiny,v2_tiny)")
    p.add_argument("--frameworks", default=None,
                   help="comma list of jax (Keras on JAX), torch (Keras on torch), timm "
                        "(default jax,timm; timm is the reference of the ratios)")
    p.add_argument("--image-size", type=int, default=None, help="default 224 (quick: 64)")
    p.add_argument("--inference-batches", default=None, help="default 1,64 (quick: 2)")
    p.add_argument("--training-batches", default=None, help="default 64 (quick: 2)")
    p.add_argument("--no-timm-compile", dest="timm_compile", action="store_false", default=None,
                   help="timm in eager mode (default with --quick: torch.compile on a CPU takes minutes)")
    p.add_argument("--repeats", type=int, default=None, help="turns per case (default 7, quick: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default 3)")
    p.add_argument("--turn-seconds", type=float, default=None,
                   help="aimed length of one timed turn (default 0.25, quick: 0.05)")
    p.add_argument("--max-calls", type=int, default=200, help="most calls in one turn")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="bound on the whole run: workers not ready by 70%% of it are dropped (an "
                        "error in the results), and the rounds stop when it is spent, after at least "
                        "one (default 480, quick: 80)")
    p.add_argument("--workers", choices=("per-task", "per-model"), default=None,
                   help="a worker process per framework, model and task (default: all compile at "
                        "once), or per framework and model (quick: fewer processes)")
    p.add_argument("--output-dir", default=os.path.join(HERE, "results", "gpu"))
    args = p.parse_args(argv)
    quick = args.quick

    def default(value, normal, small):
        return value if value is not None else (small if quick else normal)

    args.models = default(args.models, "v2_atto,v1_tiny,v2_tiny", "v2_atto").split(",")
    args.frameworks = default(args.frameworks, "jax,timm", "jax,timm").split(",")
    unknown = sorted(set(args.frameworks) - set(FRAMEWORKS))
    if unknown or "timm" not in args.frameworks:
        p.error(f"--frameworks takes {', '.join(FRAMEWORKS)}, timm included (the reference). "
                f"Received: {','.join(args.frameworks)}.")
    for model in args.models:
        if model.split("_")[0] not in bench_cpu.TIMM_NAMES or model.count("_") != 1:
            p.error(f"--models takes names like v2_atto or v1_tiny. Received: {model!r}.")
    args.image_size = default(args.image_size, 224, 64)
    args.inference_batches = [int(b) for b in default(args.inference_batches, "1,64", "2").split(",") if b]
    args.training_batches = [int(b) for b in default(args.training_batches, "64", "2").split(",") if b]
    args.timm_compile = default(args.timm_compile, True, False)
    args.repeats = default(args.repeats, 7, 1)
    args.warmup = default(args.warmup, 3, 1)
    args.turn_seconds = default(args.turn_seconds, 0.25, 0.05)
    args.max_seconds = default(args.max_seconds, 480.0, 80.0)
    args.workers = default(args.workers, "per-task", "per-model")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1. Received: {args.repeats}.")
    return args


def _gpu_info():
    """`nvidia-smi`'s name, driver and memory of each GPU; [] where there is none."""
    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [dict(zip(("name", "driver", "memory"), (s.strip() for s in line.split(","))))
            for line in text.strip().splitlines()]


def framework_label(key, timm_compile):
    label = FRAMEWORKS[key][2]
    return label + (" torch.compile" if timm_compile else " eager") if key == "timm" else label


def run(args, write=None):
    """Measures; calls `write(out)` after preparation and after every round."""
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.monotonic()
    out = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "gpus": _gpu_info()},
        "settings": dict(vars(args)),
        "dtype": {INFERENCE: "bfloat16 (weights and activations)",
                  TRAINING: "mixed bfloat16 (float32 weights, bfloat16 compute)"},
        "versions": bench_cpu._versions(),
        "reference": framework_label("timm", args.timm_compile),
        "devices": {}, "rows": [], "errors": [],
    }
    tasks = {kind: batches for kind, batches in ((INFERENCE, args.inference_batches),
                                                 (TRAINING, args.training_batches)) if batches}
    # One worker per task (all compile at once: on a GPU machine the compiles,
    # not the turns, take most of the time) or, with --workers per-model, one
    # per model for both tasks (fewer processes for a small CPU).
    groups = [{kind: batches} for kind, batches in tasks.items()] if args.workers == "per-task" else [tasks]
    timm_workers = len(args.models) * len(groups)
    servers = []
    for model in args.models:
        family, variant = model.split("_")
        for kinds in groups:
            for key in args.frameworks:
                calls, backend, _ = FRAMEWORKS[key]
                task = {"calls": calls, "backend": backend, "family": family, "variant": variant,
                        "kinds": kinds, "size": args.image_size,
                        "warmup": args.warmup, "turn_seconds": args.turn_seconds,
                        "max_calls": args.max_calls, "timm_compile": args.timm_compile,
                        "compile_threads": max(2, (os.cpu_count() or 2) // timm_workers)}
                label = framework_label(key, args.timm_compile)
                bench_cpu._log(f"start {label}: {model} {', '.join(kinds)}")
                servers.append(Server(task, label))
                servers[-1].key = key
    # All workers trace and compile at once; each gets until 70% of the budget.
    deadline = clock + 0.7 * args.max_seconds
    for server in list(servers):
        t = server.task
        try:
            ready = server.wait_ready(deadline)
        except Exception as error:  # noqa: BLE001 - reported in the results
            out["errors"].append(f"{server.label} {t['family']}_{t['variant']} {', '.join(t['kinds'])}: "
                                 f"not ready ({error})")
            bench_cpu._log("  FAILED: " + out["errors"][-1][-1500:])
            servers.remove(server)
            server.close()
            continue
        out["devices"][server.label] = ready["device"]
        bench_cpu._log(f"ready {server.label} {t['family']}_{t['variant']}: "
                       + ", ".join(f"{k} first {v['first_call_s']:.1f} s, {v['calls_per_turn']} calls/turn"
                                   for k, v in ready["cases"].items()))
    # Peers of one model, task and batch size side by side: A, B, A, B turns.
    cases = sorted(((server, kind, batch) for server in servers
                    for kind, batches in server.task["kinds"].items() for batch in batches),
                   key=lambda c: (args.models.index(f"{c[0].task['family']}_{c[0].task['variant']}"),
                                  list(tasks).index(c[1]), c[2], args.frameworks.index(c[0].key)))
    times = {id(case): [] for case in cases}
    if write:
        write(out)
    for repeat in range(args.repeats):
        if repeat and time.monotonic() - clock > args.max_seconds:
            out["errors"].append(f"time budget ({args.max_seconds:.0f} s) spent after {repeat} rounds")
            break
        shift = repeat % max(len(cases), 1)
        for case in cases[shift:] + cases[:shift]:
            server, kind, batch = case
            if server.proc.poll() is not None:
                if times[id(case)] is not None:
                    out["errors"].append(f"{server.label} {kind} b{batch}: worker exited with code "
                                         f"{server.proc.returncode}")
                    times[id(case)] = None  # reported once; its turns so far are dropped
                continue
            try:
                times[id(case)] += server.time_calls(kind, batch, 1)
            except Exception as error:  # noqa: BLE001
                out["errors"].append(f"{server.label} {kind} b{batch}: {str(error)[-1500:]}")
        out["rows"] = _rows(cases, times, args.image_size)
        out["rounds"] = repeat + 1
        out["wall_s"] = time.monotonic() - clock
        bench_cpu._log(f"round {repeat + 1} done ({out['wall_s']:.0f} s)")
        if write:
            write(out)
    for server in servers:
        server.close()
    out["wall_s"] = time.monotonic() - clock
    return out


def _rows(cases, times, image_size):
    rows = []
    for case in cases:
        server, kind, batch = case
        if not times.get(id(case)):
            continue
        t = server.task
        model = f"{t['family']}_{t['variant']}"
        seconds = statistics.median(times[id(case)])
        info = server.ready["cases"][f"{kind} {batch}"]
        # FLOPs (2 x MACs, scaled by area); a training step counted as 3 forward passes.
        gflop = 2 * GMACS_224.get(model, 0) * (image_size / 224) ** 2 * (3 if kind == TRAINING else 1)
        rows.append({"framework": server.label, "model": model, "task": kind, "batch": batch,
                     "seconds_per_call": seconds, "images_per_s": batch / seconds,
                     "tflops": gflop * batch / seconds / 1e3 if gflop else None,
                     "turn_seconds_per_call": times[id(case)], "calls_per_turn": info["calls_per_turn"],
                     "first_call_s": info["first_call_s"]})
    _ratios(rows)
    return rows


def _ratios(rows):
    """Each row's `vs_timm`: its images/s over the timm row's of the same model, task and batch."""
    timm = {(r["model"], r["task"], r["batch"]): r for r in rows if r["framework"].startswith("timm")}
    for r in rows:
        ref = timm.get((r["model"], r["task"], r["batch"]))
        r["vs_timm"] = r["images_per_s"] / ref["images_per_s"] if ref else None


def markdown(out):
    gpus = "; ".join(f"{g['name']} (driver {g['driver']}, {g['memory']})" for g in out["machine"]["gpus"])
    devices = "; ".join(f"{k}: {v['platform']} {v['device']}" for k, v in out["devices"].items())
    lines = [
        "# GPU benchmark: bfloat16 images/s against timm",
        "",
        f"Command: `{out['command']}`  ",
        f"Started (UTC): {out['started_utc']}, wall {out.get('wall_s', 0):.0f} s, "
        f"{out.get('rounds', 0)} rounds, {out['settings']['image_size']} px  ",
        f"Machine: {out['machine']['platform']}, {out['machine']['cpu_count']} CPUs, "
        f"GPU: {gpus or 'none (nvidia-smi)'}  ",
        f"Devices used: {devices}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items() if v) + "  ",
        f"dtype: inference {out['dtype'][INFERENCE]}; training {out['dtype'][TRAINING]}, AdamW, "
        "cross-entropy",
        "",
        f"Median seconds per call over the turns; images/s = batch / that. vs timm = a row's "
        f"images/s over {out['reference']}'s for the same model, task and batch (> 1: faster). "
        "TFLOP/s from the models' GMACs (training counted as 3x inference). First call: trace "
        "and compile.",
        "",
        "| model | task | batch | framework | ms per call | images/s | vs timm | TFLOP/s | turns "
        "| first call s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(out["rows"], key=lambda r: (r["model"], r["task"] != INFERENCE, r["batch"])):
        lines.append(
            f"| {r['model']} | {r['task']} | {r['batch']} | {r['framework']} | "
            f"{r['seconds_per_call'] * 1e3:.2f} | {r['images_per_s']:.1f} | "
            f"{'' if r['vs_timm'] is None else format(r['vs_timm'], '.2f') + 'x'} | "
            f"{'' if r['tflops'] is None else format(r['tflops'], '.3g')} | "
            f"{len(r['turn_seconds_per_call'])} | {r['first_call_s']:.1f} |")
    if out["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e.splitlines()[0][:300]}" for e in out["errors"]]
    return "\n".join(lines) + "\n"


def write_results(out, output_dir):
    return list(bench_cpu.write_json_and_markdown(out, output_dir, "bench_gpu", markdown(out)).values())


def main(argv=None):
    args = parse_args(argv)
    out = run(args, write=lambda partial: write_results(partial, args.output_dir))
    paths = write_results(out, args.output_dir)
    print("Wrote " + ", ".join(paths))
    print(markdown(out))
    return 0 if out["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
