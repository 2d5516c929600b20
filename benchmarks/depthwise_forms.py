"""Forms of ConvNeXt's depthwise convolution under `jax.jit` on the CPU, and the rest of a block.

Part 1 (`forms`): at the block shapes of each stage (224 px input: 56, 28,
14 and 7 px; V2 atto's and the tiny models' channels), batch 1 and 16, the
median milliseconds of one 7x7 depthwise convolution with bias, jitted:

- `grouped`: `lax.conv_general_dilated(..., feature_group_count=channels)`,
  what Keras' `DepthwiseConv2D` runs on JAX;
- `shifted`: `convnext_zoo.layers.shifted_depthwise_conv`, 49 products of
  shifted slices of the padded input summed (what
  `convnext_zoo.layers.DepthwiseConv2D` runs on JAX's CPU);
- `rows`: the same products, summed row by row (7 partial sums of 7);
- `torch` (when installed): `torch.nn.functional.conv2d(groups=channels)`
  on an NCHW tensor, what timm runs, as the reference.

with the largest difference from `grouped`, and, with `--grad`, the time of
the gradient with respect to input and kernel (`jax.grad` of a sum).

Part 2 (`block`): one block's other layers, each jitted on its own, at the
same shapes: `PointwiseLayerNorm`, fc1 (`PointwiseDense` 4x with exact
GELU), GRN, fc2, beside the same layers in torch (`nn.LayerNorm`,
`nn.Linear` + `F.gelu`, timm's GRN formula) on channels-last tensors, to show
which of them XLA runs slower than torch.

Part 3 (`kernels`): `grouped` against `shifted` for square kernels of other
sizes, with the compile time: the bound `convnext_zoo.layers.SHIFTED_MAX_TAPS`
comes from this table.

Part 4 (`patch`): the strided convolutions whose kernel is their stride (the
patchify stem, 4x4 / 4 from the 224 px image, and the three 2x2 / 2
downsampling convolutions), `convnext_zoo.layers.Conv2D` as XLA's
convolution (its Keras form, inside `export_forms()`) and as patches times
a matrix (what it runs on JAX's CPU): forward, then forward + gradient with
respect to input and kernel, with the largest difference between the two.

Part 5 (`kernel_grad`): the gradient of the 7x7 depthwise kernel alone (the
part of the layer's written-out gradient that reduces over batch and
pixels), at each stage's shape scaled to `--image-size`, in its two forms:
`taps` (`convnext_zoo.layers._kernel_gradient_by_taps`, one reduction per
tap) and `gram` (`_kernel_gradient_by_gram`, one batched matmul per kernel
row), alternated round by round, with the form the layer picks
(`_kernel_gradient_form`): the bounds `DEPTHWISE_GRAM_MIN_VALUES`,
`DEPTHWISE_GRAM_MIN_SUMMED` and `DEPTHWISE_GRAM_MAX_WIDTH` come from this
table.

Usage:
    KERAS_BACKEND=jax .venv/bin/python benchmarks/depthwise_forms.py
    KERAS_BACKEND=jax .venv/bin/python benchmarks/depthwise_forms.py --parts forms --batch-sizes 16 --grad
    KERAS_BACKEND=jax .venv/bin/python benchmarks/depthwise_forms.py --parts kernels --kernel-sizes 3,7,11,15
    KERAS_BACKEND=jax .venv/bin/python benchmarks/depthwise_forms.py --parts patch --batch-sizes 1,32
    KERAS_BACKEND=jax .venv/bin/python benchmarks/depthwise_forms.py --parts kernel_grad --batch-sizes 4,32
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import workers  # noqa: E402  (alternated rounds)

# (pixels per side at 224 px, channels): the four stages of V2 atto, then of the tiny models.
SHAPES = {
    "atto": [(56, 40), (28, 80), (14, 160), (7, 320)],
    "tiny": [(56, 96), (28, 192), (14, 384), (7, 768)],
}
PARTS = ("forms", "block", "kernels", "patch", "kernel_grad")


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def _median_ms(call, seconds, least=5):
    """Median ms of `call()` over about `seconds` (at least `least` calls), after two untimed ones."""
    call()
    call()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < least or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _jax_forms():
    import jax
    import jax.numpy as jnp
    from jax import lax

    from convnext_zoo.layers import shifted_depthwise_conv

    def grouped(x, kernel, bias):
        channels = x.shape[-1]
        kh, kw = kernel.shape[:2]
        y = lax.conv_general_dilated(
            x, kernel.reshape(kh, kw, 1, channels), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
        )
        return y + bias

    def shifted(x, kernel, bias):
        return shifted_depthwise_conv(x, kernel, "same") + bias

    def rows(x, kernel, bias):
        kh, kw = kernel.shape[:2]
        height, width = x.shape[1:3]
        padded = jnp.pad(x, ((0, 0), (kh // 2, kh - 1 - kh // 2), (kw // 2, kw - 1 - kw // 2), (0, 0)))
        total = None
        for i in range(kh):
            row = padded[:, i:i + height]
            part = sum(row[:, :, j:j + width, :] * kernel[i, j, :, 0] for j in range(kw))
            total = part if total is None else total + part
        return total + bias

    forms = {"grouped": grouped, "shifted": shifted, "rows": rows}
    return jax, jnp, forms


def run_forms(args):
    import numpy as np

    jax, jnp, forms = _jax_forms()
    torch = _optional_torch(args.threads)
    rng = np.random.default_rng(0)
    print("## Depthwise 7x7 forms, jitted, median ms per call "
          + ("(forward; gradient w.r.t. input and kernel after the slash)" if args.grad else "(forward)"))
    header = ["batch", "shape"] + list(forms) + (["torch NCHW"] if torch else []) + ["grouped / shifted", "max diff"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for batch in args.batch_sizes:
        for model in args.models:
            for side, channels in SHAPES[model]:
                x = jnp.asarray(rng.standard_normal((batch, side, side, channels), dtype=np.float32))
                kernel = jnp.asarray(0.1 * rng.standard_normal((7, 7, channels, 1), dtype=np.float32))
                bias = jnp.asarray(rng.standard_normal((channels,), dtype=np.float32))
                reference = jax.jit(forms["grouped"])(x, kernel, bias)
                cells, times, diff = [], {}, 0.0
                for name, form in forms.items():
                    forward = jax.jit(form)
                    diff = max(diff, float(jnp.max(jnp.abs(forward(x, kernel, bias) - reference))))
                    times[name] = _median_ms(lambda f=forward: f(x, kernel, bias).block_until_ready(), args.seconds)
                    cell = f"{times[name]:.2f}"
                    if args.grad:
                        grad = jax.jit(jax.grad(lambda x, k, f=form: jnp.sum(f(x, k, bias) ** 2), argnums=(0, 1)))
                        cell += f" / {_median_ms(lambda g=grad: jax.block_until_ready(g(x, kernel)), args.seconds):.2f}"
                    cells.append(cell)
                if torch:
                    xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
                    kt = torch.from_numpy(np.asarray(kernel)).permute(2, 3, 0, 1).contiguous()
                    bt = torch.from_numpy(np.asarray(bias))

                    def call():
                        with torch.inference_mode():
                            torch.nn.functional.conv2d(xt, kt, bt, padding=3, groups=channels)

                    cells.append(f"{_median_ms(call, args.seconds):.2f}")
                ratio = times["grouped"] / times["shifted"]
                print(f"| {batch} | {side}x{side}x{channels} | " + " | ".join(cells)
                      + f" | {ratio:.1f}x | {diff:.1e} |", flush=True)


def run_block(args):
    import numpy as np

    from convnext_zoo.layers import GlobalResponseNorm, PointwiseDense, PointwiseLayerNorm

    jax, jnp, _ = _jax_forms()
    torch = _optional_torch(args.threads)
    rng = np.random.default_rng(0)
    print("## The block's other layers, each jitted alone, median ms per call (torch channels-last beside)")
    names = ["layer norm", "fc1 + GELU", "GRN", "fc2"]
    header = ["batch", "shape"] + [f"{n} jax" + (" / torch" if torch else "") for n in names]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for batch in args.batch_sizes:
        for model in args.models:
            for side, channels in SHAPES[model]:
                shape = (batch, side, side, channels)
                layers = [
                    PointwiseLayerNorm(epsilon=1e-6),
                    PointwiseDense(4 * channels, activation="gelu"),
                    GlobalResponseNorm(),
                    PointwiseDense(channels),
                ]
                inputs = [shape, shape, shape[:-1] + (4 * channels,), shape[:-1] + (4 * channels,)]
                cells = []
                for layer, input_shape, name in zip(layers, inputs, names):
                    layer.build(input_shape)
                    values = [v.value for v in layer.trainable_variables]
                    x = jnp.asarray(rng.standard_normal(input_shape, dtype=np.float32))

                    @jax.jit
                    def forward(values, x, layer=layer):
                        return layer.stateless_call(values, [], x)[0]

                    cell = f"{_median_ms(lambda f=forward, v=values, x=x: f(v, x).block_until_ready(), args.seconds):.2f}"
                    if torch:
                        cell += f" / {_median_ms(_torch_layer(torch, name, input_shape, rng), args.seconds):.2f}"
                    cells.append(cell)
                print(f"| {batch} | {side}x{side}x{channels} | " + " | ".join(cells) + " |", flush=True)


def _torch_layer(torch, name, shape, rng):
    """A zero-argument call of the torch layer `name` on a channels-last tensor of `shape`."""
    import numpy as np

    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    channels = shape[-1]
    if name == "layer norm":
        module = torch.nn.LayerNorm(channels, eps=1e-6)
        forward = module
    elif name == "fc1 + GELU":
        module = torch.nn.Linear(channels, 4 * channels)
        forward = lambda x: torch.nn.functional.gelu(module(x))  # noqa: E731
    elif name == "fc2":
        module = torch.nn.Linear(channels, channels // 4)
        forward = module
    else:  # GRN, as timm writes it for channels last
        gamma = torch.zeros(channels)
        beta = torch.zeros(channels)

        def forward(x):
            gx = x.norm(p=2, dim=(1, 2), keepdim=True)
            nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
            return x + torch.addcmul(beta, gamma, x * nx)

    def call():
        with torch.inference_mode():
            forward(x)

    return call


def run_kernels(args):
    import numpy as np

    jax, jnp, forms = _jax_forms()
    rng = np.random.default_rng(0)
    print("## Kernel sizes: grouped against shifted, jitted (compile s / median ms per call)")
    print("| kernel | batch | shape | grouped | shifted | grouped / shifted |")
    print("|---|---|---|---|---|---|")
    for size in args.kernel_sizes:
        for batch, side, channels in ((1, 56, 96), (16, 28, 192)):
            x = jnp.asarray(rng.standard_normal((batch, side, side, channels), dtype=np.float32))
            kernel = jnp.asarray(0.1 * rng.standard_normal((size, size, channels, 1), dtype=np.float32))
            bias = jnp.zeros((channels,), jnp.float32)
            cells, times = [], {}
            for name in ("grouped", "shifted"):
                start = time.perf_counter()
                compiled = jax.jit(forms[name]).lower(x, kernel, bias).compile()
                compile_s = time.perf_counter() - start
                times[name] = _median_ms(lambda c=compiled: c(x, kernel, bias).block_until_ready(), args.seconds, least=3)
                cells.append(f"{compile_s:.2f} s / {times[name]:.2f}")
            print(f"| {size}x{size} | {batch} | {side}x{side}x{channels} | " + " | ".join(cells)
                  + f" | {times['grouped'] / times['shifted']:.2f}x |", flush=True)


def run_patch(args):
    import numpy as np

    from convnext_zoo.layers import Conv2D, export_forms

    jax, jnp, _ = _jax_forms()
    rng = np.random.default_rng(0)
    print("## Kernel = stride convolutions, jitted: XLA's convolution against patches x matrix "
          "(median ms, forward / forward + gradient)")
    print("| batch | layer | input | convolution | patches | convolution / patches (fwd, fwd+grad) | max diff |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        for model in args.models:
            stages = SHAPES[model]
            cases = [("stem 4x4", (224, 3), stages[0][1], 4)]
            cases += [(f"downsample {i} 2x2", stages[i - 1], stages[i][1], 2) for i in (1, 2, 3)]
            for name, (side, channels), filters, stride in cases:
                layer = Conv2D(filters, kernel_size=stride, strides=stride)
                shape = (batch, side, side, channels)
                layer.build(shape)
                values = [jnp.asarray(0.1 * rng.standard_normal(v.shape, dtype=np.float32))
                          for v in layer.trainable_variables]
                x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
                results, times = [], []
                for standard in (True, False):
                    def forward(values, x, standard=standard):
                        if standard:
                            with export_forms():
                                return layer.stateless_call(values, [], x)[0]
                        return layer.stateless_call(values, [], x)[0]

                    run = jax.jit(forward)
                    grad = jax.jit(jax.grad(lambda v, x, f=forward: jnp.sum(f(v, x) ** 2), argnums=(0, 1)))
                    results.append(run(values, x))
                    times.append((
                        _median_ms(lambda r=run: r(values, x).block_until_ready(), args.seconds),
                        _median_ms(lambda g=grad: jax.block_until_ready(g(values, x)), args.seconds),
                    ))
                diff = float(jnp.max(jnp.abs(results[0] - results[1])))
                (conv, conv_grad), (patch, patch_grad) = times
                print(f"| {batch} | {model} {name} | {side}x{side}x{channels} | {conv:.2f} / {conv_grad:.2f} | "
                      f"{patch:.2f} / {patch_grad:.2f} | {conv / patch:.1f}x, {conv_grad / patch_grad:.1f}x | "
                      f"{diff:.1e} |", flush=True)


def run_kernel_grad(args):
    import numpy as np

    from convnext_zoo import layers

    jax, jnp, _ = _jax_forms()
    rng = np.random.default_rng(0)
    forms = {"taps": layers._kernel_gradient_by_taps, "gram": layers._kernel_gradient_by_gram}
    compiled = {name: jax.jit(form, static_argnums=(2, 3)) for name, form in forms.items()}
    print(f"## The 7x7 depthwise kernel's gradient at {args.image_size} px, jitted: median ms over "
          f"{args.rounds} alternated rounds")
    print("| batch | shape | MiB | taps | gram | taps / gram | the layer takes | max diff |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for batch in args.batch_sizes:
        for model in args.models:
            for side, channels in SHAPES[model]:
                side = side * args.image_size // 224
                upstream = jnp.asarray(rng.standard_normal((batch, side, side, channels), dtype=np.float32))
                padded = jnp.asarray(rng.standard_normal((batch, side + 6, side + 6, channels), dtype=np.float32))
                results = {name: f(padded, upstream, 7, 7) for name, f in compiled.items()}
                scale = float(jnp.max(jnp.abs(results["taps"])))
                diff = float(jnp.max(jnp.abs(results["gram"] - results["taps"]))) / scale

                def measure(name):
                    start = time.perf_counter()
                    jax.block_until_ready(compiled[name](padded, upstream, 7, 7))
                    return time.perf_counter() - start

                for name in compiled:  # untimed: compile, warm the caches
                    measure(name)
                times = workers.alternate(measure, compiled, args.rounds)
                taps, gram = (1e3 * statistics.median(times[name]) for name in compiled)
                taken = "gram" if layers._kernel_gradient_form(upstream.shape, 7) is forms["gram"] else "taps"
                mib = upstream.size * 4 / 2**20
                print(f"| {batch} | {side}x{side}x{channels} | {mib:.1f} | {taps:.1f} | {gram:.1f} | "
                      f"{taps / gram:.2f}x | {taken} | {diff:.1e} |", flush=True)


def _optional_torch(threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="forms,block", help=f"comma list of {','.join(PARTS)}")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 16])
    parser.add_argument("--models", default="atto,tiny", help="comma list of atto,tiny (channel sets)")
    parser.add_argument("--kernel-sizes", type=_ints, default=[3, 5, 7, 9, 11, 15, 21])
    parser.add_argument("--grad", action="store_true", help="also time the gradient of each form")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing budget per cell")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--image-size", type=int, default=224,
                        help="kernel_grad only: the stages' sides scaled from 224 px to this input size")
    parser.add_argument("--rounds", type=int, default=7, help="kernel_grad only: alternated timed rounds")
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    args.models = [m for m in args.models.split(",") if m]
    for value, accepted, what in ((args.parts, PARTS, "--parts"), (args.models, tuple(SHAPES), "--models")):
        unknown = [v for v in value if v not in accepted]
        if unknown:
            parser.error(f"{what} received {','.join(unknown)}; accepted: {','.join(accepted)}.")
    return args


def main(argv=None):
    args = parse_args(argv)
    import bench_cpu

    bench_cpu._set_thread_env(args.threads)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.config.backend() != "jax":
        sys.exit(f"depthwise_forms.py times JAX forms: run it with KERAS_BACKEND=jax. "
                 f"Received: backend={keras.config.backend()!r}.")
    import jax

    print(f"jax {jax.__version__} on {jax.default_backend()}, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}")
    for part in args.parts:
        {"forms": run_forms, "block": run_block, "kernels": run_kernels, "patch": run_patch,
         "kernel_grad": run_kernel_grad}[part](args)


if __name__ == "__main__":
    main()
