"""Writing a model as a preset directory, atomically and verified.

`save_preset` is the one writer of presets (`convert_checkpoint` and
`push_to_hub` use it): weights in timm's layout where timm can build the
network (so timm and transformers users load the same repo), else in Keras'
own layout; `config.json` with this package's fields under `"convnext_zoo"`
and timm's fields beside them; a README. The directory is built aside,
loaded back through the loading pipeline and compared (every variable, and
the outputs on a batch), then renamed into place: a failure leaves nothing
behind (`convnext_zoo.preset_dir.atomic_directory`).

Example:
    >>> model = convnext_zoo.create_convnext_v2("atto", num_classes=10)
    >>> save_preset(model, "out/atto10")  # doctest: +SKIP
    >>> convnext_zoo.from_preset("out/atto10")  # doctest: +SKIP
"""

import gc
import os

import numpy as np

from convnext_zoo import model_card, pipeline, preset_dir, readers, timm_format, weights
from convnext_zoo.backbone import ConvNeXtBackbone
from convnext_zoo.class_names import LABEL_SET_SIZES
from convnext_zoo.classifier import ConvNeXtImageClassifier
from convnext_zoo.variants import CUSTOM, default_preprocessing, named_variant

LAYOUTS = ("auto", "timm", "keras")


def backbone_of(model):
    """The `ConvNeXtBackbone` of a model of this package, or a TypeError."""
    if isinstance(model, ConvNeXtBackbone):
        return model
    if isinstance(getattr(model, "backbone", None), ConvNeXtBackbone):
        return model.backbone
    raise TypeError(
        "Expected a ConvNeXt model of convnext_zoo or a preset directory. Received: "
        f"{type(model).__name__}. Build it with convnext_zoo.from_preset / "
        "create_convnext_v1 / create_convnext_v2, or pass a preset directory path."
    )


def architecture_fields(backbone):
    """The preset config's architecture fields of a backbone.

    A backbone of no named variant's depths and widths is variant "custom"
    with its `depths` and `hidden_dims` recorded.
    """
    family = "v2" if backbone.use_grn else "v1"
    variant = named_variant(family, backbone.depths, backbone.hidden_dims)
    fields = {"family": family, "variant": variant,
              **{key: getattr(backbone, key) for key in preset_dir.ARCHITECTURE_OPTIONS}}
    if variant == CUSTOM:
        fields.update(depths=list(backbone.depths), hidden_dims=list(backbone.hidden_dims))
    return fields


def model_config(model, license=None, base_model=None, provenance=None, **fields):
    """The preset config of a model: architecture from the model, metadata from its preprocessor.

    Args:
        model: a `ConvNeXtImageClassifier` or `ConvNeXtBackbone`.
        license: licence of the weights (default: the family's).
        base_model: Hub repo the model was fine-tuned from (provenance).
        provenance: the provenance record (default: "a Keras model").
        **fields: preset fields that replace the derived ones
            (`image_size`, `preprocessing`, `label_set`, `class_names`, ...).

    Returns:
        A validated config dict (its `weights_layout` and `timm` are filled
        in by `save_preset`).
    """
    backbone = backbone_of(model)
    architecture = architecture_fields(backbone)
    family = architecture["family"]
    if model is backbone:
        num_classes, head, pooling = 0, "none", "avg"
    else:
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        head, pooling = ("fc" if num_classes else "norm"), model.pooling
    prep, size = default_preprocessing(), [224, 224]
    converter = getattr(getattr(model, "preprocessor", None), "image_converter", None)
    if converter is not None:
        options = converter.get_config()
        prep = {k: (list(options[k]) if isinstance(options[k], (list, tuple)) else options[k]) for k in prep}
        size = [int(s) for s in options["image_size"]]
    elif backbone.image_shape[0] and backbone.image_shape[1]:
        size = [int(backbone.image_shape[0]), int(backbone.image_shape[1])]
    provenance = dict(provenance or {"source_format": "keras", "source": "a Keras model"})
    if base_model:
        provenance["base_model"] = base_model.removeprefix("hf://")
    derived = dict(
        **architecture, num_classes=num_classes, head=head,
        image_size=size, preprocessing=prep,
        label_set=LABEL_SET_SIZES.get(num_classes) if head == "fc" else None,
        license=license or model_card.LICENSES[family],
        provenance=provenance,
        image_shape=list(backbone.image_shape),
        adapt_small_inputs=bool(backbone.adapt_small_inputs),
        pooling=pooling,
    )
    derived.update(fields)
    return preset_dir.make_config(**derived)


def timm_loadable(model, config):
    """`(True, None)` where timm builds the same network, else `(False, reason)`."""
    backbone = backbone_of(model)
    return timm_format.timm_support(
        config["family"], config["variant"], head=config["head"], strides=backbone.strides,
        pooling=config["pooling"], in_channels=int(backbone.image_shape[-1]),
        layer_scale=bool(backbone.layer_scale_init_value),
        architecture=preset_dir.backbone_arguments(config),
    )


