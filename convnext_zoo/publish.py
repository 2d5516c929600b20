"""Publishing presets of this package to the Hugging Face Hub (timm loads them too where it can).

`push_to_hub` stages a preset directory (config.json, model.safetensors,
README.md model card) in a temporary directory, loads it back to check it,
and uploads it with huggingface_hub (`create_repo(exist_ok=True)`,
`upload_folder`). `publish_preset` is the maintainer path: registry entry ->
conversion -> parity verification -> push; `publish_registry` runs it over
the whole registry, skipping what is already published.
"""

import logging
import os
import shutil
import tempfile

from convnext_zoo import model_card, preset_dir, resolve, writer

logger = logging.getLogger("convnext_zoo")

STAGED_FILES = ("config.json", "model.safetensors", "README.md")


class VerificationFailed(RuntimeError):
    """Parity verification of a converted preset failed; nothing was pushed."""


def _hf_api(token=None):
    return resolve.hub().HfApi(token=token)


# === Staging ===


def stage_preset(model_or_preset_dir, directory, license=None, base_model=None, check=True,
                 layout="auto"):
    """Writes the preset files (config.json, model.safetensors, README.md) into `directory`.

    Args:
        model_or_preset_dir: a ConvNeXt model of this package, or a preset
            directory.
        directory: where to stage: absent or empty (it is replaced).
        license, base_model: as in `push_to_hub`.
        check: load the staged preset back and compare (variables; for a
            model, its outputs too).
        layout: for a model: "auto", "timm" or "keras" (see
            `writer.save_preset`).

    Returns:
        The config dict.
    """
    if os.path.isdir(directory) and os.listdir(directory):
        raise FileExistsError(f"Staging directory {directory} is not empty.")
    if not isinstance(model_or_preset_dir, (str, os.PathLike)):
        model = model_or_preset_dir
        config = writer.model_config(model, license=license, base_model=base_model)
        model_card.resolve_license(config)
        return writer.save_preset(model, directory, config, layout=layout, overwrite=True,
                                  check=check)
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
    with preset_dir.atomic_directory(directory, overwrite=True) as tmp:
        document = preset_dir.read_json(os.path.join(source, preset_dir.CONFIG_FILE))
        timm_fields = {k: v for k, v in document.items() if k != preset_dir.ZOO_SECTION
                       } if preset_dir.ZOO_SECTION in document else None
        preset_dir.write_config(tmp, config, timm_fields)
        shutil.copyfile(weights_file, os.path.join(tmp, preset_dir.WEIGHTS_FILE))
        if check:
            writer.verify_preset(tmp)
    return preset_dir.read_config(directory)


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
    top1_source=None,
):
    """Publishes a ConvNeXt model or preset directory as a preset on the Hub.

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
        top1_source: where `top1` comes from, in words (see
            `model_card.top1_provenance`).
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
        card = model_card.render(config, repo_id, license=license, top1=top1, parity=parity, name=name,
                                 top1_source=top1_source)
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
    """True when `repo_id` already holds a preset of this package (its fields in config.json)."""
    from huggingface_hub import errors

    api = _hf_api(token)
    try:
        if not api.file_exists(repo_id, "config.json", revision=revision):
            return False
        path = api.hf_hub_download(repo_id, "config.json", revision=revision)
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError):
        return False
    try:
        return preset_dir.zoo_fields(preset_dir.read_json(path)) is not None
    except preset_dir.PresetError:
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
            preset of this package.

    Returns:
        A dict: name, repo_id, status ("pushed", "skipped", "dry-run"),
        the verification report, and the commit info.

    Raises:
        VerificationFailed: the converted preset does not match the source;
            nothing is pushed.
    """
    from convnext_zoo import convert, readers, registry, verification

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
            source = resolve.locate(name).path
        convert.convert_checkpoint(source, output, overwrite=True, **readers.registry_metadata(entry))
        options = {} if tolerance is None else {"tolerance": tolerance}
        report = verification.verify(source, output, images=images, **options)
        if not report["passed"]:
            raise VerificationFailed(
                f"{name}: the converted preset differs from its source checkpoint "
                f"(relative differences: {verification.summary(report)}; tolerance "
                f"{report['tolerance']}). Nothing "
                "was pushed. Check the source file and the conversion."
            )
        info = push_to_hub(
            output, repo_id, private=private, revision=revision, token=token, dry_run=dry_run,
            replace_readme=replace_readme, top1=entry.get("top1"), parity=report, name=name,
            top1_source=model_card.top1_provenance(entry),
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
