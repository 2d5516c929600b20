"""Classifies photographs with a pretrained ConvNeXt and prints the top ImageNet labels.

Usage:
    python examples/classify.py examples/chelsea.jpg [--preset convnext_v2_atto_imagenet] [--top 5]

The preset's weights are downloaded from the Hugging Face Hub on first use
(15 MB for the default). `--no-weights` builds the architecture only, offline:
the labels are then meaningless (the tests use it).
"""

import argparse

import numpy as np
from PIL import Image

import keras
import convnext_zoo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="image files (any size, any format Pillow reads)")
    parser.add_argument("--preset", default="convnext_v2_atto_imagenet")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--no-weights", action="store_true", help="random weights, no download")
    args = parser.parse_args(argv)

    # A classifier from a preset carries its evaluation preprocessing (resize,
    # centre crop, normalisation), so it takes raw uint8 RGB images.
    model = convnext_zoo.from_preset(args.preset, load_weights=not args.no_weights)
    for path in args.images:
        image = np.asarray(Image.open(path).convert("RGB"))
        logits = model.predict(image[None], verbose=0)
        probs = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
        print(path)
        for synset, name, score in convnext_zoo.decode_predictions(probs, top=args.top)[0]:
            print(f"  {score:6.1%}  {name} ({synset})")


if __name__ == "__main__":
    main()
