"""Publishing Keras-native presets to the Hugging Face Hub.

`push_to_hub` stages a preset directory (config.json, model.safetensors,
README.md model card) in a temporary directory, loads it back to check it,
and uploads it with huggingface_hub (`create_repo(exist_ok=True)`,
`upload_folder`). `publish_preset` is the maintainer path: registry entry ->
conversion -> parity verification -> push; `publish_registry` runs it over
the whole registry, skipping what is already published.
"""

import json
import logging
import os
import shutil
import tempfile

from convnext_zoo import model_card
from convnext_zoo.variants import default_preprocessing

logger = logging.getLogger("convnext_zoo")

STAGED_FILES = ("config.json", "model.safetensors", "README.md")


class VerificationFailed(RuntimeError):
    """Parity verification of a converted preset failed; nothing was pushed."""


def _hf_api(token=None):
    from convnext_zoo.hub import _hub

    return _hub().HfApi(token=token)


# === Staging ===

def _infer_variant(backbone):
    from convnext_zoo.variants import FAMILIES

    family = "v2" if backbone.use_grn else "v1"
    key = (tuple(backbone.depths), tuple(backbone.hidden_dims))
    for variant, spec in FAMILIES[family].items():
        if (tuple(spec[0]), tuple(spec[1])) == key:
            return family, variant
    raise ValueError(
        f"Cannot name the ConvNeXt variant of this model (family {family}, depths "
        f"{key[0]}, dims {key[1]}). Only the registered variants can be published; "
        "see convnext_zoo.variants."
    )


def model_config(model, license=None, base_model=None):
    """The preset `config.json` of a Keras ConvNeXt model.

    Args:
        model: a `ConvNeXtImageClassifier` or `ConvNeXtBackbone`.
        license: licence of the weights (default: the family's).
        base_model: Hub repo the model was fine-tuned from, recorded in
            the provenance.

    Returns:
        A schema-1 config dict.
    """
    from convnext_zoo import preset_dir
    from convnext_zoo.backbone import ConvNeXtBackbone

    if isinstance(model, ConvNeXtBackbone):
        backbone, num_classes, head = model, 0, "none"
    elif isinstance(getattr(model, "backbone", None), ConvNeXtBackbone):
        backbone = model.backbone
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        head = "fc" if num_classes else "norm"
    else:
        raise TypeError(
            "push_to_hub publishes a ConvNeXt model or a preset directory. Received: "
            f"{type(model).__name__}. Build it with convnext_zoo.from_preset / "
            "create_convnext_v1 / create_convnext_v2, or pass a preset directory path."
        )
    family, variant = _infer_variant(backbone)
    prep = default_preprocessing()
    size = [224, 224]
    converter = getattr(getattr(model, "preprocessor", None), "image_converter", None)
    if converter is not None:
        cfg = converter.get_config()
        prep = {k: (list(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]) for k in prep}
        size = [int(s) for s in cfg["image_size"]]
    from convnext_zoo.class_names import LABEL_SET_SIZES

    label_set = LABEL_SET_SIZES.get(num_classes) if head == "fc" else None
    provenance = {"source_format": "keras", "source": "a Keras model (convnext_zoo.push_to_hub)"}
    if base_model:
        provenance["base_model"] = base_model.removeprefix("hf://")
    return preset_dir.make_config(
        family=family,
        variant=variant,
        num_classes=num_classes,
        head=head,
        image_size=size,
        preprocessing=prep,
        label_set=label_set,
        license=license or model_card.LICENSES[family],
        provenance=provenance,
    )


def stage_preset(model_or_preset_dir, directory, license=None, base_model=None, check=True):
    """Writes config.json and model.safetensors into `directory` and checks them.

    Returns:
        The config dict.
    """
    import numpy as np

    from convnext_zoo import preset_dir, weights

    if isinstance(model_or_preset_dir, (str, os.PathLike)):
        source = os.fspath(model_or_preset_dir)
        config = preset_dir.read_config(source)
        weights_file = os.path.join(source, preset_dir.WEIGHTS_FILE)
        if not os.path.isfile(weights_file):
            raise preset_dir.PresetError(
                f"{source!r} has no {preset_dir.WEIGHTS_FILE}; a preset to publish needs its "
                "weights. Convert a checkpoint with convnext_zoo.convert_checkpoint first."
            )
        if base_model:
            config = dict(config, provenance=dict(config["provenance"], base_model=base_model.removeprefix("hf://")))
        if license:
            model_card.resolve_license(config, license)
            config = dict(config, license=license)
        preset_dir.write_config(directory, config)
        shutil.copyfile(weights_file, os.path.join(directory, preset_dir.WEIGHTS_FILE))
        if check:
            preset_dir.verify_preset(directory)
        return config
    model = model_or_preset_dir
    config = model_config(model, license=license, base_model=base_model)
    model_card.resolve_license(config)
    weights.save_weights(model, os.path.join(directory, preset_dir.WEIGHTS_FILE))
    preset_dir.write_config(directory, config)
    if check:
        preset_dir.verify_preset(directory)  # every variable equals its stored tensor
        _check_outputs(model, directory, config)
    return config


