"""`convert_checkpoint`: official, timm and transformers ConvNeXt checkpoints to presets.

The converter resolves the source (file, directory or Hub repo), reads it
lazily, detects its layout from the tensor names, infers family, variant and
classes from names and shapes, builds the Keras model, assigns every variable
with strict accounting and writes a preset directory atomically
(`convnext_zoo.preset_dir`).
"""

import json
import os
import re
import time

from convnext_zoo import layout
from convnext_zoo.checkpoint_io import CheckpointError, detect_format, open_source, sha256_file
from convnext_zoo.variants import FAMILIES, default_preprocessing, suggest

DEFAULT_LICENSE = {"v1": "apache-2.0", "v2": "cc-by-nc-4.0"}
LABEL_SETS = {1000: "imagenet-1k", 21841: "imagenet-22k"}
CONVERTER = "convnext_zoo.convert_checkpoint"
# Weight files in the order a directory or Hub repo is searched.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
OVERRIDES = (
    "family", "variant", "num_classes", "init_head", "backbone_only",
    "checkpoint_key", "dtype", "input_size", "crop_pct", "crop_mode",
    "interpolation", "mean", "std", "labels", "license", "overwrite",
    "revision", "name",
)
_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")
_INTERPOLATIONS = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}


class ConversionError(ValueError):
    """The checkpoint and the requested conversion do not agree."""


# === Source resolution ===

def _pick_weights(names, where):
    names = list(names)
    for candidate in WEIGHT_FILES:
        if candidate in names:
            return candidate
    found = sorted(n for n in names if n.endswith(WEIGHT_SUFFIXES))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(
            f"No weights file in {where}. Looked for {', '.join(WEIGHT_FILES)} "
            f"or a single *{', *'.join(WEIGHT_SUFFIXES)} file. Found: {sorted(names)[:10]}."
        )
    raise CheckpointError(
        f"Several weights files in {where}: {found}. Pass the file itself as the source."
    )


def resolve_source(source, revision=None):
    """Finds the weights file and its JSON sidecars for a file, directory or Hub id.

    Returns:
        `(weights_path, {sidecar name: parsed JSON}, description)` where the
        description is a dict with `source`, `revision`.
    """
    source = os.fspath(source)
    if os.path.isfile(source):
        folder = os.path.dirname(os.path.abspath(source))
        sidecars = {}
        if os.path.basename(source) in WEIGHT_FILES:
            sidecars = _read_sidecars(folder)
        return source, sidecars, {"source": os.path.basename(source), "revision": None}
    if os.path.isdir(source):
        name = _pick_weights(os.listdir(source), source)
        return (os.path.join(source, name), _read_sidecars(source),
                {"source": os.path.basename(os.path.abspath(source)), "revision": None})
    if _HUB_ID.match(source) and not source.startswith((".", "/")):
        return _download(source.removeprefix("hf://"), revision)
    raise CheckpointError(
        f"Received: source={source!r}, which is neither an existing file, an "
        "existing directory, nor a Hugging Face Hub repo id ('owner/name'). "
        "Check the path, or pass a repo id such as 'timm/convnextv2_atto.fcmae_ft_in1k'."
    )


def _read_sidecars(folder):
    sidecars = {}
    for name in ("config.json", "preprocessor_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    sidecars[name] = json.load(f)
            except ValueError as error:
                raise CheckpointError(f"{path} is not valid JSON: {error}.") from None
    return sidecars


def _download(repo_id, revision):
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            "Downloading from the Hub needs huggingface_hub: pip install huggingface_hub."
        ) from None
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        name = _pick_weights(files, f"Hub repo {repo_id}")
        wanted = [name] + [n for n in ("config.json", "preprocessor_config.json") if n in files]
        if name.endswith(".index.json"):
            with open(huggingface_hub.hf_hub_download(repo_id, name, revision=revision)) as f:
                wanted += sorted(set(json.load(f)["weight_map"].values()))
        paths = {n: huggingface_hub.hf_hub_download(repo_id, n, revision=revision) for n in wanted}
    except CheckpointError:
        raise
    except Exception as error:  # network, auth, missing repo: say which repo
        raise CheckpointError(
            f"Could not download {repo_id!r} (revision {revision or 'main'}) from the "
            f"Hugging Face Hub: {type(error).__name__}: {error}. Check the repo id, "
            "your network and HF_TOKEN, or convert a local copy."
        ) from None
    sidecars = _read_sidecars(os.path.dirname(paths[name]))
    return paths[name], sidecars, {"source": repo_id, "revision": revision}


