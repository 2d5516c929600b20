"""Image embeddings and feature maps from a ConvNeXt backbone, for retrieval or a detection head.

Usage:
    python examples/extract_features.py [IMAGE ...] [--preset convnext_v2_atto_imagenet]

Without image files it embeds a few photographs shipped with scikit-image and
prints their cosine similarities. The preset's weights are downloaded from the
Hugging Face Hub on first use; `--no-weights` builds the architecture only,
offline (the similarities are then meaningless; the tests use it).
"""

import argparse

import numpy as np
from PIL import Image

import keras
import convnext_zoo

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def load_images(paths):
    """uint8 RGB images of any size, with names to print."""
    if not paths:
        import skimage.data

        return [getattr(skimage.data, name)()[..., :3] for name in PHOTOS], PHOTOS
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths], paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="*", help="image files (default: scikit-image photographs)")
    parser.add_argument("--preset", default="convnext_v2_atto_imagenet")
    parser.add_argument("--no-weights", action="store_true", help="random weights, no download")
    args = parser.parse_args(argv)
    images, names = load_images(args.images)

    # The pooled, head-normalised embedding (timm's `num_classes=0` output). The
    # preset's preprocessing (resize, centre crop, normalisation) is attached,
    # so it takes raw uint8 RGB images.
    embedder = convnext_zoo.from_preset(
        args.preset, include_top=False, pooling="avg", load_weights=not args.no_weights,
    )
    embeddings = np.concatenate([embedder.predict(image[None], verbose=0) for image in images])
    print(f"embeddings: {embeddings.shape}")

    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    width = max(len(name) for name in names)
    print("cosine similarity")
    for name, row in zip(names, unit @ unit.T):
        print(f"  {name:>{width}}", " ".join(f"{value:6.3f}" for value in row))

    # The four stage outputs (strides 4, 8, 16, 32) for a detection or segmentation
    # head. The backbone takes normalised pixels: the preset's converter makes them.
    pixels = embedder.preprocessor.image_converter(images[0][None])
    pyramid = keras.Model(embedder.backbone.inputs, embedder.backbone.pyramid_outputs)
    for level, features in pyramid.predict(pixels, verbose=0).items():
        print(f"{level}: {features.shape}")


if __name__ == "__main__":
    main()
