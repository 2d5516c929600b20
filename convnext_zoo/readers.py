"""Step 2 of loading: local files -> a config and the tensors, one reader per format.

Every reader yields a `Checkpoint`: this package's preset config (the
fields `convnext_zoo.preset_dir` validates) and the source tensors as
`convnext_zoo.weights.SourceTensor`s under their Keras variable names, read
lazily, one at a time. Readers never build the model the caller asked for:
that is `convnext_zoo.build`, and the strict assignment is
`convnext_zoo.weights.assign_strict`.

Formats (`read` picks one from the files):

* "preset": this package's preset directory, weights in timm's layout or
  in Keras' own (`convnext_zoo.preset_dir`);
* "keras-hub": a directory written by keras-hub's `save_to_preset`
  (`config.json` naming a registered class, `model.weights.h5`, and
  `task.json` / `task.weights.h5` / `preprocessor.json` for a task): read
  through keras-hub's own loader;
* "timm", "transformers", "official": a PyTorch checkpoint (safetensors,
  sharded index, or pickle read with `weights_only=True`), its layout told
  from the tensor names and its architecture from names and shapes;
* "fcmae": the official FCMAE pre-training file (`models/fcmae.py`:
  `encoder.downsample_layers.0.0.weight`, MinkowskiEngine kernels) read as
  its headless encoder; the decoder and mask token (`FCMAE_DECODER_KEYS`)
  are deliberately unused (`Checkpoint.allow_unused`);
  `convnext_zoo.FCMAE.load_official_weights` loads them into an FCMAE.
"""

import json
import os
import re

from convnext_zoo import layout, preset_dir
from convnext_zoo.checkpoint_io import (
    CheckpointError,
    DictReader,
    SafetensorsReader,
    detect_format,
    open_source,
)
from convnext_zoo.resolve import SIDECARS, WEIGHT_FILES, WEIGHT_SUFFIXES
from convnext_zoo.variants import FAMILIES, default_preprocessing, suggest
from convnext_zoo.weights import SourceTensor, weight_tensors

DEFAULT_LICENSE = {"v1": "apache-2.0", "v2": "cc-by-nc-4.0"}
LABEL_SETS = {1000: "imagenet-1k", 21841: "imagenet-22k"}
TORCH_FORMATS = layout.LAYOUTS + ("fcmae",)
FORMATS = ("preset", "keras-hub") + TORCH_FORMATS
# The official FCMAE file's decoder: no encoder variable takes these.
FCMAE_DECODER_KEYS = ("proj.", "mask_token", "decoder.", "pred.")
# Facts a caller may state about a checkpoint: the architecture must agree
# with the tensors; the rest fills in or replaces the metadata.
ARCHITECTURE_OVERRIDES = ("family", "variant", "num_classes")
METADATA_OVERRIDES = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std",
                      "labels", "license", "dtype")
READ_OVERRIDES = ARCHITECTURE_OVERRIDES + METADATA_OVERRIDES + ("checkpoint_key",)
_INTERPOLATIONS = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}


class ConversionError(ValueError):
    """The checkpoint and what the caller said about it do not agree."""


class Checkpoint:
    """A read checkpoint: its preset config and its tensors, before any model exists.

    Attributes:
        config: the preset config (validated, schema 2).
        tensors: `SourceTensor`s with Keras names (data read on demand).
        source: the weights path, for messages.
        files: the files the tensors come from (hashed for provenance).
        source_format: one of `FORMATS`.
        allow_unused: prefixes of source keys the format holds beyond the
            network, deliberately not loaded (the FCMAE decoder).
    """

    def __init__(self, config, tensors, source, files, source_format, allow_unused=()):
        self.config = config
        self.tensors = tensors
        self.source = source
        self.files = files
        self.source_format = source_format
        self.allow_unused = tuple(allow_unused)