# === Architecture inference ===

def infer_architecture(canonical, reader):
    """Reads family, variant, depths, dims and head from tensor names and shapes.

    Args:
        canonical: `{timm name: source name}` (see `timm_names`).
        reader: the source reader (shapes only are read).

    Returns:
        A dict: family (or None when undecidable), variant (or None),
        depths, hidden_dims, num_classes (0 without `head.fc`), head_norm (bool).
    """
    def shape(name):
        return tuple(reader.shape(canonical[name]))

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


# === Metadata ===

def _preprocessing(sidecars, input_size):
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
    if input_size is not None:
        size = input_size
    size = [size, size] if isinstance(size, int) else list(size)
    return size, pre


# === Conversion ===

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


def _build(family, variant, head, num_classes, name=None):
    from convnext_zoo.convnext_v1 import create_convnext_v1
    from convnext_zoo.convnext_v2 import create_convnext_v2

    create = create_convnext_v1 if family == "v1" else create_convnext_v2
    options = {"input_shape": (None, None, 3)}
    if name:
        options["name"] = name
    if head == "fc":
        return create(variant, num_classes=num_classes, **options)
    return create(variant, include_top=False, pooling="avg" if head == "norm" else None,
                  **options)


def _source_tensors(reader, named, unknown):
    from convnext_zoo.weights import SourceTensor

    tensors = []
    for name, key in named.items():
        shape = tuple(reader.shape(key))
        target = layout.timm_to_keras_name(name)
        if target is None:
            tensors.append(SourceTensor(key, None, None, shape, None))
            continue
        keras_name, kind = target

        def load(key=key, kind=kind):
            return layout.to_keras(kind, reader.get(key))

        tensors.append(SourceTensor(key, keras_name, layout.keras_shape(kind, shape), shape, load))
    tensors += [SourceTensor(key, None, None, tuple(reader.shape(key)), None) for key in unknown]
    return tensors


def _head_prefixes():
    """Keras variable-name prefixes of the head layers (LayerNorm and Dense)."""
    return [layout.timm_to_keras_name(f"head.{m}.weight")[0].split("/")[0] + "/"
            for m in ("fc", "norm")]


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConversionError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}.")


class Conversion:
    """A checkpoint read, checked and mapped to Keras names, before any model exists.

    Made by `prepare_conversion`. `tensors` are `SourceTensor`s (data read
    lazily, one tensor at a time); `allow_unused` / `allow_unassigned` are the
    deliberate exceptions of the strict assignment (a replaced head).
    """

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def build(self):
        """The Keras model this conversion fills.

        Built inside `weights_to_be_loaded`: its variables are left pending
        (or at zeros where Keras cannot defer them) until `assign` fills
        them; a head the conversion initialises afresh is random as usual.
        """
        from convnext_zoo.backbone import weights_to_be_loaded

        with weights_to_be_loaded():
            return _build(self.family, self.variant, self.head, self.num_classes,
                          self.overrides.get("name"))

    def assign(self, model, allow_unused=(), allow_unassigned=(), description=None):
        """Assigns the source tensors to `model`'s variables, strictly."""
        from convnext_zoo import weights

        return weights.assign_strict(
            weights.keras_variables(model),
            self.tensors,
            source=self.weights_path,
            allow_unused=tuple(self.allow_unused) + tuple(allow_unused),
            allow_unassigned=tuple(self.allow_unassigned) + tuple(allow_unassigned),
            description=description,
        )

    def config(self, model=None, with_hashes=True):
        """The preset config (schema v1) of this conversion.

        Args:
            model: the converted model; names its freshly initialised
                variables in the provenance.
            with_hashes: hash the source files (a full read of each).
        """
        from convnext_zoo import preset_dir, weights

        overrides = self.overrides
        image_size, preprocessing = _preprocessing(self.sidecars, overrides.get("input_size"))
        for key in preprocessing:
            if overrides.get(key) is not None:
                preprocessing[key] = list(overrides[key]) if key in ("mean", "std") else overrides[key]
        pretrained_cfg = self.sidecars.get("config.json", {}).get("pretrained_cfg") or {}
        files = [{"name": os.path.basename(p), "bytes": os.path.getsize(p),
                  **({"sha256": sha256_file(p)} if with_hashes else {})}
                 for p in self.reader.files]
        fresh = []
        if model is not None:
            fresh = sorted(n for n in weights.keras_variables(model)
                           if any(n.startswith(p) for p in self.allow_unassigned))
        return preset_dir.make_config(
            family=self.family,
            variant=self.variant,
            num_classes=self.num_classes,
            head=self.head,
            image_size=image_size,
            preprocessing=preprocessing,
            label_set=overrides.get("labels", LABEL_SETS.get(self.num_classes)),
            license=overrides.get("license") or pretrained_cfg.get("license")
            or DEFAULT_LICENSE[self.family],
            weights_dtype=overrides.get("dtype", "float32"),
            provenance={
                "source_format": self.source_format,
                "source": self.origin["source"],
                "revision": self.origin["revision"],
                "file_name": files[0]["name"],
                "sha256": files[0].get("sha256", ""),
                "files": files,
                "converter": f"{CONVERTER} {_version()}",
                "unused_source_tensors": list(self.allow_unused),
                "fresh_variables": fresh,
            },
        )


