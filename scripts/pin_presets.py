"""Pins every Hub preset to a commit and records its file's sha256 (online).

For each registry entry with a Hub source, asks the Hub for the repo's
current commit and the LFS sha256 of the weights file, and writes both into
presets/registry.json (atomically). Entries already pinned are re-checked:
a changed checksum at the pinned revision is reported and stops the run.
The two official-only `.pth` presets are hashed by streaming the file when
`--include-official` is given (about 350 MB and 800 MB).

Needs network access to the Hub (HF_ENDPOINT is honoured; HF_TOKEN too). Every
source with a Hub repo is pinned the same way, whatever its format (timm,
transformers, open_clip); a gated repo's metadata is public, so DINOv3's
transformers repos pin without a token.

Usage:
    python scripts/pin_presets.py [--registry PATH] [--only NAME ...] [--include-official]
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REGISTRY = os.path.join(ROOT, "presets", "registry.json")


def hub_pin(api, repo_id, filename, revision=None):
    """Returns `(commit sha, sha256 of filename)` at `revision` (default: main)."""
    info = api.model_info(repo_id, revision=revision or None, files_metadata=True)
    for sibling in info.siblings or []:
        if sibling.rfilename == filename:
            if sibling.lfs is None:
                raise SystemExit(
                    f"{repo_id}@{info.sha}: {filename} is not an LFS file, so the Hub "
                    "reports no sha256 for it. Download it and hash it by hand."
                )
            return info.sha, sibling.lfs.sha256
    names = [s.rfilename for s in info.siblings or []]
    raise SystemExit(f"{repo_id}@{info.sha} has no {filename}. Files: {names}.")


def url_sha256(url):
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_network_error(error):
    # huggingface_hub 2.x raises httpx errors (ConnectError, ConnectTimeout, ...).
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, OSError) or bool(
        names & {"ConnectError", "TimeoutException", "NetworkError", "TransportError"}
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registry", default=DEFAULT_REGISTRY)
    parser.add_argument("--only", nargs="*", help="registered names to pin (default: all)")
    parser.add_argument("--include-official", action="store_true",
                        help="also stream and hash the two official .pth files")
    args = parser.parse_args(argv)

    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    with open(args.registry) as f:
        registry = json.load(f)
    names = args.only or list(registry["presets"])
    unknown = [n for n in names if n not in registry["presets"]]
    if unknown:
        raise SystemExit(f"Unknown presets: {unknown}. Valid: registered names in {args.registry}.")
    api = HfApi()
    changed = 0
    for name in names:
        source = registry["presets"][name]["source"]
        try:
            if source["hf_repo"]:
                sha, sha256 = hub_pin(api, source["hf_repo"], source["filename"],
                                      source["revision"] or None)
            elif args.include_official:
                sha, sha256 = "", url_sha256(source["official_url"])
            else:
                print(f"skip  {name} (official .pth; pass --include-official to hash it)")
                continue
        except OfflineModeIsEnabled:
            raise SystemExit("HF_HUB_OFFLINE is set: pinning needs the Hub. Unset it and retry.")
        except Exception as error:
            if not _is_network_error(error):
                raise
            raise SystemExit(
                f"Could not reach the Hub for {name} ({type(error).__name__}: {error}). "
                "pin_presets.py needs network access; nothing was written."
            )
        if source["sha256"] and source["sha256"] != sha256:
            raise SystemExit(
                f"{name}: sha256 changed at the pinned revision {source['revision']!r}: "
                f"registry {source['sha256']}, Hub {sha256}. Investigate before re-pinning."
            )
        if (source["revision"], source["sha256"]) != (sha or source["revision"], sha256):
            changed += 1
        source["revision"] = sha or source["revision"]
        source["sha256"] = sha256
        print(f"pin   {name} {source['revision'][:12]} {sha256[:12]}")

    directory = os.path.dirname(os.path.abspath(args.registry))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(registry, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.registry)
    print(f"Pinned {len(names)} presets ({changed} changed) in {args.registry}.")


if __name__ == "__main__":
    sys.exit(main())