def _check_outputs(model, directory, config, rtol=1e-5):
    """The preset, rebuilt at the model's input shape, reproduces the model's outputs."""
    import numpy as np

    from convnext_zoo import preset_dir

    backbone = model.backbone if hasattr(model, "backbone") else model
    shape = tuple(backbone.image_shape or (None, None, 3))
    height, width = (shape[0] or 64), (shape[1] or 64)
    x = np.random.default_rng(0).uniform(-2, 2, (2, height, width, 3)).astype("float32")
    include_top = config["head"] != "none"
    rebuilt = preset_dir.from_preset(directory, include_top=include_top, input_shape=shape)
    expected = np.asarray(model(x, training=False))
    outputs = np.asarray(rebuilt(x, training=False))
    diff = float(np.max(np.abs(outputs - expected))) if outputs.shape == expected.shape else float("inf")
    scale = float(np.max(np.abs(expected))) or 1.0
    if diff > rtol * scale:
        raise preset_dir.PresetError(
            f"The staged preset does not reproduce the model: outputs differ by {diff:.3g} "
            f"(largest {scale:.3g}, shapes {outputs.shape} vs {expected.shape}). Nothing was pushed."
        )


def _human(size):
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def _remote_has(api, repo_id, filename, revision):
    from huggingface_hub import errors

    try:
        return api.file_exists(repo_id, filename, revision=revision)
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError):
        return False


