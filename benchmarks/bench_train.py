"""CPU training-step benchmark: convnext_zoo on TensorFlow, JAX and PyTorch against timm.

Measures images/s of one training step (forward, backward, AdamW update;
cross-entropy on integer labels; float32) at batch 32 for ConvNeXt V2 atto
and V1 tiny at 224 and 64 px:

- convnext_zoo on each Keras backend (TensorFlow, JAX, PyTorch): the model
  compiled with this package's optimizer (`training.make_optimizer`:
  `LayerDecayAdamW`, constant learning rate, layer decay 1, no EMA) and
  `SparseCategoricalCrossentropy(from_logits=True)`, `jit_compile` left at
  Keras' default ("auto": XLA on JAX, none on TensorFlow on a CPU, eager on
  torch), stepped by `model.train_on_batch` (the train function that `fit`
  runs, one batch per call);
- timm in eager mode with `torch.optim.AdamW` (same learning rate and weight
  decay; no decay on 1-D parameters, as the Keras optimizer excludes biases
  and norms), and with --frameworks ...,timm-compile also timm's module under
  `torch.compile` (the optimizer step stays eager).

The Keras models keep the reference strides at every size
(`adapt_small_inputs=False`), so that every framework runs the same network;
the parameter counts are checked equal. The batch is real photographs
(scikit-image), random crops resized to the image size and normalised with
the ImageNet statistics; the labels are random. A Keras worker builds one
model per image size; the timm worker trains one module at every size (its
first losses at the second size are therefore lower).

Each framework runs in its own worker process (bench_cpu.py's, answering
turns through workers.serve), all with the same thread count. After every
worker has traced and warmed its steps, the orchestrator gives each case one
turn (one timed step) in rotation, round after round, so that a slow spell of
the shared machine hits all frameworks alike. A row's images/s is the batch
over the median step time; its `vs timm eager` is the median over the rounds
of timm's step time over the row's (its images/s over timm's in the same
round; > 1: faster than timm). Results: bench_train.json and bench_train.md in
--output-dir (benchmarks/results/train).

Usage:
    .venv/bin/python benchmarks/bench_train.py                      # default run
    .venv/bin/python benchmarks/bench_train.py --quick --output-dir /tmp/train
    .venv/bin/python benchmarks/bench_train.py --models v2_atto --image-sizes 64 --repeats 9
    .venv/bin/python benchmarks/bench_train.py --allocator jemalloc   # every worker on jemalloc
    .venv/bin/python benchmarks/bench_train.py --models v2_atto,v2_tiny --image-sizes 224 \
        --frameworks tf,fcmae,timm --output-dir benchmarks/results/fcmae   # the cost of masking

--frameworks ...,fcmae adds the FCMAE pre-training step (`convnext_zoo.FCMAE`,
mask ratio 0.6, decoder 512 x 1, AdamW betas 0.9 / 0.95, on TensorFlow) of
the same encoder, reported beside the fine-tuning step (the tf row) as the
median per-round ratio of their step times.
"""

import argparse
import ctypes.util
import datetime
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_cpu  # noqa: E402  (worker processes, threads, versions, timm names)
import workers  # noqa: E402  (machine facts: CPU model, AVX-512)

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
FRAMEWORKS = {  # --frameworks key: (Keras backend of the worker, row label)
    "tf": ("tensorflow", "convnext_zoo tf"),
    "jax": ("jax", "convnext_zoo jax"),
    "torch": ("torch", "convnext_zoo torch"),
    "timm": ("torch", "timm eager"),
    "timm-compile": ("torch", "timm torch.compile"),
    # FCMAE pre-training step of the same encoder (V2 only): the cost of masking and the decoder.
    "fcmae": ("tensorflow", "convnext_zoo tf FCMAE"),
}
FINETUNE_ROW = "convnext_zoo tf"  # the FCMAE rows' `vs fine-tuning` reference
REFERENCE = "timm eager"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "colorwheel")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# === Worker side: runs inside a fresh subprocess ===