def prepare_conversion(source, source_format="auto", **overrides):
    """Reads and checks a checkpoint for conversion; reads no tensor data.

    Takes the arguments of `convert_checkpoint` (without `output_dir`) and
    raises its errors. `convnext_zoo.from_preset` uses it to load timm,
    transformers and official checkpoints straight into the requested model,
    with no preset written in between.

    Returns:
        A `Conversion`.
    """
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(
            f"Unknown conversion option(s): {', '.join(unknown)}."
            f"{suggest(unknown[0], OVERRIDES)} Valid: {', '.join(OVERRIDES)}."
        )
    if source_format != "auto" and source_format not in layout.LAYOUTS:
        raise ValueError(
            f"Received: source_format={source_format!r}.{suggest(source_format, layout.LAYOUTS)} "
            f"Valid: 'auto', {', '.join(map(repr, layout.LAYOUTS))}."
        )
    init_head = bool(overrides.get("init_head", False))
    backbone_only = bool(overrides.get("backbone_only", False))
    if init_head and backbone_only:
        raise ConversionError("init_head=True and backbone_only=True exclude each other; pick one.")
    num_classes = overrides.get("num_classes")
    if num_classes is not None:
        _check_int("num_classes", num_classes, 0)
    if init_head and num_classes is None:
        raise ConversionError(
            "init_head=True builds a fresh head and needs its size: pass num_classes=N "
            "(0 for a fresh LayerNorm over the pooled embedding)."
        )

    weights_path, sidecars, origin = resolve_source(source, overrides.get("revision"))
    reader = open_source(weights_path, overrides.get("checkpoint_key"))
    detected = detect_format(reader.keys(), weights_path)
    if source_format not in ("auto", detected):
        raise ConversionError(
            f"Received: source_format={source_format!r}, but the tensor names in "
            f"{weights_path} are in the {detected} layout. Use source_format='auto'."
        )
    named, unknown_keys = timm_names(reader.keys(), detected)
    arch = infer_architecture(named, reader)
    family, variant = _resolve_architecture(
        arch, overrides.get("family"), overrides.get("variant"), weights_path
    )
    _check_timm_architecture(sidecars, family, variant, weights_path)

    source_head = sorted(key for name, key in named.items() if name.startswith("head."))
    allow_unused, allow_unassigned = [], []
    if init_head:
        head = "fc" if num_classes else "norm"
        allow_unused, allow_unassigned = source_head, _head_prefixes()
    elif backbone_only:
        head, num_classes = "none", 0
        allow_unused = source_head
    else:
        if num_classes is not None and num_classes != arch["num_classes"]:
            raise ConversionError(
                f"Received: num_classes={num_classes!r}, but {weights_path} has "
                f"{'a %d-class head' % arch['num_classes'] if arch['num_classes'] else 'no classification layer'}. "
                "Drop the override, or pass init_head=True to replace the head with a fresh one."
            )
        num_classes = arch["num_classes"]
        head = "fc" if num_classes else "norm" if arch["head_norm"] else "none"
        if head == "fc" and not arch["head_norm"]:
            raise ConversionError(
                f"{weights_path} has a classification layer but no head LayerNorm "
                "(head.norm / norm / layernorm); ConvNeXt always has one."
            )
    return Conversion(
        weights_path=weights_path, sidecars=sidecars, origin=origin, reader=reader,
        source_format=detected, family=family, variant=variant, head=head,
        num_classes=num_classes, tensors=_source_tensors(reader, named, unknown_keys),
        allow_unused=allow_unused, allow_unassigned=allow_unassigned, overrides=overrides,
    )