def push_to_hub(
    model_or_preset_dir,
    repo_id,
    *,
    private=False,
    revision=None,
    create_pr=False,
    commit_message=None,
    token=None,
    license=None,
    dry_run=False,
    replace_readme=False,
    base_model=None,
    top1=None,
    parity=None,
    name=None,
):
    """Publishes a ConvNeXt model or preset directory as a Keras-native preset on the Hub.

    The preset (config.json, model.safetensors, README.md model card) is
    staged in a temporary directory and loaded back (every variable compared
    with the file; for a model, its outputs too) before anything is sent.
    Then `create_repo(exist_ok=True)` and one `upload_folder` commit.

    Args:
        model_or_preset_dir: a `ConvNeXtImageClassifier` / `ConvNeXtBackbone`,
            or a preset directory written by `convert_checkpoint`.
        repo_id: "namespace/name".
        private: create the repo private (an existing repo keeps its setting).
        revision: the branch to commit to (created from main if missing).
        create_pr: open a pull request (refs/pr/N) instead of committing.
        commit_message: default "Upload ConvNeXt <family>-<variant> preset".
        token: Hub token (default: HF_TOKEN or the saved login).
        license: licence of the weights (default: the config's / family's;
            V2 weights are always cc-by-nc-4.0).
        dry_run: print what would be uploaded and send nothing.
        replace_readme: overwrite a README.md that already exists on the Hub
            (kept by default).
        base_model: the Hub repo the weights were fine-tuned from (model card
            `base_model`).
        top1: ImageNet-1k top-1 (percent) for the card.
        parity: a `convnext_zoo.verify` report for the card.
        name: the registry name, when publishing a registered preset.

    Returns:
        The `huggingface_hub.CommitInfo` of the upload (its `pr_url` set for a
        pull request), or for a dry run a dict with `repo_id`, `revision`,
        `files` ({name: bytes}) and `readme`.

    Raises:
        PresetError: the preset directory is invalid or does not load back.
        ValueError: a licence that does not match the weights.

    Example:
        >>> model = convnext_zoo.from_preset("convnext_v2_atto", num_classes=10)  # doctest: +SKIP
        >>> convnext_zoo.push_to_hub(model, "me/convnext-v2-atto-flowers",
        ...                          base_model="timm/convnextv2_atto.fcmae_ft_in1k")  # doctest: +SKIP
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(
            f"repo_id must be 'namespace/name'. Received: repo_id={repo_id!r}."
        )
    staging = tempfile.mkdtemp(prefix="convnext_zoo_push_")
    try:
        config = stage_preset(model_or_preset_dir, staging, license=license, base_model=base_model)
        card = model_card.render(config, repo_id, license=license, top1=top1, parity=parity, name=name)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card)
        files = {f: os.path.getsize(os.path.join(staging, f)) for f in STAGED_FILES}
        message = commit_message or f"Upload ConvNeXt {config['family'].upper()}-{config['variant']} preset"
        target = f"{repo_id}" + (f"@{revision}" if revision else "") + (" (as a pull request)" if create_pr else "")
        if dry_run:
            print(f"Dry run: would upload to https://huggingface.co/{target}, commit {message!r}:")
            for file, size in files.items():
                note = "" if file != "README.md" or replace_readme else " (skipped if the repo already has one)"
                print(f"  {file:<20} {_human(size):>10}{note}")
            print(card)
            return {"repo_id": repo_id, "revision": revision, "create_pr": create_pr,
                    "files": files, "readme": card, "config": config}

        api = _hf_api(token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        allow = list(STAGED_FILES)
        if not replace_readme and _remote_has(api, repo_id, "README.md", revision):
            allow.remove("README.md")
            logger.warning("%s already has a README.md: kept (pass replace_readme=True to overwrite).", repo_id)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            allow_patterns=allow,
            revision=revision,
            create_pr=create_pr,
            commit_message=message,
            repo_type="model",
        )
        return info
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# === Maintainer path ===

def is_published(repo_id, revision=None, token=None):
    """True when `repo_id` already holds a Keras-native preset (config.json with schema_version)."""
    from huggingface_hub import errors

    api = _hf_api(token)
    try:
        if not api.file_exists(repo_id, "config.json", revision=revision):
            return False
        path = api.hf_hub_download(repo_id, "config.json", revision=revision)
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError):
        return False
    with open(path, encoding="utf-8") as handle:
        try:
            return "schema_version" in json.load(handle)
        except ValueError:
            return False


def publish_preset(name, namespace, *, source=None, images=None, tolerance=None, work_dir=None,
                   private=False, revision=None, token=None, dry_run=False, skip_existing=True,
                   replace_readme=False):
    """Converts a registry entry, verifies parity, and pushes it to `namespace/<name>`.

    Args:
        name: a registered preset name or alias.
        namespace: the Hub user or organisation to publish under.
        source: the checkpoint to convert (default: the registry's source,
            downloaded through huggingface_hub).
        images: images for the parity check (default: verification's).
        tolerance: relative tolerance of the parity check.
        work_dir: where the converted preset is kept (default: a temporary
            directory, removed afterwards).
        private, revision, token, dry_run, replace_readme: as in `push_to_hub`.
        skip_existing: return "skipped" when the repo already holds a
            Keras-native preset.

    Returns:
        A dict: name, repo_id, status ("pushed", "skipped", "dry-run"),
        the verification report, and the commit info.

    Raises:
        VerificationFailed: the converted preset does not match the source;
            nothing is pushed.
    """
    from convnext_zoo import convert, hub, registry, verification

    entry = registry.preset_info(name)
    name = entry["name"]
    repo_id = f"{namespace}/{name}"
    if skip_existing and not dry_run and is_published(repo_id, revision, token):
        logger.info("%s: already published at %s, skipped.", name, repo_id)
        return {"name": name, "repo_id": repo_id, "status": "skipped"}
    tmp = None if work_dir else tempfile.mkdtemp(prefix="convnext_zoo_publish_")
    try:
        output = os.path.join(work_dir or tmp, name)
        if source is None:
            source, entry = hub._fetch_registered(name, None, False)
        convert.convert_checkpoint(source, output, overwrite=True, **hub._registry_overrides(entry))
        options = {} if tolerance is None else {"tolerance": tolerance}
        report = verification.verify(source, output, images=images, **options)
        if not report["passed"]:
            raise VerificationFailed(
                f"{name}: the converted preset differs from its source checkpoint "
                f"(logits relative {report['logits_relative']}, features relative "
                f"{report['features_relative']}, tolerance {report['tolerance']}). Nothing "
                "was pushed. Check the source file and the conversion."
            )
        info = push_to_hub(
            output, repo_id, private=private, revision=revision, token=token, dry_run=dry_run,
            replace_readme=replace_readme, top1=entry.get("top1"), parity=report, name=name,
            commit_message=f"Publish {name} (converted from {entry['source']['hf_repo'] or entry['source']['official_url']}, parity verified)",
        )
        return {"name": name, "repo_id": repo_id, "status": "dry-run" if dry_run else "pushed",
                "report": report, "commit": info}
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def publish_registry(namespace, *, names=None, family=None, keep_going=True, **options):
    """Publishes every registry entry (or `names`) not yet on the Hub.

    Returns:
        A list of `publish_preset` results; failures are reported as
        `{"name", "repo_id", "status": "failed", "error"}` when `keep_going`.
    """
    from convnext_zoo import registry

    results = []
    for name in names or registry.list_presets(family):
        try:
            results.append(publish_preset(name, namespace, **options))
        except Exception as error:  # one bad entry must not stop the batch
            if not keep_going:
                raise
            logger.error("%s: %s", name, error)
            results.append({"name": name, "repo_id": f"{namespace}/{name}", "status": "failed",
                            "error": f"{type(error).__name__}: {error}"})
    return results
