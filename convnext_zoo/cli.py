"""The `convnext-zoo` command line (also `python -m convnext_zoo`).

    convnext-zoo list [--family v1|v2] [--variant V] [--classes N] [--license L]
        [--task classification|embedding|features] [--max-params 30M] [--aliases] [--json]
    convnext-zoo info NAME [--json]
    convnext-zoo predict IMAGE... [--preset NAME] [--top K] [--json]
    convnext-zoo predict DIR --output results.jsonl [--preset NAME] [--features] [--batch-size N]
        [--top K] [--overwrite] [--distribute data]
    convnext-zoo convert SOURCE OUTPUT_DIR [--format F] [--verify] ...
    convnext-zoo verify SOURCE PRESET_DIR [--images DIR] [--tolerance T]
    convnext-zoo push PRESET_DIR REPO_ID [--private] [--revision R] [--create-pr] [--dry-run]
    convnext-zoo export PRESET_OR_DIR OUT --format litert|onnx|saved_model|openvino [--quantize Q]
        [--batch-size N] [--image-size H W] [--include-preprocessing] [--overwrite] [--json]
    convnext-zoo finetune PRESET DATA_DIR --output OUT_DIR [--epochs N] [--batch-size B]
        [--distribute data|model] ...
    convnext-zoo pretrain DATA_DIR --variant atto --output OUT_DIR [--epochs N] [--mask-ratio R]
        [--init PRESET] [--resume] ...

`--help`, `list` and `info` import neither Keras nor TensorFlow (the
`convnext-zoo` launcher sets CONVNEXT_ZOO_LIGHT_IMPORT=1 before importing the
package). Errors print one line on stderr and exit with status 2; set
CONVNEXT_ZOO_DEBUG=1 for the traceback. CONVNEXT_ZOO_CPU_DEVICES=N splits
the CPU into N devices before the backend starts (to try `--distribute` on
a machine without accelerators; see `convnext_zoo.distribute`).
"""

import argparse
import json
import os
import sys

PROG = "convnext-zoo"
DEFAULT_PRESET = "convnext_v2_atto_imagenet"
EXIT_ERROR = 2
EXIT_FAILED = 1  # verification ran and failed


class CommandError(Exception):
    """An error reported as one line, exit status 2."""


# === Helpers ===

def _quiet_backends():
    import logging

    # huggingface_hub logs each retry of an unreachable Hub; the final error is
    # reported as one line instead. Its progress bars are unaffected.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
    _import_backend_quietly()
    if os.environ.get("CONVNEXT_ZOO_CPU_DEVICES"):
        from convnext_zoo import distribute

        distribute.configure_cpu_devices()  # before the backend's first operation


def _import_backend_quietly():
    """Imports Keras (and its backend) with native stderr silenced.

    TensorFlow 2.21 prints oneDNN / CUDA notices from C++ before absl logging
    is initialised, ignoring TF_CPP_MIN_LOG_LEVEL; they would bury the
    command's output. Python errors are unaffected (reported after restore).
    CONVNEXT_ZOO_DEBUG=1 keeps everything.
    """
    if os.environ.get("CONVNEXT_ZOO_DEBUG") == "1" or "keras" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras  # noqa: F401
        import keras_hub  # noqa: F401

        if keras.config.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # triggers the CUDA probe now
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _format_params(count):
    if count >= 1e6:
        return f"{count / 1e6:.1f}M"
    return f"{count / 1e3:.0f}K"


def _table(rows, headers, right=()):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _check_preset(preset):
    """Fails fast (before Keras loads) on an unknown preset name."""
    from convnext_zoo import registry

    try:
        registry.resolve(preset)
    except ValueError as error:
        raise CommandError(str(error)) from None


# === Commands ===

def cmd_list(args):
    from convnext_zoo import registry

    try:
        names = registry.list_presets(args.family, license=args.license, task=args.task,
                                      max_params=args.max_params)
    except ValueError as error:
        raise CommandError(str(error)) from None
    entries = [registry.preset_info(n) for n in names]
    if args.variant:
        entries = [e for e in entries if e["variant"] == args.variant]
    if args.classes is not None:
        entries = [e for e in entries if e["num_classes"] == args.classes]
    if args.tag:
        entries = [e for e in entries if args.tag in e["tag"]]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    rows = [
        [e["name"], e["family"], e["variant"], e["image_size"], e["num_classes"] or "-",
         _format_params(e["params"]), f"{e['top1']:.1f}" if e["top1"] is not None else "-",
         e["task"], e["license"] + (" (gated)" if e["gated"] else "")]
        for e in entries
    ]
    print(_table(rows, ["name", "family", "variant", "resolution", "classes", "params", "top-1",
                        "task", "licence"], right={3, 4, 5, 6}))
    if args.aliases:
        aliases = {a: t for a, t in registry.aliases().items() if t in {e["name"] for e in entries}}
        print()
        print(_table(sorted(aliases.items()), ["alias", "preset"]))
    print(f"\n{len(rows)} presets. Details: {PROG} info NAME")
    return 0


