#!/usr/bin/env python
"""Publish a ConvNeXt preset directory to the Hugging Face Hub.

Stages config.json, model.safetensors and a README.md model card, loads the
staged preset back to check it, then creates the repo (if needed) and uploads
everything in one commit. An existing README.md on the Hub is kept unless
--replace-readme.

Example:
    python scripts/push_to_hub.py out/convnext_v2_atto me/convnext-v2-atto --dry-run
    python scripts/push_to_hub.py out/convnext_v2_atto me/convnext-v2-atto --create-pr

Same as `convnext-zoo push`. Exit status: 0 on success, 2 on errors.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("CONVNEXT_ZOO_LIGHT_IMPORT", "1")

from convnext_zoo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["push"] + sys.argv[1:]))
