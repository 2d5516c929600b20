#!/usr/bin/env python
"""Measures the time and peak memory of converting the largest checkpoints.

For each variant (default: V1 xlarge and V2 huge) the script writes a timm
`model.safetensors` with random float32 weights of the exact timm shapes
(built from timm's model on the meta device, so no model is materialised
here), then runs `convnext_zoo.convert.convert_checkpoint` on it in a fresh
Python process and reports:

* wall time of the conversion call (Keras already imported; the import is
  reported separately),
* peak resident memory of that process (`VmHWM`), the peak resident memory
  after importing Keras and the converter, and the difference as a multiple
  of the weights' size: the converter reads safetensors lazily and
  holds the Keras model plus at most one more copy while writing, so the
  peak should stay near 2x the weights plus the runtime.

Example:
    .venv/bin/python scripts/measure_conversion.py
    .venv/bin/python scripts/measure_conversion.py --variants v2:atto v1:tiny --json out.json

Each large case takes minutes and several GB of memory and disk.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

DEFAULT_VARIANTS = ("v1:xlarge", "v2:huge")

CHILD = r"""
import json, sys, time


def status(field):
    # VmHWM is the peak resident set of this process image; unlike
    # ru_maxrss it does not inherit the parent's peak across fork + exec.
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


started = time.perf_counter()
import keras  # noqa: F401  (the import is timed on its own)
from convnext_zoo.convert import convert_checkpoint
imported = time.perf_counter()
before = status("VmHWM")
config = convert_checkpoint(sys.argv[1], sys.argv[2], dtype=sys.argv[3])
done = time.perf_counter()
print(json.dumps({
    "import_seconds": round(imported - started, 2),
    "convert_seconds": round(done - imported, 2),
    "rss_before_convert_bytes": before,
    "peak_rss_bytes": status("VmHWM"),
    "variant": config["variant"], "family": config["family"],
}))
"""


def _arch(family, variant):
    return f"convnext{'v2' if family == 'v2' else ''}_{variant}"


def write_random_timm_checkpoint(family, variant, path, seed=0):
    """Writes random weights of timm's exact shapes; returns (tensors, bytes)."""
    import numpy as np
    import timm
    import torch
    from safetensors.numpy import save_file

    with torch.device("meta"):
        model = timm.create_model(_arch(family, variant))
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, value in model.state_dict().items():
        shape = tuple(value.shape)
        array = rng.standard_normal(shape, dtype=np.float32)
        array *= 0.02
        if len(shape) == 1:
            array += 1.0 if key.endswith(("norm.weight", "downsample.0.weight", "stem.1.weight")) else 0.0
        arrays[key] = np.ascontiguousarray(array)
    total = sum(a.nbytes for a in arrays.values())
    save_file(arrays, path, metadata={"format": "pt"})
    with open(os.path.join(os.path.dirname(path), "config.json"), "w") as handle:
        json.dump({"architecture": _arch(family, variant), "num_classes": 1000}, handle)
    return len(arrays), total


def measure(family, variant, workdir, dtype="float32"):
    source_dir = os.path.join(workdir, f"{_arch(family, variant)}_source")
    os.makedirs(source_dir, exist_ok=True)
    source = os.path.join(source_dir, "model.safetensors")
    count, size = write_random_timm_checkpoint(family, variant, source)
    output = os.path.join(workdir, f"{_arch(family, variant)}_preset")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, source, output, dtype],
        env=env, capture_output=True, text=True,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"Conversion of {family} {variant} failed (exit {result.returncode}):\n"
            + result.stderr[-4000:]
        )
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    out_bytes = os.path.getsize(os.path.join(output, "model.safetensors"))
    stats.update({
        "tensors": count,
        "weights_bytes": size,
        "output_bytes": out_bytes,
        "process_wall_seconds": round(wall, 2),
        "peak_over_weights": round(stats["peak_rss_bytes"] / size, 2),
        "conversion_over_weights": round(
            (stats["peak_rss_bytes"] - stats["rss_before_convert_bytes"]) / size, 2),
        "dtype": dtype,
    })
    shutil.rmtree(source_dir, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Measure conversion time and peak memory (benchmarks/README.md, Conversion cost).")
    parser.add_argument(
        "--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="FAMILY:VARIANT",
        help="cases to measure, e.g. v1:xlarge v2:huge (default) or v2:atto for a quick check")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="storage dtype of the converted preset (default float32)")
    parser.add_argument("--workdir", default=None,
                        help="where to write the random checkpoint and the preset (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    # torch (via timm) must be imported before TensorFlow, which `import
    # convnext_zoo` loads: the other order segfaults on this machine.
    import timm  # noqa: F401

    from convnext_zoo.variants import variant_config

    workdir = args.workdir or tempfile.mkdtemp(prefix="convnext_measure_")
    results = []
    try:
        for case in args.variants:
            family, _, variant = case.partition(":")
            variant_config(family, variant)  # fails early on a typo
            print(f"measuring {family} {variant} ...", file=sys.stderr, flush=True)
            results.append(measure(family, variant, workdir, args.dtype))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    gib = 1024 ** 3
    print("| model | weights (GiB) | convert (s) | peak RSS (GiB) | RSS after imports (GiB) "
          "| (peak - imports) / weights |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| ConvNeXt {r['family'].upper()}-{r['variant']} | {r['weights_bytes'] / gib:.2f} | "
              f"{r['convert_seconds']:.1f} | {r['peak_rss_bytes'] / gib:.2f} | "
              f"{r['rss_before_convert_bytes'] / gib:.2f} | {r['conversion_over_weights']:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
