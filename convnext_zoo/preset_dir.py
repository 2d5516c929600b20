"""The preset directory of this package: its config schema, written atomically.

A preset directory holds:

* `config.json`. Schema 2 keeps this package's fields under the key
  `"convnext_zoo"`; beside it, where timm can build the network, the fields
  timm reads (`architecture`, `num_classes`, `pretrained_cfg`, ...; see
  `convnext_zoo.timm_format`), so `timm.create_model("local-dir:...")` and
  `"hf-hub:..."` load the same directory. Schema 1 (older presets) has this
  package's fields at the top level and is still read.
* `model.safetensors`: the weights, in timm's layout (`weights_layout`
  "timm": PyTorch tensor layouts under timm's names) or in Keras' own
  (`weights_layout` "keras": every Keras variable under
  `"{layer}/{variable}"`, see `convnext_zoo.weights`), the latter for
  networks timm cannot express (lowered strides for small inputs).
* `README.md`: a model card.

This package's fields:

    {
      "schema_version": 2,
      "family": "v1" | "v2",
      "variant": "tiny", ... | "custom",
      "depths": [4 ints] | null,   # set for variant "custom" (any depths and
      "hidden_dims": [4 ints] | null,  # widths, inferred from the tensors)
      "stem": "patchify" | "overlap" | "overlap_tiered" | "overlap_act",
      "norm_layer": "layer_norm" | "simple_norm" | "rms_norm",
      "norm_epsilon": float,       # default 1e-6
      "conv_mlp": bool,            # the source stored the MLPs as 1x1 convs
                                   # (see convnext_zoo.variants; defaults as
                                   # the official network)
      "num_classes": int,          # 0: no classification layer
      "head": "fc" | "norm" | "none",
                                   # fc: pool + norm + Dense; norm: pool +
                                   # norm (pooled embedding); none: backbone
                                   # only (FCMAE encoders)
      "image_size": [h, w],        # the resolution the weights were trained at
      "preprocessing": {"mean": [3], "std": [3], "crop_pct": float,
                        "crop_mode": "center" | "squash",
                        "interpolation": "bicubic" | ...},
      "label_set": "imagenet-1k" | "imagenet-12k" | "imagenet-22k" | null,
      "class_names": [str, ...] | absent,   # custom labels, one per class
      "license": str | null,
      "weights_dtype": "float32" | "float16" | "bfloat16",
      "weights_layout": "timm" | "keras",   # schema 2; schema 1 is "keras"
      "image_shape": [h | null, w | null, channels],
                                   # the input the network was built for
                                   # (static sides lower the strides of
                                   # small inputs); default [null, null, 3]
      "adapt_small_inputs": bool,  # default true
      "pooling": "avg" | "max",    # default "avg"
      "head_norm_first": bool,     # default false: LayerNorm on the feature
                                   # map before pooling (timm's *_hnf)
      "head_hidden_size": int | null,
                                   # default null: Dense + GELU of this width
                                   # between the norm and the last Dense
                                   # (timm's *_mlp, OpenCLIP's MLP projection)
      "timm": {"loadable": bool, "reason": str | null},
      "provenance": {"source_format": "official" | "timm" | "transformers"
                     | "keras" | "keras-hub", "file_name": str, ...}
    }

This module is pure Python (no Keras): the loading pipeline
(`convnext_zoo.pipeline`) reads presets, `convnext_zoo.writer` writes them.
"""

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile

from convnext_zoo.registry import LABEL_SET_SIZES

SCHEMA_VERSION = 2
READ_SCHEMA_VERSIONS = (1, 2)
ZOO_SECTION = "convnext_zoo"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
README_FILE = "README.md"
HEADS = ("fc", "norm", "none")
LABEL_SETS = (*LABEL_SET_SIZES.values(), None)
WEIGHT_LAYOUTS = ("timm", "keras")
POOLINGS = ("avg", "max")
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
# Schema-2 fields with the value a schema-1 file implies.
DEFAULTS = {
    "weights_layout": "keras",
    "image_shape": [None, None, 3],
    "adapt_small_inputs": True,
    "pooling": "avg",
    "depths": None,
    "hidden_dims": None,
    "stem": "patchify",
    "norm_layer": "layer_norm",
    "norm_epsilon": 1e-6,
    "conv_mlp": False,
    "head_norm_first": False,
    "head_hidden_size": None,
    "timm": {"loadable": False, "reason": "not recorded (a schema-1 preset, in Keras layout)"},
}

logger = logging.getLogger("convnext_zoo")


