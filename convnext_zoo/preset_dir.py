"""The Keras-native preset directory: write it atomically, load it back.

A preset directory holds three files:

* `config.json`: the versioned schema below;
* `model.safetensors`: every Keras variable under `"{layer}/{variable}"`,
  in Keras layout (see `convnext_zoo.weights`);
* `README.md`: a short model card.

`config.json`, schema version 1:

    {
      "schema_version": 1,
      "family": "v1" | "v2",
      "variant": "tiny", ...,
      "num_classes": int,          # 0: no classification layer
      "head": "fc" | "norm" | "none",
                                   # fc: pool + norm + Dense; norm: pool +
                                   # norm (pooled embedding); none: backbone
                                   # only (FCMAE encoders)
      "image_size": [h, w],        # the resolution the weights were trained at
      "preprocessing": {"mean": [3], "std": [3], "crop_pct": float,
                        "crop_mode": "center" | "squash",
                        "interpolation": "bicubic" | ...},
      "label_set": "imagenet-1k" | "imagenet-22k" | null,
      "license": str | null,
      "weights_dtype": "float32" | "float16" | "bfloat16",
      "provenance": {"source_format": "official" | "timm" | "transformers",
                     "file_name": str, "sha256": str, ...}
    }

Example:
    >>> model = from_preset("presets/convnext_v2_atto")
    >>> backbone = from_preset("presets/convnext_v2_atto", include_top=False)
    >>> model10 = from_preset("presets/convnext_v2_atto", num_classes=10)
"""

import contextlib
import json
import logging
import os
import shutil
import tempfile

SCHEMA_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
README_FILE = "README.md"
HEADS = ("fc", "norm", "none")
LABEL_SETS = ("imagenet-1k", "imagenet-22k", None)
REQUIRED_KEYS = (
    "schema_version",
    "family",
    "variant",
    "num_classes",
    "image_size",
    "preprocessing",
    "label_set",
    "license",
    "provenance",
)
PREPROCESSING_KEYS = ("mean", "std", "crop_pct", "crop_mode", "interpolation")

logger = logging.getLogger("convnext_zoo")


class PresetError(ValueError):
    """A preset directory is missing, incomplete or invalid."""


