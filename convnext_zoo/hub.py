"""`from_preset`: registered names, aliases, `hf://` handles and local directories.

Downloads go through huggingface_hub only (its cache under `HF_HOME`, its
progress bars, `HF_TOKEN`, `HF_HUB_OFFLINE=1`, revisions). Every downloaded
weights file is checked against its sha256 (the registry's pin when known,
else the Hub's LFS etag, which names the cached blob) before use, so a
corrupt or truncated cache gives an error that says how to re-download,
never a silently wrong model. Keras-native presets load through
`convnext_zoo.preset_dir.from_preset`; timm, transformers and official
checkpoints are read by `convnext_zoo.convert.prepare_conversion` and
assigned tensor by tensor straight into the requested model (no preset is
written in between).
"""

import json
import logging
import os
import re
import shutil
import tempfile
import urllib.request

from convnext_zoo import registry
from convnext_zoo.checkpoint_io import sha256_file

logger = logging.getLogger("convnext_zoo")

WEIGHT_CANDIDATES = ("model.safetensors", "pytorch_model.bin")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PresetDownloadError(OSError):
    """A preset's files could not be downloaded or failed their integrity check."""


def _redownload_hint(preset, path):
    return (
        f"Re-download it with convnext_zoo.from_preset({preset!r}, force_download=True), "
        f"or delete {path} and load again."
    )


def verify_file(path, expected_sha256=None, preset=None):
    """Checks a downloaded file against its sha256.

    `expected_sha256` is the registry's pin; without one, the name of the
    huggingface_hub cache blob the file links to is used when it is a sha256
    (the Hub's etag of LFS files). Returns the digest.
    """
    blob = os.path.realpath(path)
    expected = expected_sha256 or (
        os.path.basename(blob) if _SHA256.match(os.path.basename(blob)) else None
    )
    if expected is None:
        return None
    actual = sha256_file(blob)
    if actual != expected:
        raise PresetDownloadError(
            f"Integrity check failed for {path}: sha256 {actual}, expected {expected} "
            f"({'registry pin' if expected_sha256 else 'Hub etag'}). The cached file is "
            f"corrupt or truncated. {_redownload_hint(preset, blob)}"
        )
    return actual


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            "Loading presets from the Hub needs huggingface_hub: pip install huggingface_hub."
        ) from None
    return huggingface_hub


def hub_download(repo_id, filename, revision=None, force_download=False, preset=None):
    """`hf_hub_download` with errors that name the preset and the way out."""
    hub = _hub()
    from huggingface_hub import errors

    try:
        return hub.hf_hub_download(
            repo_id, filename, revision=revision, force_download=force_download
        )
    except errors.RevisionNotFoundError:
        raise PresetDownloadError(
            f"Revision {revision!r} not found in Hub repo {repo_id!r} (preset {preset!r}). "
            "Pass an existing branch, tag or commit as revision=, or drop it for 'main'."
        ) from None
    except errors.RepositoryNotFoundError:
        raise PresetDownloadError(
            f"Hub repo {repo_id!r} not found or not accessible (preset {preset!r}). Check "
            "the name; for a private repo set HF_TOKEN or run `hf auth login`."
        ) from None
    # LocalEntryNotFoundError subclasses EntryNotFoundError: test it first.
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        raise PresetDownloadError(
            f"{filename} of {repo_id!r} (revision {revision or 'main'}) is not in the "
            f"huggingface_hub cache and {'HF_HUB_OFFLINE=1 forbids downloads' if offline else 'the Hub cannot be reached'}. "
            "Connect once (unset HF_HUB_OFFLINE) to download it, or pass a local directory. "
            f"({type(error).__name__})"
        ) from None
    except errors.EntryNotFoundError:
        raise  # the caller decides whether a missing file is optional
    except Exception as error:
        names = {c.__name__ for c in type(error).__mro__}
        if names & {"TransportError", "HTTPError", "RemoteProtocolError", "StreamError"} or isinstance(
            error, OSError
        ):
            raise PresetDownloadError(
                f"Download of {filename} from {repo_id!r} failed: {type(error).__name__}: "
                f"{error}. The cache was left usable (partial downloads are kept apart "
                "from it); load again to retry."
            ) from None
        raise