class PresetError(ValueError):
    """A preset directory is missing, incomplete or invalid."""


def validate_config(config, where="config.json"):
    """Checks this package's preset fields (schema 1 or 2) and fills schema-2 defaults.

    Args:
        config: this package's fields (the `"convnext_zoo"` section of a
            schema-2 `config.json`, or a whole schema-1 one).
        where: file name for the error message.

    Returns:
        A new dict: `config` with every schema-2 field present.

    Raises:
        PresetError: naming the first problem and what is valid.
    """
    from convnext_zoo.variants import architecture_shape, check_family, check_options

    if not isinstance(config, dict):
        raise PresetError(f"{where} must hold a JSON object. Received: {type(config).__name__}.")
    version = config.get("schema_version")
    if version not in READ_SCHEMA_VERSIONS:
        raise PresetError(
            f"{where} has schema_version={version!r}; this version of convnext_zoo "
            f"reads schema_version {' and '.join(map(str, READ_SCHEMA_VERSIONS))}. "
            "Convert the checkpoint again or upgrade convnext_zoo."
        )
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise PresetError(
            f"{where} lacks the keys {', '.join(missing)}. Required: "
            f"{', '.join(REQUIRED_KEYS)}."
        )
    config = {**copy.deepcopy(DEFAULTS), **config}
    try:
        check_family(config["family"])
        architecture_shape(config["family"], config["variant"], config["depths"], config["hidden_dims"])
        check_options(config["stem"], config["norm_layer"], config["norm_epsilon"])
    except ValueError as error:
        raise PresetError(f"{where}: {error}") from None
    if not isinstance(config["conv_mlp"], bool):
        raise PresetError(f"{where}: conv_mlp must be true or false. Received: {config['conv_mlp']!r}.")
    num_classes = config["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise PresetError(f"{where}: num_classes must be an int >= 0. Received: {num_classes!r}.")
    head = config.setdefault("head", "fc" if num_classes else "norm")
    if head not in HEADS or (head == "fc") != (num_classes > 0):
        raise PresetError(
            f"{where}: head={head!r} with num_classes={num_classes} is inconsistent. "
            "Valid: head='fc' with num_classes >= 1, 'norm' or 'none' with 0."
        )
    size = config["image_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise PresetError(f"{where}: image_size must be [height, width]. Received: {size!r}.")
    shape = config["image_shape"]
    if not (
        isinstance(shape, list) and len(shape) == 3
        and all(s is None or (isinstance(s, int) and s > 0) for s in shape[:2])
        and isinstance(shape[2], int) and shape[2] > 0
    ):
        raise PresetError(
            f"{where}: image_shape must be [height or null, width or null, channels]. "
            f"Received: {shape!r}."
        )
    preprocessing = config["preprocessing"]
    if not isinstance(preprocessing, dict) or any(k not in preprocessing for k in PREPROCESSING_KEYS):
        raise PresetError(
            f"{where}: preprocessing needs {', '.join(PREPROCESSING_KEYS)}. "
            f"Received: {preprocessing!r}."
        )
    if config["label_set"] not in LABEL_SETS:
        raise PresetError(
            f"{where}: unknown label_set {config['label_set']!r}. Valid: "
            f"{', '.join(repr(s) for s in LABEL_SETS if s)}, null."
        )
    names = config.get("class_names")
    if names is not None and (
        not isinstance(names, list) or len(names) != num_classes
        or not all(isinstance(n, str) for n in names)
    ):
        raise PresetError(
            f"{where}: class_names must be a list of {num_classes} strings (one per "
            f"class). Received: {str(names)[:80]}."
        )
    if config["weights_layout"] not in WEIGHT_LAYOUTS:
        raise PresetError(
            f"{where}: weights_layout must be one of {', '.join(WEIGHT_LAYOUTS)}. "
            f"Received: {config['weights_layout']!r}."
        )
    if config["pooling"] not in POOLINGS:
        raise PresetError(
            f"{where}: pooling must be 'avg' or 'max'. Received: {config['pooling']!r}."
        )
    if not isinstance(config["head_norm_first"], bool):
        raise PresetError(
            f"{where}: head_norm_first must be true or false. "
            f"Received: {config['head_norm_first']!r}."
        )
    hidden = config["head_hidden_size"]
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise PresetError(
            f"{where}: head_hidden_size must be null or an int >= 1. Received: {hidden!r}."
        )
    if hidden is not None and config["head_norm_first"]:
        raise PresetError(
            f"{where}: head_norm_first=true and head_hidden_size={hidden} exclude each "
            "other (timm builds neither head). Keep one."
        )
    provenance = config["provenance"]
    if not isinstance(provenance, dict) or "source_format" not in provenance:
        raise PresetError(f"{where}: provenance must be an object with source_format.")
    return config


# The architecture fields besides family and variant, as ConvNeXtBackbone names its arguments.
ARCHITECTURE_OPTIONS = ("stem", "norm_layer", "norm_epsilon", "conv_mlp")


def backbone_arguments(config):
    """The `ConvNeXtBackbone` architecture arguments a validated config describes.

    Returns:
        `{"depths", "hidden_dims", "use_grn", "stem", "norm_layer",
        "norm_epsilon", "conv_mlp"}`.
    """
    from convnext_zoo.variants import architecture_shape

    depths, hidden_dims = architecture_shape(
        config["family"], config["variant"], config.get("depths"), config.get("hidden_dims"))
    options = {key: config.get(key, DEFAULTS[key]) for key in ARCHITECTURE_OPTIONS}
    return {"depths": depths, "hidden_dims": hidden_dims, "use_grn": config["family"] == "v2",
            **options}


def make_config(
    *, family, variant, num_classes, head, image_size, preprocessing, label_set,
    license, provenance, weights_dtype="float32", **schema2,
):
    """A validated schema-2 config dict; every writer of presets builds it here.

    Args:
        **schema2: any of `weights_layout`, `image_shape`,
            `adapt_small_inputs`, `pooling`, `head_norm_first`,
            `head_hidden_size`, `timm`, `class_names` (defaults
            as in `DEFAULTS`).

    Raises:
        PresetError: a field is invalid (see `validate_config`).
    """
    unknown = sorted(set(schema2) - set(DEFAULTS) - {"class_names"})
    if unknown:
        raise TypeError(f"Unknown preset config fields: {', '.join(unknown)}.")
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
        **schema2,
    })


