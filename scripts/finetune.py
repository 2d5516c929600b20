"""Fine-tunes a preset on a folder of class sub-folders: `convnext-zoo finetune` as a script.

Usage:
    python scripts/finetune.py PRESET DATA_DIR --output OUT_DIR [--epochs N] [--batch-size B] ...

Same arguments as `convnext-zoo finetune --help`.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from convnext_zoo import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["finetune", *sys.argv[1:]]))