def cmd_info(args):
    from convnext_zoo import registry

    try:
        entry = registry.preset_info(args.name)
    except ValueError as error:
        raise CommandError(str(error)) from None
    entry["aliases"] = [a for a, t in registry.aliases().items() if t == entry["name"]]
    if args.json:
        print(json.dumps(entry, indent=2))
        return 0
    source, prep = entry["source"], entry["preprocessing"]
    lines = [
        f"name:          {entry['name']}",
        f"aliases:       {', '.join(entry['aliases']) or '-'}",
        f"family:        {entry['family']}",
        f"variant:       {entry['variant']}",
        f"tag:           {entry['tag']}",
        f"task:          {entry['task']}",
        f"classes:       {entry['num_classes'] or 'none (encoder, no head)'}"
        + (f" ({entry['label_set']})" if entry["label_set"] else
           " (embedding size)" if entry["num_classes"] else ""),
        f"parameters:    {entry['params']:,}",
        f"top-1:         "
        + (f"{entry['top1']} ({entry['top1_source']}, ImageNet-1k at {entry['top1_image_size']} px)"
           if entry["top1"] is not None else "-"),
        f"resolution:    {entry['image_size']}"
        + (f" (test time {entry['test_time']['image_size']}, crop_pct {entry['test_time']['crop_pct']})"
           if entry.get("test_time") else ""),
        f"preprocessing: {prep['interpolation']} resize, crop_pct {prep['crop_pct']} ({prep['crop_mode']}), "
        f"mean {prep['mean']}, std {prep['std']}",
        f"licence:       {entry['license']}"
        + (f" (gated: accept it on https://huggingface.co/{source['hf_repo']}, then set HF_TOKEN)"
           if entry["gated"] else ""),
        f"source:        {source['format']} "
        + (f"hf://{source['hf_repo']} ({source['filename']})" if source["hf_repo"] else source["official_url"]),
        f"revision:      {source['revision'] or '-'}",
        f"sha256:        {source['sha256'] or '-'}",
        f"official url:  {source['official_url'] or '-'}",
        f"load:          convnext_zoo.from_preset({entry['name']!r})",
    ]
    print("\n".join(lines))
    return 0


