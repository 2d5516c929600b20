"""Fine-tunes a pretrained ConvNeXt on scikit-learn's handwritten digits (8x8 scans, 10 classes).

Usage:
    python examples/fine_tune_digits.py [--preset convnext_v2_atto] [--epochs 3]

The preset's ImageNet weights are downloaded from the Hugging Face Hub on
first use; every weight but the classification head is loaded, and a new
10-class head is initialised. `--no-weights` trains the same model from
random weights, offline (the tests use it). A short `model.fit`, then the
accuracy on held-out digits.
"""

import argparse

import numpy as np
from sklearn.datasets import load_digits

import keras
import convnext_zoo


def digits(seed=0):
    """The 1,797 digits as uint8 RGB images (8x8) and their labels, shuffled."""
    data = load_digits()
    images = (data.images * (255 / 16)).round().astype("uint8")  # 0-16 grey levels
    images = np.repeat(images[..., None], 3, axis=-1)
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order], data.target[order]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="convnext_v2_atto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=1497, help="the rest are held out")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--no-weights", action="store_true", help="random weights, no download")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)

    images, labels = digits()
    train, test = slice(0, args.train_samples), slice(args.train_samples, None)
    # The attached preprocessing resizes the 8x8 scans to the model's input size.
    model = convnext_zoo.from_preset(
        args.preset, num_classes=10, input_shape=(args.image_size, args.image_size, 3),
        load_weights=not args.no_weights,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(images[train], labels[train], batch_size=32, epochs=args.epochs, verbose=2)
    loss, accuracy = model.evaluate(images[test], labels[test], verbose=0)
    print(f"held-out accuracy: {accuracy:.3f} on {len(labels[test])} digits")


if __name__ == "__main__":
    main()