def photo_batch(batch, size, seed=0):
    """`batch` real photographs, (batch, size, size, 3) float32, ImageNet-normalised.

    Image i is a random square crop (60-100 % of the short side) of
    scikit-image photograph `PHOTOS[i % 8]`, resized with PIL bicubic.
    """
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(batch):
        photo = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()[..., :3]
        side = int(min(photo.shape[:2]) * rng.uniform(0.6, 1.0))
        top = rng.integers(0, photo.shape[0] - side + 1)
        left = rng.integers(0, photo.shape[1] - side + 1)
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
        images.append(np.asarray(crop, np.float32) / 255.0)
    return ((np.stack(images) - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


def labels(batch, seed=0):
    import numpy as np

    return np.random.default_rng(seed + 1).integers(0, 1000, size=(batch,)).astype(np.int32)


# Never hand freed pages back to the kernel: XLA's temporaries (about 2.4 GB a
# step for V2 atto at 224 px) are then reused instead of faulted in afresh.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def allocator_env(allocator, find=ctypes.util.find_library):
    """The environment variables that give every worker `allocator` ("default" or "jemalloc").

    The allocator moves every framework's CPU training step by 1.3-2x
    (benchmarks/README.md), so all peers of one run share it.

    Raises:
        ValueError: jemalloc asked for but not found on the library path.
    """
    if allocator == "default":
        return {}
    library = find("jemalloc")
    if library is None:
        raise ValueError("--allocator jemalloc: no jemalloc library on this machine. Install it (Debian, "
                         "Ubuntu: apt-get install libjemalloc2) or pass --allocator default.")
    return {"LD_PRELOAD": library, "MALLOC_CONF": JEMALLOC_CONF}


def _optimizer_plan():
    """A `training.make_optimizer` plan: constant learning rate, no layer decay, no EMA."""
    return {"lr": LEARNING_RATE, "min_lr": LEARNING_RATE, "warmup_steps": 0, "total_steps": 10**9,
            "weight_decay": WEIGHT_DECAY, "layer_decay": 1.0, "layer_decay_type": "single",
            "ema": False, "ema_decay": 0.9999}


def steps_keras(task):
    """{size: (step, weights)} for convnext_zoo on this process's Keras backend, and facts."""
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        bench_cpu._tf_threads(task["threads"])
    elif backend == "torch":
        import torch

        bench_cpu._torch_threads(torch, task["threads"])
    import convnext_zoo
    from convnext_zoo import internals, training

    factory = convnext_zoo.create_convnext_v1 if task["family"] == "v1" else convnext_zoo.create_convnext_v2
    steps, facts = {}, {}
    for size in task["sizes"]:
        keras.utils.set_random_seed(size)
        x = keras.ops.convert_to_tensor(photo_batch(task["batch"], size))
        if task["calls"] == "fcmae":
            # The pre-training step: masked encoder, decoder, loss on the removed patches.
            from convnext_zoo import pretrain

            encoder = factory(task["variant"], include_top=False, input_shape=(size, size, 3),
                              adapt_small_inputs=False)
            model = convnext_zoo.FCMAE(encoder, seed=size)
            optimizer = pretrain.make_optimizer({**_optimizer_plan(), "betas": (0.9, 0.95)})
            model.compile(optimizer=optimizer)
            steps[size] = (lambda m=model, x=x: float(m.train_on_batch(x, return_dict=True)["loss"]),
                           lambda m=model: [keras.ops.convert_to_numpy(v) for v in m.encoder.trainable_variables])
            facts = {"params": encoder.count_params(), "optimizer": type(optimizer).__name__,
                     "path": f"FCMAE train_on_batch (mask ratio {model.mask_ratio}, decoder "
                             f"{model.decoder_dim}), jit_compile={model.jit_compile}",
                     "decoder_params": model.decoder.count_params()}
            continue
        model = factory(task["variant"], num_classes=1000, input_shape=(size, size, 3),
                        adapt_small_inputs=False)
        optimizer = training.make_optimizer(model, _optimizer_plan())
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        y = keras.ops.convert_to_tensor(labels(task["batch"]))
        steps[size] = (lambda m=model, x=x, y=y: float(m.train_on_batch(x, y, return_dict=True)["loss"]),
                       lambda m=model: [keras.ops.convert_to_numpy(v) for v in m.trainable_variables])
        facts = {"params": model.count_params(), "optimizer": type(optimizer).__name__,
                 "path": f"train_on_batch, jit_compile={model.jit_compile}"}
    facts["onednn"] = internals.onednn_enabled() if backend == "tensorflow" else _torch_onednn(backend)
    return steps, facts


def _torch_onednn(backend):
    """torch's oneDNN (mkldnn) for the torch backends; None (not applicable) for JAX."""
    if backend != "torch":
        return None
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def steps_timm(task):
    """{size: (step, weights)} for timm, eager or under torch.compile, and facts."""
    import timm
    import torch
    import torch.nn.functional as F

    bench_cpu._torch_threads(torch, task["threads"])
    name = bench_cpu.TIMM_NAMES[task["family"]].format(task["variant"])
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000).train()
    net = torch.compile(model) if task["compile"] else model
    # No weight decay on biases and norms (1-D tensors), as LayerDecayAdamW excludes them.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LEARNING_RATE)
    steps = {}
    for size in task["sizes"]:
        x = torch.from_numpy(photo_batch(task["batch"], size).transpose(0, 3, 1, 2).copy())
        y = torch.from_numpy(labels(task["batch"])).long()

        def step(x=x, y=y):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            return loss.item()

        steps[size] = (step, lambda: [p.detach().numpy().copy() for p in model.parameters()])
    facts = {"params": sum(p.numel() for p in model.parameters()), "optimizer": "torch.optim.AdamW",
             "path": "torch.compile(model), eager AdamW" if task["compile"] else "eager",
             "onednn": _torch_onednn("torch")}
    return steps, facts


def worker_serve(task):
    """Builds this framework's steps, checks they learn, then times turns (workers.serve).

    READY reports per image size the first step's seconds (tracing,
    compiling), the losses of the first and warm-up steps on the repeated
    batch, and the largest change of any weight over them; and the
    parameter count, optimizer, step path, oneDNN state and the allocator
    this process runs (read off its memory map: workers.allocator).
    """
    import numpy as np

    steps, facts = (steps_timm if task["calls"] == "timm" else steps_keras)(task)
    ready = {**facts, "allocator": workers.allocator(), "cases": {}}
    for size, (step, weights) in steps.items():
        before = weights()
        start = time.perf_counter()
        losses = [step()]
        first = time.perf_counter() - start
        losses += [step() for _ in range(task["warmup"])]
        change = max(float(np.max(np.abs(a - b))) for a, b in zip(weights(), before))
        ready["cases"][str(size)] = {"first_step_s": first, "losses": losses, "max_weight_change": change}

    def turn(key, count):
        # No untimed step first (unlike inference): a training step reads and
        # writes its weights, two Adam moments and its activations, far more
        # than the caches hold, so the previous turn leaves nothing to refill.
        step = steps[int(key.split()[0])][0]
        return bench_cpu._time_calls(step, 0, count)

    workers.serve(ready, turn)


# === Orchestrator side ===


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: V2 atto, 32 px, batch 2, tf and timm, 2 rounds")
    p.add_argument("--models", default=None, help="comma list of v2_atto, v1_tiny, ... "
                   "(default v2_atto,v1_tiny)")
    p.add_argument("--image-sizes", default=None, help="default 224,64 (quick: 32)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (quick: 2)")
    p.add_argument("--frameworks", default=None,
                   help=f"comma list of {', '.join(FRAMEWORKS)}; timm is the reference and "
                        "required (default tf,jax,torch,timm; quick: tf,timm)")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds: timed steps per case (default 7, quick: 2)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget of each model's rounds: no new round starts once they have "
                        "taken this long, after at least one (default 300, quick: 120)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps after the first, per case (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for every framework (default: all cores)")
    p.add_argument("--allocator", choices=("default", "jemalloc"), default="default",
                   help="memory allocator of every worker: the C library's (default) or jemalloc "
                        f"preloaded with MALLOC_CONF={JEMALLOC_CONF} (needs libjemalloc)")
    p.add_argument("--output-dir", default=os.path.join(HERE, "results", "train"))
    args = p.parse_args(argv)
    try:
        args.allocator_env = allocator_env(args.allocator)
    except ValueError as error:
        p.error(str(error))
    quick = args.quick

    def default(value, normal, small):
        return value if value is not None else (small if quick else normal)

    args.models = default(args.models, "v2_atto,v1_tiny", "v2_atto").split(",")
    for model in args.models:
        family, _, variant = model.partition("_")
        if family not in bench_cpu.TIMM_NAMES or not variant or "_" in variant:
            p.error(f"--models takes names like v2_atto or v1_tiny. Received: {model!r}.")
    sizes = default(args.image_sizes, "224,64", "32")
    try:
        args.image_sizes = [int(s) for s in sizes.split(",")]
    except ValueError:
        p.error(f"--image-sizes takes a comma list of pixel sizes such as 224,64. Received: {sizes!r}.")
    if min(args.image_sizes) < 32:
        p.error(f"--image-sizes must be at least 32 (the network divides by 32). Received: {sizes!r}.")
    args.frameworks = default(args.frameworks, "tf,jax,torch,timm", "tf,timm").split(",")
    unknown = [f for f in args.frameworks if f not in FRAMEWORKS]
    if unknown or "timm" not in args.frameworks:
        p.error(f"--frameworks takes {', '.join(FRAMEWORKS)}, timm included (the reference). "
                f"Received: {','.join(args.frameworks)!r}.")
    if "fcmae" in args.frameworks and any(not m.startswith("v2_") for m in args.models):
        p.error(f"--frameworks fcmae needs ConvNeXt V2 models (FCMAE is V2's pre-training). "
                f"Received: --models {','.join(args.models)}.")
    args.batch_size = default(args.batch_size, 32, 2)
    args.repeats = default(args.repeats, 7, 2)
    args.max_seconds = default(args.max_seconds, 300.0, 120.0)
    args.warmup = default(args.warmup, 2, 2)
    for name in ("batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1. Received: {getattr(args, name)}.")
    if args.warmup < 0 or args.max_seconds <= 0:
        p.error(f"--warmup must be >= 0 and --max-seconds > 0. Received: {args.warmup}, {args.max_seconds}.")
    return args


