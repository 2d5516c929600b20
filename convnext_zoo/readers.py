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
* "timm", "transformers", "official", "open_clip", "dinov3": a PyTorch
  checkpoint (safetensors, sharded index, or pickle read with
  `weights_only=True`), its layout told from the tensor names and its
  architecture from names and shapes: any depths and widths (variant
  "custom" where no named variant has them), the stem, the MLPs' storage as
  Linear or 1x1 conv, LayerNorm or a bias-free norm, and the head's form.
  timm's `config.json` (architecture, `model_args`) or the caller's
  `norm_layer=` says which bias-free norm, and the epsilon. "open_clip" is
  an OpenCLIP model file (`open_clip_model.safetensors` /
  `open_clip_pytorch_model.bin`): its image tower becomes a classifier
  whose Dense is the CLIP projection, its text tower is listed as
  deliberately unused. "dinov3" is a transformers `DINOv3ConvNextModel`
  (`facebook/dinov3-convnext-*`): the embedding model, its final norm as
  the head LayerNorm.
* "fcmae": the official FCMAE pre-training file (`models/fcmae.py`:
  `encoder.downsample_layers.0.0.weight`, MinkowskiEngine kernels) read as
  its headless encoder; the decoder and mask token (`FCMAE_DECODER_KEYS`)
  are listed as deliberately unused (`Checkpoint.unused`);
  `convnext_zoo.FCMAE.load_official_weights` loads them into an FCMAE.
"""

import json
import os
import re

from convnext_zoo import layout, preset_dir, timm_format
from convnext_zoo.checkpoint_io import (
    CheckpointError,
    DictReader,
    SafetensorsReader,
    detect_format,
    open_source,
)
from convnext_zoo.registry import LABEL_SET_SIZES
from convnext_zoo.resolve import SIDECARS, WEIGHT_FILES, WEIGHT_SUFFIXES
from convnext_zoo.variants import (
    CUSTOM,
    FAMILIES,
    NORM_LAYERS,
    default_preprocessing,
    named_variant,
    stem_width,
    suggest,
)
from convnext_zoo.weights import SourceTensor, weight_tensors

DEFAULT_LICENSE = {"v1": "apache-2.0", "v2": "cc-by-nc-4.0"}
# Where a layout names the weights' origin, its licence (the OpenCLIP LAION
# towers are MIT; DINOv3's weights have their own licence).
LAYOUT_LICENSE = {"open_clip": "mit", "dinov3": "dinov3-license"}
# OpenCLIP's (and OpenAI CLIP's) normalisation, for an OpenCLIP file without
# its open_clip_config.json.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LABEL_SETS = LABEL_SET_SIZES
TORCH_FORMATS = layout.LAYOUTS + ("fcmae",)
FORMATS = ("preset", "keras-hub") + TORCH_FORMATS
# The official FCMAE file's decoder: no encoder variable takes these.
FCMAE_DECODER_KEYS = ("proj.", "mask_token", "decoder.", "pred.")
# Facts a caller may state about a checkpoint: the architecture must agree
# with the tensors; the rest fills in or replaces the metadata.
# `norm_layer` and `norm_epsilon` also say what tensors cannot show (a
# SimpleNorm and an RMS norm hold the same scale vector).
ARCHITECTURE_OVERRIDES = ("family", "variant", "num_classes", "norm_layer", "norm_epsilon")
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
        unused: source keys that belong to no image model and are left
            unused deliberately (listed, not an error): an OpenCLIP file's
            text tower, an FCMAE file's decoder.
    """

    def __init__(self, config, tensors, source, files, source_format, unused=()):
        self.config = config
        self.tensors = tensors
        self.source = source
        self.files = files
        self.source_format = source_format
        # Source keys left out on purpose (an OpenCLIP file's text tower, an
        # FCMAE file's decoder).
        self.unused = tuple(unused)


