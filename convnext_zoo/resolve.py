"""Step 1 of loading: a preset handle -> local files.

A handle is a registered name or alias, an `hf://org/repo[@revision]`
handle, an existing directory or an existing weights file; anything else is
an error that lists these forms (`convnext_zoo.registry.resolve` classifies
without touching the network). Downloads go through huggingface_hub only
(its cache under `HF_HOME`, its progress bars, `HF_TOKEN`,
`HF_HUB_OFFLINE=1`, revisions). Every downloaded weights file is checked
against its sha256 (the registry's pin when known, else the Hub's LFS etag,
which names the cached blob) before use, so a corrupt or truncated cache
gives an error that says how to re-download, never a silently wrong model.

Example:
    >>> located = locate("convnext_v2_atto")  # doctest: +SKIP
    >>> located.path  # the huggingface_hub cache folder of the timm repo  # doctest: +SKIP
"""

import dataclasses
import json
import os
import re
import shutil
import tempfile
import urllib.request

from convnext_zoo import registry
from convnext_zoo.checkpoint_io import sha256_file

# Weights files of a Hub repo or directory, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# A keras-hub preset (`save_to_preset`): config.json names a registered class.
KERAS_HUB_FILES = ("metadata.json", "model.weights.h5", "task.json", "task.weights.h5",
                   "preprocessor.json", "image_converter.json")
SIDECARS = ("config.json", "preprocessor_config.json", "open_clip_config.json")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PresetDownloadError(OSError):
    """A preset's files could not be downloaded or failed their integrity check."""


@dataclasses.dataclass
class Located:
    """Where a preset's files are on this machine.

    Attributes:
        preset: the handle as the caller gave it (for messages).
        path: a local directory or weights file; `None` for a registered
            preset asked for without weights (nothing is downloaded).
        entry: the registry entry of a registered preset, else `None`.
        origin: `{"source": repo id / file name, "revision": ...}` for the
            provenance of a conversion.
    """

    preset: str
    path: str = None
    entry: dict = None
    origin: dict = dataclasses.field(default_factory=dict)


def locate(preset, revision=None, force_download=False, download=True):
    """Finds, downloading when needed, the files of a preset handle.

    Args:
        preset: a registered name or alias, `hf://org/repo[@revision]`, a
            directory or a weights file (`.safetensors`, `.pth`, `.pt`,
            `.bin`, `.safetensors.index.json`).
        revision: Hub branch, tag or commit (overrides the registry's pin
            and the handle's).
        force_download: download again even if cached.
        download: `False` downloads nothing for a registered preset (its
            registry entry describes it); Hub handles still fetch their
            config and weights, which hold the architecture.

    Returns:
        A `Located`.
    """
    source = registry.resolve(preset, revision=revision, files=True)
    if source.kind == "registered":
        entry = registry.preset_info(source.name)
        if not download:
            return Located(preset, None, entry, {"source": source.name, "revision": None})
        return Located(preset, _fetch_registered(entry, revision, force_download), entry,
                       {"source": entry["source"]["hf_repo"] or entry["source"]["official_url"],
                        "revision": source.revision})
    if source.kind == "hf":
        folder = _fetch_hf(source.repo_id, source.revision, force_download, preset)
        return Located(preset, folder, None, {"source": source.repo_id, "revision": source.revision})
    return Located(preset, source.path, None,
                   {"source": os.path.basename(source.path.rstrip(os.sep)), "revision": None})


def redownload_hint(preset, path):
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
            f"corrupt or truncated. {redownload_hint(preset, blob)}"
        )
    return actual


def hub():
    """The huggingface_hub module, or an ImportError with the install line."""
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            "Loading presets from the Hub needs huggingface_hub: pip install huggingface_hub."
        ) from None
    return huggingface_hub


def hub_download(repo_id, filename, revision=None, force_download=False, preset=None):
    """`hf_hub_download` with errors that name the preset and the way out."""
    huggingface_hub = hub()
    from huggingface_hub import errors

    try:
        return huggingface_hub.hf_hub_download(
            repo_id, filename, revision=revision, force_download=force_download
        )
    except errors.RevisionNotFoundError:
        raise PresetDownloadError(
            f"Revision {revision!r} not found in Hub repo {repo_id!r} (preset {preset!r}). "
            "Pass an existing branch, tag or commit as revision=, or drop it for 'main'."
        ) from None
    # GatedRepoError subclasses RepositoryNotFoundError: test it first.
    except errors.GatedRepoError as error:
        raise PresetDownloadError(gated_message(repo_id, preset, error)) from None
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


