"""Entry point of the `convnext-zoo` console script.

A top-level module, so the environment is set before `import convnext_zoo`
runs the package's __init__: CONVNEXT_ZOO_LIGHT_IMPORT=1 keeps `--help`,
`list` and `info` free of Keras and TensorFlow.
"""

import os
import sys


def main():
    os.environ["CONVNEXT_ZOO_LIGHT_IMPORT"] = "1"
    from convnext_zoo.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
