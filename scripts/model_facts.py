"""Prints the model tables: parameter counts (benchmarks/README.md, "Model facts") and small-input feature maps.

Every number is measured on models built by this package:

    python scripts/model_facts.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from convnext_zoo import create_convnext_v1, create_convnext_v2  # noqa: E402
from convnext_zoo.variants import FAMILIES  # noqa: E402

FACTORIES = {"v1": create_convnext_v1, "v2": create_convnext_v2}


def parameter_table():
    print("| family | variant | depths | dims | params, 1000 classes | params, no head | params, 21841 classes |")
    print("|---|---|---|---|---|---|---|")
    for family, variants in FAMILIES.items():
        for variant, (depths, dims) in variants.items():
            create = FACTORIES[family]
            # Parameter counts do not depend on the input size.
            shape = (64, 64, 3)
            with_head = create(variant, input_shape=shape).count_params()
            keras.backend.clear_session()
            no_head = create(variant, include_top=False, pooling="avg", input_shape=shape).count_params()
            keras.backend.clear_session()
            in22k = "—"
            if family == "v1":
                in22k = f"{create(variant, num_classes=21841, input_shape=shape).count_params():,}"
                keras.backend.clear_session()
            print(
                f"| {family.upper()} | {variant} | {','.join(map(str, depths))} | "
                f"{','.join(map(str, dims))} | {with_head:,} | {no_head:,} | {in22k} |"
            )


def small_input_table():
    print("| input | strides (stem, stage 1-3) | last feature map, adapted | rule switched off |")
    print("|---|---|---|---|")
    for size in (32, 48, 96, 224):
        shape = (size, size, 3)
        adapted = create_convnext_v1("tiny", include_top=False, input_shape=shape)
        plain = create_convnext_v1("tiny", include_top=False, input_shape=shape, adapt_small_inputs=False)
        print(
            f"| {size}x{size} | {adapted.strides} | {tuple(adapted.output.shape)} | "
            f"{tuple(plain.output.shape)} |"
        )
        keras.backend.clear_session()


if __name__ == "__main__":
    parameter_table()
    print()
    small_input_table()