def read(located, source_format="auto", **overrides):
    """Reads what `convnext_zoo.resolve.locate` found.

    Args:
        located: a `convnext_zoo.resolve.Located`.
        source_format: "auto" or one of `FORMATS`.
        **overrides: `READ_OVERRIDES`: `family`, `variant`, `num_classes`
            must agree with the tensors; `input_size`, `crop_pct`,
            `crop_mode`, `interpolation`, `mean`, `std`, `labels`,
            `license`, `dtype` replace the metadata; `checkpoint_key` picks
            the entry of a pickled training checkpoint.

    Returns:
        A `Checkpoint`; for a registered preset located without download,
        one with the registry's config and no tensors.
    """
    unknown = sorted(set(overrides) - set(READ_OVERRIDES))
    if unknown:
        raise TypeError(
            f"Unknown option(s): {', '.join(unknown)}.{suggest(unknown[0], READ_OVERRIDES)} "
            f"Valid: {', '.join(READ_OVERRIDES)}."
        )
    if source_format != "auto" and source_format not in FORMATS:
        raise ValueError(
            f"Received: source_format={source_format!r}.{suggest(source_format, FORMATS)} "
            f"Valid: 'auto', {', '.join(map(repr, FORMATS))}."
        )
    # None means "not stated", except for labels, where it states "no label set".
    overrides = {k: v for k, v in overrides.items() if v is not None or k == "labels"}
    if located.entry is not None:
        overrides = {**registry_metadata(located.entry), **overrides}
        if located.path is None:
            return Checkpoint(registry_config(located.entry), None, located.preset, [], "timm")
    path = located.path
    document = _config_document(path)
    detected = None
    if isinstance(document, dict) and "registered_name" in document:
        detected = "keras-hub"
        checkpoint = read_keras_hub(path, document)
    elif preset_dir.zoo_fields(document) is not None:
        detected = "preset"
        checkpoint = read_preset(path, document)
    else:
        checkpoint = read_torch_checkpoint(path, overrides, located.origin, source_format)
    if source_format not in ("auto", checkpoint.source_format):
        raise ConversionError(
            f"Received: source_format={source_format!r}, but {checkpoint.source} is in "
            f"the {checkpoint.source_format} format. Use source_format='auto'."
        )
    if detected:
        _check_architecture(checkpoint.config, overrides, checkpoint.source)
        checkpoint.config = _with_metadata(checkpoint.config, overrides)
    return checkpoint


def _config_document(path):
    """The parsed `config.json` of a directory (read once per load), or `None`."""
    config = os.path.join(path, preset_dir.CONFIG_FILE)
    return preset_dir.read_json(config) if os.path.isfile(config) else None


# === This package's presets ===


