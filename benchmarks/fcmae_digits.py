"""FCMAE on real data: does masked pre-training help when labels are few? (scikit-learn digits)

The proof of issue 19. Steps, each a `convnext-zoo` command in its own
process (the user's path, nothing special-cased):

1. `examples/write_digits.py`: the 1,797 digits as 32x32 PNGs, a fixed
   stratified 80/20 split (1,437 training, 360 test images).
2. `convnext-zoo pretrain DIGITS/train --variant atto`: FCMAE on every
   training image, labels ignored (the class folders are only folders).
3. For each seed: a stratified 10 % of the training labels (seed-chosen,
   the same subset for both starts), then `convnext-zoo finetune` twice
   with one recipe: from the pre-trained encoder (`OUT/encoder`) and from
   random weights of the same architecture (`--from-scratch`). The test
   accuracy is the run's final evaluation on the 360 test images (`val/`).

Results: fcmae_digits.json and .md (mean, std, min/max of both starts,
every run's settings and seconds) and the last reconstruction grid
(reconstruction.png) in --output-dir (benchmarks/results/fcmae).

Usage (from the repository root):
    .venv/bin/python benchmarks/fcmae_digits.py                 # about 18 minutes on 2 cores
    .venv/bin/python benchmarks/fcmae_digits.py --quick --output-dir /tmp/fcmae   # a smoke run
    # two more seeds on a finished run's pre-training (and its finished fine-tunings):
    .venv/bin/python benchmarks/fcmae_digits.py --work-dir W --reuse --seeds 0,1,2,3,4 ...
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, HERE)

from write_digits import write_digits  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 12 images per class, 2 pre-training epochs, 1 seed, 2 fine-tuning epochs")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="default 20 (quick: 2)")
    p.add_argument("--pretrain-batch", type=int, default=64)
    p.add_argument("--pretrain-lr", type=float, default=1.5e-3,
                   help="peak rate (the official 1.5e-4 x 64 / 256 = 3.75e-5 is for 1600 ImageNet epochs)")
    p.add_argument("--warmup-epochs", type=float, default=5)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--pretrain-crop-scale", type=float, default=1.0,
                   help="smallest random-crop area of the pre-training (default 1.0: whole digits, as the "
                        "fine-tuning sees them; the official ImageNet value is 0.2)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="default 40 (quick: 2)")
    p.add_argument("--finetune-batch", type=int, default=None, help="default 16 (quick: 4)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="peak fine-tuning rate for both starts (default: the recipe's, 1e-3 at batch 16)")
    p.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise lr decay for both starts (default: the recipe's, 1.0: none; the official FCMAE "
                        "fine-tuning of atto uses 0.9)")
    p.add_argument("--head-init-scale", type=float, default=None,
                   help="scale of the new head's initial weights for both starts (default: the recipe's, 1.0; the "
                        "official FCMAE fine-tuning uses 0.001)")
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--seeds", default=None, help="comma list (default 0,1,2; quick: 0)")
    p.add_argument("--work-dir", help="keep the runs here (default: a temporary folder, removed)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the pre-training and fine-tuning runs already finished in --work-dir (e.g. to "
                        "add seeds); their seconds are the ones they logged")
    p.add_argument("--output-dir", default=os.path.join(HERE, "results", "fcmae"))
    args = p.parse_args(argv)
    args.pretrain_epochs = args.pretrain_epochs or (2 if args.quick else 20)
    args.finetune_epochs = args.finetune_epochs or (2 if args.quick else 40)
    args.finetune_batch = args.finetune_batch or (4 if args.quick else 16)
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    return args


def _command(*argv):
    """Runs `convnext-zoo ARGV` in a fresh process; returns (stdout, seconds)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "convnext_zoo", *map(str, argv)], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"convnext-zoo {' '.join(map(str, argv))} failed:\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result.stdout, time.perf_counter() - start


def label_subset(digits, out, fraction, seed):
    """`out/train`: a stratified `fraction` of each class of `digits/train` (seed-chosen); `out/val`: all of `digits/val`."""
    rng = np.random.default_rng(seed)
    counts = {}
    for digit in sorted(os.listdir(os.path.join(digits, "train"))):
        files = sorted(os.listdir(os.path.join(digits, "train", digit)))
        chosen = rng.permutation(len(files))[:max(1, int(round(fraction * len(files))))]
        os.makedirs(os.path.join(out, "train", digit))
        for i in sorted(chosen):
            shutil.copy(os.path.join(digits, "train", digit, files[i]), os.path.join(out, "train", digit))
        counts[digit] = len(chosen)
    shutil.copytree(os.path.join(digits, "val"), os.path.join(out, "val"))
    return counts


def _summary(values):
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "runs": values}


