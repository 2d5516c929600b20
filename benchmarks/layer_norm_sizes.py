"""Per-call time of one layer norm, oneDNN's fused kernel against the short TensorFlow form.

For a range of channel counts and pixel counts, traces a chain of
`PointwiseLayerNorm`s in a `tf.function`, once inside
`convnext_zoo.layers.fused_layer_norms()` (one `_MklLayerNorm` kernel each)
and once outside (the short form), alternates calls of the two, and prints
the median microseconds per layer norm and the ratio. The crossover behind
`convnext_zoo.layers.FUSED_MIN_VALUES` comes from this table.

Usage:
    .venv/bin/python benchmarks/layer_norm_sizes.py
    .venv/bin/python benchmarks/layer_norm_sizes.py --channels 40,96 --pixels 196,784,3136
"""

import argparse
import os
import statistics
import sys
import time
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_cpu  # noqa: E402  (thread settings)


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def time_layer_norms(channels, pixels, chain, repeats):
    """Median µs per layer norm: `{"short": ..., "fused": ...}` for a `(1, pixels, 1, channels)` input."""
    import numpy as np
    import tensorflow as tf

    from convnext_zoo import layers

    norms = [layers.PointwiseLayerNorm(epsilon=1e-6) for _ in range(chain)]
    x = tf.constant(np.random.default_rng(0).standard_normal((1, pixels, 1, channels), dtype=np.float32))

    def short(x):
        for norm in norms:
            x = norm(x)
        return x

    def fused(x):
        # Every size gets the fused kernel here: the threshold is lifted while tracing.
        with layers.fused_layer_norms(), mock.patch.object(layers, "FUSED_MIN_VALUES", 0):
            return short(x)

    calls = {"short": tf.function(short, autograph=False), "fused": tf.function(fused, autograph=False)}
    for call in calls.values():
        for _ in range(3):
            call(x).numpy()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call(x).numpy()
            times[name].append(time.perf_counter() - start)
    return {name: 1e6 * statistics.median(t) / chain for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=_ints, default=[40, 96, 320, 768])
    p.add_argument("--pixels", type=_ints, default=[16, 49, 196, 784, 3136, 12544])
    p.add_argument("--chain", type=int, default=10, help="layer norms per traced call")
    p.add_argument("--repeats", type=int, default=30, help="alternated calls of each form")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    bench_cpu._set_thread_env(args.threads)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    bench_cpu._tf_threads(args.threads)
    from convnext_zoo.layers import onednn_layer_norm_available

    if not onednn_layer_norm_available():
        sys.exit("This TensorFlow has no oneDNN layer norm kernel on its CPU: nothing to compare.")
    print(f"{args.threads} threads, median of {args.repeats} alternated calls, {args.chain} layer norms each")
    print("| channels | pixels | values | short form µs | fused µs | short / fused |")
    print("|---:|---:|---:|---:|---:|---:|")
    for channels in args.channels:
        for pixels in args.pixels:
            us = time_layer_norms(channels, pixels, args.chain, args.repeats)
            print(f"| {channels} | {pixels} | {channels * pixels} | {us['short']:.1f} | {us['fused']:.1f} "
                  f"| {us['short'] / us['fused']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
