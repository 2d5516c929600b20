"""A ConvNeXt gradient step on JAX's CPU with and without the package's XLA CPU forms.

On the JAX backend with a CPU, two layers take a form of their own when
they are trained (`convnext_zoo.layers`): `Conv2D` (the stem and the
downsampling convolutions as patches x matrix, also at inference) and
`PointwiseDense` (the MLP's matmuls on the input flattened to 2-D, only
with `training=True`). This builds one model and jits its gradient (or its
forward pass, `--mode forward`) seven times, each form switched on or off
at trace time, then alternates the seven compiled functions round by round
in the same process and prints median milliseconds and ratios:

    KERAS_BACKEND=jax python benchmarks/jax_step_forms.py --model v2_atto --batch 32
    KERAS_BACKEND=jax python benchmarks/jax_step_forms.py --model v2_atto --batch 1 --mode forward

`keras`: both off (Keras' convolution and `Dense.call`); `patch`: the patch
form only; `flat`: the flat matmul only; `both`: the package as it is. The
depthwise convolution takes its shifted form in all of them, written once
(inside the conditional of `layers._shifted_depthwise_conv_jax`) except in
a fifth form, `recompute`: the package without that conditional, so that
XLA may copy the shifted sum into the fusions that read it. A sixth,
`taps`, is the package with the depthwise kernel's gradient always taken
tap by tap (`layers._kernel_gradient_by_taps`), never as Gram matrices (the
layer's choice for large feature maps, `layers._kernel_gradient_form`). A
seventh, `erfc`, is the package with Keras' GELU (`jax.nn.gelu`'s erfc
form, differentiated by JAX) in the flat matmuls, where the package takes
`layers._exact_gelu_jax`, the erf form with its derivative written out. For steadier
figures give the process jemalloc, as `bench_train.py --allocator jemalloc`
does (benchmarks/README.md, "The memory allocator").

With `--mode forward` the flat switch flattens the matmuls at inference as
well (the package flattens them only in training): there `patch` is the
package as it is, `erfc` shows what flattening would give, and `flat` and
`both` what flattening with the erf GELU would.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time
import typing

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import workers  # noqa: E402  (machine facts, alternated rounds)

# name: (flat matmuls, patch convolutions, depthwise sum written once, kernel gradient as Gram matrices,
#        the flat matmul's GELU with its derivative written out)
FORMS = {"keras": (False, False, True, True, True), "patch": (False, True, True, True, True),
         "flat": (True, False, True, True, True), "both": (True, True, True, True, True),
         "recompute": (True, True, False, True, True), "taps": (True, True, True, False, True),
         "erfc": (True, True, True, True, False)}


def matmuls_2d(function, arguments):
    """How many of the function's matmuls multiply a 2-D left operand (StableHLO
    `dot_general` contracting dimension 1 of one with dimension 0 of the other):
    the flattened MLP matmuls and the head's; the 4-D form contracts dimension 3."""
    return function.lower(*arguments).as_text().count("contracting_dims = [1] x [0]")


class Compiled(typing.NamedTuple):
    """One form, jitted: its function and arguments, its first call (tracing, compiling) and result."""
    function: typing.Callable
    arguments: tuple
    first_call_s: float
    result: typing.Any


