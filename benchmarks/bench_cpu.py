"""CPU inference benchmark: convnext_zoo against timm and keras.applications.

Measures, in one run and with the same thread count for every framework,
throughput (images/s) and latency (median seconds per call) at batch 1 and
batch 16, 224 px, float32, for ConvNeXt V2 atto, V1 tiny and V2 tiny
(V1 base with --base):

- convnext_zoo on the TensorFlow backend through `model.predict` and through
  `convnext_zoo.inference_function(model)` (tf.function; with --frameworks
  ...,tf-xla also with jit_compile=True, off by default: 8x slower here);
- convnext_zoo's snapshot compiled by OpenVINO (`openvino_function`, TensorFlow
  backend, a worker of its own), the fastest documented path on CPUs;
- convnext_zoo on the JAX and PyTorch Keras backends (inference_function);
- timm in eager mode (torch.inference_mode) and, with --compile, torch.compile;
- keras.applications ConvNeXtTiny (weights=None) for V1 tiny, in a
  tf.function (its fastest path).

It also measures this machine's float32 matmul peak (GFLOP/s) to express each
result as a fraction of it: the best of a few 2048x2048 products in NumPy,
torch and TensorFlow at the start, then the fastest library's product timed
as one more case in every model's alternation, so that a model's share of
the peak divides two medians taken in the same minutes. It also measures the
cold start (time and peak RSS above the process baseline, each in a fresh
process) of `convnext_zoo.from_preset` on a local timm-layout directory
(converted on load) and on a Keras-native preset, against
`timm.create_model(..., pretrained_cfg_overlay=dict(file=...))` on the same
file. All weights are random and generated locally: no network.

Each framework runs in its own long-lived worker process (the Keras backend
is fixed at import, and TensorFlow and torch are kept apart). After every
worker has traced, compiled and warmed up its calls, the orchestrator times
one call of each case in turn, repetition after repetition, with a short
pause between calls: the speed of a shared virtual machine drifts by tens of
percent over minutes, and alternating call by call makes every framework see
the same drift, so the ratios hold even where the absolute numbers move.
Cold starts run in fresh processes, repeated and interleaved (medians).
Results go to benchmarks/results/: bench_cpu.json, bench_cpu.md and
bench_cpu.png.

Usage:
    .venv/bin/python benchmarks/bench_cpu.py                # default run
    .venv/bin/python benchmarks/bench_cpu.py --quick        # smoke test, < 2 min
    .venv/bin/python benchmarks/bench_cpu.py --compile --base --threads 2
"""

import argparse
import datetime
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# GMACs of one 224x224 image (timm / the papers); 1 MAC = 2 FLOP.
GMACS_224 = {"v2_atto": 0.55, "v1_tiny": 4.47, "v2_tiny": 4.47, "v1_base": 15.36}
def gflop_per_image(model, image_size):
    """FLOPs (2 x multiply-adds, GMACS_224 scaled by area) of one image, in GFLOP; 0 if unknown."""
    return 2 * GMACS_224.get(model, 0) * (image_size / 224) ** 2


TIMM_NAMES = {
    "v1": "convnext_{}",
    "v2": "convnextv2_{}",
}
OURS_FAST = "convnext_zoo tf inference_function"
OURS_PREDICT = "convnext_zoo tf predict"
OURS_OPENVINO = "convnext_zoo tf openvino_function"
MATMUL_PEAK = "float32 matmul peak"
PEERS = ("timm eager", "timm torch.compile", "keras.applications")


# === Worker side: runs inside a fresh subprocess ===


def _set_thread_env(threads):
    """Thread settings that must exist before TF / torch / JAX / BLAS import."""
    n = str(threads)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = n
    os.environ["TF_NUM_INTRAOP_THREADS"] = n
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    # Flags only: XLA stops reading XLA_FLAGS at the first word without "--". XLA sizes its
    # CPU thread pool from the cores this process may run on.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true").strip()


def _tf_threads(threads):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _torch_threads(torch, threads):
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set once in this process