def read_preset(folder, document=None):
    """A preset directory of this package (schema 1 or 2, timm or Keras layout).

    Args:
        folder: the directory.
        document: its parsed `config.json`, when the caller has read it.
    """
    if document is None:
        config = preset_dir.read_config(folder)
    else:
        fields = preset_dir.zoo_fields(document)
        config = preset_dir.validate_config(fields, os.path.join(folder, preset_dir.CONFIG_FILE))
    file = os.path.join(folder, preset_dir.WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise preset_dir.PresetError(
            f"No weights file in {folder}: a preset holds {preset_dir.WEIGHTS_FILE} beside "
            "config.json. Copy or download the whole directory again."
        )
    reader = SafetensorsReader(file)
    if config["weights_layout"] == "keras":
        tensors = weight_tensors(reader)
    else:
        named, unknown = timm_names(reader.keys(), "timm")
        tensors = torch_layout_tensors(reader, named, unknown)
    return Checkpoint(config, tensors, file, reader.files, "preset")


# === keras-hub presets ===


def read_keras_hub(folder, backbone_json=None):
    """A keras-hub preset directory (`save_to_preset` of this package's models).

    keras-hub's own loader (`keras_hub.models.Backbone.from_preset`, or
    `ImageClassifier.from_preset` with `task.json`) rebuilds the saved model
    and its weights; its variables, named as this package names them, are
    the tensors. The config comes from the JSON files.
    """
    import keras_hub

    from convnext_zoo.weights import keras_variables

    if backbone_json is None:
        backbone_json = preset_dir.read_json(os.path.join(folder, preset_dir.CONFIG_FILE))
    task_path = os.path.join(folder, "task.json")
    task_json = preset_dir.read_json(task_path) if os.path.isfile(task_path) else None
    registered = (task_json or backbone_json).get("registered_name", "")
    if not registered.startswith("convnext_zoo>"):
        raise preset_dir.PresetError(
            f"{folder} is a keras-hub preset of {registered!r}, not of a convnext_zoo "
            "model. Load it with keras_hub.models.Backbone.from_preset / "
            "ImageClassifier.from_preset."
        )
    loader = keras_hub.models.ImageClassifier if task_json else keras_hub.models.Backbone
    model = loader.from_preset(folder)
    tensors = {name: variable.numpy() for name, variable in keras_variables(model).items()}
    config = keras_hub_config(backbone_json["config"], task_json and task_json["config"], folder)
    reader = DictReader(tensors, folder)
    return Checkpoint(config, weight_tensors(reader), folder, _existing(folder), "keras-hub")


def _existing(folder):
    return [os.path.join(folder, f) for f in ("model.weights.h5", "task.weights.h5")
            if os.path.isfile(os.path.join(folder, f))]


def keras_hub_config(backbone, task, folder):
    """The preset config of a keras-hub backbone config and optional task config."""
    family = "v2" if backbone.get("use_grn") else "v1"
    depths, dims = tuple(backbone["depths"]), tuple(backbone["hidden_dims"])
    variant = next((name for name, spec in FAMILIES[family].items() if spec == (depths, dims)), None)
    if variant is None:
        raise preset_dir.PresetError(
            f"The keras-hub preset in {folder} is a ConvNeXt {family.upper()} with "
            f"depths={list(depths)}, hidden_dims={list(dims)}, which matches no variant. "
            f"Known: {', '.join(f'{k} {v}' for k, v in FAMILIES[family].items())}."
        )
    shape = [None if s is None else int(s) for s in backbone.get("image_shape", (None, None, 3))]
    num_classes = int(task["num_classes"]) if task else 0
    head = ("fc" if num_classes else "norm") if task else "none"
    preprocessing, size = default_preprocessing(), [224, 224]
    converter = ((task or {}).get("preprocessor") or {}).get("config", {}).get("image_converter")
    if converter:
        options = converter["config"]
        size = [int(s) for s in options["image_size"]]
        preprocessing = {k: list(options[k]) if isinstance(options[k], (list, tuple)) else options[k]
                         for k in preprocessing}
    elif shape[0] and shape[1]:
        size = shape[:2]
    return preset_dir.make_config(
        family=family, variant=variant, num_classes=num_classes, head=head,
        image_size=size, preprocessing=preprocessing,
        label_set=LABEL_SETS.get(num_classes) if head == "fc" else None,
        license=DEFAULT_LICENSE[family],
        provenance={"source_format": "keras-hub", "source": folder},
        image_shape=shape,
        adapt_small_inputs=bool(backbone.get("adapt_small_inputs", True)),
        pooling=(task or {}).get("pooling", "avg"),
    )


# === PyTorch checkpoints (timm, transformers, official) ===


def find_weights(folder):
    """The weights file of a directory: the first of `WEIGHT_FILES`, or the only one."""
    names = os.listdir(folder)
    for candidate in WEIGHT_FILES:
        if candidate in names:
            return os.path.join(folder, candidate)
    found = sorted(n for n in names if n.endswith(WEIGHT_SUFFIXES))
    if len(found) == 1:
        return os.path.join(folder, found[0])
    if not found:
        raise CheckpointError(
            f"No weights file in {folder}. Looked for {', '.join(WEIGHT_FILES)} "
            f"or a single *{', *'.join(WEIGHT_SUFFIXES)} file, a preset of this package, "
            f"or a keras-hub preset (config.json + model.weights.h5). Found: {sorted(names)[:10]}."
        )
    raise CheckpointError(
        f"Several weights files in {folder}: {found}. Pass the file itself as the source."
    )


def read_sidecars(folder):
    """`config.json` and `preprocessor_config.json` of a checkpoint's folder, parsed."""
    sidecars = {}
    for name in SIDECARS:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    sidecars[name] = json.load(f)
            except ValueError as error:
                raise CheckpointError(f"{path} is not valid JSON: {error}.") from None
    return sidecars


def read_torch_checkpoint(path, overrides, origin, source_format="auto"):
    """A timm, transformers or official checkpoint: a weights file or its folder."""
    if os.path.isdir(path):
        weights_path, sidecars = find_weights(path), read_sidecars(path)
    else:
        weights_path = path
        in_folder = os.path.basename(path) in WEIGHT_FILES
        sidecars = read_sidecars(os.path.dirname(os.path.abspath(path))) if in_folder else {}
    reader = open_source(weights_path, overrides.get("checkpoint_key"))
    detected = detect_format(reader.keys(), weights_path)
    if source_format not in ("auto", detected):
        raise ConversionError(
            f"Received: source_format={source_format!r}, but the tensor names in "
            f"{weights_path} are in the {detected} layout. Use source_format='auto'."
        )
    shape_of, allow_unused = None, ()
    if detected == "fcmae":
        encoder = [k for k in reader.keys() if k.startswith("encoder.")]
        named, unknown = timm_names(encoder, detected)
        unknown += [k for k in reader.keys() if not k.startswith("encoder.")]
        shape_of, allow_unused = _sparse_as_dense_shape(reader), FCMAE_DECODER_KEYS
    else:
        named, unknown = timm_names(reader.keys(), detected)
    arch = infer_architecture(named, reader, shape_of)
    family, variant = _resolve_architecture(
        arch, overrides.get("family"), overrides.get("variant"), weights_path
    )
    _check_timm_architecture(sidecars, family, variant, weights_path)
    num_classes = arch["num_classes"]
    head = "fc" if num_classes else "norm" if arch["head_norm"] else "none"
    if head == "fc" and not arch["head_norm"]:
        raise ConversionError(
            f"{weights_path} has a classification layer but no head LayerNorm "
            "(head.norm / norm / layernorm); ConvNeXt always has one."
        )
    image_size, preprocessing = _preprocessing(sidecars)
    pretrained_cfg = sidecars.get("config.json", {}).get("pretrained_cfg") or {}
    files = [{"name": os.path.basename(p), "bytes": os.path.getsize(p)} for p in reader.files]
    config = preset_dir.make_config(
        family=family, variant=variant, num_classes=num_classes, head=head,
        image_size=image_size, preprocessing=preprocessing,
        label_set=LABEL_SETS.get(num_classes),
        license=pretrained_cfg.get("license") or DEFAULT_LICENSE[family],
        provenance={
            "source_format": detected,
            "source": origin.get("source") or os.path.basename(weights_path),
            "revision": origin.get("revision"),
            "file_name": files[0]["name"],
            "files": files,
        },
    )
    _check_architecture(config, overrides, weights_path)
    config = _with_metadata(config, overrides)
    if detected == "fcmae":
        tensors = [converted_tensor(reader, key, layout.fcmae_to_keras_name(key))
                   for key in [*named.values(), *unknown]]
    else:
        tensors = torch_layout_tensors(reader, named, unknown)
    return Checkpoint(config, tensors, weights_path, reader.files, detected, allow_unused)


def _sparse_as_dense_shape(reader):
    """`shape(key)` that reports a MinkowskiEngine kernel `[k*k, in, out]` as PyTorch's `[out, in, k, k]`."""
    def shape(key):
        dims = tuple(reader.shape(key))
        if key.endswith(".kernel") and len(dims) == 3:
            side = int(round(dims[0] ** 0.5))
            return (dims[2], dims[1], side, side)
        return dims

    return shape


def timm_names(keys, source_format):
    """`{timm name: source name}` for the keys `convnext_zoo.layout` can rename.

    Keys it cannot rename are returned apart, to be listed as unused.
    """
    to_timm = layout.TO_TIMM_NAME[source_format]
    named, unknown = {}, []
    for key in keys:
        name = to_timm(key)
        if name is None:
            unknown.append(key)
        elif name in named:
            raise CheckpointError(f"Source keys {named[name]!r} and {key!r} both mean {name!r}.")
        else:
            named[name] = key
    return named, unknown


def converted_tensor(reader, key, target):
    """The `SourceTensor` of one PyTorch-layout tensor, converted to Keras' layout as it loads.

    `target` is `(keras name, layout kind)`, or None for a tensor no variable
    takes (listed as unused by the strict assignment).
    """
    shape = tuple(reader.shape(key))
    if target is None:
        return SourceTensor(key, None, None, shape, None)
    keras_name, kind = target

    def load():
        return layout.to_keras(kind, reader.get(key))

    return SourceTensor(key, keras_name, layout.keras_shape(kind, shape), shape, load)


def torch_layout_tensors(reader, named, unknown):
    """`SourceTensor`s of PyTorch-layout tensors, converted to Keras layout as they load."""
    tensors = [converted_tensor(reader, key, layout.timm_to_keras_name(name)) for name, key in named.items()]
    return tensors + [converted_tensor(reader, key, None) for key in unknown]


def infer_architecture(canonical, reader, shape_of=None):
    """Reads family, variant, depths, dims and head from tensor names and shapes.

    Args:
        canonical: `{timm name: source name}` (see `timm_names`).
        reader: the source reader (shapes only are read).
        shape_of: `shape(source key)` in PyTorch's dense layout (default:
            the reader's; the FCMAE file's sparse kernels need converting).

    Returns:
        A dict: family (or None when undecidable), variant (or None),
        depths, hidden_dims, num_classes (0 without `head.fc`), head_norm (bool).
    """
    def shape(name):
        return tuple((shape_of or reader.shape)(canonical[name]))

    if "stem.0.weight" not in canonical:
        raise CheckpointError("The checkpoint has no stem convolution (stem.0.weight).")
    blocks = {}
    for name in canonical:
        match = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", name)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    depths = tuple(len(blocks.get(i, ())) for i in range(4))
    dims = [shape("stem.0.weight")[0]]
    for i in range(1, 4):
        key = f"stages.{i}.downsample.1.weight"
        dims.append(shape(key)[0] if key in canonical else None)
    dims = tuple(dims)
    has_grn = any(".mlp.grn." in n for n in canonical)
    has_scale = any(re.match(r"^stages\.\d+\.blocks\.\d+\.gamma$", n) for n in canonical)
    family = "v2" if has_grn and not has_scale else "v1" if has_scale and not has_grn else None
    variant = None
    candidates = [family] if family else list(FAMILIES)
    for fam in candidates:
        for name, config in FAMILIES[fam].items():
            if config == (depths, dims):
                variant = name
    num_classes = shape("head.fc.weight")[0] if "head.fc.weight" in canonical else 0
    return {
        "family": family, "variant": variant, "depths": depths, "hidden_dims": dims,
        "num_classes": num_classes, "head_norm": "head.norm.weight" in canonical,
        "has_grn": has_grn, "has_layer_scale": has_scale,
    }


def _describe(arch):
    return (f"depths={arch['depths']}, hidden_dims={arch['hidden_dims']}, "
            f"{'GRN' if arch['has_grn'] else 'no GRN'}, "
            f"{'layer scale' if arch['has_layer_scale'] else 'no layer scale'}, "
            f"num_classes={arch['num_classes']}")


def _resolve_architecture(arch, family, variant, path):
    if family is not None and family not in FAMILIES:
        raise ConversionError(
            f"Received: family={family!r}.{suggest(family, FAMILIES)} Valid: "
            f"{', '.join(FAMILIES)}."
        )
    if arch["family"] and family and family != arch["family"]:
        raise ConversionError(
            f"Received: family={family!r}, but {path} is ConvNeXt "
            f"{arch['family'].upper()} ({_describe(arch)}). Drop the override."
        )
    family = family or arch["family"]
    if family is None:
        raise ConversionError(
            f"Cannot tell V1 from V2 in {path} ({_describe(arch)}). Pass family='v1' or 'v2'."
        )
    variants = FAMILIES[family]
    if variant is not None and variant not in variants:
        raise ConversionError(
            f"Received: variant={variant!r}.{suggest(variant, variants)} Valid for "
            f"{family.upper()}: {', '.join(variants)}."
        )
    inferred = arch["variant"] if arch["family"] in (None, family) else None
    if variant and inferred and variant != inferred:
        raise ConversionError(
            f"Received: variant={variant!r}, but {path} holds a ConvNeXt "
            f"{family.upper()}-{inferred} ({_describe(arch)}); {variant} has "
            f"depths={variants[variant][0]}, hidden_dims={variants[variant][1]}. "
            "Drop the override or pick the matching checkpoint."
        )
    variant = variant or inferred
    if variant is None:
        raise ConversionError(
            f"{path} matches no ConvNeXt {family.upper()} variant ({_describe(arch)}). "
            f"Known: {', '.join(f'{k} {v}' for k, v in variants.items())}."
        )
    return family, variant


def _check_timm_architecture(sidecars, family, variant, path):
    architecture = sidecars.get("config.json", {}).get("architecture")
    if not architecture:
        return
    expected = f"convnext{'v2' if family == 'v2' else ''}_{variant}"
    if architecture != expected:
        raise ConversionError(
            f"config.json beside {path} says architecture={architecture!r}, but the "
            f"tensors are a {expected}. The files do not belong together."
        )


def _check_architecture(config, overrides, path):
    """`family`, `variant`, `num_classes` the caller stated must be the checkpoint's."""
    for key in ARCHITECTURE_OVERRIDES:
        stated = overrides.get(key)
        if stated is None or stated == config[key]:
            continue
        if key == "num_classes":
            has = (f"a {config['num_classes']}-class head" if config["num_classes"]
                   else "no classification layer")
            raise ConversionError(
                f"Received: num_classes={stated!r}, but {path} has {has}. Drop the "
                "override, or pass init_head=True to replace the head with a fresh one."
            )
        raise ConversionError(
            f"Received: {key}={stated!r}, but {path} is a ConvNeXt "
            f"{config['family'].upper()}-{config['variant']}. Drop the override."
        )


def _preprocessing(sidecars):
    """The resolution and evaluation transform timm's or transformers' sidecar states."""
    pre = default_preprocessing()
    size = 224
    timm_cfg = sidecars.get("config.json", {}).get("pretrained_cfg")
    if timm_cfg:
        size = list(timm_cfg.get("input_size", [3, 224, 224])[-2:])
        for key in ("mean", "std", "crop_pct", "crop_mode", "interpolation"):
            if timm_cfg.get(key) is not None:
                pre[key] = timm_cfg[key]
    hf_pre = sidecars.get("preprocessor_config.json")
    if hf_pre:
        shortest = (hf_pre.get("size") or {}).get("shortest_edge")
        if shortest:
            size = shortest
        pre["mean"] = hf_pre.get("image_mean", pre["mean"])
        pre["std"] = hf_pre.get("image_std", pre["std"])
        # transformers resizes >= 384 straight to size, like timm's squash.
        pre["crop_pct"] = hf_pre.get("crop_pct", pre["crop_pct"]) if size < 384 else 1.0
        pre["crop_mode"] = "center" if size < 384 else "squash"
        pre["interpolation"] = _INTERPOLATIONS.get(hf_pre.get("resample"), pre["interpolation"])
    elif "image_size" in sidecars.get("config.json", {}):
        size = sidecars["config.json"]["image_size"]
    size = [size, size] if isinstance(size, int) else list(size)
    return size, pre


def _with_metadata(config, overrides):
    """`config` with the caller's metadata overrides (resolution, transform, labels, licence)."""
    config = dict(config, preprocessing=dict(config["preprocessing"]))
    size = overrides.get("input_size")
    if size is not None:
        config["image_size"] = [size, size] if isinstance(size, int) else list(size)
    for key in ("mean", "std", "crop_pct", "crop_mode", "interpolation"):
        if overrides.get(key) is not None:
            value = overrides[key]
            config["preprocessing"][key] = list(value) if key in ("mean", "std") else value
    if "labels" in overrides:
        config["label_set"] = overrides["labels"]
    if overrides.get("license"):
        config["license"] = overrides["license"]
    if overrides.get("dtype"):
        config["weights_dtype"] = overrides["dtype"]
    return preset_dir.validate_config(config)


# === Registered presets ===


def registry_metadata(entry):
    """What the registry states about a registered checkpoint, as read overrides."""
    prep = entry["preprocessing"]
    return {
        "family": entry["family"],
        "variant": entry["variant"],
        "input_size": entry["image_size"],
        "crop_pct": prep["crop_pct"],
        "crop_mode": prep["crop_mode"],
        "interpolation": prep["interpolation"],
        "mean": prep["mean"],
        "std": prep["std"],
        "labels": entry["label_set"],
        "license": entry["license"],
    }


def registry_config(entry):
    """The preset config of a registered checkpoint, from the registry alone (no download)."""
    prep = entry["preprocessing"]
    return preset_dir.make_config(
        family=entry["family"],
        variant=entry["variant"],
        num_classes=entry["num_classes"],
        head="fc" if entry["num_classes"] else "none",
        image_size=[entry["image_size"], entry["image_size"]],
        preprocessing={k: prep[k] for k in preset_dir.PREPROCESSING_KEYS},
        label_set=entry["label_set"],
        license=entry["license"],
        provenance={"source_format": entry["source"]["format"], "preset": entry["name"]},
    )
