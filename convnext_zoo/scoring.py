"""Scoring a folder of any size: top-k predictions or embeddings, one JSON line per image.

`score_folder(model, folder, output)` streams the images through tf.data
(recursive listing, parallel decoding, the model's own evaluation transform,
batching, prefetch), so memory holds a few batches, never the folder. The
transform is the one `model.predict` applies to raw images: keras-hub's
`preprocess_samples` of the model (its `ConvNeXtImageConverter`), mapped
over single images; batches then run through the network with Keras' `predict_on_batch`, or
its `predict` inside a `keras.distribution` or `tf.distribute` scope.
The model is an argument, so it can be built inside such a scope;
`load_model` loads a preset for scoring (classifier, or pooled embedding).

`output` (JSON lines, in listing order, flushed after every batch):

    {"image": "cats/1.png", "predictions": [{"class": 3, "synset": null, "label": "cat",
                                               "probability": 0.91}, ...]}
    {"image": "cats/2.png", "features": [0.12, -1.5, ...]}
    {"image": "cats/3.png", "error": "could not be read or decoded as an image ..."}

`image` is the path relative to the folder, `/`-separated. Probabilities
are the softmax of the logits; features are the pooled, normalised
embedding (the classifier's `embedding_output`, `from_preset(...,
include_top=False, pooling="avg")`), as float32 values. Beside `output`,
`OUTPUT.meta.json` records the settings (folder, model, features, top).

Resuming: run the same call again after an interruption (Ctrl-C, a killed
process) and the images already in `output` (error lines included: delete
those lines to retry them) are skipped, the rest appended. A torn last line
(a process killed mid-write) is dropped first. A file written with other
settings is refused unless `overwrite=True`.

This module imports neither Keras nor TensorFlow at import time: the CLI
checks a request (`check_request`, `read_previous`) before Keras loads.

Example:
    >>> model, names = load_model("convnext_v2_atto_imagenet")  # doctest: +SKIP
    >>> score_folder(model, "photos", "results.jsonl", class_names=names)  # doctest: +SKIP
    {'output': 'results.jsonl', 'images': 120, 'scored': 120, 'errors': [], ...}
"""

import contextlib
import json
import os
import pathlib
import sys
import time
import weakref

from convnext_zoo.finetune_data import IMAGE_EXTENSIONS

META_SUFFIX = ".meta.json"
FORMAT_VERSION = 1
DEFAULT_BATCH_SIZE = 32
DEFAULT_TOP = 5
ERROR_TEXT = f"could not be read or decoded as an image ({', '.join(IMAGE_EXTENSIONS)})"
_SHOWN = 5
_NETWORKS = weakref.WeakKeyDictionary()  # model -> {features: network}


class ScoringError(ValueError):
    """A scoring request that cannot run as given (one line: what, what is accepted, what to do)."""


# === Listing and checking (no Keras) ===

def list_images(folder):
    """Paths of the image files under `folder`, relative and `/`-separated, in a stable order.

    Recursive; hidden folders (`.name`) are skipped; image files are those
    with the extensions `image_dataset_from_directory` reads (case-insensitive).
    """
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        relative = os.path.relpath(root, folder)
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(name if relative == "." else pathlib.PurePath(relative, name).as_posix())
    return found


def meta_path(output):
    """The settings file beside `output`."""
    return os.fspath(output) + META_SUFFIX


def run_settings(folder, model_id, features, top):
    """What a resumed run must share with the run that wrote `output`."""
    return {"version": FORMAT_VERSION, "folder": os.path.abspath(folder), "model": str(model_id),
            "features": bool(features), "top": None if features else int(top)}