def _time_calls(fn, warmup, repeats):
    """`warmup` untimed calls, then `repeats` timed ones (seconds each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _summary(times, batch):
    median = statistics.median(times)
    return {
        "batch": batch,
        "latency_s": median,
        "images_per_s": batch / median,
        "times_s": times,
    }


def _images(batch, size, channels_first=False):
    import numpy as np

    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if channels_first else x


def _keras_model(family, variant, size):
    import convnext_zoo

    factory = convnext_zoo.create_convnext_v1 if family == "v1" else convnext_zoo.create_convnext_v2
    return factory(variant, num_classes=1000, input_shape=(size, size, 3))


def calls_keras(task):
    """convnext_zoo on the backend in KERAS_BACKEND: predict and inference_function."""
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        _tf_threads(task["threads"])
    elif backend == "torch":
        import torch

        _torch_threads(torch, task["threads"])
    from convnext_zoo.inference import inference_function

    model = _keras_model(task["family"], task["variant"], task["size"])
    calls = {}
    for mode in task["modes"]:
        if mode == "openvino":
            forward = _openvino_forward(model, task["threads"])
        elif mode != "predict":
            forward = inference_function(model, jit_compile=(mode == "xla"))
        for batch in task["batches"]:
            x = _images(batch, task["size"])
            if mode == "predict":
                calls[(mode, batch)] = lambda x=x, b=batch: model.predict(x, batch_size=b, verbose=0)
            else:
                calls[(mode, batch)] = lambda x=x, f=forward: keras.ops.convert_to_numpy(f(x))
    return calls


def _openvino_forward(model, threads):
    """`openvino_function`, converted at the first call (so its first-call time includes it)."""
    from convnext_zoo.inference import openvino_function

    compiled = []

    def forward(x):
        if not compiled:
            compiled.append(openvino_function(model, num_threads=threads))
        return compiled[0](x)

    return forward


def calls_timm(task):
    """timm eager (inference_mode) and optionally torch.compile."""
    import torch
    import timm

    _torch_threads(torch, task["threads"])
    name = TIMM_NAMES[task["family"]].format(task["variant"])
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    calls = {}
    for mode in task["modes"]:
        net = torch.compile(model) if mode == "compile" else model
        for batch in task["batches"]:
            x = torch.from_numpy(_images(batch, task["size"], channels_first=True))

            def call(net=net, x=x):
                with torch.inference_mode():
                    return net(x).numpy()

            calls[(mode, batch)] = call
    return calls


def calls_kapp(task):
    """keras.applications.ConvNeXtTiny (grouped Conv2D), TF backend, in a tf.function."""
    _tf_threads(task["threads"])
    import keras
    import tensorflow as tf

    model = keras.applications.ConvNeXtTiny(
        weights=None, input_shape=(task["size"], task["size"], 3), include_preprocessing=False
    )
    forward = tf.function(lambda x: model(x, training=False), autograph=False)
    calls = {}
    for batch in task["batches"]:
        x = tf.constant(_images(batch, task["size"]))
        for mode in task["modes"]:
            if mode == "predict":
                calls[(mode, batch)] = lambda x=x, b=batch: model.predict(x, batch_size=b, verbose=0)
            else:
                calls[(mode, batch)] = lambda x=x: forward(x).numpy()
    return calls


def calls_matmul(task):
    """The matmul peak as one more case of the alternation (mode `peak`, any batch)."""
    call = matmul_call(task["library"], task["matmul_n"], task["threads"])
    return {("peak", batch): call for batch in task["batches"]}


CALLS = {"keras": calls_keras, "timm": calls_timm, "kapp": calls_kapp, "matmul": calls_matmul}


def worker_serve(task):
    """A long-lived worker: prepares its calls, then times one turn per request (workers.serve).

    It reports `READY` with the first-call seconds of every case; a
    `RUN <mode> <batch> <count>` turn runs one untimed call first (the other
    workers have evicted this one's weights from the caches), then `count`
    timed ones, and answers their seconds.
    """
    import workers

    calls = resolve(CALLS, task["calls"])(task)
    first = {}
    for (mode, batch), call in calls.items():
        start = time.perf_counter()
        call()  # traces / compiles
        first[f"{mode} {batch}"] = time.perf_counter() - start
        for _ in range(task["warmup"] if first[f"{mode} {batch}"] < 10 else 0):
            call()
    by_key = {f"{mode} {batch}": call for (mode, batch), call in calls.items()}

    def turn(key, count):
        by_key[key]()  # untimed: brings this worker's weights back into the caches
        return _time_calls(by_key[key], 0, count)

    workers.serve(first, turn)


MATMUL_LIBRARIES = ("numpy", "torch", "tensorflow")


def matmul_call(library, n, threads=None):
    """A zero-argument call that multiplies two random float32 `n`x`n` matrices in `library`.

    `threads` sets torch's or TensorFlow's thread pools first (a worker
    process does; `None` leaves them as they are).
    """
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    if library == "numpy":
        return lambda: a @ b
    if library == "torch":
        import torch

        if threads is not None:
            _torch_threads(torch, threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        return lambda: torch.mm(ta, tb)
    if library == "tensorflow":
        if threads is not None:
            _tf_threads(threads)
        import tensorflow as tf

        ta, tb = tf.constant(a), tf.constant(b)
        mm = tf.function(lambda: tf.matmul(ta, tb))
        return lambda: mm().numpy()
    raise ValueError(f"Unknown matmul library. Received: {library!r}. Accepted: {MATMUL_LIBRARIES}.")


def matmul_gflops(n, seconds):
    return 2.0 * n**3 / seconds / 1e9


def worker_matmul(task):
    """float32 matmul peak: best GFLOP/s of NumPy (BLAS), torch and TensorFlow.

    `library` names the fastest; the orchestrator then times that one
    alongside each model's calls (`calls_matmul`).
    """
    n = task["matmul_n"]
    out = {}
    for library in MATMUL_LIBRARIES:
        times = _time_calls(matmul_call(library, n, task["threads"]), 2, task["repeats"])
        out[f"{library}_gflops"] = matmul_gflops(n, min(times))
    out["library"] = max(MATMUL_LIBRARIES, key=lambda library: out[f"{library}_gflops"])
    out["peak_gflops"] = out[f"{out['library']}_gflops"]
    out["n"] = n
    return out


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak():
    """Resets VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# Where the cold start of `from_preset` goes: functions timed in the cold
# worker (module, class or None, attribute). They do not nest in one another.
PHASES = {
    "backbone graph": ("convnext_zoo.backbone", "ConvNeXtBackbone", "__init__"),
    "classifier head": ("convnext_zoo.classifier", "ConvNeXtImageClassifier", "__init__"),
    "assign": ("convnext_zoo.weights", None, "assign_strict"),
    "copy into variables": ("convnext_zoo.internals", None, "load_value"),
}


def phase_targets():
    """`(phase, object, attribute)` of each PHASES function, its module imported."""
    import importlib

    for phase, (module, owner, attribute) in PHASES.items():
        target = importlib.import_module(module)
        yield phase, (getattr(target, owner) if owner else target), attribute


def _timed_phases():
    """Wraps the PHASES functions with timers; returns the dict of their total seconds."""
    totals = dict.fromkeys(PHASES, 0.0)
    for phase, target, attribute in phase_targets():
        original = getattr(target, attribute)

        @functools.wraps(original)
        def timed(*args, _original=original, _phase=phase, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_phase] += time.perf_counter() - start

        setattr(target, attribute, timed)
    return totals


def _phase_split(totals, seconds):
    """Disjoint phases: `read` is `assign` less `load_value`.

    `read` takes each tensor from the file and views it in Keras' layout;
    `copy into variables` (`load_value`) makes the one copy into Keras'
    layout and dtype and creates the variable from it.
    """
    split = {
        "backbone graph": totals["backbone graph"],
        "classifier head and compile": totals["classifier head"],
        "read": totals["assign"] - totals["copy into variables"],
        "copy into variables": totals["copy into variables"],
    }
    split["rest"] = seconds - sum(split.values())
    return split


def worker_cold(task):
    """Cold start of one loader in this fresh process: time and peak RSS above baseline."""
    kind, path = task["kind"], task["path"]
    if kind == "timm":
        import torch
        import timm

        _torch_threads(torch, task["threads"])
        name = TIMM_NAMES["v1"].format(task["variant"])

        def load():
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(file=path)
            ).eval()
    else:
        _tf_threads(task["threads"])
        import keras  # noqa: F401
        import convnext_zoo

        phases = _timed_phases()

        def load():
            return convnext_zoo.from_preset(path, preprocessing=False)

    import gc

    gc.collect()
    baseline = _rss_bytes()
    exact = _reset_peak()
    before_hwm = _hwm_bytes()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak = _hwm_bytes()
    del model
    return {
        "kind": kind,
        "seconds": seconds,
        "phases_s": _phase_split(phases, seconds) if kind != "timm" else {},
        "baseline_rss_bytes": baseline,
        "peak_above_baseline_bytes": max(peak - baseline, 0),
        "peak_exact": exact or before_hwm <= baseline,
        "weights_bytes": os.path.getsize(task["weights_file"]),
    }


