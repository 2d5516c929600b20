"""FCMAE pre-training of a ConvNeXt V2 on a folder of images: `convnext-zoo pretrain` as a script.

Usage:
    python scripts/pretrain.py DATA_DIR --variant atto --output OUT_DIR [--epochs N] ...

Same arguments as `convnext-zoo pretrain --help`.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from convnext_zoo import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["pretrain", *sys.argv[1:]]))