def run(args, work):
    digits = os.path.join(work, "digits")
    if args.reuse and os.path.isdir(digits):  # as written (other --reuse processes may read it)
        counts = {split: sum(len(files) for _, _, files in os.walk(os.path.join(digits, split)))
                  for split in ("train", "val")}
    else:
        counts = write_digits(digits, per_class=12 if args.quick else None)
    pretrained = os.path.join(work, "pretrained")
    pretrain_log_path = os.path.join(pretrained, "pretraining_log.json")
    if not (args.reuse and os.path.exists(pretrain_log_path)):
        _command("pretrain", os.path.join(digits, "train"), "--variant", "atto", "--output", pretrained,
                 "--image-size", 32, "--epochs", args.pretrain_epochs, "--batch-size", args.pretrain_batch,
                 "--lr", args.pretrain_lr, "--warmup-epochs", args.warmup_epochs,
                 "--mask-ratio", args.mask_ratio, "--crop-scale", args.pretrain_crop_scale, "--no-flip",
                 "--seed", 0, "--verbose", 0)
    with open(pretrain_log_path, encoding="utf-8") as handle:
        pretrain_log = json.load(handle)
    plan = pretrain_log["plan"]
    if (plan["epochs"], plan["lr"], pretrain_log["mask_ratio"], plan["crop_scale"][0]) != (
            args.pretrain_epochs, args.pretrain_lr, args.mask_ratio, args.pretrain_crop_scale):
        raise SystemExit(f"--reuse: {pretrain_log_path} is a run of {plan['epochs']} epochs at lr {plan['lr']:g}, "
                         f"mask ratio {pretrain_log['mask_ratio']}, crop scale {plan['crop_scale'][0]:g}; this "
                         f"command asks for {args.pretrain_epochs} at {args.pretrain_lr:g}, {args.mask_ratio}, "
                         f"{args.pretrain_crop_scale:g}. Repeat its settings or use another --work-dir.")
    common = ["--recipe", "small_from_scratch", "--epochs", args.finetune_epochs,
              "--batch-size", args.finetune_batch, "--image-size", 32, "--verbose", 0]
    if args.finetune_lr:
        common += ["--lr", args.finetune_lr]
    if args.layer_decay is not None:
        common += ["--layer-decay", args.layer_decay]
    if args.head_init_scale is not None:
        common += ["--head-init-scale", args.head_init_scale]
    runs = []
    for seed in args.seeds:
        subset = os.path.join(work, f"labels_{seed}")
        if args.reuse and os.path.isdir(subset):
            shutil.rmtree(subset)  # drawn again: the same seed gives the same subset
        labelled = label_subset(digits, subset, args.label_fraction, seed)
        for start, extra in (("pretrained", []), ("random", ["--from-scratch"])):
            out = os.path.join(work, f"finetune_{start}_{seed}")
            log_path = os.path.join(out, "training_log.json")
            if not (args.reuse and os.path.exists(log_path)):
                _command("finetune", os.path.join(pretrained, "encoder"), subset, "--output", out,
                         "--seed", seed, *common, *extra)
            with open(log_path, encoding="utf-8") as handle:
                log = json.load(handle)
            ran = (log["plan"]["epochs"], log["plan"]["batch_size"], log["plan"]["lr"], log["plan"]["layer_decay"],
                   log["plan"].get("head_init_scale", 1.0))
            if ran[:2] != (args.finetune_epochs, args.finetune_batch) or (
                    args.finetune_lr and ran[2] != args.finetune_lr) or (
                    args.layer_decay is not None and ran[3] != args.layer_decay) or (
                    args.head_init_scale is not None and ran[4] != args.head_init_scale):
                raise SystemExit(f"--reuse: {log_path} ran {log['plan']['epochs']} epochs at batch "
                                 f"{log['plan']['batch_size']}, lr {log['plan']['lr']:g}, layer decay "
                                 f"{log['plan']['layer_decay']:g}, not the {args.finetune_epochs} at "
                                 f"{args.finetune_batch} asked for (or another lr / layer decay / head init "
                                 "scale). "
                                 "Repeat its settings or use another --work-dir.")
            seconds = log["wall_seconds"]
            runs.append({"start": start, "seed": seed, "labelled_images": sum(labelled.values()),
                         "test_images": log["num_val"], "test_accuracy": log["final"]["val_accuracy"],
                         "seconds": round(seconds, 1), "plan_lr": log["plan"]["lr"],
                         "plan_layer_decay": log["plan"]["layer_decay"],
                         "plan_head_init_scale": log["plan"].get("head_init_scale", 1.0)})
            print(f"seed {seed} {start}: test accuracy {runs[-1]['test_accuracy']:.4f} ({seconds:.0f} s)",
                  flush=True)
    results = {start: _summary([r["test_accuracy"] for r in runs if r["start"] == start])
               for start in ("pretrained", "random")}
    gain = results["pretrained"]["mean"] - results["random"]["mean"]
    spread = max(results["pretrained"]["std"], results["random"]["std"])
    grid = os.path.join(pretrained, pretrain_log["final"]["grid"])
    return {
        "digits": counts, "label_fraction": args.label_fraction,
        "pretraining": {k: pretrain_log[k] for k in ("image_size", "patch_size", "grid", "mask_ratio",
                                                     "norm_pix_loss", "decoder", "plan", "train_seconds")}
        | {"seconds": pretrain_log["wall_seconds"],
           "loss_first_last": [pretrain_log["epochs"][0]["loss"], pretrain_log["epochs"][-1]["loss"]]},
        "finetuning": {"recipe": "small_from_scratch", "epochs": args.finetune_epochs,
                       "batch": args.finetune_batch, "lr": runs[0]["plan_lr"],
                       "layer_decay": runs[0]["plan_layer_decay"],
                       "head_init_scale": runs[0]["plan_head_init_scale"]},
        "runs": runs, "results": results, "gain": gain, "largest_std": spread,
        "pretrained_better_by_more_than_spread": bool(gain > spread
                                                       and results["pretrained"]["min"] > results["random"]["mean"]),
        "grid_path": grid,
    }