def _download_official(url, expected_sha256, force_download, preset):
    """The two V1 in1k_384 checkpoints exist only as official `.pth` files."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ImportError(
            f"Preset {preset!r} exists only as an official PyTorch .pth checkpoint, "
            "which needs torch to read: pip install torch (or convnext_zoo[torch]). "
            "Every other preset loads from safetensors without torch."
        ) from None
    hub = _hub()
    from huggingface_hub import constants

    folder = os.path.join(constants.HF_HOME, "convnext_zoo", "official")
    path = os.path.join(folder, os.path.basename(url))
    if os.path.exists(path) and not force_download:
        verify_file(path, expected_sha256, preset)
        return path
    if constants.HF_HUB_OFFLINE:
        raise PresetDownloadError(
            f"Preset {preset!r} is not cached at {path} and HF_HUB_OFFLINE=1 forbids "
            "downloads. Connect once to download it."
        )
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".incomplete")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, f, 1 << 20)
        verify_file(tmp, expected_sha256, preset)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    del hub
    return path


def _fetch_registered(name, revision, force_download):
    """Downloads a registered preset; returns `(directory or file, entry)`."""
    entry = registry.preset_info(name)
    source = entry["source"]
    if not source["hf_repo"]:
        return _download_official(source["official_url"], source["sha256"], force_download, name), entry
    pinned = revision or source["revision"] or None
    weights = hub_download(source["hf_repo"], source["filename"], pinned, force_download, name)
    # A registry sha256 belongs to the pinned revision only.
    expected = source["sha256"] if not revision or revision == source["revision"] else None
    verify_file(weights, expected or None, name)
    try:
        hub_download(source["hf_repo"], "config.json", pinned, force_download, name)
    except Exception:  # the sidecar is optional: the registry holds its facts
        pass
    return os.path.dirname(weights), entry


def _fetch_hf(repo_id, revision, force_download, preset):
    """Downloads `config.json` and the weights of an `hf://` preset; returns the folder."""
    from huggingface_hub import errors

    try:
        config_path = hub_download(repo_id, "config.json", revision, force_download, preset)
    except errors.EntryNotFoundError:
        config_path = None
    for filename in WEIGHT_CANDIDATES:
        try:
            weights = hub_download(repo_id, filename, revision, force_download, preset)
        except errors.EntryNotFoundError:
            continue
        verify_file(weights, None, preset)
        if config_path and os.path.dirname(config_path) != os.path.dirname(weights):
            raise PresetDownloadError(
                f"{repo_id}: config.json and {filename} resolved to different commits; retry."
            )
        return os.path.dirname(weights)
    raise PresetDownloadError(
        f"Hub repo {repo_id!r} (revision {revision or 'main'}) has none of "
        f"{', '.join(WEIGHT_CANDIDATES)} (preset {preset!r}). Accepted repos hold a "
        "Keras-native preset (config.json + model.safetensors) or a timm / "
        "transformers ConvNeXt checkpoint."
    )


def _is_keras_preset(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            return "schema_version" in json.load(f)
    except ValueError:
        return False


def _registry_overrides(entry):
    prep = entry["preprocessing"]
    return {
        "family": entry["family"],
        "variant": entry["variant"],
        "input_size": entry["image_size"],
        "crop_pct": prep["crop_pct"],
        "crop_mode": prep["crop_mode"],
        "interpolation": prep["interpolation"],
        "mean": prep["mean"],
        "std": prep["std"],
        "labels": entry["label_set"],
        "license": entry["license"],
    }


def registry_config(entry):
    """The Keras-native config.json a registered preset converts to."""
    from convnext_zoo import preset_dir

    prep = entry["preprocessing"]
    return preset_dir.make_config(
        family=entry["family"],
        variant=entry["variant"],
        num_classes=entry["num_classes"],
        head="fc" if entry["num_classes"] else "none",
        image_size=[entry["image_size"], entry["image_size"]],
        preprocessing={k: prep[k] for k in preset_dir.PREPROCESSING_KEYS},
        label_set=entry["label_set"],
        license=entry["license"],
        provenance={"source_format": entry["source"]["format"], "preset": entry["name"]},
    )


def attach_preprocessor(model, config, input_shape=None):
    """Gives a classifier the preset's evaluation preprocessing."""
    from convnext_zoo.classifier import ConvNeXtImageClassifier
    from convnext_zoo.preprocessing import (
        ConvNeXtImageClassifierPreprocessor,
        ConvNeXtImageConverter,
    )

    if not isinstance(model, ConvNeXtImageClassifier):
        return model
    size = list(config["image_size"])
    if input_shape is not None and input_shape[0] and input_shape[1]:
        size = [int(input_shape[0]), int(input_shape[1])]
    prep = dict(config["preprocessing"])
    converter = ConvNeXtImageConverter(
        image_size=tuple(size),
        crop_pct=float(prep["crop_pct"]),
        crop_mode=prep["crop_mode"],
        mean=tuple(prep["mean"]),
        std=tuple(prep["std"]),
        interpolation=prep["interpolation"] if prep["interpolation"] in ("bicubic", "bilinear", "nearest") else "bicubic",
    )
    model.preprocessor = ConvNeXtImageClassifierPreprocessor(converter)
    return model


