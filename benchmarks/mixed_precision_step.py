"""A training step on TensorFlow per dtype policy, and the float16 matmul form that oneDNN makes slow.

    python benchmarks/mixed_precision_step.py --rounds 3

Each measurement runs in a fresh process (the dtype policy and TensorFlow's
oneDNN choice are per process), one thread, rounds alternating the
policies: `train_on_batch` of a random V2 atto classifier (AdamW; under
`mixed_float16` Keras' loss scaling) on a batch of 4 images at 32 px,
median of the timed steps after two untimed ones. Then, in one process,
the operators behind it: a 40 -> 160 channel matmul with bias on 4,096
pixels as one 2-D `MatMul` + `BiasAdd` (the pattern oneDNN's rewrite
fuses; `PointwiseDense` uses it in float32) and as `keras.layers.Dense`
computes it (the bias added after a reshape: not fused).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import workers  # noqa: E402  (machine facts, alternated rounds)

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def _one_thread():
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def step_child(policy, steps):
    """Prints the median seconds of `steps` training steps under `policy`, as JSON."""
    _one_thread()
    import keras
    import numpy as np

    import convnext_zoo

    keras.config.set_dtype_policy(policy)
    model = convnext_zoo.from_preset("convnext_v2_atto", num_classes=4, input_shape=(32, 32, 3),
                                     load_weights=False, preprocessing=False)
    optimizer = keras.optimizers.AdamW(1e-3)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    images, labels = rng.uniform(size=(4, 32, 32, 3)).astype("float32"), np.eye(4, dtype="float32")
    for _ in range(3):  # the first traces the step
        model.train_on_batch(images, labels)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(images, labels)
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": statistics.median(times)}))


def matmul_forms(repeats=5):
    """Milliseconds of the two matmul + bias forms in float32 and float16 (this process, one thread)."""
    tf = _one_thread()
    import keras

    results = {}
    pixels = tf.random.normal((4, 32, 32, 40))
    for dtype in ("float32", "float16"):
        dense = keras.layers.Dense(160, dtype=dtype)
        dense.build(pixels.shape)
        kernel, bias = (tf.cast(w, dtype) for w in dense.weights)
        flat = tf.cast(tf.reshape(pixels, (-1, 40)), dtype)
        forms = {"2-D MatMul + BiasAdd": tf.function(lambda x: tf.nn.bias_add(tf.matmul(x, kernel), bias)),
                 "keras Dense": tf.function(dense)}
        inputs = {"2-D MatMul + BiasAdd": flat, "keras Dense": tf.cast(pixels, dtype)}
        for name, form in forms.items():
            form(inputs[name])
            start = time.perf_counter()
            for _ in range(repeats):
                form(inputs[name])
            results[f"{name}, {dtype}"] = (time.perf_counter() - start) / repeats * 1e3
    return results


def measure(policy, steps):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, __file__, "--child", policy, "--steps", str(steps)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{policy} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["step_s"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default=",".join(POLICIES), help="comma list of Keras dtype policies")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per policy, alternated")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--output", default=None, help="a JSON file for the results")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return step_child(args.child, args.steps)
    policies = args.policies.split(",")
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        p.error(f"--policies: {', '.join(unknown)} not among {', '.join(POLICIES)}")
    from convnext_zoo.internals import onednn_enabled

    facts = dict(workers.machine(), tensorflow_onednn=onednn_enabled())
    print(f"Machine: {facts['cpu']}, AVX-512 {'yes' if facts['avx512'] else 'no'}, TensorFlow oneDNN "
          f"{'on' if facts['tensorflow_onednn'] else 'off'}, load average at start {facts['load_average_at_start']}")
    times = workers.alternate(lambda policy: measure(policy, args.steps), policies, args.rounds)
    medians = {policy: statistics.median(t) for policy, t in times.items()}
    for policy, seconds in medians.items():
        print(f"{policy}: {seconds * 1e3:.0f} ms per step (median of {args.rounds} processes)")
    forms = matmul_forms()
    for name, ms in forms.items():
        print(f"{name}: {ms:.1f} ms")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"machine": facts, "rounds": args.rounds, "steps": args.steps, "step_s": times,
                       "median_step_s": medians, "matmul_ms": forms}, f, indent=1)


if __name__ == "__main__":
    main()