def read(located, source_format="auto", **overrides):
    """Reads what `convnext_zoo.resolve.locate` found.

    Args:
        located: a `convnext_zoo.resolve.Located`.
        source_format: "auto" or one of `FORMATS`.
        **overrides: `READ_OVERRIDES`: `family`, `variant`, `num_classes`,
            `norm_layer`, `norm_epsilon` must agree with the tensors (and
            name the norm where they cannot tell); `input_size`, `crop_pct`,
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
        tensors = torch_layout_tensors(reader, named, unknown, config["stem"])
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
    depths, dims = list(backbone["depths"]), list(backbone["hidden_dims"])
    variant = named_variant(family, depths, dims)
    architecture = {key: backbone.get(key, preset_dir.DEFAULTS[key])
                    for key in preset_dir.ARCHITECTURE_OPTIONS}
    if variant == CUSTOM:
        architecture.update(depths=depths, hidden_dims=dims)
    shape = [None if s is None else int(s) for s in backbone.get("image_shape", (None, None, 3))]
    num_classes = int(task["num_classes"]) if task else 0
    head = ("fc" if num_classes else "norm") if task else "none"
    head_options = {k: (task or {}).get(k, preset_dir.DEFAULTS[k])
                    for k in ("head_norm_first", "head_hidden_size")}
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
        **architecture,
        image_shape=shape,
        adapt_small_inputs=bool(backbone.get("adapt_small_inputs", True)),
        pooling=(task or {}).get("pooling", "avg"),
        **head_options,
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
    """A timm, transformers, official, OpenCLIP, DINOv3 or FCMAE checkpoint: a weights file or its folder."""
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
    shape_of, unused = None, ()
    if detected == "fcmae":
        encoder = [k for k in reader.keys() if k.startswith("encoder.")]
        named, unknown = timm_names(encoder, detected)
        # The decoder is listed as unused; any other stray key stays unknown
        # (and fails the strict assignment).
        others = [k for k in reader.keys() if not k.startswith("encoder.")]
        unused = tuple(k for k in others if k.startswith(FCMAE_DECODER_KEYS))
        unknown += [k for k in others if not k.startswith(FCMAE_DECODER_KEYS)]
        shape_of = _sparse_as_dense_shape(reader)
    else:
        named, unknown = timm_names(reader.keys(), detected)
    arch = infer_architecture(named, reader, shape_of)
    family, variant = _resolve_architecture(
        arch, overrides.get("family"), overrides.get("variant"), weights_path
    )
    head_options = {"head_norm_first": arch["head_norm_first"],
                    "head_hidden_size": arch["head_hidden_size"]}
    stated = _timm_sidecar_architecture(sidecars, arch, family, head_options, weights_path)
    options = _norm_options(arch, stated, overrides, weights_path)
    if variant == CUSTOM:
        options.update(depths=list(arch["depths"]), hidden_dims=list(arch["hidden_dims"]))
    num_classes = arch["num_classes"]
    has_norm = arch["head_norm"] or arch["head_norm_first"]
    head = "fc" if num_classes else "norm" if has_norm else "none"
    if head == "fc" and not has_norm:
        raise ConversionError(
            f"{weights_path} has a classification layer but no head LayerNorm "
            "(head.norm / norm / layernorm / norm_pre); ConvNeXt always has one."
        )
    image_size, preprocessing = _preprocessing(sidecars, detected)
    pretrained_cfg = sidecars.get("config.json", {}).get("pretrained_cfg") or {}
    files = [{"name": os.path.basename(p), "bytes": os.path.getsize(p)} for p in reader.files]
    # A CLIP projection's outputs are no classes.
    label_set = None if detected == "open_clip" else LABEL_SETS.get(num_classes)
    default_license = LAYOUT_LICENSE.get(detected) or DEFAULT_LICENSE[family]
    config = preset_dir.make_config(
        family=family, variant=variant, num_classes=num_classes, head=head,
        image_size=image_size, preprocessing=preprocessing,
        label_set=label_set,
        license=pretrained_cfg.get("license") or default_license,
        **head_options,
        provenance={
            "source_format": detected,
            "source": origin.get("source") or os.path.basename(weights_path),
            "revision": origin.get("revision"),
            "file_name": files[0]["name"],
            "files": files,
        },
        **options,
    )
    _check_architecture(config, overrides, weights_path)
    config = _with_metadata(config, overrides)
    if detected == "open_clip":
        named, unknown, unused, tensors = _open_clip_head(reader, named, unknown)
    elif detected == "fcmae":
        # The sparse kernels have their own kinds (`layout.fcmae_to_keras_name`).
        return Checkpoint(config, [converted_tensor(reader, key, layout.fcmae_to_keras_name(key))
                                   for key in [*named.values(), *unknown]],
                          weights_path, reader.files, detected, unused)
    else:
        tensors = []
    tensors += torch_layout_tensors(reader, named, unknown, config["stem"])
    return Checkpoint(config, tensors, weights_path, reader.files, detected, unused)


def _open_clip_head(reader, named, unknown):
    """OpenCLIP's bias-free projection and its text tower.

    The projection (`visual.head.proj` or `visual.head.mlp.fc2`) has no bias
    in OpenCLIP's ConvNeXt towers; the Keras Dense has one, which takes
    zeros (as timm's own conversion of these files does), so the projected
    embedding is the same. The text tower (every key outside "visual.") is
    returned as deliberately unused.

    Returns:
        `(named, unknown, unused keys, [the zero bias SourceTensor] or [])`.
    """
    import numpy as np

    unused = tuple(key for key in unknown if not key.startswith(layout.OPEN_CLIP_VISUAL))
    unknown = [key for key in unknown if key.startswith(layout.OPEN_CLIP_VISUAL)]
    extra = []
    if "head.fc.weight" in named and "head.fc.bias" not in named:
        size = int(reader.shape(named["head.fc.weight"])[0])
        key = f"(zero bias of {named['head.fc.weight']})"
        extra.append(SourceTensor(key, "head_fc/bias", (size,), (size,),
                                  lambda: np.zeros((size,), np.float32)))
    return named, unknown, unused, extra

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


def torch_layout_tensors(reader, named, unknown, stem="patchify"):
    """`SourceTensor`s of PyTorch-layout tensors, converted to Keras layout as they load.

    `stem` (`variants.STEMS`) tells which `stem.{i}` is a conv and which the norm.
    """
    tensors = [converted_tensor(reader, key, layout.timm_to_keras_name(name, stem))
               for name, key in named.items()]
    return tensors + [converted_tensor(reader, key, None) for key in unknown]


def infer_architecture(canonical, reader, shape_of=None):
    """Reads family, variant, shape, stem, MLP form and head from tensor names and shapes.

    Args:
        canonical: `{timm name: source name}` (see `timm_names`).
        reader: the source reader (shapes only are read).
        shape_of: `shape(source key)` in PyTorch's dense layout (default:
            the reader's; the FCMAE file's sparse kernels need converting).

    Returns:
        A dict: family (or None when undecidable), variant (a named one,
        or `CUSTOM` for other depths and widths), depths, hidden_dims,
        stem (`variants.STEMS`), conv_mlp (the MLPs are stored as 1x1
        convs), norm_bias (the norms have a bias: LayerNorm), num_classes
        (0 without `head.fc`), head_norm (bool), head_norm_first (bool:
        `norm_pre`), head_hidden_size (None or the width of
        `head.pre_logits.fc`).
    """
    def shape(name):
        return tuple((shape_of or reader.shape)(canonical[name]))

    if "stem.0.weight" not in canonical:
        raise CheckpointError("The checkpoint has no stem convolution (stem.0.weight).")
    stem_modules = sorted(int(m[1]) for n in canonical for m in [re.match(r"^stem\.(\d+)\.weight$", n)] if m)
    # The stem's last module is its norm; before it, one conv (patchify),
    # two (overlapping) or two around a parameterless activation.
    stem = {1: "patchify", 2: "overlap", 3: "overlap_act"}.get(stem_modules[-1])
    if stem is None or len(shape(f"stem.{stem_modules[-1]}.weight")) != 1:
        raise CheckpointError(
            f"Unrecognised stem: modules {['stem.%d' % i for i in stem_modules]}. Known: "
            "stem.0 conv + stem.1 norm (patchify), stem.0/stem.1 3x3 convs + stem.2 norm "
            "(timm's overlapping stem), stem.0/stem.2 convs + stem.3 norm (with activation)."
        )
    stem_norm = f"stem.{stem_modules[-1]}"
    blocks = {}
    for name in canonical:
        match = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", name)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    depths = tuple(len(blocks.get(i, ())) for i in range(4))
    dims = [shape(f"{stem_norm}.weight")[0]]
    if stem == "overlap" and shape("stem.0.weight")[0] != dims[0]:
        stem = "overlap_tiered"
        if shape("stem.0.weight")[0] != stem_width(stem, dims[0]):
            raise CheckpointError(
                f"The overlapping stem's first conv has {shape('stem.0.weight')[0]} channels; "
                f"timm's stems have {dims[0]} or (tiered) {stem_width(stem, dims[0])}."
            )
    for i in range(1, 4):
        key = f"stages.{i}.downsample.1.weight"
        dims.append(shape(key)[0] if key in canonical else None)
    dims = tuple(dims)
    has_grn = any(".mlp.grn." in n for n in canonical)
    has_scale = any(re.match(r"^stages\.\d+\.blocks\.\d+\.gamma$", n) for n in canonical)
    family = "v2" if has_grn and not has_scale else "v1" if has_scale and not has_grn else None
    variant = CUSTOM
    candidates = [family] if family else list(FAMILIES)
    for fam in candidates:
        if None not in dims and named_variant(fam, depths, dims) != CUSTOM:
            variant = named_variant(fam, depths, dims)
    num_classes = shape("head.fc.weight")[0] if "head.fc.weight" in canonical else 0
    fc1 = [n for n in canonical if re.match(r"^stages\.\d+\.blocks\.\d+\.mlp\.fc1\.weight$", n)]
    hidden = "head.pre_logits.fc.weight"
    return {
        "family": family, "variant": variant, "depths": depths, "hidden_dims": dims,
        "stem": stem, "conv_mlp": any(len(shape(n)) == 4 for n in fc1),
        "norm_bias": f"{stem_norm}.bias" in canonical,
        "num_classes": num_classes, "head_norm": "head.norm.weight" in canonical,
        "head_norm_first": "norm_pre.weight" in canonical,
        "head_hidden_size": shape(hidden)[0] if hidden in canonical else None,
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
    if variant is not None and variant not in variants and variant != CUSTOM:
        raise ConversionError(
            f"Received: variant={variant!r}.{suggest(variant, variants)} Valid for "
            f"{family.upper()}: {', '.join(variants)}."
        )
    if None in arch["hidden_dims"] or 0 in arch["depths"]:
        raise ConversionError(
            f"{path} lacks whole stages ({_describe(arch)}): every stage needs its "
            "downsampling (from stage 1 on) and at least one block."
        )
    inferred = named_variant(family, arch["depths"], arch["hidden_dims"])
    if variant and variant != inferred:
        shape = (f"has depths={variants[variant][0]}, hidden_dims={variants[variant][1]}"
                 if variant in variants else "is for shapes of no named variant")
        raise ConversionError(
            f"Received: variant={variant!r}, but {path} holds a ConvNeXt "
            f"{family.upper()}-{inferred} ({_describe(arch)}); {variant} {shape}. "
            "Drop the override or pick the matching checkpoint."
        )
    return family, inferred


def _timm_sidecar_architecture(sidecars, arch, family, head_options, path):
    """What timm's `config.json` beside the weights says (architecture and `model_args`).

    timm's `convnext_tiny_hnf` / `convnext_large_mlp` are a body of
    `TIMM_ARCHITECTURES` plus a head option, checked against the tensors' head.

    Returns:
        `timm_format.from_timm_architecture`'s dict, or `None` without a
        timm config or for an architecture timm_format does not know.

    Raises:
        ConversionError: the named architecture is not the tensors' network.
    """
    document = sidecars.get("config.json", {})
    name = document.get("architecture")
    if not name:
        return None
    body = name
    if name in timm_format.TIMM_HEAD_ARCHITECTURES:
        (_, variant), options = timm_format.TIMM_HEAD_ARCHITECTURES[name]
        body = timm_format.timm_architecture(family, variant)
        wrong = {k: head_options[k] for k, v in options.items() if head_options[k] != v}
        if wrong:
            raise ConversionError(
                f"config.json beside {path} says architecture={name!r} ({options}), but the "
                f"tensors' head has {wrong}. The files do not belong together."
            )
    stated = timm_format.from_timm_architecture(body, document.get("model_args"))
    if stated is None:
        return None
    found = {"family": family, "depths": tuple(arch["depths"]), "hidden_dims": tuple(arch["hidden_dims"]),
             "stem": arch["stem"]}
    differing = [key for key in found if stated[key] != found[key]]
    if differing:
        variant = named_variant(family, found["depths"], found["hidden_dims"])
        tensors = timm_format.timm_architecture(family, variant, found)
        raise ConversionError(
            f"config.json beside {path} says architecture={name!r} "
            f"({', '.join(f'{k}={stated[k]}' for k in differing)}), but the tensors are a "
            f"{tensors} ({', '.join(f'{k}={found[k]}' for k in differing)}). The files do "
            "not belong together."
        )
    return stated


def _norm_options(arch, stated, overrides, path):
    """stem, norm_layer, norm_epsilon and conv_mlp of a checkpoint, as preset fields.

    The tensors give the stem, the MLP form and whether the norms have a
    bias; timm's `config.json` (`stated`) or the caller's overrides give the
    norm kind where the tensors cannot (a bias-free norm: SimpleNorm or RMS
    norm) and the epsilon. transformers' `layer_norm_eps` is not read: it
    sets only transformers' final pooled LayerNorm, not the 1e-6 of every
    other norm (its default, 1e-12, is a deviation from the official model).
    """
    norm_layer = overrides.get("norm_layer") or (stated or {}).get("norm_layer")
    if norm_layer is not None and norm_layer not in NORM_LAYERS:
        raise ConversionError(
            f"Received: norm_layer={norm_layer!r}.{suggest(norm_layer, NORM_LAYERS)} "
            f"Valid: {', '.join(NORM_LAYERS)}."
        )
    if arch["norm_bias"]:
        if norm_layer not in (None, "layer_norm"):
            raise ConversionError(
                f"Received: norm_layer={norm_layer!r}, but the norms of {path} have a bias: "
                "they are LayerNorms. Drop the override."
            )
        norm_layer = "layer_norm"
    elif norm_layer in (None, "layer_norm"):
        raise ConversionError(
            f"The norms of {path} have a scale and no bias: a SimpleNorm or an RMS norm, "
            "which the tensors cannot tell apart. Pass norm_layer='simple_norm' (timm's "
            "zepto_rms) or norm_layer='rms_norm' (timm's atto_rms)."
        )
    epsilon = overrides.get("norm_epsilon") or (stated or {}).get("norm_epsilon") or \
        preset_dir.DEFAULTS["norm_epsilon"]
    return {"stem": arch["stem"], "norm_layer": norm_layer, "norm_epsilon": float(epsilon),
            "conv_mlp": bool(arch["conv_mlp"])}


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
        if key in ("norm_layer", "norm_epsilon"):
            raise ConversionError(
                f"Received: {key}={stated!r}, but {path} has {key}={config[key]!r}. "
                "Drop the override."
            )
        raise ConversionError(
            f"Received: {key}={stated!r}, but {path} is a ConvNeXt "
            f"{config['family'].upper()}-{config['variant']}. Drop the override."
        )


def _preprocessing(sidecars, source_format=None):
    """The resolution and evaluation transform timm's, transformers' or OpenCLIP's sidecar states."""
    pre = default_preprocessing()
    size = 224
    if source_format == "open_clip":
        # OpenCLIP resizes the short side to the size and crops the centre.
        pre.update(mean=CLIP_MEAN, std=CLIP_STD, crop_pct=1.0, crop_mode="center")
        open_clip_cfg = sidecars.get("open_clip_config.json") or {}
        vision = (open_clip_cfg.get("model_cfg") or {}).get("vision_cfg") or {}
        size = vision.get("image_size", size)
        transform = open_clip_cfg.get("preprocess_cfg") or {}
        for key in ("mean", "std", "interpolation"):
            if transform.get(key) is not None:
                pre[key] = list(transform[key]) if key != "interpolation" else transform[key]
    timm_cfg = sidecars.get("config.json", {}).get("pretrained_cfg")
    if timm_cfg:
        size = list(timm_cfg.get("input_size", [3, 224, 224])[-2:])
        for key in ("mean", "std", "crop_pct", "crop_mode", "interpolation"):
            if timm_cfg.get(key) is not None:
                pre[key] = timm_cfg[key]
    hf_pre = sidecars.get("preprocessor_config.json")
    if hf_pre:
        hf_size = hf_pre.get("size") or {}
        shortest = hf_size.get("shortest_edge")
        if shortest:
            size = shortest
        pre["mean"] = hf_pre.get("image_mean", pre["mean"])
        pre["std"] = hf_pre.get("image_std", pre["std"])
        # transformers resizes >= 384 straight to size, like timm's squash.
        pre["crop_pct"] = hf_pre.get("crop_pct", pre["crop_pct"]) if size < 384 else 1.0
        pre["crop_mode"] = "center" if size < 384 else "squash"
        if not shortest and hf_size.get("height"):
            # A fixed height x width (DINOv3's processor): a plain resize.
            size = [hf_size["height"], hf_size["width"]]
            pre["crop_pct"], pre["crop_mode"] = 1.0, "squash"
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