def convert_checkpoint(source, output_dir, source_format="auto", **overrides):
    """Converts an official, timm or transformers ConvNeXt checkpoint to a preset.

    The layout is detected from the tensor names, family / variant / classes
    from names and shapes; every source tensor must be consumed and every
    Keras variable assigned. The preset directory is written atomically: on
    any error nothing is left at `output_dir`.

    Args:
        source: a weights file (`.safetensors`, `.pth`, `.pt`, `.bin`,
            `.safetensors.index.json`), a directory holding one (with
            `config.json` / `preprocessor_config.json` when present), or a
            Hugging Face Hub repo id (`"timm/convnextv2_atto.fcmae_ft_in1k"`).
        output_dir: the preset directory to create.
        source_format: "auto" (from the tensor names), "official", "timm"
            or "transformers".
        **overrides: optional
            `family` ("v1"/"v2"), `variant`, `num_classes`: must agree with
                the checkpoint; they fill in what cannot be inferred.
            `init_head` (bool): write a classifier whose head (LayerNorm +
                Dense of `num_classes`) is freshly initialised, leaving any
                source head unused. The way to a classifier from an FCMAE
                encoder.
            `backbone_only` (bool): write the backbone only, leaving the
                source head unused.
            `checkpoint_key`: the entry of a pickled training checkpoint that
                holds the weights (default: the bare dict, else "model",
                "model_ema", "state_dict").
            `dtype`: storage dtype: "float32" (default), "float16", "bfloat16".
            `input_size` (int or [h, w]), `crop_pct`, `crop_mode`,
                `interpolation`, `mean`, `std`, `labels` ("imagenet-1k",
                "imagenet-22k" or None), `license`: preprocessing and metadata.
            `revision`: Hub revision. `overwrite`: replace `output_dir`.
            `name`: the Keras model name.

    Returns:
        The written preset config (a dict), plus `seconds` taken.

    Raises:
        CheckpointError: unreadable, unsafe, corrupt or unknown-layout source.
        ConversionError: an override disagrees with the checkpoint.
        WeightMismatchError: tensors and variables do not match one to one.

    Example:
        >>> convnext_zoo.convert_checkpoint(
        ...     "timm/convnextv2_atto.fcmae_ft_in1k", "presets/atto")  # doctest: +SKIP
        >>> model = convnext_zoo.from_preset("presets/atto")  # doctest: +SKIP
    """
    from convnext_zoo import preset_dir, weights

    started = time.perf_counter()
    conversion = prepare_conversion(source, source_format, **overrides)
    model = conversion.build()
    conversion.assign(
        model, description=f"Converting {os.path.basename(conversion.weights_path)}"
    )
    config = conversion.config(model)
    dtype = config["weights_dtype"]
    with preset_dir.atomic_directory(output_dir, bool(overrides.get("overwrite", False))) as tmp:
        weights.save_weights(model, os.path.join(tmp, preset_dir.WEIGHTS_FILE), dtype=dtype)
        preset_dir.write_config(tmp, config)
        with open(os.path.join(tmp, preset_dir.README_FILE), "w", encoding="utf-8") as f:
            f.write(preset_dir.render_readme(config))
        preset_dir.read_config(tmp)
    config["seconds"] = round(time.perf_counter() - started, 2)
    return config


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


def _version():
    from convnext_zoo import __version__

    return __version__
