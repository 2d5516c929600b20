"""Creating a ConvNeXt with new random weights on the JAX backend: chunked initializer against Keras' draw.

`jax.random.truncated_normal` compiles once per new shape (about half a
second each on a CPU); `convnext_zoo.backbone.ConvInitializer` draws in
chunks of a few fixed sizes instead. This times `create_convnext_v1/v2`
(224 px, 1000 classes, random weights: what training from scratch and
FCMAE pre-training build) in a fresh process per measurement, XLA's
compilations being cached per process, alternating the two forms:

    python benchmarks/jax_model_build.py --models v2_atto,v1_tiny --rounds 3

`chunked` is the package as it is; `keras` replaces the initializer's call
with Keras' `TruncatedNormal` (one draw of the kernel's own shape).
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

FORMS = ("chunked", "keras")


def child(model, form):
    """Creates `model` with random weights in this process; prints its seconds as JSON."""
    import keras

    import convnext_zoo
    from convnext_zoo import backbone

    if form == "keras":
        backbone.ConvInitializer.__call__ = (
            lambda self, shape, dtype=None: keras.initializers.TruncatedNormal.__call__(self, shape, dtype))
    family, variant = model.split("_")
    create = convnext_zoo.create_convnext_v1 if family == "v1" else convnext_zoo.create_convnext_v2
    start = time.perf_counter()
    built = create(variant)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "parameters": built.count_params()}))


def measure(model, form):
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # every compilation counted
    proc = subprocess.run([sys.executable, __file__, "--child", model, form], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} {form} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="v2_atto,v1_tiny", help="comma list, e.g. v2_atto,v1_tiny,v2_base")
    p.add_argument("--rounds", type=int, default=3, help="measurements per model and form, alternated")
    p.add_argument("--output", default=None, help="a JSON file for the results")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "FORM"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child)
    facts = workers.machine()
    print(f"Machine: {facts['cpu']}, AVX-512 {'yes' if facts['avx512'] else 'no'}, "
          f"{facts['cpu_count']} cores, load average at start {facts['load_average_at_start']}")
    results = {"machine": facts, "rounds": args.rounds, "models": {}}
    for model in args.models.split(","):
        times = workers.alternate(lambda form: measure(model, form)["seconds"], FORMS, args.rounds)
        medians = {form: statistics.median(t) for form, t in times.items()}
        results["models"][model] = {"seconds": times, "median_s": medians}
        print(f"{model}: chunked {medians['chunked']:.2f} s, keras {medians['keras']:.2f} s "
              f"(median of {args.rounds}; keras / chunked {medians['keras'] / medians['chunked']:.1f}x)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