def _start(args, model, key):
    backend, label = FRAMEWORKS[key]
    family, variant = model.split("_")
    calls = "timm" if key.startswith("timm") else "fcmae" if key == "fcmae" else "keras"
    task = {"worker": "bench_train:worker_serve", "calls": calls,
            "compile": key == "timm-compile", "family": family, "variant": variant,
            "sizes": args.image_sizes, "batch": args.batch_size, "warmup": args.warmup,
            "threads": args.threads, "no_triton": not key.startswith("timm"), "env": args.allocator_env}
    bench_cpu._log(f"{model}: start {label} ({backend} backend)")
    return bench_cpu.Server(task, backend), label


def _alternate(args, model, errors):
    """Starts one worker per framework for `model`, then times rounds of turns.

    Returns `(servers' READY reports by label, {(label, size): {round: seconds}})`.
    """
    servers, ready = {}, {}
    for key in args.frameworks:
        try:
            server, label = _start(args, model, key)
        except Exception as error:  # noqa: BLE001 - reported in the results
            errors.append(f"{model} {key}: not ready ({str(error)[-1500:]})")
            bench_cpu._log("  FAILED: " + errors[-1][-500:])
            continue
        # bench_cpu.Server keeps the READY report as `first_call_s`.
        servers[label], ready[label] = server, server.first_call_s
        bench_cpu._log(f"  ready: {server.first_call_s['path']}, {server.first_call_s['params']} params, "
                       + ", ".join(f"{s} px first step {c['first_step_s']:.1f} s, losses "
                                   + " ".join(f"{v:.3f}" for v in c["losses"])
                                   for s, c in server.first_call_s["cases"].items()))
    try:
        check_allocators(args.allocator, ready)
    except RuntimeError:
        for server in servers.values():
            server.close()
        raise
    cases = [(label, size) for size in args.image_sizes for label in servers]
    times = {case: {} for case in cases}
    exited = set()
    started = time.perf_counter()
    for repeat in range(args.repeats):
        if repeat and time.perf_counter() - started > args.max_seconds:
            errors.append(f"{model}: time budget ({args.max_seconds:.0f} s) spent after {repeat} rounds")
            break
        shift = repeat % max(len(cases), 1)
        for label, size in cases[shift:] + cases[:shift]:
            server = servers[label]
            if server.proc.poll() is not None:
                if label not in exited:  # reported once; its rounds so far are kept
                    exited.add(label)
                    errors.append(f"{model} {label}: worker exited with code {server.proc.returncode} "
                                  f"before round {repeat + 1}")
                continue
            try:
                [seconds] = server.time_calls(str(size), args.batch_size, 1)
                times[(label, size)][repeat] = seconds
            except Exception as error:  # noqa: BLE001
                errors.append(f"{model} {label} {size} px: {str(error)[-1500:]}")
        bench_cpu._log(f"  round {repeat + 1} ({time.perf_counter() - started:.0f} s): "
                       + ", ".join(f"{label} {size} px {times[(label, size)].get(repeat, float('nan')):.2f} s"
                                   for label, size in cases))
    for server in servers.values():
        server.close()
    return ready, times