def _read_images(paths):
    """Decodes every image first, so a bad path fails before Keras loads."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        if not os.path.exists(path):
            raise CommandError(f"No such file: {path}")
        if os.path.isdir(path):
            raise CommandError(f"{path} is a directory; pass image files (JPEG, PNG, ...).")
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
        except (UnidentifiedImageError, OSError) as error:
            raise CommandError(
                f"{path} is not an image PIL can read ({type(error).__name__}). "
                "Pass JPEG, PNG, WebP, BMP or TIFF files."
            ) from None
    return images


def cmd_predict(args):
    if args.output is not None or (len(args.images) == 1 and os.path.isdir(args.images[0])):
        return _predict_folder(args)
    for flag, given in (("--features", args.features), ("--batch-size", args.batch_size is not None),
                        ("--overwrite", args.overwrite), ("--distribute", args.distribute)):
        if given:
            raise CommandError(
                f"{flag} applies to scoring a folder: pass one DIR and --output results.jsonl. "
                f"Received image files: {' '.join(args.images[:3])}."
            )
    top = 5 if args.top is None else args.top
    if top < 1:
        raise CommandError(f"--top must be >= 1. Received: {top}.")
    images = _read_images(args.images)
    _check_preset(args.preset)
    _quiet_backends()
    from convnext_zoo import scoring

    try:  # a fine-tuned preset's own class names, else ImageNet's
        model, labels = scoring.load_model(args.preset)
    except scoring.ScoringError as error:
        raise CommandError(str(error)) from None
    results = []
    for path, image in zip(args.images, images):
        scores = model.predict(image[None], verbose=0)[0]
        results.append({"image": path, "predictions": scoring.top_predictions(
            scores, top, labels, softmax=model.activation != "softmax")})
    if args.json:
        print(json.dumps({"preset": args.preset, "results": results}, indent=2))
        return 0
    for result in results:
        print(f"{result['image']}:")
        for p in result["predictions"]:
            print(f"  {p['probability']:7.2%}  {p['label']}" + (f" ({p['synset']})" if p["synset"] else ""))
    return 0


def _predict_folder(args):
    """`predict DIR --output results.jsonl`: checks everything, then `scoring.score_folder`."""
    from convnext_zoo import scoring

    folder = args.images[0]
    if len(args.images) != 1:
        raise CommandError(
            f"--output scores one folder: pass one DIR. Received {len(args.images)} paths: "
            f"{' '.join(args.images[:3])}{' ...' if len(args.images) > 3 else ''}."
        )
    if args.output is None:
        raise CommandError(
            f"{folder} is a directory: pass --output results.jsonl to score every image in it "
            "(or pass image files)."
        )
    if args.features and args.top is not None:
        raise CommandError(
            f"--features writes embeddings, not top-k classes. Received: --top {args.top}; drop one of them."
        )
    for flag, value in (("--batch-size", args.batch_size), ("--top", args.top)):
        if value is not None and value < 1:
            raise CommandError(f"{flag} must be >= 1. Received: {value}.")
    top = None if args.features else (5 if args.top is None else args.top)
    batch_size = scoring.DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    if not (os.path.exists(args.preset) or args.preset.startswith("hf://")):
        _check_preset(args.preset)
    try:
        scoring.check_request(folder, args.output, batch_size, top, args.features)
        name = scoring.model_id(args.preset)
        scoring.read_previous(args.output, scoring.run_settings(folder, name, args.features, top),
                              args.overwrite)
    except scoring.ScoringError as error:
        raise CommandError(str(error)) from None
    _quiet_backends()
    from convnext_zoo import distribute

    try:
        with distribute.distribution_scope(args.distribute, global_batch=batch_size) as placement:
            model, labels = scoring.load_model(args.preset, args.features)
            summary = scoring.score_folder(
                model, folder, args.output, features=args.features, batch_size=batch_size, top=top,
                class_names=[label for _, label in labels] if labels else None,
                overwrite=args.overwrite, model_name=name, placement=placement)
    except (scoring.ScoringError, distribute.DistributeError) as error:
        raise CommandError(str(error)) from None
    print(scoring.format_summary(summary))
    return 0


def _check_source(source):
    """A path-like source that does not exist fails before Keras loads (Hub ids pass)."""
    looks_local = os.path.isabs(source) or source.startswith(".") or source.endswith(
        (".safetensors", ".pth", ".pt", ".bin", ".json")) or source.count("/") != 1
    if looks_local and not os.path.exists(source):
        raise CommandError(
            f"No such checkpoint: {source} (a file, a directory, or a Hub repo id 'org/name')."
        )


def cmd_convert(args):
    _check_source(args.source)
    if os.path.exists(args.output_dir) and not args.overwrite:
        raise CommandError(f"Output directory {args.output_dir} already exists; pass --overwrite to replace it.")
    _quiet_backends()
    from convnext_zoo.convert import convert_checkpoint

    overrides = {k: v for k, v in {
        "family": args.family, "variant": args.variant, "num_classes": args.num_classes,
        "dtype": args.dtype, "revision": args.revision, "checkpoint_key": args.checkpoint_key,
        "layout": args.layout, "norm_layer": args.norm_layer, "norm_epsilon": args.norm_epsilon,
    }.items() if v is not None}
    if args.overwrite:
        overrides["overwrite"] = True
    config = convert_checkpoint(args.source, args.output_dir, source_format=args.format, **overrides)
    print(f"Wrote {args.output_dir}: ConvNeXt {config['family'].upper()}-{config['variant']}, "
          f"{config['num_classes']} classes, head {config['head']}, licence {config['license']}"
          + (f" ({config['seconds']:.1f} s)" if "seconds" in config else ""))
    timm = config["timm"]
    print(f"timm loads it: timm.create_model('local-dir:{args.output_dir}', pretrained=True)"
          if timm["loadable"] else f"timm cannot load it: {timm['reason']}")
    if args.verify:
        return _run_verify(args.source, args.output_dir, args.images, args.tolerance, args.format,
                           args.revision)
    return 0


def _run_verify(source, preset, images, tolerance, source_format="auto", revision=None):
    from convnext_zoo import verification

    options = {"source_format": source_format, "revision": revision, "images": images}
    if tolerance is not None:
        options["tolerance"] = tolerance
    report = verification.verify(source, preset, **options)
    print(verification.format_report(report))
    return 0 if report["passed"] else EXIT_FAILED


def cmd_verify(args):
    _check_source(args.source)
    if not os.path.isdir(args.preset_dir):
        raise CommandError(f"No such preset directory: {args.preset_dir}")
    _quiet_backends()
    return _run_verify(args.source, args.preset_dir, args.images, args.tolerance, args.format)


def cmd_push(args):
    if not os.path.isdir(args.preset_dir):
        raise CommandError(f"No such preset directory: {args.preset_dir}")
    _quiet_backends()
    from convnext_zoo.publish import push_to_hub

    info = push_to_hub(
        args.preset_dir, args.repo_id, private=args.private, revision=args.revision,
        create_pr=args.create_pr, commit_message=args.commit_message, token=args.token,
        license=args.license, dry_run=args.dry_run, replace_readme=args.replace_readme,
        base_model=args.base_model,
    )
    if not args.dry_run:
        print(f"Pushed to {info.pr_url or info.commit_url}")
    return 0


def cmd_export(args):
    from convnext_zoo.deploy import ExportError, check_options

    try:
        check_options(args.format, args.quantize, args.output, args.overwrite, args.batch_size,
                      tuple(args.image_size) if args.image_size else None)
    except ExportError as error:
        raise CommandError(str(error)) from None
    if not os.path.isdir(args.source):
        _check_preset(args.source)
    _quiet_backends()
    from convnext_zoo.deploy import export

    report = export(
        args.source, args.output, format=args.format, quantize=args.quantize,
        batch_size=args.batch_size, image_size=tuple(args.image_size) if args.image_size else None,
        include_preprocessing=args.include_preprocessing, overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    shape = "x".join("N" if s is None else str(s) for s in report["input_shape"])
    agreement = report.get("top1_agreement")
    print(f"Wrote {args.output}: {args.format}"
          + (f" ({args.quantize})" if args.quantize else " (float32)")
          + f", {report['bytes'] / 1e6:.1f} MB, input {report['input_dtype']} {shape}"
          + (f", opset {report['opset']}" if "opset" in report else ""))
    print(f"Checked on {report['images']} photographs against the Keras model: relative logit "
          f"error {report['relative']:.1e}"
          + (f" (limit {report['tolerance']:.0e})" if report["tolerance"] else "")
          + (f", top-1 agreement {agreement:.0%}" if agreement is not None else ""))
    return 0


def _finetune_options(args):
    overrides = {k: v for k, v in {
        "mixup": args.mixup, "cutmix": args.cutmix, "smoothing": args.smoothing,
        "drop_path": args.drop_path, "reprob": args.reprob, "head_init_scale": args.head_init_scale,
    }.items() if v is not None}
    if args.randaugment is not None:
        overrides["randaugment"] = (
            {"num_ops": 2, "magnitude": args.randaugment} if args.randaugment > 0 else None)
    if args.flip is not None:
        overrides["flip"] = args.flip
    return {
        "preset": args.preset, "output": args.output, "epochs": args.epochs,
        "batch_size": args.batch_size, "image_size": args.image_size,
        "val_split": args.val_split, "recipe": args.recipe, "lr": args.lr,
        "layer_decay": args.layer_decay, "dtype": args.dtype, "resume": args.resume,
        "seed": args.seed, "from_scratch": args.from_scratch, "overrides": overrides,
        "distribute": args.distribute,
    }


def _preset_facts(preset):
    """`(resolution, num_classes)` a preset records (registry or config.json); None when unknown."""
    from convnext_zoo import preset_dir, registry

    try:
        if os.path.isdir(preset):
            config = preset_dir.read_config(preset)
            return int(config["image_size"][0]), int(config["num_classes"])
        info = registry.preset_info(preset)
        return int(info["image_size"]), int(info["num_classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _training_size(preset, folder):
    """`--image-size` by default: the preset's resolution, or less for small images.

    Images smaller than the preset's resolution (digits, icons, CIFAR-like
    crops) train at the smallest multiple of 32 that holds them: upsampling
    32-px images to 224 px costs 49 times the compute and adds no detail.
    """
    resolution = _preset_facts(preset)[0] or 224
    if folder.max_side:
        resolution = min(resolution, max(32, -(-folder.max_side // 32) * 32))
    return resolution


def _check_run_sizes(args):
    """A training command's --epochs and --batch-size (>= 1) and --image-size (>= 32), where given."""
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--image-size", args.image_size, 32)):
        if value is not None and value < low:
            raise CommandError(f"{flag} must be >= {low}. Received: {value}.")