def gated_message(repo_id, preset, error=None):
    """One line for a gated Hub repo: which licence to accept where, and `HF_TOKEN`."""
    from huggingface_hub import constants

    page = f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"
    name = registry.canonical_name(preset) if isinstance(preset, str) else None
    license = f" ({registry.preset_info(name)['license']})" if name else ""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 403:
        who = "The account of your token (HF_TOKEN or `hf auth login`) has not been granted access yet"
    else:
        who = "No Hugging Face token was sent"
    return (
        f"Hub repo {repo_id!r} is gated (preset {preset!r}): its licence{license} must be accepted "
        f"first. {who}. Accept the licence at {page} while logged in, then set HF_TOKEN to a token "
        "of that account (or run `hf auth login`) and load again."
    )


def _optional_download(repo_id, filename, revision, force_download, preset):
    from huggingface_hub import errors

    try:
        return hub_download(repo_id, filename, revision, force_download, preset)
    except errors.EntryNotFoundError:
        return None


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
    hub()
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
    return path


def _fetch_registered(entry, revision, force_download):
    """Downloads a registered preset; returns its folder (or the official file)."""
    name, source = entry["name"], entry["source"]
    if not source["hf_repo"]:
        return _download_official(source["official_url"], source["sha256"], force_download, name)
    pinned = revision or source["revision"] or None
    weights = hub_download(source["hf_repo"], source["filename"], pinned, force_download, name)
    # A registry sha256 belongs to the pinned revision only.
    expected = source["sha256"] if not revision or revision == source["revision"] else None
    verify_file(weights, expected or None, name)
    # The sidecars are optional: the registry holds their facts. An OpenCLIP
    # repo's own config is what `verify` builds OpenCLIP's model from.
    sidecars = ["config.json"] + (["open_clip_config.json"] if source["format"] == "open_clip" else [])
    for sidecar in sidecars:
        try:
            _optional_download(source["hf_repo"], sidecar, pinned, force_download, name)
        except PresetDownloadError:
            pass
    return os.path.dirname(weights)


def _fetch_hf(repo_id, revision, force_download, preset):
    """Downloads what an `hf://` repo holds of a preset; returns the folder.

    A keras-hub preset (config.json naming a registered class) brings its
    `.weights.h5` and JSON files; anything else its first weights file of
    `WEIGHT_FILES` (with the shards of a sharded index) and the JSON
    sidecars. All files come from one commit.
    """
    config_path = _optional_download(repo_id, "config.json", revision, force_download, preset)
    if config_path and _names_registered_class(config_path):
        fetched = [config_path]
        for filename in KERAS_HUB_FILES:
            path = _optional_download(repo_id, filename, revision, force_download, preset)
            if path and filename.endswith(".h5"):
                verify_file(path, None, preset)
            fetched.append(path)
        _same_commit(repo_id, fetched)
        return os.path.dirname(config_path)
    for filename in WEIGHT_FILES:
        weights = _optional_download(repo_id, filename, revision, force_download, preset)
        if weights is None:
            continue
        fetched = [weights]
        if filename.endswith(".index.json"):
            with open(weights, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            fetched += [hub_download(repo_id, shard, revision, force_download, preset) for shard in shards]
        for path in fetched:
            if not path.endswith(".json"):
                verify_file(path, None, preset)
        sidecars = [_optional_download(repo_id, name, revision, force_download, preset)
                    for name in SIDECARS[1:]]
        _same_commit(repo_id, [config_path, *sidecars, *fetched])
        return os.path.dirname(weights)
    raise PresetDownloadError(
        f"Hub repo {repo_id!r} (revision {revision or 'main'}) has none of "
        f"{', '.join(WEIGHT_FILES)} and is no keras-hub preset (preset {preset!r}). "
        "Accepted repos hold a preset of this package, a keras-hub preset "
        "(save_to_preset) or a timm / transformers ConvNeXt checkpoint."
    )


def _names_registered_class(config_path):
    try:
        with open(config_path, encoding="utf-8") as handle:
            return "registered_name" in json.load(handle)
    except ValueError:
        return False


def _same_commit(repo_id, paths):
    folders = {os.path.dirname(p) for p in paths if p}
    if len(folders) > 1:
        raise PresetDownloadError(
            f"{repo_id}: its files resolved to different commits (the repo changed "
            "during the download); load again."
        )
