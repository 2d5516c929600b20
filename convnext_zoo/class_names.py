"""ImageNet class names shipped with the package, and `decode_predictions`.

The label files live in `convnext_zoo/labels/` (written by
`scripts/build_labels.py` from timm's synset tables), so decoding works
offline, unlike `keras.applications.imagenet_utils.decode_predictions`.
"""

import functools
import gzip
from importlib import resources

import numpy as np

from convnext_zoo.registry import LABEL_SET_SIZES

LABEL_FILES = {"imagenet-1k": "imagenet1k.txt", "imagenet-12k": "imagenet12k.txt.gz",
               "imagenet-22k": "imagenet22k.txt.gz"}


@functools.lru_cache(maxsize=None)
def class_names(label_set="imagenet-1k"):
    """`(synset, lemmas)` pairs of a label set, in model output order.

    Args:
        label_set: "imagenet-1k" (1000 classes), "imagenet-12k" (11821, timm's
            ImageNet-22k subset) or "imagenet-22k" (21841), the `label_set`
            values of presets.

    Returns:
        A tuple of `(synset, lemmas)` string pairs, e.g.
        `("n01440764", "tench, Tinca tinca")`.

    Example:
        >>> class_names("imagenet-1k")[0]
        ('n01440764', 'tench, Tinca tinca')
    """
    if label_set not in LABEL_FILES:
        raise ValueError(
            f"Unknown label set. Received: label_set={label_set!r}. "
            f"Valid: {', '.join(LABEL_FILES)}."
        )
    data = resources.files("convnext_zoo").joinpath("labels", LABEL_FILES[label_set]).read_bytes()
    if LABEL_FILES[label_set].endswith(".gz"):
        data = gzip.decompress(data)
    return tuple(tuple(line.split("\t", 1)) for line in data.decode().splitlines())


def decode_predictions(preds, top=5):
    """Turns class scores into `(synset, name, score)` triples, best first.

    The label set follows from the number of classes: 1000 -> ImageNet-1k,
    11821 -> ImageNet-12k (timm's `in12k` presets), 21841 -> ImageNet-22k
    (the V1 `in22k` presets). `name` is the first
    lemma of the class ("tench"); scores are returned as given (logits stay
    logits: apply a softmax first for probabilities).

    Args:
        preds: array of shape `(batch, classes)` (NumPy or any tensor).
        top: how many classes to return per image.

    Returns:
        A list (one per image) of lists of `(synset, name, score)` tuples.

    Example:
        >>> scores = np.zeros((1, 1000)); scores[0, 1] = 1.0
        >>> decode_predictions(scores, top=1)
        [[('n01443537', 'goldfish', 1.0)]]
    """
    preds = np.asarray(preds)
    if preds.ndim != 2:
        raise ValueError(
            "`decode_predictions` expects scores of shape (batch, classes). "
            f"Received: shape {preds.shape}. For one image, pass preds[None]."
        )
    label_set = LABEL_SET_SIZES.get(preds.shape[1])
    if label_set is None:
        raise ValueError(
            f"Cannot pick a label set for {preds.shape[1]} classes. Received: "
            f"preds of shape {preds.shape}. Known: 1000 classes (ImageNet-1k), 11821 "
            "(ImageNet-12k), 21841 (ImageNet-22k). A fine-tuned head needs its own class names."
        )
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"`top` must be an int >= 1. Received: top={top!r}.")
    names = class_names(label_set)
    results = []
    for row in preds:
        order = np.argsort(-row, kind="stable")[:top]
        results.append(
            [(names[i][0], names[i][1].split(",")[0], float(row[i])) for i in order]
        )
    return results
