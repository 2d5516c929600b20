#!/usr/bin/env python
"""Maintainer path: registry entries -> converted, verified, published presets.

For each preset: download the registry's source checkpoint (through
huggingface_hub), convert it to a preset, verify parity against
timm/transformers on natural images (convnext_zoo.verify), and push it to
NAMESPACE/<preset name> with a model card carrying the licence, top-1 and
parity figures. A preset whose verification fails is never pushed. Presets
already published (a config.json with this package's fields in the repo) are skipped.

Examples:
    python scripts/publish_registry.py my-org convnext_v2_atto_fcmae_ft_in1k
    python scripts/publish_registry.py my-org --all --family v2 --dry-run
    python scripts/publish_registry.py my-org --all

Needs torch and timm (pip install "convnext_zoo[test]"). Exit status: 0 when
every preset was pushed or skipped, 1 when any failed, 2 on usage errors.
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("namespace", help="Hub user or organisation to publish under.")
    parser.add_argument("names", nargs="*", help="preset names or aliases (or --all).")
    parser.add_argument("--all", action="store_true", help="every registry entry.")
    parser.add_argument("--family", choices=["v1", "v2"], help="with --all: one family only.")
    parser.add_argument("--images", help="images for the parity check (default: convnext_zoo/data/images).")
    parser.add_argument("--tolerance", type=float, help="relative tolerance of the parity check.")
    parser.add_argument("--work-dir", help="keep the converted presets here.")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to push to.")
    parser.add_argument("--dry-run", action="store_true", help="convert and verify, print, push nothing.")
    parser.add_argument("--force", action="store_true", help="push even if already published.")
    parser.add_argument("--replace-readme", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the results as JSON.")
    args = parser.parse_args(argv)
    if bool(args.names) == args.all:
        parser.error("pass preset names or --all (not both).")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from convnext_zoo.optional import keep_triton_away
    from convnext_zoo.publish import publish_registry
    from convnext_zoo.verification import summary

    keep_triton_away()
    results = publish_registry(
        args.namespace, names=args.names or None, family=args.family, images=args.images,
        tolerance=args.tolerance, work_dir=args.work_dir, private=args.private,
        revision=args.revision, dry_run=args.dry_run, skip_existing=not args.force,
        replace_readme=args.replace_readme,
    )
    for result in results:
        line = f"{result['status']:<8} {result['repo_id']}"
        if "report" in result:
            report = result["report"]
            line += f"  (relative differences: {summary(report)})"
        if "error" in result:
            line += f"  {result['error']}"
        print(line)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "commit"} for r in results], indent=2, default=str))
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