def check_allocators(requested, ready):
    """Raises when a worker runs another allocator than `--allocator` asked for.

    A worker that cannot tell ("unknown": no /proc) is taken at its word.
    """
    wrong = {label: facts["allocator"] for label, facts in ready.items()
             if facts["allocator"] not in (requested, "unknown")}
    if wrong:
        raise RuntimeError(f"--allocator {requested}, but these workers run another allocator: {wrong}. "
                           "Check that the library the LD_PRELOAD names can be loaded (ldconfig -p | grep "
                           "jemalloc) and run again.")


def rows_of(model, batch, ready, times):
    """One row per (framework, size) that was timed, with its ratio to timm eager.

    `vs_timm_eager` is the median over the rounds where both were timed of
    timm's step seconds over this row's (= this row's images/s over timm's
    in the same round).
    """
    import numpy as np

    rows = []
    for (label, size), by_round in times.items():
        if not by_round:
            continue
        seconds = [by_round[r] for r in sorted(by_round)]
        rates = [batch / s for s in seconds]
        q1, q3 = (float(v) for v in np.percentile(rates, [25, 75]))
        reference = times.get((REFERENCE, size), {})
        ratios = [reference[r] / by_round[r] for r in sorted(by_round) if r in reference]
        facts = ready[label]
        case = facts["cases"][str(size)]
        finetune = times.get((FINETUNE_ROW, size), {}) if label == FRAMEWORKS["fcmae"][1] else {}
        vs_finetune = [finetune[r] / by_round[r] for r in sorted(by_round) if r in finetune]
        rows.append({
            "vs_finetune_step": statistics.median(vs_finetune) if vs_finetune else None,
            "framework": label, "model": model, "image_size": size, "batch": batch,
            "path": facts["path"], "optimizer": facts["optimizer"], "params": facts["params"],
            "onednn": facts["onednn"],
            "seconds_per_step": statistics.median(seconds), "images_per_s": batch / statistics.median(seconds),
            "images_per_s_q1": q1, "images_per_s_q3": q3, "images_per_s_iqr": q3 - q1,
            "vs_timm_eager": statistics.median(ratios) if ratios else None, "turn_ratios": ratios,
            "times_s": seconds, "rounds": sorted(by_round), "first_step_s": case["first_step_s"],
            "warmup_losses": case["losses"], "max_weight_change": case["max_weight_change"],
        })
    return rows