def markdown(out):
    r = out["results"]
    p = out["pretraining"]
    lines = [
        "# FCMAE pre-training on the scikit-learn digits: 10 % of the labels",
        "",
        f"Command: `{out['command']}`  ",
        f"Started (UTC): {out['started_utc']}, wall {out['wall_s']:.0f} s; {out['machine']}  ",
        f"Data: {out['digits']['train']} training images (pre-training, labels unused), "
        f"{out['digits']['val']} test images; fine-tuning on a stratified "
        f"{out['label_fraction']:.0%} of the training labels ({out['runs'][0]['labelled_images']} images), "
        "a different subset per seed, the same for both starts.  ",
        f"Pre-training: ConvNeXt V2-atto at {p['image_size']} px, {p['patch_size']}-px patches "
        f"({p['grid'][0]}x{p['grid'][1]}), mask ratio {p['mask_ratio']}, decoder {p['decoder']['dim']} x "
        f"{p['decoder']['depth']}, {p['plan']['epochs']} epochs at batch {p['plan']['batch_size']}, "
        f"peak lr {p['plan']['lr']:g} ({p['plan']['warmup_steps']} warmup steps, cosine), AdamW betas "
        f"{p['plan']['betas']}, weight decay {p['plan']['weight_decay']}, RandomResizedCrop "
        f"{p['plan']['crop_scale']}, no flips (digits); loss {p['loss_first_last'][0]:.3f} -> "
        f"{p['loss_first_last'][1]:.3f}; {p['seconds']:.0f} s.  ",
        f"Fine-tuning: `convnext-zoo finetune` with recipe {out['finetuning']['recipe']}, "
        f"{out['finetuning']['epochs']} epochs, batch {out['finetuning']['batch']}, peak lr "
        f"{out['finetuning'].get('lr', 1e-3):g}, layer decay {out['finetuning'].get('layer_decay', 1.0):g}, "
        f"head init scale {out['finetuning'].get('head_init_scale', 1.0):g}, "
        "identical for both starts.",
        "",
        "| start | test accuracy mean | std | min | max | runs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for start in ("pretrained", "random"):
        s = r[start]
        lines.append(f"| {'FCMAE encoder' if start == 'pretrained' else 'random init'} | {s['mean']:.2%} | "
                     f"{s['std']:.2%} | {s['min']:.2%} | {s['max']:.2%} | "
                     + ", ".join(f"{v:.2%}" for v in s["runs"]) + " |")
    paired = {r["seed"]: r["test_accuracy"] for r in out["runs"] if r["start"] == "pretrained"}
    differences = [paired[r["seed"]] - r["test_accuracy"] for r in out["runs"]
                   if r["start"] == "random" and r["seed"] in paired]
    lines += ["", f"Gain of the pre-trained start: {out['gain']:+.2%} (largest std {out['largest_std']:.2%}); "
              f"better by more than the spread: {'yes' if out['pretrained_better_by_more_than_spread'] else 'no'}. "
              "Per seed (same labelled subset for both starts): "
              + ", ".join(f"{d:+.2%}" for d in differences) + ".",
              "", "Reconstruction grid after the last epoch (rows: original, masked, reconstructed): "
              "reconstruction.png"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.monotonic()
    work = args.work_dir or tempfile.mkdtemp(prefix="fcmae_digits_")
    out = run(args, work)
    import workers  # this folder's: the machine facts every benchmark records

    machine = workers.machine()
    out.update({
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"), "wall_s": time.monotonic() - clock,
        "machine": f"{machine['cpu']}, {machine['cpu_count']} CPUs, AVX-512 "
                   f"{'yes' if machine['avx512'] else 'no'}, load average at start "
                   f"{', '.join(f'{x:.1f}' for x in machine['load_average_at_start'])} "
                   f"(shared with other jobs), {platform.machine()}",
        "machine_facts": machine,
    })
    os.makedirs(args.output_dir, exist_ok=True)
    shutil.copy(out.pop("grid_path"), os.path.join(args.output_dir, "reconstruction.png"))
    with open(os.path.join(args.output_dir, "fcmae_digits.json"), "w", encoding="utf-8") as handle:
        json.dump(out, handle, indent=1)
    text = markdown(out)
    with open(os.path.join(args.output_dir, "fcmae_digits.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
