"""Where the time of one forward pass goes: per-op totals, TensorFlow vs timm.

Runs, each in its own process with the same thread count, the convnext_zoo
TensorFlow inference function (TensorFlow's profiler, ops grouped by kernel
type, e.g. `_MklNativeFusedMatMul` = matmul + bias + GELU fused by oneDNN)
and timm in eager mode (torch.profiler, grouped by aten op), and prints the
mean milliseconds per forward pass of the heaviest op types. This is the
profile behind the "Speed on a CPU" section of benchmarks/README.md.

`--frameworks openvino` profiles `openvino_function`'s compiled model
(OpenVINO's per-node counters, grouped by node type and kernel, e.g.
`FullyConnected [brgemm_avx512_f32]`). Its matmul-like nodes (fully
connected, convolutions) also get their GFLOP/s, counted from their shapes;
with `--peak`, this machine's float32 matmul peak is measured first (the
same measurement as bench_cpu.py's) and each rate is also given as a
fraction of it.

`--frameworks onednn` lists the oneDNN primitives that TensorFlow runs for
`inference_function` (oneDNN's verbose log), one line per kind,
implementation, fused post-ops and problem shape, with the GFLOP/s of the
matmuls (inner products) and convolutions. It shows, for instance, the
exact GELU that TensorFlow fuses into each first MLP matmul
(`+eltwise_gelu_erf`) and what it costs next to the second matmul, which
has the same FLOPs and no post-op. Where TensorFlow runs without oneDNN
(CPUs without AVX-512 by default, or `TF_ENABLE_ONEDNN_OPTS=0`), it says so
instead of listing primitives; `TF_ENABLE_ONEDNN_OPTS=1` turns oneDNN on.
The TensorFlow profiles say in their header whether oneDNN was on.

`--frameworks jax` profiles the JAX backend's `inference_function` with
JAX's profiler: the thunks XLA's CPU runtime ran (its fusions and library
calls, `ynn_fusion` for a matmul or reduction handed to YNNPACK), grouped by
the layer and operation each came from (`mlp_fc1: dot_general`). Its header
gives the executor's time per pass in place of a step time.

`--tf-layer-norm` swaps, for the TensorFlow profile only, the form of the
layer norms (see `layer_norm_form`): the library's one oneDNN kernel each,
the portable seven kernels, or XLA clusters. `--compare-layer-norms` times
the three forms against each other instead, calls alternated in one process.

`--train` profiles a training step instead of a forward pass, for `tf`,
`jax` and `timm`: bench_train.py's step (forward, backward, AdamW, on
scikit-image photographs; `train_on_batch` on TensorFlow and JAX, eager
timm), at `--batch` (32 in that benchmark). The TensorFlow profile then also
groups the ops by the layer they come from (`mlp_fc1`, `norm`, `conv_dw`, the
optimizer's `layer_decay_adam_w`, ...; the gradient ops with their layer),
which shows where a step's element-wise work goes. The JAX profile labels
each thunk with its layer as for a forward pass, the gradient's marked
`(gradient)` (`conv_dw: dot_general (gradient)`), reading the layers off
the step's compiled module, which XLA writes out for it (`--xla_dump_to`).

Each header also gives the median wall-clock time of a call timed without
the profiler, and the sum of the op times. Their difference is the cost of a
call that no kernel accounts for (dispatch, the executor, Python). At a small
`--image-size` the kernels have little work, so the wall time is close to
that fixed cost of a call.

Usage:
    .venv/bin/python benchmarks/profile_ops.py                    # V1 tiny, batch 1
    .venv/bin/python benchmarks/profile_ops.py --model v1_tiny --batch 16 --frameworks openvino --peak
    .venv/bin/python benchmarks/profile_ops.py --model v1_tiny --frameworks onednn --top 12 --peak
    .venv/bin/python benchmarks/profile_ops.py --model v2_atto --frameworks tf --tf-layer-norm portable
    .venv/bin/python benchmarks/profile_ops.py --model v2_atto --compare-layer-norms --repeats 50
    .venv/bin/python benchmarks/profile_ops.py --model v2_atto --batch 16
    .venv/bin/python benchmarks/profile_ops.py --model v1_tiny --frameworks jax,timm
    .venv/bin/python benchmarks/profile_ops.py --model v2_atto --image-size 32   # fixed cost of a call
    .venv/bin/python benchmarks/profile_ops.py --model v2_atto --batch 32 --train --passes 2 --repeats 3
    .venv/bin/python benchmarks/profile_ops.py --model v2_atto --batch 32 --train --frameworks jax --passes 2
"""