def validate_config(config, where="config.json"):
    """Checks a preset config against schema version 1.

    Args:
        config: the parsed `config.json`.
        where: file name for the error message.

    Returns:
        `config`, unchanged.

    Raises:
        PresetError: naming the first problem and what is valid.
    """
    from convnext_zoo.variants import variant_config

    if not isinstance(config, dict):
        raise PresetError(f"{where} must hold a JSON object. Received: {type(config).__name__}.")
    version = config.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PresetError(
            f"{where} has schema_version={version!r}; this version of convnext_zoo "
            f"reads schema_version={SCHEMA_VERSION}. Convert the checkpoint again "
            "or upgrade convnext_zoo."
        )
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise PresetError(
            f"{where} lacks the keys {', '.join(missing)}. Required: "
            f"{', '.join(REQUIRED_KEYS)}."
        )
    try:
        variant_config(config["family"], config["variant"])
    except ValueError as error:
        raise PresetError(f"{where}: {error}") from None
    num_classes = config["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise PresetError(f"{where}: num_classes must be an int >= 0. Received: {num_classes!r}.")
    head = config.get("head", "fc" if num_classes else "norm")
    if head not in HEADS or (head == "fc") != (num_classes > 0):
        raise PresetError(
            f"{where}: head={head!r} with num_classes={num_classes} is inconsistent. "
            "Valid: head='fc' with num_classes >= 1, 'norm' or 'none' with 0."
        )
    size = config["image_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise PresetError(f"{where}: image_size must be [height, width]. Received: {size!r}.")
    preprocessing = config["preprocessing"]
    if not isinstance(preprocessing, dict) or any(k not in preprocessing for k in PREPROCESSING_KEYS):
        raise PresetError(
            f"{where}: preprocessing needs {', '.join(PREPROCESSING_KEYS)}. "
            f"Received: {preprocessing!r}."
        )
    if config["label_set"] not in LABEL_SETS:
        raise PresetError(
            f"{where}: unknown label_set {config['label_set']!r}. Valid: "
            "'imagenet-1k', 'imagenet-22k', null."
        )
    provenance = config["provenance"]
    if not isinstance(provenance, dict) or "source_format" not in provenance:
        raise PresetError(f"{where}: provenance must be an object with source_format.")
    return config


def make_config(
    *, family, variant, num_classes, head, image_size, preprocessing, label_set,
    license, provenance, weights_dtype="float32",
):
    """A validated schema-1 `config.json` dict; every writer of presets builds it here.

    Raises:
        PresetError: a field is invalid (see `validate_config`).
    """
    return validate_config({
        "schema_version": SCHEMA_VERSION,
        "family": family,
        "variant": variant,
        "num_classes": num_classes,
        "head": head,
        "image_size": list(image_size),
        "preprocessing": dict(preprocessing),
        "label_set": label_set,
        "license": license,
        "weights_dtype": weights_dtype,
        "provenance": provenance,
    })


def read_config(path):
    """Reads and validates `config.json` of a preset directory."""
    file = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isdir(os.fspath(path)):
        raise PresetError(
            f"Not a preset directory: {path!r} does not exist or is not a "
            "directory. A preset directory holds config.json and "
            "model.safetensors (convert a checkpoint with convert_checkpoint)."
        )
    if not os.path.isfile(file):
        raise PresetError(
            f"{path!r} has no {CONFIG_FILE}: it is not a convnext_zoo preset "
            "directory. Convert a checkpoint with convert_checkpoint first."
        )
    try:
        with open(file, encoding="utf-8") as handle:
            config = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PresetError(f"{file} is not valid JSON ({error}).") from None
    return validate_config(config, file)


def write_config(path, config):
    validate_config(config)
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
        handle.write("\n")


def render_readme(config):
    """A minimal model card for a preset directory."""
    provenance = config["provenance"]
    name = f"ConvNeXt {config['family'].upper()}-{config['variant']}"
    head = {
        "fc": f"{config['num_classes']}-class classifier ({config['label_set'] or 'custom labels'})",
        "norm": "pooled embedding (no classification layer)",
        "none": "backbone only (no head)",
    }[config.get("head", "fc")]
    pre = config["preprocessing"]
    lines = [
        f"# {name}",
        "",
        f"Keras 3 weights for {name}, {head}, converted by convnext_zoo.",
        "",
        f"- Source: {provenance.get('source', provenance.get('file_name'))} "
        f"({provenance['source_format']} layout)",
        f"- Source file: `{provenance.get('file_name')}`, sha256 `{provenance.get('sha256')}`",
        f"- Image size: {config['image_size'][0]}x{config['image_size'][1]}, "
        f"{pre['interpolation']} resize, crop_pct {pre['crop_pct']} ({pre['crop_mode']}), "
        f"mean {pre['mean']}, std {pre['std']}",
        f"- Weights: {config.get('weights_dtype', 'float32')}",
        f"- License: {config['license']}",
        "",
        "```python",
        "import convnext_zoo",
        'model = convnext_zoo.from_preset("path/to/this/directory")',
        "```",
        "",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def atomic_directory(output_dir, overwrite=False):
    """Yields a temporary directory that becomes `output_dir` on success.

    The temporary directory sits in the same parent (so the final rename is
    atomic on one file system). On any exception it is removed and
    `output_dir` is left as it was: absent, or the old content when
    `overwrite` is set.

    Args:
        output_dir: the final directory.
        overwrite: replace an existing `output_dir`; otherwise an existing
            one raises `FileExistsError` before any work is done.

    Example:
        >>> with atomic_directory("out/preset") as tmp:
        ...     write_files(tmp)
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.lexists(output_dir) and not overwrite:
        raise FileExistsError(
            f"Output directory {output_dir} already exists. Choose another "
            "path or pass overwrite=True (--overwrite) to replace it."
        )
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"{output_dir} exists and is not a directory.")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(output_dir)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.lexists(output_dir):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rmdir(old)
            os.rename(output_dir, old)
            os.rename(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output_dir)
        os.chmod(output_dir, 0o755)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_preset(path, reference=None, rtol=1e-5):
    """Loads a preset directory back and checks it reproduces what was written.

    Every variable of the rebuilt model must equal its tensor in
    `model.safetensors` (exactly, in the stored dtype; the strict loader
    already proved every tensor is consumed and every variable assigned).
    With `reference`, the rebuilt model's output must also match.

    Args:
        path: the preset directory (usually the temporary one inside
            `atomic_directory`, before the rename).
        reference: optional `(inputs, outputs)`: a float32 NHWC batch and the
            source model's outputs on it. Meaningful for float32 storage.
        rtol: tolerance relative to the largest reference output.

    Returns:
        The max abs output difference (0.0 without a reference).

    Raises:
        PresetError: a variable or the output differs.

    Example:
        >>> with atomic_directory(out) as tmp:
        ...     save_weights(model, f"{tmp}/model.safetensors")
        ...     write_config(tmp, config)
        ...     verify_preset(tmp, reference=(x, model.predict(x)))
    """
    import numpy as np

    from convnext_zoo import weights
    from convnext_zoo.checkpoint_io import SafetensorsReader

    config = read_config(path)
    model = from_preset(path, include_top=config.get("head", "fc") != "none")
    file = os.path.join(os.fspath(path), WEIGHTS_FILE)
    variables = weights.keras_variables(model)
    tensors = SafetensorsReader(file)
    for name, variable in variables.items():
        stored = tensors.get(name)
        if not np.array_equal(np.asarray(variable.numpy()).astype(stored.dtype), stored):
            raise PresetError(
                f"Verification failed: variable {name!r} of the model rebuilt "
                f"from {path} differs from its tensor in {file}."
            )
    if reference is None:
        return 0.0
    inputs, expected = reference
    outputs = np.asarray(model(inputs, training=False))
    expected = np.asarray(expected)
    if outputs.shape != expected.shape:
        raise PresetError(
            f"Verification failed: the model rebuilt from {path} outputs shape "
            f"{outputs.shape}, the source model {expected.shape}."
        )
    diff = float(np.max(np.abs(outputs - expected)))
    scale = float(np.max(np.abs(expected))) or 1.0
    if diff > rtol * scale:
        raise PresetError(
            f"Verification failed: the model rebuilt from {path} differs from "
            f"the source model by {diff:.3g} (largest output {scale:.3g}, "
            f"tolerance {rtol:g} relative)."
        )
    return diff


def _build(config, include_top, num_classes, input_shape, pooling, dtype, kwargs):
    from convnext_zoo.convnext_v1 import create_convnext_v1
    from convnext_zoo.convnext_v2 import create_convnext_v2

    factory = create_convnext_v1 if config["family"] == "v1" else create_convnext_v2
    options = dict(kwargs)
    if dtype is not None:
        options["dtype"] = dtype
    if not include_top:
        return factory(
            config["variant"], include_top=False, pooling=pooling,
            input_shape=input_shape, **options,
        )
    if num_classes == 0:
        # The pooled, normalised embedding (timm's num_classes=0 model).
        return factory(
            config["variant"], include_top=False, pooling=pooling or "avg",
            input_shape=input_shape, **options,
        )
    return factory(
        config["variant"], num_classes=num_classes, include_top=True,
        pooling=pooling, input_shape=input_shape, **options,
    )


def build_for_config(
    config, where, include_top=True, num_classes=None, input_shape=None,
    pooling=None, dtype=None, load_weights=False, **kwargs,
):
    """Builds the model a preset config describes, as `from_preset` asked for it.

    Args: as `from_preset`; `where` names the preset in messages. With
        `load_weights=True` the backbone's random init is skipped (zeros):
        the caller must assign every backbone weight.

    Returns:
        `(model, allow_unused, allow_unassigned)`: the model with fresh
        weights, and the name prefixes the strict weight assignment must let
        pass (a head that is dropped or replaced).
    """
    from convnext_zoo import weights

    head = config.get("head", "fc" if config["num_classes"] else "norm")
    preset_classes = config["num_classes"]
    if input_shape is None:
        input_shape = (None, None, 3)
    if include_top and num_classes is None:
        if head == "none":
            raise PresetError(
                f"Preset {where!r} is a headless encoder (e.g. FCMAE): it has no "
                "classifier. Pass num_classes=N for a freshly initialised head, "
                "or include_top=False for the backbone."
            )
        num_classes = preset_classes
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0
    ):
        raise ValueError(
            f"`num_classes` must be an int >= 1 (or 0 for the pooled embedding). "
            f"Received: num_classes={num_classes!r}."
        )
    from convnext_zoo.backbone import weights_to_be_loaded

    with weights_to_be_loaded() if load_weights else contextlib.nullcontext():
        model = _build(
            config, include_top, num_classes if include_top else 0, input_shape,
            pooling, dtype, kwargs,
        )
    allow_unused, allow_unassigned = [], []
    model_names = set(weights.keras_variables(model))
    has_fc = any(n.startswith("head_fc/") for n in model_names)
    has_norm = any(n.startswith("head_norm/") for n in model_names)
    if not has_fc:
        allow_unused.append("head_fc/")
    if not has_norm:
        allow_unused.append("head_norm/")
    fresh = []
    if has_fc and (head != "fc" or num_classes != preset_classes):
        allow_unused.append("head_fc/")
        allow_unassigned.append("head_fc/")
        fresh.append("head_fc")
    if has_norm and head == "none":
        allow_unassigned.append("head_norm/")
        fresh.append("head_norm")
    if fresh:
        logger.warning(
            "Preset %s: loaded every weight except %s, which %s freshly "
            "initialised (preset head: %s, %d classes; requested: %d classes).",
            where, " and ".join(fresh), "is" if len(fresh) == 1 else "are",
            head, preset_classes, num_classes or 0,
        )
    return model, tuple(allow_unused), tuple(allow_unassigned)


def from_preset(
    path,
    include_top=True,
    num_classes=None,
    input_shape=None,
    pooling=None,
    load_weights=True,
    dtype=None,
    **kwargs,
):
    """Builds the model of a Keras-native preset directory and loads its weights.

    Args:
        path: a directory written by `convert_checkpoint` (config.json +
            model.safetensors).
        include_top: build the classification head. A preset without a
            classifier (`head` "norm") gives its pooled embedding; one
            without any head (FCMAE, `head` "none") needs `num_classes`.
        num_classes: classes of the head; `None` keeps the preset's. A
            different number loads everything but `head_fc`, which is freshly
            initialised (logged once).
        input_shape: `(height, width, channels)`; default `(None, None, 3)`
            (any size of 32 px and more).
        pooling: without the top: `None` returns the backbone (last feature
            map), "avg"/"max" the pooled, normalised embedding.
        load_weights: `False` builds the architecture with fresh weights.
        dtype: dtype policy, e.g. "mixed_float16" or "bfloat16".
        **kwargs: passed to `create_convnext_v1`/`create_convnext_v2`
            (`drop_path_rate`, `classifier_activation`, `name`, `dropout`, ...).

    Returns:
        A `ConvNeXtImageClassifier`, or a `ConvNeXtBackbone` when
        `include_top=False` and `pooling=None`.

    Raises:
        PresetError: the directory is not a valid preset.
        WeightMismatchError: the weights do not fit the built model.

    Example:
        >>> model = from_preset("out/convnext_v2_atto")
        >>> features = from_preset("out/convnext_v2_atto", include_top=False)
    """
    from convnext_zoo import weights

    config = read_config(path)
    model, allow_unused, allow_unassigned = build_for_config(
        config, path, include_top, num_classes, input_shape, pooling, dtype,
        load_weights=load_weights, **kwargs,
    )
    if not load_weights:
        return model
    weights.load_weights(
        model,
        os.path.join(os.fspath(path), WEIGHTS_FILE),
        allow_unused=tuple(allow_unused),
        allow_unassigned=tuple(allow_unassigned),
    )
    return model