def registry_architecture(entry):
    """The backbone fields of a registered checkpoint, as preset config fields.

    Its variant (or "custom" with depths and widths) and the stem, norm and
    MLP options its `architecture` states. timm's variant names that are one size plus options (tiny_hnf, large_mlp)
    are that size; sizes of no family table (atto ... nano, zepto and
    xxlarge for V1) are "custom".
    """
    arch = entry["architecture"]
    if "depths" in arch:
        variant = named_variant(entry["family"], arch["depths"], arch["hidden_dims"])
    else:
        variant = entry["variant"]
    options = {k: v for k, v in arch.items() if k not in ("depths", "hidden_dims")}
    unsupported = sorted(set(options) - set(preset_dir.DEFAULTS))
    if unsupported:
        # Never build a different network than the checkpoint's.
        raise ConversionError(
            f"Preset {entry.get('name')!r} needs the architecture option(s) "
            f"{', '.join(f'{k}={options[k]!r}' for k in unsupported)}, which this version of "
            "convnext_zoo cannot build. Upgrade convnext_zoo, or pick another preset "
            "(convnext_zoo.list_presets())."
        )
    fields = {"variant": variant, **options}
    if variant == CUSTOM:
        fields.update(depths=list(arch["depths"]), hidden_dims=list(arch["hidden_dims"]))
    return fields


def registry_head(entry):
    """The head of a registered checkpoint: "fc", "norm" or "none".

    fc: a classifier or a CLIP projection; norm: a feature encoder with its
    final norm (DINOv3, EUPE); none: the FCMAE encoders, released without it.
    """
    if entry["num_classes"]:
        return "fc"
    return "none" if entry["family"] == "v2" else "norm"


def registry_metadata(entry):
    """What the registry states about a registered checkpoint, as read overrides."""
    prep = entry["preprocessing"]
    fields = registry_architecture(entry)
    return {
        "family": entry["family"],
        "variant": fields["variant"],
        **{k: fields[k] for k in ("norm_layer", "norm_epsilon") if k in fields},
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
        num_classes=entry["num_classes"],
        head=registry_head(entry),
        image_size=[entry["image_size"], entry["image_size"]],
        preprocessing={k: prep[k] for k in preset_dir.PREPROCESSING_KEYS},
        label_set=entry["label_set"],
        license=entry["license"],
        provenance={"source_format": entry["source"]["format"], "preset": entry["name"]},
        **registry_architecture(entry),
    )