def compiled_forms(model_name, batch, size, mode):
    """`{form: Compiled}`, each traced with its form switched."""
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    import convnext_zoo
    from convnext_zoo import layers

    family, variant = model_name.split("_")
    create = convnext_zoo.create_convnext_v1 if family == "v1" else convnext_zoo.create_convnext_v2
    model = create(variant, num_classes=10, input_shape=(size, size, 3))
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, size, size, 3), dtype=np.float32))
    labels = jnp.asarray(np.eye(10, dtype=np.float32)[np.arange(batch) % 10])
    flat_form, patch_form = layers.PointwiseDense._flat_on_jax, layers.Conv2D._patch_form
    depthwise, kernel_gradient_form = layers._shifted_depthwise_conv_jax, layers._kernel_gradient_form
    exact_gelu = layers._exact_gelu_jax

    def loss(trainable, images):
        logits, _ = model.stateless_call(trainable, frozen, images, training=True)
        return jnp.mean(keras.losses.categorical_crossentropy(labels, logits, from_logits=True))

    def forward(trainable, images):
        return model.stateless_call(trainable, frozen, images)[0]

    compiled = {}
    try:
        for name, (flat, patch, once, gram, written_gelu) in FORMS.items():
            if not flat:
                layers.PointwiseDense._flat_on_jax = lambda self, inputs, training: False
            elif mode == "forward":  # the package flattens only in training: here, flat at inference too
                layers.PointwiseDense._flat_on_jax = lambda self, inputs, training: flat_form(self, inputs, True)
            else:
                layers.PointwiseDense._flat_on_jax = flat_form
            layers.Conv2D._patch_form = patch_form if patch else (lambda self, inputs: False)
            layers._shifted_depthwise_conv_jax = functools.partial(depthwise, write_once=once)
            layers._kernel_gradient_form = (kernel_gradient_form if gram
                                            else (lambda shape, width: layers._kernel_gradient_by_taps))
            layers._exact_gelu_jax = (exact_gelu if written_gelu
                                      else (lambda: functools.partial(keras.activations.gelu, approximate=False)))
            # A new function each time: jax.jit reuses the trace of a function it has seen, which
            # would give every form the first one's.
            function = jax.jit(jax.grad(loss) if mode == "gradient" else (lambda t, i: forward(t, i)))
            start = time.perf_counter()
            result = jax.block_until_ready(function(trainable, images))  # traced now, with this form
            compiled[name] = Compiled(function, (trainable, images), time.perf_counter() - start, result)
    finally:
        layers.PointwiseDense._flat_on_jax, layers.Conv2D._patch_form = flat_form, patch_form
        layers._shifted_depthwise_conv_jax, layers._kernel_gradient_form = depthwise, kernel_gradient_form
        layers._exact_gelu_jax = exact_gelu
    return compiled


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="v2_atto", help="v2_atto, v1_tiny, v2_tiny, ...")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--mode", choices=("gradient", "forward"), default="gradient")
    p.add_argument("--rounds", type=int, default=8, help="timed calls per form, alternated")
    p.add_argument("--output", default=None, help="a JSON file for the results")
    args = p.parse_args(argv)
    import jax
    import keras

    if keras.config.backend() != "jax" or jax.default_backend() != "cpu":
        sys.exit("jax_step_forms.py times JAX's CPU forms: run it with KERAS_BACKEND=jax on a CPU. "
                 f"Received: backend={keras.config.backend()!r}, device={jax.default_backend()!r}.")
    facts = workers.machine()
    allocator = workers.allocator()
    print(f"Machine: {facts['cpu']}, AVX-512 {'yes' if facts['avx512'] else 'no'}, {facts['cpu_count']} cores, "
          f"load average at start {facts['load_average_at_start']}, allocator {allocator}, jax {jax.__version__}")
    compiled = compiled_forms(args.model, args.batch, args.image_size, args.mode)
    # Every form computes the same gradient (or logits): the largest difference from Keras' forms,
    # relative to the largest value.
    reference = jax.tree_util.tree_leaves(compiled["keras"].result)
    scale = max(float(abs(leaf).max()) for leaf in reference)
    differences = {
        name: max(float(abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(entry.result), reference)) / scale
        for name, entry in compiled.items()}

    def call_seconds(name):
        start = time.perf_counter()
        jax.block_until_ready(compiled[name].function(*compiled[name].arguments))
        return time.perf_counter() - start

    times = workers.alternate(call_seconds, compiled, args.rounds)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{args.model}, batch {args.batch}, {args.image_size} px, {args.mode}, median of {args.rounds}:")
    for name, median in medians.items():
        print(f"  {name:9s} {median:9.1f} ms   keras / {name} {medians['keras'] / median:.2f}x   "
              f"first call {compiled[name].first_call_s:.1f} s   max difference {differences[name]:.1e}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"machine": facts, "allocator": allocator, "args": vars(args),
                       "ms": {name: [t * 1e3 for t in ts] for name, ts in times.items()},
                       "median_ms": medians, "max_relative_difference": differences,
                       "matmuls_2d": {name: matmuls_2d(entry.function, entry.arguments)
                                      for name, entry in compiled.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