def check_request(folder, output, batch_size=DEFAULT_BATCH_SIZE, top=DEFAULT_TOP, features=False):
    """Validates a request and lists the folder's images.

    Returns:
        The image paths (see `list_images`).

    Raises:
        ScoringError: one line naming the problem and the fix.
    """
    for name, value in (("batch_size", batch_size), ("top", top)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ScoringError(f"{name} must be an int >= 1. Received: {name}={value!r}.")
    if features and top is not None:
        raise ScoringError(
            f"features=True writes embeddings, not top-k classes. Received: top={top!r}; drop it."
        )
    if not os.path.isdir(folder):
        raise ScoringError(f"No such folder: {folder}. Pass a folder of images (searched recursively).")
    output = os.fspath(output)
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise ScoringError(f"The output's folder {parent} does not exist. Create it, or pass another path.")
    if os.path.isdir(output):
        raise ScoringError(f"The output {output} is a folder; pass a file path, e.g. {output}/results.jsonl.")
    images = list_images(folder)
    if not images:
        raise ScoringError(
            f"No images in {folder} (searched recursively for {', '.join(IMAGE_EXTENSIONS)} files). "
            "Pass the folder that holds them."
        )
    return images


def read_previous(output, settings, overwrite=False):
    """What an earlier run left in `output`: the images done and the bytes to keep.

    Reads only; `score_folder` truncates a torn last line when it starts.

    Returns:
        `(done, keep)`: the set of image paths already in `output`, and the
        length of its whole lines (`None` when starting afresh).

    Raises:
        ScoringError: `output` was written with other settings, or without
            its settings file, or has a damaged line (not the last).
    """
    output = os.fspath(output)
    meta = meta_path(output)
    if overwrite or not os.path.exists(output):
        return set(), None
    if not os.path.exists(meta):
        raise ScoringError(
            f"{output} exists but has no {os.path.basename(meta)} (it was not written by "
            "convnext-zoo predict). Pass --overwrite (overwrite=True) to replace it, or another output."
        )
    try:
        with open(meta, encoding="utf-8") as handle:
            saved = json.load(handle)["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ScoringError(f"{meta} is damaged. Pass --overwrite (overwrite=True) to start afresh.") from None
    differing = [k for k in settings if saved.get(k) != settings[k]]
    if differing:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {settings[k]!r}" for k in differing)
        raise ScoringError(
            f"{output} was written with other settings ({shown}). Rerun with those settings to "
            "resume, pass --overwrite (overwrite=True) to start afresh, or choose another output."
        )
    done, keep, number = set(), 0, 0
    with open(output, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break  # torn by a killed process: dropped
            number += 1
            try:
                done.add(json.loads(line)["image"])
            except (ValueError, KeyError, TypeError):
                raise ScoringError(
                    f"Line {number} of {output} is damaged (not a JSON object with 'image'). "
                    "Delete that line, or pass --overwrite (overwrite=True) to start afresh."
                ) from None
            keep += len(line)
    return done, keep


def _write_meta(output, settings):
    path = meta_path(output)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"written_by": "convnext_zoo.scoring", "settings": settings}, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


# === Labels and lines ===

def preset_labels(config):
    """`(synset or None, label)` per class of a preset config, or `None` without names.

    Fine-tuned presets record `class_names`; ImageNet ones a `label_set`.
    """
    if config.get("class_names"):
        return [(None, name) for name in config["class_names"]]
    if config.get("label_set"):
        from convnext_zoo.class_names import class_names

        return [(synset, lemmas.split(",")[0]) for synset, lemmas in class_names(config["label_set"])]
    return None


def imagenet_labels(num_classes):
    """The ImageNet `(synset, label)` pairs for 1000 or 21841 classes, else `None`."""
    from convnext_zoo.class_names import LABEL_SET_SIZES

    label_set = LABEL_SET_SIZES.get(num_classes)
    return preset_labels({"label_set": label_set}) if label_set else None


def top_predictions(scores, top, labels=None, softmax=True):
    """The `top` classes of one image's scores, best first, as JSON-ready dicts.

    Args:
        scores: 1-D class scores.
        top: how many classes.
        labels: `(synset or None, label)` per class; `None`: the index as label.
        softmax: the scores are logits (turned into probabilities here).
    """
    import numpy as np

    scores = np.asarray(scores, np.float64)
    if softmax:
        scores = np.exp(scores - scores.max())
        scores /= scores.sum()
    order = np.argsort(-scores, kind="stable")[:top]
    return [{"class": int(i),
             "synset": labels[i][0] if labels else None,
             "label": labels[i][1] if labels else str(int(i)),
             "probability": float(scores[i])} for i in order]


def _float32_list(row):
    # str() of a float32 is its shortest round-trip form: 0.1, not 0.10000000149011612.
    return [float(str(v)) for v in row]


# === Models ===

def model_id(preset):
    """The name a preset is recorded under: registered name, absolute directory, or as given."""
    from convnext_zoo import registry

    preset = os.fspath(preset)
    if os.path.exists(preset):
        return os.path.abspath(preset)
    return registry.canonical_name(preset) or preset


def load_model(preset, features=False, **kwargs):
    """A preset loaded for scoring, and its class labels.

    Reads the preset's config first (nothing is built for a preset that
    cannot serve), then `convnext_zoo.from_preset`: the classifier, or with
    `features` the pooled embedding (`include_top=False, pooling="avg"`; for
    an FCMAE encoder, whose checkpoint has no head norm, that norm is freshly
    initialised: unit scale, no shift, as timm's).

    Args:
        preset: anything `convnext_zoo.from_preset` accepts.
        features: load the embedding model.
        **kwargs: passed to `from_preset` (e.g. `dtype`).

    Returns:
        `(model, labels)`: labels as in `preset_labels` (`None` with features).

    Raises:
        ScoringError: a preset without a classification head, without features.
    """
    from convnext_zoo import factory, readers, resolve

    config = readers.read(resolve.locate(preset, download=False)).config
    if not features and (config["head"] != "fc" or not config["num_classes"]):
        raise ScoringError(
            f"Preset {preset!r} has no classification head (head {config['head']!r}: an FCMAE "
            "encoder or an embedding model). Pass --features (features=True) for its pooled "
            "embedding, or pick a classifier."
        )
    if features:
        model = factory.from_preset(preset, include_top=False, pooling="avg", **kwargs)
        return model, None
    return factory.from_preset(preset, **kwargs), preset_labels(config)


def scoring_network(model, features=False):
    """`(network, preprocess)`: the plain Keras network to run on preprocessed batches, and
    the model's own preprocessing of raw images (keras-hub's `preprocess_samples`).

    The network shares the model's layers and weights; it has no
    preprocessor, so `predict` runs on the already transformed batches.

    Raises:
        ScoringError: the model has no preprocessor, is not a ConvNeXt
            classifier, or has no classes where predictions are asked for.
    """
    import keras

    if not hasattr(model, "head_norm") or not hasattr(model, "preprocess_samples"):
        raise ScoringError(
            f"Expected a ConvNeXtImageClassifier (with a head, or num_classes=0 for the pooled "
            f"embedding). Received: {type(model).__name__}. Load it with convnext_zoo.from_preset "
            "(include_top=False, pooling='avg' for features of a backbone)."
        )
    if model.preprocessor is None:
        raise ScoringError(
            "The model has no preprocessor: score_folder feeds it raw images. Load it with "
            "convnext_zoo.from_preset (preprocessing=True, the default) or attach one."
        )
    if features:
        outputs = model.embedding_output if model.num_classes else model.output
    elif not model.num_classes:
        raise ScoringError(
            "The model has no classification layer (num_classes=0: a pooled embedding). "
            "Pass features=True (--features) to write its embeddings."
        )
    else:
        outputs = model.output
    # One network per model and output, so later calls reuse its traced predict step.
    cached = _NETWORKS.setdefault(model, {})
    if features not in cached:
        cached[features] = keras.Model(model.inputs, outputs, name=f"{model.name}_scoring")
    return cached[features], model.preprocess_samples


def _distributed():
    """Whether a `tf.distribute` strategy scope or a global `keras.distribution` is active."""
    import keras

    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        if tf.distribute.has_strategy():
            return True
    return keras.distribution.distribution() is not None


def predict_batch(network, batch, placement=None):
    """The network's outputs on one preprocessed batch, as float32 NumPy.

    `predict_on_batch` runs the compiled step directly (Keras' `predict`
    costs about 0.1 s of data-pipeline setup per call, a fifth of a V2 atto
    batch of 32 at 224 px on 2 CPU cores). Under a distribution, `predict`
    splits the batch over the replicas (`predict_on_batch` would hand each
    replica the whole batch); with the scope's `placement`
    (`convnext_zoo.distribute.Placement`) a last, short batch is padded to
    split evenly over the replicas.
    """
    import numpy as np

    from convnext_zoo.layers import fused_layer_norms

    with fused_layer_norms():
        if placement is not None and placement.mode:
            size = len(batch) + (-len(batch) % placement.replicas)
            outputs = placement.predict(network, batch, batch_size=size)
        elif _distributed():
            outputs = network.predict(batch, batch_size=len(batch), verbose=0)
        else:
            outputs = network.predict_on_batch(batch)
    return np.asarray(outputs, np.float32)


def image_dataset(folder, paths, preprocess, batch_size):
    """`(index, image)` batches of `paths` (relative to `folder`), preprocessed, prefetched.

    Files that cannot be read or decoded are left out (their index is
    missing from the batches). Grayscale and RGBA files become RGB (the
    alpha channel is dropped, as PIL's `convert("RGB")` does); of a GIF, the
    first frame.
    """
    import tensorflow as tf

    files = [os.path.join(folder, p) for p in paths]

    def load(index, path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return index, preprocess(image)

    dataset = tf.data.Dataset.from_tensor_slices((tf.range(len(files), dtype=tf.int64), files))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class _Progress:
    """A Keras progress bar on stderr, with the images/s of this run."""

    def __init__(self, total, enabled):
        self.enabled = enabled and total > 0
        self.start = time.perf_counter()
        if self.enabled:
            import keras

            with contextlib.redirect_stdout(sys.stderr):
                self.bar = keras.utils.Progbar(total, unit_name="image", stateful_metrics=["images/s"])

    def update(self, done, scored):
        if self.enabled:
            rate = scored / max(time.perf_counter() - self.start, 1e-9)
            with contextlib.redirect_stdout(sys.stderr):
                self.bar.update(done, values=[("images/s", rate)])


def score_folder(model, folder, output, *, features=False, batch_size=DEFAULT_BATCH_SIZE, top=None,
                 class_names=None, overwrite=False, progress=True, model_name=None, on_batch=None,
                 placement=None):
    """Scores every image under `folder` into `output`, resuming an interrupted run.

    Call it inside a `tf.distribute` strategy scope or under a global
    `keras.distribution` to spread the batches; build the model there too.

    Args:
        model: a `ConvNeXtImageClassifier` with its preprocessor (from
            `convnext_zoo.from_preset`, or `load_model`), or a preset handle
            (then loaded with `load_model`).
        folder: the folder of images (searched recursively, see `list_images`).
        output: the JSON-lines file to write or resume (format: module docstring).
        features: write the pooled embedding instead of top-k classes.
        batch_size: images per batch.
        top: classes per image (default 5); not with `features`.
        class_names: a label per class; default: the preset's when `model`
            is a handle, else ImageNet's for 1000 or 21841 classes, else the
            class index.
        overwrite: replace an `output` written with other settings.
        progress: a progress bar with images/s on stderr.
        model_name: how the model is recorded in the settings file
            (default: the preset, or `model.name`).
        on_batch: called with the number of images done after each batch
            is written (for callers' own progress, or to stop a run).
        placement: the `Placement` of `convnext_zoo.distribute.distribution_scope`
            when called inside one (pads the last batch to split evenly).

    Returns:
        A summary dict: `output`, `images` (in the folder), `previous`
        (already in `output`), `scored`, `errors` (paths that could not be
        decoded this run), `seconds`, `images_per_second`.

    Raises:
        ScoringError: bad arguments, or an `output` that cannot be resumed.
    """
    if top is None and not features:
        top = DEFAULT_TOP
    images = check_request(folder, output, batch_size, top, features)
    labels = None
    if isinstance(model, (str, os.PathLike)):
        model_name = model_name or model_id(model)
        model, preset_names = load_model(model, features)
        labels = preset_names
    model_name = model_name or model.name
    settings = run_settings(folder, model_name, features, top)
    done, keep = read_previous(output, settings, overwrite)
    network, preprocess = scoring_network(model, features)
    if class_names is not None:
        labels = [(None, str(name)) for name in class_names]
    elif labels is None and not features:
        labels = imagenet_labels(model.num_classes)
    if labels is not None and not features and len(labels) != model.num_classes:
        raise ScoringError(
            f"class_names has {len(labels)} names for a model of {model.num_classes} classes. "
            "Pass one name per class."
        )
    softmax = getattr(model, "activation", None) != "softmax"

    todo = [p for p in images if p not in done]
    output = os.fspath(output)
    if keep is None:
        _write_meta(output, settings)
        mode = "w"
    else:
        os.truncate(output, keep)  # drops a torn last line
        mode = "a"
    bar = _Progress(len(todo), progress)
    start = time.perf_counter()
    errors, scored, expected = [], 0, 0

    def error_line(path):
        errors.append(path)
        return json.dumps({"image": path, "error": ERROR_TEXT}) + "\n"

    with open(output, mode, encoding="utf-8") as handle:
        if todo:
            for indices, batch in image_dataset(folder, todo, preprocess, batch_size).as_numpy_iterator():
                outputs = predict_batch(network, batch, placement)
                lines = []
                for index, row in zip(indices.tolist(), outputs):
                    lines += [error_line(todo[i]) for i in range(expected, index)]
                    record = {"image": todo[index]}
                    if features:
                        record["features"] = _float32_list(row)
                    else:
                        record["predictions"] = top_predictions(row, top, labels, softmax)
                    lines.append(json.dumps(record) + "\n")
                    expected = index + 1
                scored += len(outputs)
                handle.write("".join(lines))
                handle.flush()
                os.fsync(handle.fileno())
                bar.update(expected, scored)
                if on_batch is not None:
                    on_batch(expected)
        tail = [error_line(todo[i]) for i in range(expected, len(todo))]
        if tail:
            handle.write("".join(tail))
            handle.flush()
            bar.update(len(todo), scored)
    seconds = time.perf_counter() - start
    return {"output": output, "images": len(images), "previous": len(images) - len(todo),
            "scored": scored, "errors": errors, "seconds": seconds,
            "images_per_second": scored / seconds if scored and seconds > 0 else None}


def format_summary(summary):
    """One line for the command line: counts, speed, unreadable files."""
    errors = summary["errors"]
    parts = [f"Wrote {summary['output']}: {summary['scored']} images scored"
             + (f" ({summary['images_per_second']:.1f} images/s)" if summary["images_per_second"] else "")]
    if summary["previous"]:
        parts.append(f"{summary['previous']} already there, skipped")
    if errors:
        shown = ", ".join(errors[:_SHOWN]) + (f" and {len(errors) - _SHOWN} more" if len(errors) > _SHOWN else "")
        parts.append(f"{len(errors)} unreadable, skipped (an \"error\" line each): {shown}")
    return "; ".join(parts) + "."