def cmd_finetune(args):
    from convnext_zoo import finetune_data, recipes

    _check_run_sizes(args)
    if not 0.0 < args.val_split < 1.0:
        raise CommandError(f"--val-split must be in (0, 1). Received: {args.val_split}.")
    if args.head_init_scale is not None and not args.head_init_scale > 0:
        raise CommandError(f"--head-init-scale must be > 0. Received: {args.head_init_scale}. The official "
                           "fine-tuning recipes use 0.001 (pre-trained weights) or 1.0 (from scratch).")
    if args.recipe is not None:
        try:
            recipes.get_recipe(args.recipe)
        except ValueError as error:
            raise CommandError(str(error)) from None
    if os.path.exists(args.output):
        raise CommandError(
            f"Output directory {args.output} already exists; choose a new --output "
            "(the fine-tuned preset is written there as a whole)."
        )
    if not (os.path.isdir(args.preset) or args.preset.startswith("hf://")):
        _check_preset(args.preset)
    try:
        folder = finetune_data.scan_images(args.data_dir)
    except finetune_data.DataError as error:
        raise CommandError(str(error)) from None
    if args.image_size is None:
        args.image_size = _training_size(args.preset, folder)
    if args.epochs is None:
        args.epochs = recipes.default_epochs(args.recipe, args.from_scratch)
    options = _finetune_options(args)
    if args.batch_size > folder.num_train:
        raise CommandError(
            f"--batch-size {args.batch_size} is larger than the {folder.num_train} training "
            f"images; pass --batch-size {max(1, folder.num_train // 4)} or less."
        )
    from convnext_zoo.finetune_data import ResumeError, check_resume, work_dir

    if args.resume:
        try:
            check_resume(options, folder)
        except ResumeError as error:
            raise CommandError(str(error)) from None
    elif os.path.exists(work_dir(args.output)):
        raise CommandError(
            f"An interrupted run's work folder {work_dir(args.output)} exists: pass --resume "
            "to continue it, or delete that folder to start afresh."
        )
    notes = [f"{len(folder.class_names)} classes, {folder.num_train} training images"
             + (f", {folder.num_val} validation images" if folder.val_dir else
                f" (validation: {args.val_split:.0%} of them)")]
    if folder.ignored:
        notes.append(f"{len(folder.ignored)} non-image files skipped")
    if folder.unreadable:
        shown = ", ".join(folder.unreadable[:3]) + (", ..." if len(folder.unreadable) > 3 else "")
        notes.append(f"{len(folder.unreadable)} unreadable image files skipped ({shown})")
    converted = sorted(folder.modes - {"RGB"})
    if converted:
        notes.append(f"{'/'.join(converted)} images converted to RGB")
    preset_classes = None if args.from_scratch else _preset_facts(args.preset)[1]
    if preset_classes is not None and preset_classes != len(folder.class_names):
        head = f"its {preset_classes}-class head" if preset_classes else "no head"
        notes.append(f"a new {len(folder.class_names)}-class head (the preset has {head})")
    notes.append(f"training at {args.image_size} px for {args.epochs} epochs")
    print(f"{args.data_dir}: " + "; ".join(notes))
    _quiet_backends()
    from convnext_zoo.finetune import finetune

    log = finetune(options, folder, verbose=args.verbose)
    final = log["final"]
    print(f"Wrote {args.output}: validation accuracy {final['val_accuracy']:.2%} "
          f"({final['weights']} weights) after {len(log['epochs'])} epochs, "
          f"{log['train_seconds']:.0f} s of training. Load it with "
          f"convnext_zoo.from_preset({args.output!r}).")
    return 0