def worker_fixtures(task):
    """Random timm checkpoints (model.safetensors + config.json) and their Keras presets."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    import convnext_zoo  # noqa: F401  (TF first, then torch with triton kept away)
    from convnext_zoo.convert import convert_checkpoint
    from convnext_zoo.optional import keep_triton_away

    keep_triton_away()
    import torch
    import timm

    out = {}
    for variant in task["variants"]:
        name = TIMM_NAMES["v1"].format(variant)
        timm_dir = os.path.join(task["dir"], f"timm_{name}")
        keras_dir = os.path.join(task["dir"], f"keras_{name}")
        weights = os.path.join(timm_dir, "model.safetensors")
        if not os.path.isfile(os.path.join(keras_dir, "config.json")):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=1000)
            state = {k: np.ascontiguousarray(v.detach().numpy()) for k, v in model.state_dict().items()}
            os.makedirs(timm_dir, exist_ok=True)
            save_file(state, weights)
            reloaded = load_file(weights)
            assert all(np.array_equal(reloaded[k], state[k]) for k in state), "safetensors reload differs"
            with open(os.path.join(timm_dir, "config.json"), "w") as f:
                json.dump({"architecture": name, "num_classes": 1000}, f)
            if os.path.exists(keras_dir):
                shutil.rmtree(keras_dir)
            convert_checkpoint(timm_dir, keras_dir, layout="keras")  # the Keras-layout preset case
        out[variant] = {"timm_dir": timm_dir, "keras_dir": keras_dir, "weights_file": weights}
    return out


def worker_onednn(task):
    """Whether TensorFlow runs oneDNN here (True, False, None: it cannot say)."""
    from convnext_zoo import internals

    return internals.onednn_enabled()


WORKERS = {
    "onednn": worker_onednn,
    "serve": worker_serve,
    "matmul": worker_matmul,
    "cold": worker_cold,
    "fixtures": worker_fixtures,
}


def resolve(table, name):
    """`table[name]`, or `function` of module `module` for a name `module:function`.

    Other benchmarks in this directory (bench_deploy.py) run their own calls
    and workers in this module's worker processes this way.
    """
    if ":" not in name:
        return table[name]
    import importlib

    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def worker_main(task):
    result = resolve(WORKERS, task["worker"])(task)
    sys.stdout.write("\nBENCH_RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


# === Orchestrator side ===


def _worker_command(task, backend):
    env = dict(os.environ, **task.get("env", {}))
    env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(task["threads"])
    code = (
        "import sys, json; sys.path.insert(0, {here!r}); import bench_cpu as b; "
        "b._set_thread_env({threads}); "
        "(sys.modules.setdefault('triton', None) if {no_triton} else None); "
        "b.worker_main(json.loads(sys.argv[1]))"
    ).format(here=HERE, threads=task["threads"], no_triton=task.get("no_triton", True))
    return [sys.executable, "-c", code, json.dumps(task)], env


def run_worker(task, backend="tensorflow", timeout=1800):
    """Runs one worker in a fresh interpreter; returns its result or raises."""
    command, env = _worker_command(task, backend)
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):]), wall
    raise RuntimeError(
        f"worker {task['worker']} ({backend}) failed with exit code {proc.returncode}:\n"
        + proc.stderr[-3000:]
    )


class Server:
    """A `worker_serve` process: one framework's prepared calls, timed on request."""

    def __init__(self, task, backend):
        command, env = _worker_command(task, backend)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(command, env=env, cwd=ROOT, text=True, bufsize=1,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.first_call_s = json.loads(self._expect("READY"))

    def _expect(self, word):
        for line in self.proc.stdout:
            if line.startswith(word + " "):
                return line[len(word) + 1:]
        self.log.seek(0)
        raise RuntimeError(f"worker exited with code {self.proc.wait()}:\n" + self.log.read()[-3000:])

    def time_calls(self, mode, batch, count):
        self.proc.stdin.write(f"RUN {mode} {batch} {count}\n")
        self.proc.stdin.flush()
        return [float(t) for t in self._expect("TIME").split()]

    def close(self):
        try:
            self.proc.stdin.write("QUIT\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.log.close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: atto only, few repeats, cold start on tiny only")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for every framework (default: all cores)")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--models", default=None,
                   help="comma list of v2_atto,v1_tiny,v2_tiny,v1_base (default: the first three)")
    p.add_argument("--base", action="store_true", help="add V1 base to the models")
    p.add_argument("--frameworks", default=None,
                   help="comma list of tf (predict + inference_function), tf-xla, openvino "
                        "(openvino_function), jax, torch, timm, kapp (keras.applications, V1 tiny "
                        "only); default all, quick: tf,openvino,timm; tf-xla is off by default: XLA "
                        "was 8x slower here)")
    p.add_argument("--compile", action="store_true", help="also timm with torch.compile (~45 s per model)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="time budget per case (model, framework, batch size): the "
                        "alternating repetitions stop once every case has had it and at least "
                        "3 calls (default 20)")
    p.add_argument("--burst", type=int, default=2,
                   help="timed calls per turn of a case, after one untimed call (default 2)")
    p.add_argument("--pause", type=float, default=0.05,
                   help="seconds between two timed calls (lets the last worker's threads idle)")
    p.add_argument("--cold-repeats", type=int, default=None,
                   help="fresh processes per cold-start case, interleaved; the median is kept "
                        "(default 3, quick: 1)")
    p.add_argument("--no-cold-start", action="store_true")
    p.add_argument("--cold-start-only", action="store_true",
                   help="only the cold start (no throughput, no matmul peak)")
    p.add_argument("--cold-variants", default=None, help="default: tiny,base (quick: tiny)")
    p.add_argument("--no-matmul", action="store_true")
    p.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "convnext_zoo_bench"),
                   help="where the random checkpoints for the cold start are written")
    args = p.parse_args(argv)
    if args.models is None:
        args.models = "v2_atto" if args.quick else "v2_atto,v1_tiny,v2_tiny"
    args.models = args.models.split(",")
    if args.base and "v1_base" not in args.models:
        args.models.append("v1_base")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.frameworks is None:
        args.frameworks = "tf,openvino,timm" if args.quick else "tf,openvino,jax,torch,timm,kapp"
    args.frameworks = args.frameworks.split(",")
    if args.cold_start_only:
        if args.no_cold_start:
            p.error("--cold-start-only and --no-cold-start exclude each other.")
        args.frameworks, args.no_matmul = [], True
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.cold_repeats is None:
        args.cold_repeats = 1 if args.quick else 3
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    if args.repeats < 1 or args.cold_repeats < 1:
        p.error(f"--repeats and --cold-repeats must be at least 1. Received: "
                f"{args.repeats}, {args.cold_repeats}.")
    if args.cold_variants is None:
        args.cold_variants = "tiny" if args.quick else "tiny,base"
    args.cold_variants = [v for v in args.cold_variants.split(",") if v]
    return args