def save_preset(model, output_dir, config=None, layout="auto", dtype="float32",
                overwrite=False, readme=None, check=True):
    """Writes `model` as a preset directory, atomically, and checks it loads back the same.

    Args:
        model: a `ConvNeXtImageClassifier` or `ConvNeXtBackbone`.
        output_dir: the directory to create.
        config: the preset config (default: `model_config(model)`); its
            architecture fields must describe `model`.
        layout: "auto" (timm's where timm can build the network, else
            Keras'), "timm" (refused where timm cannot) or "keras".
        dtype: storage dtype: "float32", "float16" or "bfloat16".
        overwrite: replace an existing `output_dir`.
        readme: the README.md text (default: `preset_dir.render_readme`).
        check: load the written directory back and compare.

    Returns:
        The written config.

    Raises:
        FileExistsError: `output_dir` exists and `overwrite` is False.
        PresetError: the written preset does not reproduce the model.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Received: layout={layout!r}. Valid: {', '.join(map(repr, LAYOUTS))}.")
    config = dict(config or model_config(model))
    loadable, reason = timm_loadable(model, config)
    if layout == "timm" and not loadable:
        raise ValueError(
            f"timm cannot load this model ({reason}). Write it with layout='keras' "
            "(or 'auto'); it loads with convnext_zoo.from_preset."
        )
    layout = ("timm" if loadable else "keras") if layout == "auto" else layout
    config.update(
        weights_layout=layout, weights_dtype=dtype,
        timm={"loadable": layout == "timm", "reason": None if layout == "timm" else
              reason or "written in Keras' layout on request (layout='keras')"},
    )
    config = preset_dir.validate_config(config)
    with preset_dir.atomic_directory(output_dir, overwrite) as tmp:
        write_files(model, tmp, config)
        with open(os.path.join(tmp, preset_dir.README_FILE), "w", encoding="utf-8") as handle:
            handle.write(readme or preset_dir.render_readme(config))
        if check:
            verify_preset(tmp, model)
    return config


def write_files(model, directory, config):
    """`model.safetensors` and `config.json` of `config` (layout and dtype from it)."""
    path = os.path.join(directory, preset_dir.WEIGHTS_FILE)
    dtype = config["weights_dtype"]
    if config["weights_layout"] == "keras":
        weights.save_weights(model, path, dtype=dtype)
        preset_dir.write_config(directory, config)
        return
    np_dtype = weights.storage_dtype(dtype)
    arrays = {name: np.asarray(v.numpy()).astype(np_dtype)
              for name, v in weights.keras_variables(model).items()}
    architecture = preset_dir.backbone_arguments(config)
    state = timm_format.timm_state_dict(arrays, config["family"], config["variant"], architecture)
    del arrays  # the state dict holds the only copy still needed (transposed kernels are new arrays)
    timm_format.write_timm_weights(state, path, metadata={"dtype": dtype})
    timm_fields = timm_format.timm_config(
        config["family"], config["variant"], config["num_classes"], config["image_size"],
        config["preprocessing"], label_names=config.get("class_names"), license=config["license"],
        in_channels=config["image_shape"][2], pooling=config["pooling"],
        architecture=architecture,
    )
    preset_dir.write_config(directory, config, timm_fields)


def verify_preset(path, reference_model=None, rtol=1e-5):
    """Loads a preset directory back and checks it reproduces what was written.

    The directory is read and filled into a new model by the loading
    pipeline (strict: every tensor consumed, every variable assigned), and
    every variable must equal its stored tensor in the stored dtype.
    With `reference_model`, the rebuilt model's outputs on a batch must
    also match the model's (meaningful for float32 storage).

    Returns:
        The max abs output difference (0.0 without a reference).

    Raises:
        PresetError: a variable or the output differs.
    """
    checkpoint = readers.read_preset(os.fspath(path))
    model = pipeline.fill(checkpoint, os.fspath(path), ConvNeXtBackbone, ConvNeXtImageClassifier,
                          include_top=checkpoint.config["head"] != "none").model
    try:
        return _compare_rebuilt(path, checkpoint, model, reference_model, rtol)
    finally:
        # A Keras model holds reference cycles: free this second copy of the
        # weights now, not at some later collection (V2 huge is 2.6 GB).
        del model
        gc.collect()


def _compare_rebuilt(path, checkpoint, model, reference_model, rtol):
    config = checkpoint.config
    variables = weights.keras_variables(model)
    for tensor in checkpoint.tensors:
        stored = np.asarray(tensor.load())
        value = np.asarray(variables[tensor.target].numpy()).astype(stored.dtype)
        if not np.array_equal(value, stored):
            raise preset_dir.PresetError(
                f"Verification failed: variable {tensor.target!r} of the model rebuilt "
                f"from {path} differs from its tensor {tensor.key!r}."
            )
    if reference_model is None or config["weights_dtype"] != "float32":
        return 0.0  # rounded weights: the variables above are the check
    backbone = backbone_of(reference_model)
    height, width, channels = (s or 64 for s in backbone.image_shape)
    x = np.random.default_rng(0).uniform(-2, 2, (2, height, width, channels)).astype("float32")
    expected = np.asarray(reference_model(x, training=False))
    outputs = np.asarray(model(x, training=False))
    diff = float(np.max(np.abs(outputs - expected))) if outputs.shape == expected.shape else float("inf")
    scale = float(np.max(np.abs(expected))) or 1.0
    if diff > rtol * scale:
        raise preset_dir.PresetError(
            f"Verification failed: the model rebuilt from {path} differs from the source "
            f"model by {diff:.3g} (largest output {scale:.3g}, shapes {outputs.shape} vs "
            f"{expected.shape}, tolerance {rtol:g} relative)."
        )
    return diff