def _describe_init(config):
    if config["head"] == "none":
        return f"a ConvNeXt {config['family'].upper()}-{config['variant']} encoder"
    return (f"a ConvNeXt {config['family'].upper()}-{config['variant']} with a "
            f"{config['num_classes'] or 'pooled'}-class head")


def _check_init(init, variant):
    """`--init` must be an FCMAE encoder of `variant`; checked on its config, before any training."""
    from convnext_zoo import readers, resolve

    accepted = (f"Pass convnext_v2_{variant}_fcmae, an official FCMAE .pt file of V2-{variant}, "
                f"an encoder preset directory of V2-{variant}, or the output of an earlier "
                f"`{PROG} pretrain --variant {variant}`.")
    for folder in (os.path.join(init, "fcmae"), init):
        config_path = os.path.join(folder, "config.json")
        if os.path.isdir(folder) and os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as handle:
                document = json.load(handle)
            if isinstance(document, dict) and document.get("format") == "convnext_zoo.fcmae":
                found = document.get("metadata", {}).get("variant")
                if found != variant:
                    raise CommandError(
                        f"--init {init} is an FCMAE of ConvNeXt V2-{found}, not of --variant "
                        f"{variant}. Pass --variant {found}, or: {accepted}")
                return
    try:
        config = readers.read(resolve.locate(init, download=False)).config
        source_format = config["provenance"]["source_format"]
    except (ValueError, OSError, KeyError) as error:
        raise CommandError(f"--init {init} cannot be read: {_one_line(error)} {accepted}") from None
    if os.path.isfile(init) and source_format != "fcmae":
        raise CommandError(
            f"--init {init} is a {source_format} checkpoint, not an official FCMAE pre-training "
            f"file (key encoder.downsample_layers.0.0.weight). {accepted}")
    if (config["family"], config["variant"], config["head"]) != ("v2", variant, "none"):
        raise CommandError(
            f"--init {init} is not an FCMAE encoder of ConvNeXt V2-{variant}: it is "
            f"{_describe_init(config)}. {accepted}")


