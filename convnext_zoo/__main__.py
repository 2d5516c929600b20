"""`python -m convnext_zoo`: the `convnext-zoo` command line.

The package skips importing Keras under `-m` (see `convnext_zoo._light_import`).
"""

import sys

from convnext_zoo.cli import main

sys.exit(main())
