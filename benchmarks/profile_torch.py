"""Where the time of one forward pass goes on the PyTorch backend, against timm.

Part 1 (`forms`): one model, calls alternated turn by turn in one process
(same threads, same images), the median milliseconds of

- `keras`: `model(images, training=False)` under `torch.no_grad`, what
  `inference_function` ran before it captured the graph: every Keras
  layer's `__call__` in Python around torch's kernels;
- `export`: the same forward captured by `torch.export` (dynamic batch) and
  run as its graph module as exported: torch's kernels without Keras'
  Python, but with the ops `torch.export` records (hundreds of metadata
  checks and no-op dtype conversions) and Keras' two copies around each
  convolution (channels-last -> channels-first memory -> channels-last);
- `inference_function`: the library's `TorchGraphFunction`, that graph with
  those ops dropped (`convnext_zoo.inference._lean_graph`);
- `timm`: timm eager under `torch.inference_mode` on NCHW images.

with the per-turn ratio to timm, then the torch.profiler op table of one
pass of each (mean ms per pass by aten op; `copy_` is the layout copies,
`to`/`_assert_tensor_metadata` the no-ops) and the wall time no op accounts
for (Python, dispatch).

Part 2 (`kernels`): at the shapes of each stage (224 px: 56, 28, 14, 7 px),
torch's 7x7 depthwise convolution on NCHW memory (timm) against
channels-last memory (Keras, after the captured graph's single
`contiguous`), and a layer norm over the last axis of an NHWC tensor
(Keras, and timm's blocks) against timm's `LayerNorm2d`-style
permute-norm-permute.

Usage:
    .venv/bin/python benchmarks/profile_torch.py --model v2_atto --batch 1 --threads 2
    .venv/bin/python benchmarks/profile_torch.py --model v1_tiny --batch 16 --parts forms --repeats 10
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FORMS = ("keras", "export", "inference_function", "timm")


def _forms(model, net, images):
    import torch

    from convnext_zoo.inference import _inference_module, inference_function

    channels_first = images.permute(0, 3, 1, 2).contiguous()
    sample = torch.zeros((2,) + tuple(images.shape[1:]))
    with torch.no_grad():
        exported = torch.export.export(_inference_module(model), (sample,),
                                       dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
    fast = inference_function(model)

    def keras_call():
        with torch.no_grad():
            return model(images, training=False)

    def export_call():
        with torch.no_grad():
            return exported(images)

    def timm_call():
        with torch.inference_mode():
            return net(channels_first)

    return {"keras": keras_call, "export": export_call, "inference_function": lambda: fast(images),
            "timm": timm_call}


def time_forms(calls, repeats):
    """Median ms per form and median per-turn ratio of timm's time to each form's."""
    times = {name: [] for name in calls}
    for name, call in calls.items():
        call()  # the capture, then a warm-up
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            call()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: (1000 * statistics.median(t),
                   statistics.median(a / b for a, b in zip(times["timm"], t))) for name, t in times.items()}


def profile_form(call, passes=3, top=10):
    """(op rows [(name, calls per pass, ms per pass)], op ms per pass, wall ms per pass) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    call()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            call()
    wall = 1000 * (time.perf_counter() - start) / passes
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1000 / passes
    rows = [(e.key, e.count / passes, e.self_cpu_time_total / 1000 / passes) for e in events[:top]]
    return rows, total, wall


def _median_ms(call, repeats):
    import bench_cpu

    return 1000 * statistics.median(bench_cpu._time_calls(call, 1, repeats))


def kernels(dims, batch, repeats):
    """Rows (pixels, channels, dw NCHW ms, dw channels-last ms, LN last axis ms, LN permuted ms)."""
    import torch

    rows = []
    for size, channels in zip((56, 28, 14, 7), dims):
        nchw = torch.randn(batch, channels, size, size)
        last = nchw.contiguous(memory_format=torch.channels_last)
        weight, bias = torch.randn(channels, 1, 7, 7), torch.randn(channels)
        nhwc = nchw.permute(0, 2, 3, 1).contiguous()
        gamma, beta = torch.randn(channels), torch.randn(channels)
        with torch.inference_mode():
            def dw(x):
                return torch.nn.functional.conv2d(x, weight, bias, padding=3, groups=channels)

            def norm_last():
                return torch.nn.functional.layer_norm(nhwc, (channels,), gamma, beta, 1e-6)

            def norm_permuted():
                moved = torch.nn.functional.layer_norm(nchw.permute(0, 2, 3, 1), (channels,), gamma, beta, 1e-6)
                return moved.permute(0, 3, 1, 2)

            rows.append((size, channels, _median_ms(lambda: dw(nchw), repeats),
                         _median_ms(lambda: dw(last), repeats), _median_ms(norm_last, repeats),
                         _median_ms(norm_permuted, repeats)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="v2_atto", help="v2_atto, v1_tiny or v2_tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8, help="alternated turns (forms), calls (kernels)")
    parser.add_argument("--parts", default="forms,kernels")
    parser.add_argument("--top", type=int, default=10, help="op rows per profile")
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = "torch"
    import bench_cpu

    bench_cpu._set_thread_env(args.threads)
    import timm
    import torch

    bench_cpu._torch_threads(torch, args.threads)
    family, variant = args.model.split("_")
    print(f"{args.model}, batch {args.batch}, {args.image_size} px, {args.threads} threads, torch "
          f"{torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    model = bench_cpu._keras_model(family, variant, args.image_size)
    parts = args.parts.split(",")
    if "forms" in parts:
        net = timm.create_model(bench_cpu.TIMM_NAMES[family].format(variant), pretrained=False).eval()
        images = torch.from_numpy(bench_cpu._images(args.batch, args.image_size))
        calls = _forms(model, net, images)
        print("\n| form | ms | vs timm (per turn) | ops ms (profiled) | wall ms (profiled) | "
              "copy_ calls | copy_ ms |\n|---|---:|---:|---:|---:|---:|---:|")
        medians = time_forms(calls, args.repeats)
        tables = {}
        for name in FORMS:
            rows, total, wall = profile_form(calls[name], top=10_000)
            tables[name] = rows
            copies = [row for row in rows if row[0] == "aten::copy_"] or [("", 0, 0.0)]
            ms, ratio = medians[name]
            print(f"| {name} | {ms:.1f} | {ratio:.2f}x | {total:.1f} | {wall:.1f} | "
                  f"{copies[0][1]:.0f} | {copies[0][2]:.1f} |")
        print(f"load average {os.getloadavg()[0]:.1f}")
        for name in FORMS:
            print(f"\n{name}: ms per pass by aten op (self time), calls per pass")
            for key, count, ms in tables[name][:args.top]:
                print(f"  {key:<36} {ms:8.2f} ms {count:6.0f}")
    if "kernels" in parts:
        dims = model.backbone.hidden_dims
        print(f"\nbatch {args.batch}: 7x7 depthwise convolution, NCHW memory vs channels-last memory; "
              "layer norm over the last axis of NHWC vs permute-norm-permute of NCHW (ms)\n"
              "| px | channels | dw NCHW | dw channels-last | LN last axis | LN permuted |\n"
              "|---:|---:|---:|---:|---:|---:|")
        for size, channels, *times in kernels(dims, args.batch, 5 * args.repeats):
            print(f"| {size} | {channels} | " + " | ".join(f"{t:.2f}" for t in times) + " |")


if __name__ == "__main__":
    main()