def run(args):
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.monotonic()
    out = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": workers.machine(),
        "settings": {k: bench_cpu._within_repo(v) if k == "output_dir" else v for k, v in vars(args).items()},
        "training": {"learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY, "dtype": "float32",
                     "loss": "cross-entropy on integer labels (random), logits",
                     "data": "scikit-image photographs, random crops, ImageNet-normalised"},
        "versions": bench_cpu._versions(), "reference": REFERENCE, "rows": [], "errors": [],
    }
    for model in args.models:
        ready, times = _alternate(args, model, out["errors"])
        counts = {label: facts["params"] for label, facts in ready.items()
                  if label != FRAMEWORKS["fcmae"][1]}  # the FCMAE encoder has no head
        if len(set(counts.values())) > 1:
            raise RuntimeError(f"{model}: the frameworks build different networks (parameter counts "
                               f"{counts}); the comparison would be meaningless. Fix the model first.")
        out["rows"] += rows_of(model, args.batch_size, ready, times)
    out["machine"]["load_average_at_end"] = list(os.getloadavg())
    out["wall_s"] = time.monotonic() - clock
    return out


def _onednn(value):
    return {True: "on", False: "off", None: "n/a"}[value]


def markdown(out):
    m, s = out["machine"], out["settings"]
    lines = [
        "# CPU training-step benchmark: images/s against timm",
        "",
        f"Command: `{out['command']}`  ",
        f"Started (UTC): {out['started_utc']}, wall {out.get('wall_s', 0):.0f} s, batch {s['batch_size']}, "
        f"{s['threads']} threads for every framework, float32, allocator {s['allocator']}"
        + (f" (MALLOC_CONF={s['allocator_env']['MALLOC_CONF']})" if s["allocator_env"] else "") + "  ",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, AVX-512 {'yes' if m['avx512'] else 'no'}; load average "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} at start, "
        f"{', '.join(f'{x:.1f}' for x in m.get('load_average_at_end', []))} at end  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items() if v) + "  ",
        f"Step: forward, backward, AdamW (lr {out['training']['learning_rate']:g}, weight decay "
        f"{out['training']['weight_decay']:g}, none on biases and norms); {out['training']['loss']}; "
        f"{out['training']['data']}",
        "",
        "images/s = batch / median step seconds over the rounds; IQR: interquartile range of the per-round "
        "images/s; vs timm eager: median over the rounds of this row's images/s over timm eager's in the "
        "same round (> 1: faster). oneDNN: TensorFlow's (tf row) or torch's (torch rows).",
        "",
        "| model | px | framework | step | optimizer | images/s | IQR | vs timm eager | rounds | oneDNN "
        "| first step s |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in sorted(out["rows"], key=lambda r: (r["model"], -r["image_size"])):
        ratio = "" if r["vs_timm_eager"] is None else f"{r['vs_timm_eager']:.2f}x"
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r['framework']} | {r['path']} | {r['optimizer']} | "
            f"{r['images_per_s']:.2f} | {r['images_per_s_iqr']:.2f} | {ratio} | {len(r['times_s'])} | "
            f"{_onednn(r['onednn'])} | {r['first_step_s']:.1f} |")
    fcmae = [r for r in out["rows"] if r.get("vs_finetune_step") is not None]
    if fcmae:
        lines += ["", "## FCMAE pre-training step against the fine-tuning step of the same encoder", "",
                  "Same worker kind (TensorFlow), same batch, rounds alternating with the fine-tuning row; "
                  "ratio: median over the rounds of the fine-tuning step's seconds over the FCMAE step's "
                  "(< 1: pre-training is slower). The FCMAE step runs the encoder masked (masks multiplied "
                  "in before every block and depthwise convolution, GRN over visible positions) plus the "
                  "decoder (one 512-wide ConvNeXt V2 block at the last stage's grid).", "",
                  "| model | px | FCMAE images/s | fine-tuning images/s | FCMAE / fine-tuning |",
                  "|---|---:|---:|---:|---:|"]
        for r in sorted(fcmae, key=lambda r: (r["model"], -r["image_size"])):
            tuned = next((t for t in out["rows"] if t["framework"] == FINETUNE_ROW and t["model"] == r["model"]
                          and t["image_size"] == r["image_size"]), None)
            lines.append(f"| {r['model']} | {r['image_size']} | {r['images_per_s']:.2f} | "
                         f"{tuned['images_per_s']:.2f} | {r['vs_finetune_step']:.2f}x |" if tuned else "")
    if out["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e.splitlines()[0][:300]}" for e in out["errors"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    out = run(args)
    paths = bench_cpu.write_json_and_markdown(out, args.output_dir, "bench_train", markdown(out))
    print(markdown(out))
    print("Wrote " + ", ".join(paths.values()))
    return 0 if out["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