def cmd_pretrain(args):
    from convnext_zoo import finetune_data, recipes, variants

    _check_run_sizes(args)
    if not 0.0 < args.mask_ratio < 1.0:
        raise CommandError(
            f"--mask-ratio must be in (0, 1). Received: {args.mask_ratio}. The official value is 0.6.")
    if args.lr is not None and args.lr <= 0:
        raise CommandError(f"--lr must be > 0. Received: {args.lr}.")
    if args.warmup_epochs is not None and args.warmup_epochs < 0:
        raise CommandError(f"--warmup-epochs must be >= 0. Received: {args.warmup_epochs}.")
    if args.crop_scale is not None and not 0.0 < args.crop_scale <= 1.0:
        raise CommandError(
            f"--crop-scale must be in (0, 1]. Received: {args.crop_scale}. The official value is 0.2; "
            "1.0 keeps whole images.")
    if os.path.exists(args.output) and not args.overwrite:
        raise CommandError(
            f"Output directory {args.output} already exists; choose a new --output or pass "
            "--overwrite to replace it once the new run is complete.")
    if args.init is not None:
        _check_init(args.init, args.variant)
    try:
        folder = finetune_data.scan_unlabelled(args.data_dir)
    except finetune_data.DataError as error:
        raise CommandError(str(error)) from None
    if args.image_size is None:
        size = recipes.FCMAE_PRETRAINING["image_size"]
        args.image_size = min(size, max(32, -(-folder.max_side // 32) * 32)) if folder.max_side else size
    size = args.image_size
    strides = variants.plan_strides(size, size)
    patch = 1
    for stride in strides:
        patch *= stride
    if size % patch:
        raise CommandError(
            f"--image-size {size}: the patch grid does not divide it (patch size {patch}, the "
            f"encoder's total stride {strides}). Use a multiple of {patch}, e.g. "
            f"{max(1, size // patch) * patch}.")
    patches = (size // patch) ** 2
    kept = int(patches * (1.0 - args.mask_ratio))
    if kept < 1 or kept == patches:
        raise CommandError(
            f"--mask-ratio {args.mask_ratio} keeps {kept} of the {patches} patches at {size} px; at "
            f"least one must be kept and one removed. Choose a ratio between {1 / patches:.3f} and "
            f"{1 - 1 / patches:.3f}, or a larger --image-size.")
    if args.batch_size > folder.num_train:
        raise CommandError(
            f"--batch-size {args.batch_size} is larger than the {folder.num_train} images; pass "
            f"--batch-size {max(1, folder.num_train // 4)} or less.")
    if args.epochs is None:
        args.epochs = recipes.DEFAULT_EPOCHS
    options = {
        "variant": args.variant, "output": args.output, "epochs": args.epochs,
        "batch_size": args.batch_size, "image_size": size, "mask_ratio": args.mask_ratio,
        "init": args.init, "dtype": args.dtype, "lr": args.lr, "warmup_epochs": args.warmup_epochs,
        "flip": args.flip, "crop_scale": args.crop_scale, "resume": args.resume,
        "overwrite": args.overwrite, "seed": args.seed, "distribute": args.distribute,
    }
    from convnext_zoo.finetune_data import ResumeError, check_identity, work_dir
    from convnext_zoo.pretrain import run_identity

    if args.resume:
        try:
            check_identity(args.output, run_identity(options, folder))
        except ResumeError as error:
            raise CommandError(str(error)) from None
    elif os.path.exists(work_dir(args.output)):
        raise CommandError(
            f"An interrupted run's work folder {work_dir(args.output)} exists: pass --resume "
            "to continue it, or delete that folder to start afresh.")
    notes = [f"{folder.num_train} images (labels and sub-folders ignored)"]
    if folder.ignored:
        notes.append(f"{len(folder.ignored)} non-image files skipped")
    if folder.unreadable:
        notes.append(f"{len(folder.unreadable)} unreadable image files skipped")
    notes.append(f"ConvNeXt V2-{args.variant} at {size} px, {patch}-px patches "
                 f"({size // patch}x{size // patch}), mask ratio {args.mask_ratio:g}, "
                 f"{args.epochs} epochs; grids in {work_dir(args.output)}/reconstructions")
    print(f"{args.data_dir}: " + "; ".join(notes))
    _quiet_backends()
    from convnext_zoo.pretrain import pretrain

    log = pretrain(options, folder, verbose=args.verbose)
    last = log["epochs"][-1] if log["epochs"] else {}
    print(f"Wrote {args.output}: encoder/ (fine-tune it: {PROG} finetune {args.output}/encoder DATA "
          f"--output OUT), fcmae/, reconstructions/; loss {last.get('loss', float('nan')):.4f} after "
          f"{len(log['epochs'])} epochs, {log['train_seconds']:.0f} s of training.")
    return 0


# === Parser ===

def build_parser():
    from convnext_zoo.variants import V2_VARIANTS  # pure Python: `--help` stays Keras-free

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ConvNeXt V1/V2 for Keras 3: list presets, predict, convert, verify and publish.",
        epilog=f"Example: {PROG} predict cat.jpg --top 3",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("list", help="table of the registered presets")
    p.add_argument("--family", choices=["v1", "v2"], help="one family only")
    p.add_argument("--variant", help="one variant only, e.g. atto, tiny")
    p.add_argument("--classes", type=int,
                   help="number of outputs (1000, 11821, 21841; a CLIP embedding size; 0 for encoders)")
    p.add_argument("--tag", help="substring of the tag, e.g. in22k, fcmae, 384")
    p.add_argument("--license", help="one licence only, e.g. apache-2.0, mit, cc-by-nc-4.0, dinov3-license")
    p.add_argument("--task", help="classification, embedding (CLIP towers) or features (no head)")
    p.add_argument("--max-params", help="at most this many parameters, e.g. 30M, 1.5B")
    p.add_argument("--aliases", action="store_true", help="also list the aliases")
    p.add_argument("--json", action="store_true", help="print the entries as JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="one preset in full")
    p.add_argument("name", help="a preset name or alias")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("predict", help="top-k labels of images, or of a whole folder into a JSON-lines file")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, or one folder (with --output)")
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"preset name, alias, hf://org/repo or directory (default {DEFAULT_PRESET})")
    p.add_argument("--top", type=int, help="labels per image (default 5)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--output", help="folder mode: the JSON-lines file to write or resume")
    p.add_argument("--features", action="store_true",
                   help="folder mode: write the pooled embedding instead of labels")
    p.add_argument("--batch-size", type=int, help="folder mode: images per batch (default 32)")
    p.add_argument("--distribute", choices=["data"],
                   help="folder mode: split each batch over the devices (JAX or TensorFlow)")
    p.add_argument("--overwrite", action="store_true",
                   help="folder mode: replace an output written with other settings")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("convert", help="convert an official/timm/transformers/OpenCLIP/DINOv3/keras-hub "
                       "checkpoint to a preset")
    p.add_argument("source", help="weights file, directory or Hub repo id")
    p.add_argument("output_dir")
    p.add_argument("--format", default="auto",
                   choices=["auto", "official", "timm", "transformers", "open_clip", "dinov3",
                            "preset", "keras-hub"])
    p.add_argument("--layout", default="auto", choices=["auto", "timm", "keras"],
                   help="weights layout: timm's where timm can build the network (auto), or Keras'")
    p.add_argument("--verify", action="store_true", help="then compare with the source (needs torch, timm)")
    p.add_argument("--images", help="with --verify: directory of images (default: the test photographs)")
    p.add_argument("--tolerance", type=float, help="with --verify: relative tolerance")
    p.add_argument("--family", choices=["v1", "v2"])
    p.add_argument("--variant")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--norm-layer", choices=["layer_norm", "simple_norm", "rms_norm"],
                   help="the norm where the tensors cannot tell (a bias-free SimpleNorm or RMS norm)")
    p.add_argument("--norm-epsilon", type=float, help="epsilon of every norm (default: the source's, or 1e-6)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--checkpoint-key")
    p.add_argument("--revision")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="compare a source checkpoint and its converted preset")
    p.add_argument("source")
    p.add_argument("preset_dir")
    p.add_argument("--images", help="directory of images (default: the test photographs)")
    p.add_argument("--tolerance", type=float)
    p.add_argument("--format", default="auto",
                   choices=["auto", "official", "timm", "transformers", "open_clip", "dinov3"])
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("push", help="publish a preset directory to the Hugging Face Hub")
    p.add_argument("preset_dir")
    p.add_argument("repo_id", help="namespace/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to commit to (created if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead")
    p.add_argument("--dry-run", action="store_true", help="show what would be uploaded; send nothing")
    p.add_argument("--commit-message")
    p.add_argument("--license")
    p.add_argument("--base-model", help="Hub repo the weights were fine-tuned from")
    p.add_argument("--replace-readme", action="store_true", help="overwrite an existing README.md")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("export", help="export a preset for deployment (LiteRT, ONNX, SavedModel, OpenVINO)")
    p.add_argument("source", metavar="PRESET_OR_DIR", help="preset name, alias, hf://org/repo or directory")
    p.add_argument("output", metavar="OUT",
                   help="a .tflite file (litert), an .onnx file (onnx) or a directory (saved_model, openvino)")
    p.add_argument("--format", default="litert", help="litert (default), onnx, saved_model or openvino")
    p.add_argument("--quantize", help="litert: float16, dynamic_int8 or int8; onnx: dynamic_int8")
    p.add_argument("--batch-size", type=int, help="a fixed batch size (default: dynamic)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="input height and width (with --include-preprocessing: of the raw images)")
    p.add_argument("--include-preprocessing", action="store_true",
                   help="the graph takes uint8 images and resizes, crops and normalises them")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("finetune", help="fine-tune a preset on a folder of class sub-folders")
    p.add_argument("preset", help="preset name, alias, hf://org/repo or preset directory")
    p.add_argument("data_dir", help="folder of class sub-folders (or with train/ and val/ folders)")
    p.add_argument("--output", required=True, help="the preset directory to write (must not exist)")
    p.add_argument("--epochs", type=int,
                   help="default: the recipe's (40 for small_from_scratch), else 10")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int,
                   help="square training resolution in px (default: the preset's, or the "
                        "multiple of 32 that holds the images when they are smaller)")
    p.add_argument("--val-split", type=float, default=0.1,
                   help="validation fraction when DATA_DIR has no val/ folder (default 0.1)")
    p.add_argument("--recipe", help="official recipe (default: by family; see convnext_zoo.recipes)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: recipe base_lr x batch / 256)")
    p.add_argument("--layer-decay", type=float, help="layer-wise LR decay (default: the recipe's)")
    p.add_argument("--dtype", choices=["mixed_bfloat16", "mixed_float16"])
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-scratch", action="store_true",
                   help="the preset's architecture with random weights (nothing downloaded)")
    p.add_argument("--mixup", type=float, help="MixUp alpha (0: off; default: the recipe's)")
    p.add_argument("--cutmix", type=float, help="CutMix factor (0: off)")
    p.add_argument("--smoothing", type=float, help="label smoothing")
    p.add_argument("--drop-path", type=float, help="stochastic depth rate")
    p.add_argument("--head-init-scale", type=float,
                   help="multiplies the new head's initial weights (default: the recipe's; 0.001 in the official "
                        "fine-tuning of pre-trained weights)")
    p.add_argument("--reprob", type=float, help="random erasing factor (0: off)")
    p.add_argument("--randaugment", type=float, help="RandAugment magnitude 0-10 (0: off)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: the recipe's; --no-flip for text, digits)")
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2], help="Keras progress output")
    p.add_argument("--distribute", choices=["data", "model"],
                   help="spread training over the devices: data (replicas; JAX or TensorFlow) or "
                        "model (sharded MLP and head kernels; JAX); --batch-size is the global batch")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("pretrain", help="FCMAE masked pre-training of a ConvNeXt V2 on a folder of images")
    p.add_argument("data_dir", help="folder of images (any sub-folders; their names are ignored)")
    p.add_argument("--variant", default="atto", choices=list(V2_VARIANTS),
                   help="ConvNeXt V2 variant (default atto)")
    p.add_argument("--output", required=True,
                   help="directory to write: encoder/ (a preset), fcmae/, reconstructions/")
    p.add_argument("--epochs", type=int, help="default 10 (the official run: 1600 on ImageNet)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int,
                   help="square resolution in px (default 224, or the multiple of 32 that holds "
                        "smaller images)")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="fraction of patches removed (0.6)")
    p.add_argument("--init", help="continue from an FCMAE encoder of --variant: convnext_v2_*_fcmae, "
                                  "an official FCMAE .pt file, an encoder preset or an earlier output")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1.5e-4 x batch / 256)")
    p.add_argument("--warmup-epochs", type=float,
                   help="linear warmup (default: the official 40 of 1600 epochs, as a fraction)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default on, as officially)")
    p.add_argument("--crop-scale", type=float,
                   help="smallest area of the random resized crop, as a fraction of the image "
                        "(default 0.2, as officially; 1.0: whole images only, better where the "
                        "fine-tuning sees whole images, as on the digits benchmark)")
    p.add_argument("--dtype", choices=["mixed_bfloat16", "mixed_float16"])
    p.add_argument("--distribute", choices=["data"],
                   help="split every batch over the devices (JAX or TensorFlow)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2], help="Keras progress output")
    p.set_defaults(func=cmd_pretrain)
    return parser


def _version():
    from convnext_zoo import __version__

    return __version__


def _one_line(error):
    if type(error).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        return (
            "the preset's files are not in the huggingface_hub cache and "
            + ("HF_HUB_OFFLINE=1 forbids downloads" if offline else "the Hub cannot be reached")
            + ". Connect once (unset HF_HUB_OFFLINE) to download them, or pass a local preset directory."
        )
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv=None):
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CommandError as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `convnext-zoo list | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line, no traceback (CONVNEXT_ZOO_DEBUG=1 shows it)
        if os.environ.get("CONVNEXT_ZOO_DEBUG") == "1":
            raise
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
