"""`convert_checkpoint`: any readable ConvNeXt checkpoint -> a preset directory.

The checkpoint is read by the loading pipeline (`pipeline.read_source`: a
registered name, `hf://` handle or Hub repo id, a directory or a file, in
any format `convnext_zoo.readers` reads), filled into the network with
strict accounting (`pipeline.fill`), and written by `writer.save_preset`,
in timm's layout where timm can build the network.
"""

import gc
import os
import re
import time

from convnext_zoo import pipeline, writer
from convnext_zoo.backbone import ConvNeXtBackbone
from convnext_zoo.checkpoint_io import sha256_file
from convnext_zoo.classifier import ConvNeXtImageClassifier
from convnext_zoo.readers import LABEL_SETS, READ_OVERRIDES, ConversionError
from convnext_zoo.variants import suggest

CONVERTER = "convnext_zoo.convert_checkpoint"
OVERRIDES = READ_OVERRIDES + (
    "init_head", "backbone_only", "overwrite", "revision", "name", "layout",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

__all__ = ["convert_checkpoint", "ConversionError", "OVERRIDES"]


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConversionError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}.")


def source_handle(source):
    """A bare Hub repo id ('owner/name') that is no local path means `hf://owner/name`."""
    source = os.fspath(source)
    if not os.path.exists(source) and _HUB_ID.match(source) and not source.startswith("."):
        return "hf://" + source
    return source


def convert_checkpoint(source, output_dir, source_format="auto", **overrides):
    """Converts a ConvNeXt checkpoint to a preset directory of this package.

    The layout is detected from the files, family / variant / classes from
    names and shapes; every source tensor must be consumed and every Keras
    variable assigned. The preset directory is written atomically (on any
    error nothing is left at `output_dir`) and loaded back to check it.

    Args:
        source: a weights file (`.safetensors`, `.pth`, `.pt`, `.bin`,
            `.safetensors.index.json`), a directory (a timm / transformers /
            official checkpoint with its sidecars, a preset of this package,
            or a keras-hub preset), a registered preset name, an
            `hf://org/repo` handle or a bare Hub repo id
            (`"timm/convnextv2_atto.fcmae_ft_in1k"`).
        output_dir: the preset directory to create.
        source_format: "auto", "official", "timm", "transformers", "preset"
            or "keras-hub".
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
            `layout`: "auto" (default: timm's layout where timm can build the
                network, so `timm.create_model("local-dir:" + output_dir,
                pretrained=True)` loads it too), "timm" or "keras".
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
    started = time.perf_counter()
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(
            f"Unknown conversion option(s): {', '.join(unknown)}."
            f"{suggest(unknown[0], OVERRIDES)} Valid: {', '.join(OVERRIDES)}."
        )
    init_head = bool(overrides.pop("init_head", False))
    backbone_only = bool(overrides.pop("backbone_only", False))
    overwrite = bool(overrides.pop("overwrite", False))
    revision = overrides.pop("revision", None)
    name = overrides.pop("name", None)
    layout = overrides.pop("layout", "auto")
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
    if init_head:
        overrides.pop("num_classes")  # the new head's size, not the checkpoint's
    if os.path.lexists(os.path.abspath(os.fspath(output_dir))) and not overwrite:
        raise FileExistsError(
            f"Output directory {os.path.abspath(os.fspath(output_dir))} already exists. "
            "Choose another path or pass overwrite=True (--overwrite) to replace it."
        )
    checkpoint = pipeline.read_source(source_handle(source), source_format, revision=revision,
                                      **overrides)
    if init_head:
        request = dict(include_top=True, num_classes=num_classes, fresh_head=True)
    elif backbone_only:
        request = dict(include_top=False, pooling=None)
    else:
        request = dict(include_top=checkpoint.config["head"] != "none")
    built = pipeline.fill(
        checkpoint, os.fspath(source), ConvNeXtBackbone, ConvNeXtImageClassifier,
        description=f"Converting {os.path.basename(checkpoint.source)}",
        **request, **({"name": name} if name else {}),
    )
    config = _conversion_config(checkpoint, built, overrides)
    config = writer.save_preset(built.model, output_dir, config, layout=layout,
                                dtype=config["weights_dtype"], overwrite=overwrite)
    # The converted model is not returned: free its weights now (a Keras model
    # holds reference cycles, which wait for a collection otherwise).
    del built, checkpoint
    gc.collect()
    config["seconds"] = round(time.perf_counter() - started, 2)
    return config


def _conversion_config(checkpoint, built, overrides):
    """The preset config of the converted model: the checkpoint's metadata, the model's head."""
    from convnext_zoo import __version__

    source = checkpoint.config
    files = [{"name": os.path.basename(p), "bytes": os.path.getsize(p), "sha256": sha256_file(p)}
             for p in checkpoint.files]
    unused = sorted(t.key for t in checkpoint.tensors
              if t.target and any(t.target.startswith(p) for p in built.allow_unused))
    provenance = {
        **source["provenance"],
        "file_name": files[0]["name"],
        "sha256": files[0]["sha256"],
        "files": files,
        "converter": f"{CONVERTER} {__version__}",
        "unused_source_tensors": unused,
        "fresh_variables": sorted(
            name for name in writer.weights.keras_variables(built.model)
            if any(name.startswith(p) for p in built.allow_unassigned)
        ),
    }
    model = built.model
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    label_set = overrides["labels"] if "labels" in overrides else (
        source["label_set"] if num_classes == source["num_classes"] else LABEL_SETS.get(num_classes))
    return writer.model_config(
        model, license=source["license"], provenance=provenance,
        image_size=source["image_size"], preprocessing=source["preprocessing"],
        label_set=label_set if num_classes else None,
        weights_dtype=source["weights_dtype"],
    )