import argparse
import collections
import contextlib
import glob
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_cpu  # noqa: E402  (thread settings, inputs, model names)


def _wall_ms(call, repeats):
    """Median milliseconds of `call()` over `repeats` calls (after the warm-up)."""
    return 1000 * statistics.median(bench_cpu._time_calls(call, 0, repeats))


LAYER_NORM_FORMS = ("library", "portable", "xla")


@contextlib.contextmanager
def layer_norm_form(form):
    """Inside: `inference_function` traces its layer norms in another form (comparison only).

    - "library": as the library does (one oneDNN `_MklLayerNorm` kernel
      each where TensorFlow has it, see `convnext_zoo.layers.fused_layer_norms`);
    - "portable": the portable TensorFlow form, seven element-wise and
      reduction kernels each, as everywhere outside `inference_function`
      and `predict` on one batch (and where oneDNN is missing);
    - "xla": the portable form (`convnext_zoo.layers._short_layer_norm`),
      compiled by XLA as a cluster of its own inside the graph.
    Models traced inside use that form; the library is restored on exit.
    """
    if form not in LAYER_NORM_FORMS:
        raise ValueError(f"layer norm form must be one of {LAYER_NORM_FORMS}. Received: {form!r}.")
    from convnext_zoo import layers

    library_call = layers.PointwiseLayerNorm.call
    library_available = layers.onednn_layer_norm_available
    if form != "library":
        layers.onednn_layer_norm_available = lambda: False
    if form == "xla":
        import tensorflow as tf

        xla = tf.function(layers._short_layer_norm, jit_compile=True, autograph=False)

        def call(self, inputs, training=None):
            if not layers._tensorflow_graph_kernels() or self.compute_dtype != "float32":
                return library_call(self, inputs, training=training)
            flat = tf.reshape(inputs, [-1, inputs.shape[-1]])
            gamma, beta = tf.convert_to_tensor(self.gamma.value), tf.convert_to_tensor(self.beta.value)
            return tf.reshape(xla(flat, gamma, beta, self.epsilon), tf.shape(inputs))

        layers.PointwiseLayerNorm.call = call
    try:
        yield
    finally:
        layers.PointwiseLayerNorm.call = library_call
        layers.onednn_layer_norm_available = library_available


def _tensorflow_call(family, variant, batch, size, threads, repeats):
    """`(call, wall ms)`: one `inference_function` pass on fixed images, warmed up and timed."""
    import tensorflow as tf

    bench_cpu._tf_threads(threads)
    from convnext_zoo.inference import inference_function

    model = bench_cpu._keras_model(family, variant, size)
    forward = inference_function(model)
    images = tf.constant(bench_cpu._images(batch, size))

    def call():
        return forward(images).numpy()

    for _ in range(3):
        call()
    return call, _wall_ms(call, repeats)


def _training_step(framework, family, variant, batch, size, threads, repeats):
    """`(call, wall ms)`: bench_train.py's training step of `framework` ("tf", "jax" or "timm"), warmed up and
    timed."""
    import bench_train

    task = {"family": family, "variant": variant, "sizes": [size], "batch": batch, "threads": threads,
            "calls": "timm" if framework == "timm" else "keras", "compile": False}
    steps, _ = (bench_train.steps_timm if framework == "timm" else bench_train.steps_keras)(task)
    call = steps[size][0]
    for _ in range(2):
        call()
    return call, _wall_ms(call, repeats)


