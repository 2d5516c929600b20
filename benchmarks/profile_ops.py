"""Where the time of one forward pass goes: per-op totals, TensorFlow vs timm.

Runs, each in its own process with the same thread count, the convnext_zoo
TensorFlow inference function (TensorFlow's profiler, ops grouped by kernel
type, e.g. `_MklNativeFusedMatMul` = matmul + bias + GELU fused by oneDNN)
and timm in eager mode (torch.profiler, grouped by aten op), and prints the
mean milliseconds per forward pass of the heaviest op types. This is the
profile behind the "Speed on a CPU" section of the README.

Each header also gives the median wall-clock time of a call timed without
the profiler, and the sum of the op times. Their difference is the cost of a
call that no kernel accounts for (dispatch, the executor, Python). At a small
`--image-size` the kernels have little work, so the wall time is close to
that fixed cost of a call.

Usage:
    .venv/bin/python benchmarks/profile_ops.py                    # V1 tiny, batch 1
    .venv/bin/python benchmarks/profile_ops.py --model v2_atto --batch 16
    .venv/bin/python benchmarks/profile_ops.py --model v2_atto --image-size 32   # fixed cost of a call
"""

import argparse
import collections
import glob
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_cpu  # noqa: E402  (thread settings, inputs, model names)


def _wall_ms(call, repeats):
    """Median milliseconds of `call()` over `repeats` calls (after the warm-up)."""
    return 1000 * statistics.median(bench_cpu._time_calls(call, 0, repeats))


def profile_tensorflow(family, variant, batch, size, passes, threads, repeats):
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    bench_cpu._tf_threads(threads)
    from convnext_zoo.inference import inference_function

    model = bench_cpu._keras_model(family, variant, size)
    forward = inference_function(model)
    images = tf.constant(bench_cpu._images(batch, size))
    for _ in range(3):
        forward(images).numpy()
    wall = _wall_ms(lambda: forward(images).numpy(), repeats)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(passes):
            forward(images).numpy()
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    totals, counts = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                kind = plane.event_metadata[event.metadata_id].name.split(":")[-1]
                totals[kind] += event.duration_ps / 1e9 / passes
                counts[kind] += 1
    # "Process" spans a whole executor step; the ops nest inside it.
    step = totals.pop("Process", 0.0)
    counts.pop("Process", None)
    return wall, step, totals, {k: c // passes for k, c in counts.items()}


def profile_timm(family, variant, batch, size, passes, threads, repeats):
    import torch
    import timm
    from torch.profiler import ProfilerActivity, profile

    bench_cpu._torch_threads(torch, threads)
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
    totals, counts = collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total / 1e3 / passes
        counts[event.key] += event.count // passes
    return wall, sum(totals.values()), totals, counts


def _child(args):
    profiler = profile_tensorflow if args.framework == "tf" else profile_timm
    family, variant = args.model.split("_")
    wall, step, totals, counts = profiler(
        family, variant, args.batch, args.image_size, args.passes, args.threads, args.repeats
    )
    title = "convnext_zoo TensorFlow inference_function" if args.framework == "tf" else "timm eager"
    ops = sum(totals.values())
    print(f"\n{title}: {args.model}, batch {args.batch}, {args.image_size} px, {args.threads} threads")
    print(f"  {wall:.1f} ms per call (median of {args.repeats}, not profiled); profiled: "
          f"{step:.1f} ms per forward pass, {ops:.1f} ms in ops")
    for kind, ms in totals.most_common(args.top):
        print(f"  {ms:8.2f} ms  {counts[kind]:4d} x  {kind}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="v1_tiny", choices=sorted(bench_cpu.GMACS_224))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--passes", type=int, default=5, help="profiled forward passes")
    p.add_argument("--repeats", type=int, default=20, help="timed calls without the profiler")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--framework", choices=("tf", "timm"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.framework:
        return _child(args)
    for framework in ("tf", "timm"):
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
        env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
        subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--framework", framework],
                       env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