def read_json(path):
    """A JSON file, or `PresetError` naming it when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PresetError(f"{path} is not valid JSON ({error}).") from None


def zoo_fields(document):
    """This package's fields of a parsed `config.json`, or `None` if it has none."""
    if isinstance(document, dict):
        if isinstance(document.get(ZOO_SECTION), dict):
            return document[ZOO_SECTION]
        if "schema_version" in document:
            return document
    return None


def read_config(path):
    """Reads and validates this package's fields of a preset directory's `config.json`.

    Both schemas are read: 2 (the `"convnext_zoo"` section) and 1 (top level).

    Returns:
        The fields with every schema-2 default filled in.
    """
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
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
    fields = zoo_fields(read_json(file))
    if fields is None:
        raise PresetError(
            f"{file} has no {ZOO_SECTION!r} section (nor schema_version): it is not a "
            "convnext_zoo preset. convnext_zoo.from_preset reads it as a checkpoint "
            "of another library instead."
        )
    return validate_config(fields, file)


def write_config(path, config, timm_fields=None):
    """Writes `config.json`: `timm_fields` (if any) with this package's fields beside them."""
    config = validate_config(config)
    document = dict(timm_fields or {})
    document[ZOO_SECTION] = config
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)
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
        f"Weights of {name}, {head}, written by convnext_zoo.",
        "",
        f"- Source: {provenance.get('source', provenance.get('file_name'))} "
        f"({provenance['source_format']} layout)",
        f"- Source file: `{provenance.get('file_name')}`, sha256 `{provenance.get('sha256')}`",
        f"- Image size: {config['image_size'][0]}x{config['image_size'][1]}, "
        f"{pre['interpolation']} resize, crop_pct {pre['crop_pct']} ({pre['crop_mode']}), "
        f"mean {pre['mean']}, std {pre['std']}",
        f"- Weights: {config.get('weights_dtype', 'float32')}, in "
        f"{'timm' if config.get('weights_layout') == 'timm' else 'Keras'}' layout",
        f"- License: {config['license']}",
        "",
        "```python",
        "import convnext_zoo",
        'model = convnext_zoo.from_preset("path/to/this/directory")',
        "```",
        "",
    ]
    timm = config.get("timm") or {}
    if timm.get("loadable"):
        lines += [
            "In PyTorch, timm loads the same directory:",
            "",
            "```python",
            "import timm",
            'model = timm.create_model("local-dir:path/to/this/directory", pretrained=True)',
            "```",
            "",
        ]
    elif timm.get("reason"):
        lines += [f"timm cannot load this preset: {timm['reason']}", ""]
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
        >>> with atomic_directory("out/preset") as tmp:  # doctest: +SKIP
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