def from_preset(
    preset,
    include_top=True,
    num_classes=None,
    input_shape=None,
    pooling=None,
    load_weights=True,
    dtype=None,
    force_download=False,
    revision=None,
    preprocessing=True,
    **kwargs,
):
    """Builds a ConvNeXt model from a preset, with its pretrained weights.

    Args:
        preset: a registered name ("convnext_v2_atto_fcmae_ft_in1k"), an
            alias ("convnext_v2_atto_imagenet", "convnext_v1_tiny"), a Hub
            handle ("hf://org/repo" or "hf://org/repo@revision") or a local
            directory (a Keras-native preset, or a timm / transformers /
            official checkpoint, converted on the fly).
        include_top: build the classification head. FCMAE presets have none:
            they load as backbones unless `num_classes` asks for a new head.
        num_classes: a different number of classes loads everything but the
            head and initialises a new one (logged once); `None` keeps the
            preset's.
        input_shape: `(height, width, channels)`; default `(None, None, 3)`.
            The small-input rule applies to small static sizes.
        pooling: without the top, `None` returns the backbone's feature map,
            "avg"/"max" the pooled, normalised embedding.
        load_weights: `False` builds the architecture only (works offline).
        dtype: dtype policy, e.g. "bfloat16" or "mixed_float16".
        force_download: download again even if cached (repairs a corrupt
            cache).
        revision: Hub branch, tag or commit (overrides the registry's pin).
        preprocessing: attach the checkpoint's evaluation preprocessing to a
            classifier, so `predict` takes raw uint8 RGB images of any size.
            `False` leaves the model expecting normalised inputs.
        **kwargs: passed to the model factory (`drop_path_rate`,
            `classifier_activation`, `name`, `dropout`, ...).

    Returns:
        A `ConvNeXtImageClassifier`, or a `ConvNeXtBackbone` (include_top
        False and pooling None, or an FCMAE preset).

    Example:
        >>> model = convnext_zoo.from_preset("convnext_v2_atto_imagenet")
        >>> backbone = convnext_zoo.from_preset("convnext_v2_atto", include_top=False)
        >>> model10 = convnext_zoo.from_preset("convnext_v1_tiny", num_classes=10)
    """
    from convnext_zoo import preset_dir

    source = registry.resolve(preset, revision=revision)
    load = dict(
        include_top=include_top, num_classes=num_classes, input_shape=input_shape,
        pooling=pooling, dtype=dtype, **kwargs,
    )
    if source.kind == "registered":
        if load_weights:
            local, entry = _fetch_registered(source.name, revision, force_download)
            config, model = _load_checkpoint(local, preset, _registry_overrides(entry), load)
        else:
            config = registry_config(registry.preset_info(source.name))
            model = _build(config, source.name, load, load_weights=False)[0]
    else:
        if source.kind == "hf":
            folder = _fetch_hf(source.repo_id, source.revision, force_download, preset)
        else:
            folder = source.path
        if _is_keras_preset(folder):
            config = preset_dir.read_config(folder)
            load["include_top"] = _include_top(config, load)
            model = preset_dir.from_preset(folder, load_weights=load_weights, **load)
        else:
            config, model = _load_checkpoint(folder, preset, {}, load, load_weights)
    if preprocessing:
        attach_preprocessor(model, config, input_shape)
    return model


def _include_top(config, load):
    # FCMAE encoders (no head) load as backbones unless num_classes asks for one.
    if load["include_top"] and load["num_classes"] is None and config.get("head") == "none":
        return False
    return load["include_top"]


def _build(config, where, load, load_weights):
    from convnext_zoo import preset_dir

    return preset_dir.build_for_config(
        config, where, load_weights=load_weights,
        **{**load, "include_top": _include_top(config, load)},
    )


def _load_checkpoint(local, preset, overrides, load, load_weights=True):
    """A timm / transformers / official checkpoint straight into the asked-for model.

    The source tensors are read one at a time into the model's variables:
    no preset is written, so the cost is one read of the file.
    """
    from convnext_zoo.checkpoint_io import CheckpointError
    from convnext_zoo.convert import prepare_conversion

    try:
        conversion = prepare_conversion(local, **overrides)
        config = conversion.config(with_hashes=False)
        model, allow_unused, allow_unassigned = _build(config, preset, load, load_weights)
        if load_weights:
            conversion.assign(
                model, allow_unused, allow_unassigned,
                description=f"Loading {os.path.basename(conversion.weights_path)}",
            )
    except CheckpointError as error:
        raise PresetDownloadError(
            f"Could not read the checkpoint of preset {preset!r} at {local}: {error} "
            + (_redownload_hint(preset, local) if not os.path.isdir(preset or "") else "")
        ) from None
    return config, model


def backbone_from_preset(preset, load_weights=True, **kwargs):
    """`ConvNeXtBackbone.from_preset`: the backbone (last feature map) only."""
    kwargs.setdefault("preprocessing", False)
    return from_preset(preset, include_top=False, pooling=None, load_weights=load_weights, **kwargs)


def classifier_from_preset(preset, load_weights=True, **kwargs):
    """`ConvNeXtImageClassifier.from_preset`: always a classifier."""
    from convnext_zoo.classifier import ConvNeXtImageClassifier

    model = from_preset(preset, include_top=True, load_weights=load_weights, **kwargs)
    if not isinstance(model, ConvNeXtImageClassifier):
        raise ValueError(
            f"Preset {preset!r} has no classification head (an FCMAE encoder). "
            "Pass num_classes=N for a classifier with a fresh head, or use "
            "ConvNeXtBackbone.from_preset for the encoder."
        )
    return model