def _task(args, worker, **extra):
    return {"worker": worker, "threads": args.threads, "size": args.image_size,
            "batches": args.batch_sizes, "warmup": args.warmup, "repeats": args.repeats,
            "max_seconds": args.max_seconds, **extra}


def _log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _within_repo(path):
    """A path inside the repository relative to its root: the results are committed."""
    relative = os.path.relpath(os.path.abspath(path), ROOT)
    return path if relative.startswith(os.pardir) else relative


def run(args):
    import workers

    started = datetime.datetime.now(datetime.timezone.utc)
    rows, errors = [], []
    out = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": workers.machine(),
        "settings": {k: _within_repo(v) if k == "output_dir" else v for k, v in vars(args).items()},
        "versions": _versions(),
    }

    try:  # TensorFlow's own answer, in a process of its own like every framework here
        out["machine"]["tensorflow_onednn"], _ = run_worker(_task(args, "onednn"))
    except Exception as error:  # noqa: BLE001 - reported in the results
        errors.append(f"oneDNN state: {error}")

    if not args.no_matmul:
        _log("matmul peak")
        try:
            out["matmul"], _ = run_worker(_task(args, "matmul", matmul_n=2048))
            _log(f"  peak {out['matmul']['peak_gflops']:.1f} GFLOP/s")
        except Exception as error:  # noqa: BLE001 - reported in the results
            errors.append(str(error))

    for model in args.models:
        family, variant = model.split("_")
        base = dict(family=family, variant=variant)
        jobs = []
        if "tf" in args.frameworks or "tf-xla" in args.frameworks:
            modes = [m for m, f in (("predict", "tf"), ("fast", "tf"), ("xla", "tf-xla")) if f in args.frameworks]
            jobs.append(("keras", "tensorflow", modes, {"predict": OURS_PREDICT, "fast": OURS_FAST,
                                                         "xla": "convnext_zoo tf inference_function(jit_compile=True)"}))
        if "openvino" in args.frameworks:
            # A process of its own: OpenVINO's thread pool stays apart from TensorFlow's.
            jobs.append(("keras", "tensorflow", ["openvino"], {"openvino": OURS_OPENVINO}))
        if "jax" in args.frameworks:
            jobs.append(("keras", "jax", ["fast"], {"fast": "convnext_zoo jax inference_function"}))
        if "torch" in args.frameworks:
            jobs.append(("keras", "torch", ["fast"], {"fast": "convnext_zoo torch inference_function"}))
        if "timm" in args.frameworks:
            modes = ["eager"] + (["compile"] if args.compile else [])
            jobs.append(("timm", "tensorflow", modes, {"eager": "timm eager", "compile": "timm torch.compile"}))
        if "kapp" in args.frameworks and model == "v1_tiny":
            jobs.append(("kapp", "tensorflow", ["fast"],
                         {"fast": "keras.applications", "predict": "keras.applications predict"}))
        if jobs and "matmul" in out:
            # The peak moves with the machine as much as the models do: time
            # it in the same turns, so that each model's share of it compares
            # medians taken side by side.
            base.update(library=out["matmul"]["library"], matmul_n=out["matmul"]["n"])
            jobs.append(("matmul", "tensorflow", ["peak"], {"peak": MATMUL_PEAK}))
        model_rows, peaks = _alternate(args, model, base, jobs, errors)
        rows += model_rows
        if peaks:
            out["matmul"].setdefault("during_turns", []).extend(peaks)

    _rates(rows, args.image_size, out.get("matmul", {}).get("peak_gflops"))
    _ratios(rows)
    out["throughput"] = rows

    if not args.no_cold_start:
        out["cold_start"] = _cold_start(args, errors)
    out["errors"] = errors
    out["wall_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    return out


def _alternate(args, model, base, jobs, errors):
    """Starts one server per framework, then times their calls in turn.

    Returns the rows, and the matmul peak of each batch size's turns where a
    job times it (`MATMUL_PEAK`), which every row of that batch size
    carries as `matmul_peak_gflops`.

    For each batch size, every repetition gives each case one turn (the
    starting case rotates): an untimed call, then `--burst` timed ones; a
    pause between turns lets the previous framework's worker threads go idle. Drifts of the machine's speed, which
    are large on shared virtual machines, then fall on all frameworks alike.
    """
    servers = []
    for calls, backend, modes, names in jobs:
        _log(f"{model}: start {calls} on {backend}: {', '.join(names[m] for m in modes)}")
        task = _task(args, "serve", calls=calls, modes=modes, no_triton=calls != "timm", **base)
        try:
            servers.append((Server(task, backend), modes, names))
        except Exception as error:  # noqa: BLE001 - reported in the results
            errors.append(f"{model} {calls} {backend}: {error}")
            _log(f"  FAILED: {str(error)[-300:]}")
    rows, peaks = [], []
    for batch in args.batch_sizes:
        cases = [(server, mode, names[mode]) for server, modes, names in servers for mode in modes]
        times = {name: [] for _, _, name in cases}
        budgeted = max(sum(name != MATMUL_PEAK for _, _, name in cases), 1)  # the peak's turns are short
        started = time.perf_counter()
        for repeat in range(args.repeats):
            shift = repeat % max(len(cases), 1)
            for server, mode, name in cases[shift:] + cases[:shift]:
                if server.proc.poll() is not None:
                    continue
                try:
                    times[name] += server.time_calls(mode, batch, args.burst)
                except Exception as error:  # noqa: BLE001
                    errors.append(f"{model} {name} b{batch}: {error}")
                time.sleep(args.pause)
            if (repeat + 1) * args.burst >= 3 and time.perf_counter() - started > args.max_seconds * budgeted:
                break
        peak = None
        if times.get(MATMUL_PEAK):
            peak_times = times.pop(MATMUL_PEAK)
            peak = matmul_gflops(base["matmul_n"], statistics.median(peak_times))
            peaks.append({"model": model, "batch": batch, "gflops": peak, "times_s": peak_times})
            _log(f"  {MATMUL_PEAK:48s} b{batch:<3d} {peak:9.1f} GFLOP/s (median)")
        for server, mode, name in cases:
            if not times.get(name):
                continue
            row = {"framework": name, "model": model,
                   "first_call_s": server.first_call_s.get(f"{mode} {batch}"), **_summary(times[name], batch),
                   "matmul_peak_gflops": peak}
            rows.append(row)
            _log(f"  {name:48s} b{batch:<3d} {row['latency_s'] * 1e3:9.1f} ms "
                 f"{row['images_per_s']:8.2f} img/s  ({len(times[name])} calls)")
    for server, _, _ in servers:
        server.close()
    return rows, peaks


def _rates(rows, image_size, start_peak):
    """Each row's GFLOP/s, and its fractions of the peak timed in its turns and of `start_peak`."""
    for row in rows:
        row["gflops_per_s"] = gflop_per_image(row["model"], image_size) * row["images_per_s"]
        peak = row.get("matmul_peak_gflops")
        row["fraction_of_matmul_peak"] = row["gflops_per_s"] / peak if peak else None
        row["fraction_of_start_peak"] = row["gflops_per_s"] / start_peak if start_peak else None


def _ratios(rows):
    """Per row of ours: peer throughput ratios (ours / peer; > 1 means ours is faster)."""
    index = {(r["framework"], r["model"], r["batch"]): r for r in rows}
    for r in rows:
        if not r["framework"].startswith("convnext_zoo"):
            continue
        r["speedup_vs"] = {}
        for peer in PEERS:
            p = index.get((peer, r["model"], r["batch"]))
            if p:
                r["speedup_vs"][peer] = r["images_per_s"] / p["images_per_s"]


def _cold_start(args, errors):
    os.makedirs(args.cache_dir, exist_ok=True)
    _log(f"cold start fixtures in {args.cache_dir}")
    try:
        fixtures, _ = run_worker(_task(args, "fixtures", variants=args.cold_variants, dir=args.cache_dir))
    except Exception as error:  # noqa: BLE001
        errors.append(f"cold start fixtures: {error}")
        return []
    rows = []
    for variant in args.cold_variants:
        f = fixtures[variant]
        cases = [("timm", f["weights_file"], "timm.create_model (local file)"),
                 ("convnext_zoo timm-dir", f["timm_dir"], "from_preset, timm dir (converted on load)"),
                 ("convnext_zoo keras-preset", f["keras_dir"], "from_preset, Keras-native preset")]
        runs = {kind: [] for kind, _, _ in cases}
        for _ in range(args.cold_repeats):
            for kind, path, label in cases:
                task = _task(args, "cold", kind=kind, path=path, variant=variant,
                             weights_file=f["weights_file"], no_triton=kind != "timm")
                try:
                    result, _ = run_worker(task)
                except Exception as error:  # noqa: BLE001
                    errors.append(f"cold start {variant} {kind}: {error}")
                    _log(f"  FAILED {label}: {str(error)[-300:]}")
                    continue
                runs[kind].append(result)
                _log(f"cold v1_{variant} {label:44s} {result['seconds']:6.2f} s  "
                     f"peak +{result['peak_above_baseline_bytes'] / 2**20:7.1f} MiB")
        for kind, path, label in cases:
            if not runs[kind]:
                continue
            result = dict(runs[kind][0])
            # Medians over the repeats (each a fresh process).
            result["seconds_each"] = [r["seconds"] for r in runs[kind]]
            result["seconds"] = statistics.median(result["seconds_each"])
            peaks = [r["peak_above_baseline_bytes"] for r in runs[kind]]
            result["peak_above_baseline_bytes"] = statistics.median(peaks)
            result["peak_exact"] = all(r["peak_exact"] for r in runs[kind])
            result.update(model=f"v1_{variant}", label=label)
            result["peak_over_weights"] = result["peak_above_baseline_bytes"] / result["weights_bytes"]
            result["phases_s"] = {phase: statistics.median(r["phases_s"][phase] for r in runs[kind])
                                  for phase in result["phases_s"]}
            rows.append(result)
    for r in rows:
        timm_row = next((t for t in rows if t["kind"] == "timm" and t["model"] == r["model"]), None)
        if timm_row:
            r["time_vs_timm"] = r["seconds"] / timm_row["seconds"]
    return rows


def _versions():
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("keras", "keras-hub", "tensorflow", "jax", "torch", "timm", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_json_and_markdown(out, output_dir, stem, text):
    """`{stem}.json` (the results) and `{stem}.md` (`text`) in `output_dir`, each written atomically."""
    os.makedirs(output_dir, exist_ok=True)
    return {"json": _atomic_write(os.path.join(output_dir, stem + ".json"), json.dumps(out, indent=2)),
            "md": _atomic_write(os.path.join(output_dir, stem + ".md"), text)}


def write_results(out, output_dir, stem="bench_cpu"):
    paths = write_json_and_markdown(out, output_dir, stem, markdown(out))
    png = plot(out, os.path.join(output_dir, stem + ".png"))
    if png:
        paths["png"] = png
    return paths


def _atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _seconds(value):
    return "" if value is None else f"{value:.1f}"


def _throughput_table(rows):
    lines = [
        "Median of repeated calls. Speedup = this row's images/s over the peer's (>1: faster). "
        "First call: tracing or compiling for that batch size (for openvino_function at batch 1, "
        "also converting the model).",
        "",
        "| model | framework | batch | latency ms | images/s | % matmul peak | vs timm eager "
        "| vs torch.compile | vs keras.applications | first call s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        frac = r.get("fraction_of_matmul_peak")
        s = r.get("speedup_vs", {})

        def fmt(peer):
            return f"{s[peer]:.2f}x" if peer in s else ""

        lines.append(
            f"| {r['model']} | {r['framework']} | {r['batch']} | {r['latency_s'] * 1e3:.1f} | "
            f"{r['images_per_s']:.2f} | {'' if frac is None else f'{100 * frac:.0f}%'} | "
            f"{fmt('timm eager')} | {fmt('timm torch.compile')} | {fmt('keras.applications')} | "
            f"{_seconds(r.get('first_call_s'))} |"
        )
    return lines


def _yes_no(value):
    return {True: "yes", False: "no"}.get(value, "unknown")


def _on_off(value):
    return {True: "on", False: "off"}.get(value, "unknown")


def markdown(out):
    lines = [
        "# CPU inference benchmark",
        "",
        f"Command: `{out['command']}`  ",
        f"Started (UTC): {out['started_utc']}, wall {out.get('wall_s', 0):.0f} s, "
        f"{out['settings']['threads']} threads, {out['settings']['image_size']} px, float32  ",
        f"Machine: {out['machine'].get('cpu', '?')}, {out['machine']['cpu_count']} CPUs, AVX-512 "
        f"{_yes_no(out['machine'].get('avx512'))}, TensorFlow oneDNN "
        f"{_on_off(out['machine'].get('tensorflow_onednn'))}; {out['machine']['platform']}, "
        f"load average at start {', '.join(f'{x:.2f}' for x in out['machine']['load_average_at_start'])}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items()),
        "",
    ]
    if "matmul" in out:
        m = out["matmul"]
        lines += [f"float32 matmul peak ({m['n']}x{m['n']}), best of a few products at the start: "
                  f"{m['peak_gflops']:.1f} GFLOP/s (NumPy {m['numpy_gflops']:.1f}, torch "
                  f"{m['torch_gflops']:.1f}, TensorFlow {m['tensorflow_gflops']:.1f})", ""]
        if m.get("during_turns"):
            lines += [f"The same {m['library']} product, timed as one more case in every model's "
                      "turns (median GFLOP/s): "
                      + ", ".join(f"{d['model']} b{d['batch']} {d['gflops']:.1f}" for d in m["during_turns"])
                      + ". `% matmul peak` is a row's GFLOP/s over that median (over the start's best: "
                      "`fraction_of_start_peak` in the JSON).", ""]
    if out.get("throughput"):
        lines += _throughput_table(out["throughput"])
    if out.get("cold_start"):
        lines += ["", "## Cold start (fresh process per row)", "",
                  "| model | loader | seconds | vs timm | peak RSS above baseline MiB | x weights size |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in out["cold_start"]:
            lines.append(
                f"| {r['model']} | {r['label']} | {r['seconds']:.2f} | "
                f"{r.get('time_vs_timm', 0):.2f}x | {r['peak_above_baseline_bytes'] / 2**20:.0f} | "
                f"{r['peak_over_weights']:.2f} |"
            )
    phased = [r for r in out.get("cold_start", []) if r.get("phases_s")]
    if phased:
        names = list(phased[0]["phases_s"])
        lines += ["", "Where the `from_preset` time goes (median seconds of each phase over the "
                  "repeats, so they need not add up to the median total):", "",
                  "| model | loader | " + " | ".join(names) + " |",
                  "|---|---|" + "---:|" * len(names)]
        for r in phased:
            lines.append(f"| {r['model']} | {r['label']} | "
                         + " | ".join(f"{r['phases_s'][n]:.2f}" for n in names) + " |")
    if out.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e.splitlines()[0]}" for e in out["errors"]]
    return "\n".join(lines) + "\n"


def plot(out, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'convnext_zoo[bench]'): no plot.")
        return None
    rows = out.get("throughput", [])
    batches = sorted({r["batch"] for r in rows})
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 5), squeeze=False)
    frameworks = list(dict.fromkeys(r["framework"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    width = 0.8 / max(len(frameworks), 1)
    for ax, batch in zip(axes[0], batches):
        for i, fw in enumerate(frameworks):
            xs, ys = [], []
            for j, model in enumerate(models):
                hit = [r for r in rows if r["framework"] == fw and r["model"] == model and r["batch"] == batch]
                if hit:
                    xs.append(j + i * width)
                    ys.append(hit[0]["images_per_s"])
            ax.bar(xs, ys, width, label=fw)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))])
        ax.set_xticklabels(models)
        ax.set_yscale("log")
        ax.set_ylabel("images/s (log)")
        ax.set_title(f"batch {batch}, {out['settings']['image_size']} px, "
                     f"{out['settings']['threads']} threads")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def main(argv=None):
    args = parse_args(argv)
    out = run(args)
    paths = write_results(out, args.output_dir)
    print(markdown(out))
    print("Wrote " + ", ".join(paths.values()))
    return 1 if out["errors"] and not out.get("throughput") else 0


if __name__ == "__main__":
    sys.exit(main())