# A TensorFlow op's layer: the block layer in its name (`stages_0_blocks_1_mlp_fc1_1/...` -> `mlp_fc1`),
# else the first named scope below the model's (`stem_1_1`, `head_fc`, `stages_1_downsample_0_1`).
_BLOCK_LAYER = re.compile(r"stages_\d+_blocks_\d+_([a-z_]+?\d?)(?:_\d+)?/")
_SCOPE = re.compile(r"^(?:gradient_tape/)?(?:[^/]*convnext[^/]*/)*([^/]+)")


def layer_of(op_name):
    """The layer (or other scope) that a TensorFlow op of a training step comes from."""
    block = _BLOCK_LAYER.search(op_name + "/")
    if block:
        return block.group(1)
    scope = _SCOPE.match(op_name).group(1)
    scope = re.sub(r"^stages_\d+_", "", re.sub(r"(_\d+)+$", "", scope))
    return scope


def profile_tensorflow(family, variant, batch, size, passes, threads, repeats, train=False):
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    if train:
        call, wall = _training_step("tf", family, variant, batch, size, threads, repeats)
    else:
        call, wall = _tensorflow_call(family, variant, batch, size, threads, repeats)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(passes):
            call()
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    totals, counts, layers = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                kind = name.split(":")[-1]
                totals[kind] += event.duration_ps / 1e9 / passes
                counts[kind] += 1
                if ":" in name and kind != "Process":
                    layers[layer_of(name.rsplit(":", 1)[0])] += event.duration_ps / 1e9 / passes
    # "Process" spans a whole executor step; the ops nest inside it.
    step = totals.pop("Process", 0.0)
    counts.pop("Process", None)
    return wall, step, totals, {k: c // passes for k, c in counts.items()}, {}, layers if train else {}


def compare_layer_norms(family, variant, batch, size, threads, repeats):
    """Median ms per `inference_function` call with each layer norm form, calls alternated.

    One process, one model, one traced function per form; each round calls
    every form once, so a drift of the machine's speed hits all of them.
    """
    import tensorflow as tf

    bench_cpu._tf_threads(threads)
    from convnext_zoo.inference import inference_function

    model = bench_cpu._keras_model(family, variant, size)
    images = tf.constant(bench_cpu._images(batch, size))
    forwards = {}
    for form in LAYER_NORM_FORMS:
        with layer_norm_form(form):  # traced here, in this form
            forwards[form] = inference_function(model)
            for _ in range(3):
                forwards[form](images).numpy()
    times = {form: [] for form in forwards}
    for _ in range(repeats):
        for form, forward in forwards.items():
            start = time.perf_counter()
            forward(images).numpy()
            times[form].append(1000 * (time.perf_counter() - start))
    return {form: statistics.median(ms) for form, ms in times.items()}


# oneDNN's verbose log (ONEDNN_VERBOSE=1), one line per primitive run:
# onednn_verbose,v1,primitive,exec,cpu,<kind>,<implementation>,<propagation>,
# <memory descriptors>,<attributes>,<auxiliary>,<problem>,<milliseconds>
# A 2-D convolution's problem (a 3-D one, with depth fields, does not match).
_ONEDNN_CONV = re.compile(r"(?:g(\d+))?mb(\d+)_ic(\d+)oc(\d+)_ih\d+oh(\d+)kh(\d+)\D.*?iw\d+ow(\d+)kw(\d+)")


def _onednn_flops(kind, problem):
    """2 x multiply-adds of a oneDNN inner product or convolution, from its problem string; else 0."""
    if kind == "inner_product":
        found = re.fullmatch(r"mb(\d+)ic(\d+)(?:ih(\d+))?(?:iw(\d+))?oc(\d+)", problem)
        if not found:
            return 0
        mb, ic, ih, iw, oc = (int(v) if v else 1 for v in found.groups())
        return 2 * mb * ic * ih * iw * oc
    if kind == "convolution":
        found = _ONEDNN_CONV.match(problem)
        if not found:
            return 0
        groups, mb, ic, oc, oh, kh, ow, kw = (int(v) if v else 1 for v in found.groups())
        return 2 * mb * oc * oh * ow * (ic // groups) * kh * kw
    return 0


def parse_onednn_verbose(lines):
    """`{(kind, implementation, post-ops, problem): [runs, ms, flops]}` of the `exec` lines."""
    groups = {}
    for line in lines:
        fields = line.rstrip("\n").split(",")
        if len(fields) < 13 or fields[0] != "onednn_verbose" or fields[3] != "exec":
            continue
        kind, implementation, attributes, problem = fields[5], fields[6], fields[9], fields[-2]
        post_ops = " ".join(a.split(":", 1)[1] for a in attributes.split() if a.startswith("attr-post-ops:"))
        entry = groups.setdefault((kind, implementation, post_ops, problem), [0, 0.0, 0])
        entry[0] += 1
        entry[1] += float(fields[-1])
        entry[2] += _onednn_flops(kind, problem)
    return groups


def profile_onednn(family, variant, batch, size, passes, threads, repeats):
    """`inference_function`'s oneDNN primitives, from oneDNN's verbose log.

    The parent starts this child with ONEDNN_VERBOSE=1; the log goes to the
    process's standard output, which is sent to a file during the profiled
    passes only. Logging slows every primitive run a little (the wall time
    is measured with it on).
    """
    sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+") as log, open(os.devnull, "w") as devnull:
        saved = os.dup(1)
        os.dup2(devnull.fileno(), 1)  # the log of tracing, warm-up and timed calls
        try:
            call, wall = _tensorflow_call(family, variant, batch, size, threads, repeats)
            os.dup2(log.fileno(), 1)
            for _ in range(passes):
                call()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        groups = parse_onednn_verbose(log)
    if not groups:
        raise RuntimeError("oneDNN logged no primitive although TensorFlow reports oneDNN on: was "
                           "ONEDNN_VERBOSE=1 set before TensorFlow started? Run this script without "
                           "--framework, which sets it for its child.")
    totals, counts, flops = collections.Counter(), collections.Counter(), collections.Counter()
    for (kind, implementation, post_ops, problem), (runs, ms, work) in groups.items():
        label = f"{kind} [{implementation}]" + (f" +{post_ops}" if post_ops else "")
        if kind == "inner_product":
            label += f" {problem}"
        elif kind == "convolution":  # groups, batch, channels, input and output height, kernel
            shape, kernel = problem.split("kh", 1)
            label += f" {shape}k{kernel.split('s', 1)[0]}"
        totals[label] += ms / passes
        counts[label] += runs // passes
        flops[label] += work / passes
    return wall, sum(totals.values()), totals, counts, flops


def _matmul_flops(node):
    """2 x multiply-adds of an OpenVINO FullyConnected or (group) convolution node; else 0."""
    kind = node.get_rt_info()["layerType"].astype(str)
    if kind not in ("FullyConnected", "Convolution", "GroupConvolution"):
        return 0
    out = node.get_output_partial_shape(0).to_shape()
    weights = node.input(1).get_partial_shape().to_shape()
    if kind == "FullyConnected":  # weights [out, in], output [..., out]
        return 2 * math.prod(out) * weights[-1]
    # One multiply-add per weight of an output channel, for each output
    # element. Weights: [out, in, kh, kw], or [groups, out/g, in/g, kh, kw].
    channels = weights[0] if kind == "Convolution" else weights[0] * weights[1]
    return 2 * math.prod(out) * math.prod(weights) // channels


def profile_openvino(family, variant, batch, size, passes, threads, repeats):
    """`openvino_function`'s compiled model, with OpenVINO's per-node counters."""
    bench_cpu._tf_threads(threads)
    from convnext_zoo.inference import OPENVINO_CONFIG, convert_to_openvino

    model = bench_cpu._keras_model(family, variant, size)
    ov, converted = convert_to_openvino(model)
    converted.reshape([batch, size, size, 3])
    config = dict(OPENVINO_CONFIG, INFERENCE_NUM_THREADS=threads, PERF_COUNT=True)
    compiled = ov.Core().compile_model(converted, "CPU", config)
    request = compiled.create_infer_request()
    images = bench_cpu._images(batch, size)
    for _ in range(3):
        request.infer({0: images})
    wall = _wall_ms(lambda: request.infer({0: images}), repeats)
    flops = {node.get_friendly_name(): _matmul_flops(node)
             for node in compiled.get_runtime_model().get_ordered_ops()}
    totals, counts, group_flops = collections.Counter(), collections.Counter(), collections.Counter()
    for _ in range(passes):
        request.infer({0: images})
        # The counters describe the last inference only.
        for info in request.profiling_info:
            if info.status != info.Status.EXECUTED:
                continue  # fused into another node
            kind = f"{info.node_type} [{info.exec_type}]"
            totals[kind] += info.real_time.total_seconds() * 1e3 / passes
            counts[kind] += 1
            group_flops[kind] += flops.get(info.node_name, 0) / passes
    return wall, sum(totals.values()), totals, {k: c // passes for k, c in counts.items()}, group_flops


def _jax_thunk_labels(compiled_text):
    """`{instruction name: "layer: op"}` for the top-level instructions of a compiled XLA module.

    Each instruction of the optimised module keeps the `op_name` of the JAX
    operation it came from, such as
    `jit(forward)/convnext_v1_tiny_backbone/stages_0_blocks_0_norm/jit(_var)/reduce_sum`;
    the label is the layer with its stage and block numbers dropped
    (`norm`) and the last part (`reduce_sum`). A fusion carries the name of
    its root, so work that XLA fused across layers counts under the last.
    A conditional or a loop gets no label: the runtime records the thunks of
    its branch or body as well as its own span around them.
    """
    labels = {}
    for line in compiled_text.splitlines():
        match = re.match(r'\s*(?:ROOT )?%(\S+) = .*op_name="([^"]+)"', line)
        if not match or " conditional(" in line or " while(" in line:
            continue
        parts = match.group(2).split("/")
        # Differentiated code is named inside `jvp(...)` (forward) or `transpose(jvp(...))` (gradient).
        gradient = any(p.startswith("transpose(") for p in parts)
        names = [re.sub(r"^(?:transpose\(|jvp\()+|\)+$", "", p) for p in parts[1:-1]]
        names = [p for p in names if p and not p.startswith("jit(")]
        if names and names[0].endswith("_backbone"):
            names = names[1:]
        layer = re.sub(r"^stages_\d+_(blocks_\d+_)?|_\d+$", "", names[0]) if names else "?"
        labels[match.group(1)] = f"{layer}: {parts[-1]}" + (" (gradient)" if gradient else "")
    return labels


def _jax_inference(family, variant, batch, size, repeats):
    """`(call, wall ms, thunk labels)` of the JAX backend's `inference_function`, warmed up and timed."""
    import jax.numpy as jnp
    from convnext_zoo.inference import inference_function

    model = bench_cpu._keras_model(family, variant, size)
    forward = inference_function(model)
    images = jnp.asarray(bench_cpu._images(batch, size))
    labels = _jax_thunk_labels(forward.lower(images).compile().as_text())

    def call():
        return forward(images).block_until_ready()

    for _ in range(3):
        call()
    return call, _wall_ms(call, repeats), labels


# The span the profiler records around each profiled call. XLA's own span
# ("ThunkExecutor::Execute (wait for completion)") appears only when the
# caller had to wait for the thunks, which small calls often do not.
_JAX_PASS = "convnext_zoo profiled call"


def _jax_training_step(family, variant, batch, size, threads, repeats):
    """`(call, wall ms, compiled text)`: bench_train.py's `train_on_batch` on JAX, with its compiled module.

    Keras keeps the jitted step inside a closure, so the module's text
    comes from XLA itself: `main` starts this process with `--xla_dump_to`
    in `XLA_FLAGS` (`_XLA_DUMP`; JAX reads the flags once, when it starts),
    and this reads the optimised module of the step (`jit_train_step`).
    """
    dump = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
    if not dump:
        raise RuntimeError("The JAX training profile reads the step's module that XLA writes to --xla_dump_to; "
                           f"run it through main (profile_ops.py --train --frameworks jax). Received: "
                           f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}.")
    call, wall = _training_step("jax", family, variant, batch, size, threads, repeats)
    modules = glob.glob(os.path.join(dump.group(1), "*jit_train_step*after_optimizations.txt"))
    if not modules:
        raise RuntimeError(f"XLA wrote no optimised train_step module to {dump.group(1)} (it holds "
                           f"{sorted(os.listdir(dump.group(1)))[:5]}; XLA_FLAGS={os.environ['XLA_FLAGS']!r}).")
    with open(max(modules, key=os.path.getsize)) as f:
        return call, wall, f.read()


# The XLA flags that write out the training step's compiled module (text only, no other module).
_XLA_DUMP = "--xla_dump_to={} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=train_step"


def profile_jax(family, variant, batch, size, passes, threads, repeats, train=False):
    """The JAX backend's `inference_function` (or training step), with JAX's profiler.

    XLA's CPU runtime records each thunk it runs (a fusion, a library
    call); they are grouped by layer and operation (`_jax_thunk_labels`,
    read off the compiled module of the function's jitted forward pass or
    of the training step) and by the kind of thunk: `ynn_fusion` is a
    matmul or reduction handed to the YNNPACK library, the other fusions
    are loops XLA generates.
    """
    import gzip
    import json

    if train:
        call, wall, text = _jax_training_step(family, variant, batch, size, threads, repeats)
        labels = _jax_thunk_labels(text)
    else:
        call, wall, labels = _jax_inference(family, variant, batch, size, repeats)
    import jax

    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(passes):
                with jax.profiler.TraceAnnotation(_JAX_PASS):
                    call()
        path = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals, counts, layers, step = collections.Counter(), collections.Counter(), collections.Counter(), 0.0
    for event in events:
        if event.get("ph") != "X":
            continue
        if event["name"] == _JAX_PASS:
            step += event["dur"] / 1e3 / passes
        elif event["name"] in labels:
            thunk = event["name"].rstrip("0123456789").rstrip(".")
            kind = f"{labels[event['name']]} [{thunk}]"
            totals[kind] += event["dur"] / 1e3 / passes
            counts[kind] += 1
            layers[labels[event["name"]].split(":")[0]] += event["dur"] / 1e3 / passes
    return wall, step, totals, {k: c // passes for k, c in counts.items()}, {}, layers if train else {}


def profile_timm(family, variant, batch, size, passes, threads, repeats, train=False):
    import torch
    import timm
    from torch.profiler import ProfilerActivity, profile

    bench_cpu._torch_threads(torch, threads)
    if train:
        call, wall = _training_step("timm", family, variant, batch, size, threads, repeats)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(passes):
                call()
        return (wall, *_torch_totals(prof, passes))
    name = bench_cpu.TIMM_NAMES[family].format(variant)
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    images = torch.from_numpy(bench_cpu._images(batch, size, channels_first=True))
    with torch.inference_mode():
        for _ in range(3):
            model(images)
        wall = _wall_ms(lambda: model(images), repeats)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(passes):
                model(images)
    return (wall, *_torch_totals(prof, passes))


def _torch_totals(prof, passes):
    """`(ms in ops, {op: ms}, {op: calls})` per pass, from torch's profiler (self times)."""
    totals, counts = collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total / 1e3 / passes
        counts[event.key] += event.count // passes
    return sum(totals.values()), totals, counts


PROFILERS = {
    "tf": (profile_tensorflow, "convnext_zoo TensorFlow inference_function"),
    "timm": (profile_timm, "timm eager"),
    "openvino": (profile_openvino, "convnext_zoo openvino_function"),
    "onednn": (profile_onednn, "convnext_zoo TensorFlow inference_function, oneDNN primitives"),
    "jax": (profile_jax, "convnext_zoo JAX inference_function"),
}


def _rate(flops, ms, peak):
    """` 123.4 GFLOP/s (56% of peak)` for `flops` done in `ms`."""
    gflops = flops / ms / 1e6
    return f"  {gflops:6.1f} GFLOP/s" + (f" ({gflops / peak:.0%} of peak)" if peak else "")


def _onednn_line():
    """`oneDNN: on` or `off` (with TF_ENABLE_ONEDNN_OPTS where set): TensorFlow's answer in this process."""
    from convnext_zoo.internals import onednn_enabled

    state = {True: "on", False: "off", None: "unknown (this TensorFlow does not say)"}[onednn_enabled()]
    forced = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    return f"oneDNN: {state}" + (f" (TF_ENABLE_ONEDNN_OPTS={forced})" if forced is not None else "")


def _child(args):
    bench_cpu._set_thread_env(args.threads)  # before TensorFlow, torch or JAX is imported
    profiler, title = PROFILERS[args.framework]
    family, variant = args.model.split("_")
    if args.compare_layer_norms:
        medians = compare_layer_norms(family, variant, args.batch, args.image_size, args.threads,
                                      args.repeats)
        print(f"\n{title}, layer norm forms: {args.model}, batch {args.batch}, {args.image_size} px, "
              f"{args.threads} threads, median of {args.repeats} alternated calls each")
        for form, ms in medians.items():
            print(f"  {form:9s} {ms:8.1f} ms per call  {ms / medians['library']:.2f}x the library's time")
        return 0
    if args.framework == "onednn":
        from convnext_zoo.internals import onednn_enabled

        if onednn_enabled() is False:
            print(f"\n{title}: {args.model}: none to list.\n  {_onednn_line()}: TensorFlow runs its own "
                  f"kernels in this process, so oneDNN logs no primitive. TensorFlow turns oneDNN on by "
                  f"itself only on CPUs with AVX-512; set TF_ENABLE_ONEDNN_OPTS=1 to profile its "
                  f"primitives here.")
            return 0
    form = args.tf_layer_norm if args.framework == "tf" else "library"
    # Only the TensorFlow child imports TensorFlow (torch after it would crash).
    train = {"train": True} if args.train else {}
    with layer_norm_form(form) if args.framework == "tf" else contextlib.nullcontext():
        wall, step, totals, counts, *rest = profiler(
            family, variant, args.batch, args.image_size, args.passes, args.threads, args.repeats, **train
        )
    if form != "library":
        title += f" (layer norms: {form})"
    if args.train:
        title = title.replace("inference_function", "train_on_batch") + ", training step"
    flops = rest[0] if rest else {}
    by_layer = rest[1] if len(rest) > 1 else {}
    ops = sum(totals.values())
    print(f"\n{title}: {args.model}, batch {args.batch}, {args.image_size} px, {args.threads} threads")
    if args.framework in ("tf", "onednn"):
        print(f"  {_onednn_line()}")
    timed = "oneDNN logging on" if args.framework == "onednn" else "not profiled"
    unit = "training step" if args.train else "forward pass"
    print(f"  {wall:.1f} ms per call (median of {args.repeats}, {timed}); profiled: "
          f"{step:.1f} ms per {unit}, {ops:.1f} ms in ops")
    model_flops = 1e9 * bench_cpu.gflop_per_image(args.model, args.image_size) * args.batch
    if flops:
        print(f"  matmul-like nodes: {sum(flops.values()) / 1e9:.2f} GFLOP per pass "
              f"(bench_cpu.py counts {model_flops / 1e9:.2f} for the whole model)")
    if args.peak_gflops:
        print(f"  matmul peak {args.peak_gflops:.1f} GFLOP/s; the whole call ({timed}) "
              f"runs at{_rate(model_flops, wall, args.peak_gflops)}")
    for kind, ms in totals.most_common(args.top):
        rate = _rate(flops[kind], ms, args.peak_gflops) if flops.get(kind) else ""
        print(f"  {ms:8.2f} ms  {counts[kind]:4d} x  {kind}{rate}")
    if by_layer:
        print("  by layer (forward and gradient ops together):")
        for layer, ms in by_layer.most_common(args.top):
            print(f"  {ms:8.2f} ms  {layer}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="v1_tiny", choices=sorted(bench_cpu.GMACS_224))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--passes", type=int, default=5, help="profiled forward passes")
    p.add_argument("--repeats", type=int, default=20, help="timed calls without the profiler")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--frameworks", default="tf,timm",
                   help=f"comma-separated, in order, from {', '.join(PROFILERS)} (default: tf,timm)")
    p.add_argument("--tf-layer-norm", choices=LAYER_NORM_FORMS, default="library",
                   help="the layer norms' form in the TensorFlow profile (default: the library's)")
    p.add_argument("--compare-layer-norms", action="store_true",
                   help="instead of profiling, time inference_function with each layer norm form, "
                        "calls alternated in one TensorFlow process")
    p.add_argument("--peak", action="store_true",
                   help="measure the float32 matmul peak first, and rate the matmul-like ops against it")
    p.add_argument("--train", action="store_true",
                   help="profile bench_train.py's training step (tf, jax and timm only; use --batch 32)")
    p.add_argument("--framework", choices=sorted(PROFILERS), help=argparse.SUPPRESS)
    p.add_argument("--peak-gflops", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.framework:
        return _child(args)
    frameworks = [f for f in args.frameworks.split(",") if f]
    if args.compare_layer_norms:
        frameworks = ["tf"]
    unknown = sorted(set(frameworks) - set(PROFILERS))
    if unknown or not frameworks:
        p.error(f"--frameworks takes a comma-separated list from {', '.join(PROFILERS)}. "
                f"Received: {args.frameworks!r}.")
    if args.train and (set(frameworks) - {"tf", "jax", "timm"} or args.compare_layer_norms):
        p.error(f"--train profiles the training step of tf, jax and timm only (no --compare-layer-norms). "
                f"Received: --frameworks {args.frameworks}{' --compare-layer-norms' * args.compare_layer_norms}.")
    extra = []
    if args.peak:
        task = {"worker": "matmul", "threads": args.threads, "repeats": 5, "matmul_n": 2048}
        peak = bench_cpu.run_worker(task)[0]["peak_gflops"]
        extra = ["--peak-gflops", repr(peak)]
    for framework in frameworks:
        backend = "jax" if framework == "jax" else "tensorflow"
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
        if framework == "onednn":
            env["ONEDNN_VERBOSE"] = "1"  # read once, when oneDNN starts
        with tempfile.TemporaryDirectory(prefix="profile_ops_xla_") as dump:
            if framework == "jax" and args.train:
                # First: XLA ignores the flags after a word without "--" (a caller's XLA_FLAGS may have one).
                env["XLA_FLAGS"] = f"{_XLA_DUMP.format(dump)} {env.get('XLA_FLAGS', '')}".strip()
                # Compiled here, not loaded from JAX's persistent cache: XLA writes out what it compiles.
                env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
            subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), *extra, "--framework", framework],
                           env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
