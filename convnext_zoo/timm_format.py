"""Presets in timm's own layout, which PyTorch users load with timm.

A directory holding the `config.json` of `timm_config` and the
`model.safetensors` of `timm_state_dict` + `write_timm_weights` loads in
PyTorch with

    timm.create_model("local-dir:" + path, pretrained=True)
    timm.create_model("hf-hub:org/repo", pretrained=True)   # once pushed

because it is exactly what timm's own `save_for_hf` writes: timm's
architecture name, its state-dict keys and tensor shapes, and the fields of
`config.json` that `timm.models._hub._parse_model_cfg` reads. This package's
own fields ride along under the key `"convnext_zoo"`, which timm ignores.

timm cannot express everything this package builds; `timm_support` says
what and why (lowered strides for small static inputs, a model without the
head LayerNorm, V1 without layer scale).

Every tensor layout and name change comes from `convnext_zoo.layout`. This
module imports numpy and that module only (safetensors and the streaming
writer of `convnext_zoo.weights` when writing), so neither Keras nor torch
is needed to produce a timm checkpoint.

Example (`model` a V2 atto; see `convnext_zoo.weights.keras_variables`):
    >>> arrays = {n: v.numpy() for n, v in keras_variables(model).items()}  # doctest: +SKIP
    >>> state = timm_state_dict(arrays, "v2", "atto")  # doctest: +SKIP
    >>> write_timm_weights(state, "out/model.safetensors")  # doctest: +SKIP
    >>> config = timm_config("v2", "atto", 1000, [224, 224], default_preprocessing())  # doctest: +SKIP
"""

import os

import numpy as np

from convnext_zoo import layout
from convnext_zoo.variants import (
    NORM_EPSILON,
    STANDARD_STRIDES,
    STEMS,
    architecture_shape,
    check_options,
    stem_width,
    suggest,
)

# timm's ConvNeXt architectures whose body this package builds, with what
# timm/models/convnext.py gives each (family, depths, widths, and the options
# that differ from the official network): one table for reading a timm
# `config.json` and for choosing the name to write. `conv_mlp` models store
# the MLPs as 1x1 convs: `mlp.fc1.weight` is `[out, in, 1, 1]` there.
# tests/test_timm_format.py checks every row against timm's own models.
_SMALL = {"atto": (40, 80, 160, 320), "femto": (48, 96, 192, 384), "pico": (64, 128, 256, 512)}
TIMM_ARCHITECTURES = {
    "convnext_zepto_rms": dict(family="v1", depths=(2, 2, 4, 2), hidden_dims=(32, 64, 128, 256),
                               conv_mlp=True, norm_layer="simple_norm"),
    "convnext_zepto_rms_ols": dict(family="v1", depths=(2, 2, 4, 2), hidden_dims=(32, 64, 128, 256),
                                   conv_mlp=True, norm_layer="simple_norm", stem="overlap_act"),
    **{f"convnext_{name}": dict(family="v1", depths=(2, 2, 6, 2), hidden_dims=dims, conv_mlp=True)
       for name, dims in _SMALL.items()},
    **{f"convnext_{name}_ols": dict(family="v1", depths=(2, 2, 6, 2), hidden_dims=dims,
                                    conv_mlp=True, stem="overlap_tiered")
       for name, dims in _SMALL.items()},
    "convnext_atto_rms": dict(family="v1", depths=(2, 2, 6, 2), hidden_dims=_SMALL["atto"],
                              conv_mlp=True, norm_layer="rms_norm"),
    "convnext_nano": dict(family="v1", depths=(2, 2, 8, 2), hidden_dims=(80, 160, 320, 640),
                          conv_mlp=True),
    "convnext_nano_ols": dict(family="v1", depths=(2, 2, 8, 2), hidden_dims=(80, 160, 320, 640),
                              conv_mlp=True, stem="overlap"),
    "convnext_tiny": dict(family="v1", depths=(3, 3, 9, 3), hidden_dims=(96, 192, 384, 768)),
    "convnext_small": dict(family="v1", depths=(3, 3, 27, 3), hidden_dims=(96, 192, 384, 768)),
    "convnext_base": dict(family="v1", depths=(3, 3, 27, 3), hidden_dims=(128, 256, 512, 1024)),
    "convnext_large": dict(family="v1", depths=(3, 3, 27, 3), hidden_dims=(192, 384, 768, 1536)),
    "convnext_xlarge": dict(family="v1", depths=(3, 3, 27, 3), hidden_dims=(256, 512, 1024, 2048)),
    "convnext_xxlarge": dict(family="v1", depths=(3, 4, 30, 3), hidden_dims=(384, 768, 1536, 3072),
                             norm_epsilon=1e-5),
    **{f"convnextv2_{name}": dict(family="v2", depths=(2, 2, 6, 2), hidden_dims=dims, conv_mlp=True)
       for name, dims in _SMALL.items()},
    "convnextv2_nano": dict(family="v2", depths=(2, 2, 8, 2), hidden_dims=(80, 160, 320, 640),
                            conv_mlp=True),
    "convnextv2_tiny": dict(family="v2", depths=(3, 3, 9, 3), hidden_dims=(96, 192, 384, 768)),
    "convnextv2_small": dict(family="v2", depths=(3, 3, 27, 3), hidden_dims=(96, 192, 384, 768)),
    "convnextv2_base": dict(family="v2", depths=(3, 3, 27, 3), hidden_dims=(128, 256, 512, 1024)),
    "convnextv2_large": dict(family="v2", depths=(3, 3, 27, 3), hidden_dims=(192, 384, 768, 1536)),
    "convnextv2_huge": dict(family="v2", depths=(3, 3, 27, 3), hidden_dims=(352, 704, 1408, 2816)),
}
# The options every row has unless it says otherwise (the official network).
ARCHITECTURE_DEFAULTS = {"stem": "patchify", "norm_layer": "layer_norm",
                         "norm_epsilon": NORM_EPSILON, "conv_mlp": False}
# timm's ConvNeXt constructor arguments (the `model_args` of its model
# functions and configs) and this package's architecture options: the one
# table for reading them (`from_timm_architecture`, readers,
# scripts/build_registry.py) and for writing them (`timm_model_args`).
# timm argument -> (option, {timm value: option value}, or None: the same value).
TIMM_MODEL_ARGS = {
    "depths": ("depths", None),
    "dims": ("hidden_dims", None),
    "stem_type": ("stem", {"patch": "patchify", "overlap": "overlap", "overlap_tiered": "overlap_tiered",
                           "overlap_act": "overlap_act"}),
    "norm_layer": ("norm_layer", {"layernorm": "layer_norm", "simplenorm": "simple_norm",
                                  "rmsnorm": "rms_norm"}),
    "norm_eps": ("norm_epsilon", None),
    "conv_mlp": ("conv_mlp", None),
    "head_norm_first": ("head_norm_first", None),
    "head_hidden_size": ("head_hidden_size", None),
}
POOLINGS = ("avg", "max")
HEADS = ("fc", "norm", "none")
# timm architectures that are a variant plus a head option (timm's
# `convnext_tiny_hnf` also stores its MLPs as 1x1 convs; the 2-D form that
# `convnext_tiny` with `head_norm_first=True` expects is the same network).
# Written back as the variant's architecture with the option in
# `model_args`, which timm's `create_model` passes on.
TIMM_HEAD_ARCHITECTURES = {
    "convnext_tiny_hnf": (("v1", "tiny"), {"head_norm_first": True}),
    "convnext_large_mlp": (("v1", "large"), {"head_hidden_size": 1536}),
}
# The safetensors dtype codes timm reads, by numpy dtype name.
# How many names an error lists before "... and N more".
_LIST_LIMIT = 20


class TimmFormatError(ValueError):
    """The Keras variables do not make a timm ConvNeXt one to one."""


def options_from_timm_args(model_args):
    """This package's architecture options for timm's constructor arguments (`TIMM_MODEL_ARGS`).

    Args:
        model_args: timm's keyword arguments, e.g. `{"dims": [...],
            "stem_type": "overlap", "norm_layer": "rmsnorm2d"}`; `None`
            values are timm's defaults and left out.

    Returns:
        `(options, unknown)`: `{option: value}` (depths and widths as
        lists), and the arguments of no option or with a value of none,
        which the caller decides about.

    Example:
        >>> options_from_timm_args({"stem_type": "overlap_act", "norm_eps": 1e-5})
        ({'stem': 'overlap_act', 'norm_epsilon': 1e-05}, {})
    """
    options, unknown = {}, {}
    for key, value in (model_args or {}).items():
        if value is None:
            continue
        if key not in TIMM_MODEL_ARGS:
            unknown[key] = value
            continue
        option, values = TIMM_MODEL_ARGS[key]
        if values is None:
            options[option] = list(value) if option in ("depths", "hidden_dims") else value
            continue
        # timm names its 2-D norms with a suffix too ("rmsnorm2d").
        name = str(value).removesuffix("2d") if key == "norm_layer" else value
        if name in values:
            options[option] = values[name]
        else:
            unknown[key] = value
    return options, unknown


def timm_args_from_options(options):
    """timm's constructor arguments for this package's architecture options (`TIMM_MODEL_ARGS`).

    Example:
        >>> timm_args_from_options({"hidden_dims": (8, 16, 24, 32), "stem": "overlap"})
        {'dims': [8, 16, 24, 32], 'stem_type': 'overlap'}
    """
    by_option = {option: (key, values) for key, (option, values) in TIMM_MODEL_ARGS.items()}
    args = {}
    for option, value in options.items():
        key, values = by_option[option]
        if values is None:
            args[key] = list(value) if option in ("depths", "hidden_dims") else value
        else:
            args[key] = next(timm for timm, ours in values.items() if ours == value)
    return args


def architecture_options(family, variant, architecture=None):
    """The full architecture of a model: shape and options, defaults filled in.

    Args:
        family, variant: the ConvNeXt family and variant (or "custom").
        architecture: optional `{"depths", "hidden_dims", "stem",
            "norm_layer", "norm_epsilon", "conv_mlp"}` (any subset, as
            `preset_dir.backbone_arguments` gives them); depths and widths
            are required for "custom".

    Returns:
        A dict with family and all of those keys.
    """
    architecture = dict(architecture or {})
    depths, dims = architecture_shape(family, variant, architecture.get("depths"),
                                      architecture.get("hidden_dims"))
    options = {key: architecture.get(key, default) for key, default in ARCHITECTURE_DEFAULTS.items()}
    check_options(options["stem"], options["norm_layer"], options["norm_epsilon"])
    return {"family": family, "depths": tuple(depths), "hidden_dims": tuple(dims), **options}


def _row(name):
    return {**ARCHITECTURE_DEFAULTS, **TIMM_ARCHITECTURES[name],
            "depths": tuple(TIMM_ARCHITECTURES[name]["depths"]),
            "hidden_dims": tuple(TIMM_ARCHITECTURES[name]["hidden_dims"])}


def timm_model_args(family, variant, architecture=None):
    """timm's architecture name for a model, and the constructor arguments that make it this one.

    The name is a timm architecture that builds exactly this network when
    one does (its own variant's name first); otherwise the variant's (or,
    for custom shapes, `convnext_tiny` / `convnextv2_tiny`) with
    `model_args` for what differs: depths, widths, stem, norm, epsilon and
    1x1-conv MLPs. `conv_mlp=False` only means the source stored Linear
    weights: an architecture that uses 1x1 convs computes the same.

    Returns:
        `(architecture name, {timm constructor argument: value})`.

    Example:
        >>> timm_model_args("v1", "custom", {"depths": [2, 2, 6, 2],
        ...     "hidden_dims": [40, 80, 160, 320], "conv_mlp": True})
        ('convnext_atto', {})
    """
    wanted = architecture_options(family, variant, architecture)
    own = f"convnext{'v2' if family == 'v2' else ''}_{variant}"

    def differences(name):
        row = _row(name)
        return [key for key in wanted if wanted[key] != row.get(key, family)
                and not (key == "conv_mlp" and row["conv_mlp"])]

    names = ([own] if own in TIMM_ARCHITECTURES else []) + list(TIMM_ARCHITECTURES)
    exact = next((name for name in names if not differences(name)), None)
    if exact is not None:
        return exact, {}
    base = own if own in TIMM_ARCHITECTURES else f"convnext{'v2' if family == 'v2' else ''}_tiny"
    return base, timm_args_from_options({key: wanted[key] for key in differences(base)})


def timm_architecture(family, variant, architecture=None):
    """timm's architecture name of a ConvNeXt variant.

    Args:
        family: "v1" or "v2".
        variant: a variant of that family ("tiny", "atto", ...) or "custom".
        architecture: the options beyond the variant (see
            `architecture_options`); `timm_model_args` gives the
            constructor arguments that go with the name.

    Returns:
        `"convnext_tiny"`, `"convnextv2_atto"`, ...

    Example:
        >>> timm_architecture("v2", "atto")
        'convnextv2_atto'
    """
    return timm_model_args(family, variant, architecture)[0]


def from_timm_architecture(name, model_args=None):
    """This package's architecture of a timm architecture name and its `model_args`.

    Returns:
        `architecture_options`' dict, or `None` for a name not in
        `TIMM_ARCHITECTURES`.
    """
    if name not in TIMM_ARCHITECTURES:
        return None
    row = _row(name)
    args = dict(model_args or {})
    options, _ = options_from_timm_args(args)
    # The head options are the caller's (readers check them against the tensors).
    row.update({key: tuple(value) if key in ("depths", "hidden_dims") else value
                for key, value in options.items() if key in row})
    if "use_grn" in args:
        row["family"] = "v2" if args["use_grn"] else "v1"
    return row


def timm_shapes(family, variant, num_classes=1000, in_channels=3, head_norm=True,
                architecture=None, head_norm_first=False, head_hidden_size=None):
    """`{timm key: shape}` of timm's ConvNeXt, in timm's state-dict order.

    What `timm.create_model(name, num_classes=num_classes,
    in_chans=in_channels, head_norm_first=head_norm_first,
    head_hidden_size=head_hidden_size, **model_args).state_dict()` holds,
    with `name` and `model_args` from `timm_model_args(family, variant,
    architecture)`; a model without `head_norm` (an FCMAE encoder) has no
    `head.*` keys.
    """
    name, _ = timm_model_args(family, variant, architecture)
    arch = architecture_options(family, variant, architecture)
    depths, dims = arch["depths"], arch["hidden_dims"]
    conv_mlp = arch["conv_mlp"] or _row(name)["conv_mlp"]
    biased = arch["norm_layer"] == "layer_norm"

    def norm(module, channels):
        shapes[f"{module}.weight"] = (channels,)
        if biased:
            shapes[f"{module}.bias"] = (channels,)

    shapes = {}
    in_width, patchify = in_channels, arch["stem"] == "patchify"
    for index, kind in enumerate(STEMS[arch["stem"]]):
        if kind == "norm":
            norm(f"stem.{index}", dims[0])
        elif kind == "conv":
            width = stem_width(arch["stem"], dims[0]) if index == 0 and not patchify else dims[0]
            kernel = (4, 4) if patchify else (3, 3)
            shapes[f"stem.{index}.weight"] = (width, in_width) + kernel
            shapes[f"stem.{index}.bias"] = (width,)
            in_width = width
    for stage, (depth, dim) in enumerate(zip(depths, dims)):
        prefix = f"stages.{stage}"
        if stage:
            previous = dims[stage - 1]
            norm(f"{prefix}.downsample.0", previous)
            shapes.update({
                f"{prefix}.downsample.1.weight": (dim, previous, 2, 2),
                f"{prefix}.downsample.1.bias": (dim,),
            })
        one_by_one = (1, 1) if conv_mlp else ()
        for index in range(depth):
            block = f"{prefix}.blocks.{index}"
            if family == "v1":  # a parameter of the block itself comes first
                shapes[f"{block}.gamma"] = (dim,)
            shapes.update({
                f"{block}.conv_dw.weight": (dim, 1, 7, 7),
                f"{block}.conv_dw.bias": (dim,),
            })
            norm(f"{block}.norm", dim)
            shapes.update({
                f"{block}.mlp.fc1.weight": (4 * dim, dim) + one_by_one,
                f"{block}.mlp.fc1.bias": (4 * dim,),
            })
            if family == "v2":
                shapes[f"{block}.mlp.grn.weight"] = (4 * dim,)
                shapes[f"{block}.mlp.grn.bias"] = (4 * dim,)
            shapes[f"{block}.mlp.fc2.weight"] = (dim, 4 * dim) + one_by_one
            shapes[f"{block}.mlp.fc2.bias"] = (dim,)
    features = dims[-1]
    if head_norm and head_norm_first:
        norm("norm_pre", dims[-1])
    elif head_norm:
        norm("head.norm", dims[-1])
        if head_hidden_size:
            shapes["head.pre_logits.fc.weight"] = (head_hidden_size, dims[-1])
            shapes["head.pre_logits.fc.bias"] = (head_hidden_size,)
            features = head_hidden_size
    if num_classes:
        shapes["head.fc.weight"] = (num_classes, features)
        shapes["head.fc.bias"] = (num_classes,)
    return shapes


def _listing(title, names):
    names = list(names)
    more = f" ... and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return f"  {title} ({len(names)}): {', '.join(names[:_LIST_LIMIT])}{more}"


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}.")


def _to_timm(kind, array, conv_1x1):
    if kind == "conv":
        return layout.conv_to_torch(array)
    if kind == "depthwise":
        return layout.depthwise_to_torch(array)
    if kind == "dense":
        return layout.dense_to_torch(array, conv_1x1=conv_1x1)
    return layout.vector_to_torch(array)


def timm_state_dict(arrays, family, variant, architecture=None):
    """Keras variables -> timm's state dict of the same ConvNeXt.

    Every Keras variable maps to exactly one timm key (by
    `convnext_zoo.layout.keras_to_timm_name`) and takes timm's layout and
    shape (`layout.*_to_torch`; the 1x1-conv MLP kernels of V2
    atto..nano; GRN and layer scale as `[n]`). The number of classes, the
    input channels, whether the head LayerNorm exists and the head's form
    (`norm_pre`, `head.pre_logits.fc`) are read from the arrays; every
    other shape must be timm's.

    Args:
        arrays: `{keras variable name: numpy array in Keras layout}`, e.g.
            `{n: v.numpy() for n, v in weights.keras_variables(model).items()}`.
        family: "v1" or "v2".
        variant: the variant the arrays belong to (or "custom").
        architecture: the options beyond the variant (see
            `architecture_options`): depths and widths of a custom model,
            stem, norm, 1x1-conv MLPs.

    Returns:
        `{timm key: C-contiguous numpy array}` in timm's state-dict order,
        in the arrays' dtype.

    Raises:
        TimmFormatError: variables with no timm name, timm keys with no
            variable, or shapes that are not timm's (all listed).

    Example:
        >>> state = timm_state_dict(arrays, "v1", "tiny")  # doctest: +SKIP
        >>> state["stages.0.blocks.0.mlp.fc1.weight"].shape  # doctest: +SKIP
        (384, 96)
    """
    options = architecture
    architecture, _ = timm_model_args(family, variant, options)
    stem_kind = architecture_options(family, variant, options)["stem"]
    named, unnamed, duplicates = {}, [], []
    for name, array in arrays.items():
        key = layout.keras_to_timm_name(name)
        if key is None:
            unnamed.append(name)
        elif key in named:
            duplicates.append(
                f"  Keras variables {named[key][0]!r} and {name!r} both map to {key!r}"
            )
        else:
            named[key] = (name, array)
    fc = named.get("head.fc.weight")
    stem = named.get("stem.0.weight")
    num_classes = int(np.shape(fc[1])[-1]) if fc is not None else 0
    in_channels = int(np.shape(stem[1])[2]) if stem is not None and np.ndim(stem[1]) == 4 else 3
    hidden = named.get("head.pre_logits.fc.weight")
    expected = timm_shapes(
        family, variant, num_classes, in_channels,
        head_norm="head.norm.weight" in named or "norm_pre.weight" in named,
        architecture=options,
        head_norm_first="norm_pre.weight" in named,
        head_hidden_size=int(np.shape(hidden[1])[-1]) if hidden is not None else None,
    )
    missing = [key for key in expected if key not in named]
    extra = [f"{named[key][0]} (-> {key})" for key in named if key not in expected]
    state, mismatches = {}, []
    for key, shape in expected.items():
        if key not in named:
            continue
        name, array = named[key]
        array = np.asarray(array)
        kind = layout.timm_to_keras_name(key, stem_kind)[1]
        try:
            value = _to_timm(kind, array, ".mlp.fc" in key and len(shape) == 4)
        except ValueError as error:
            value, reason = None, f" ({error})"
        else:
            reason = ""
        if value is None or tuple(value.shape) != shape:
            got = f"{tuple(value.shape)} in timm layout" if value is not None else "no timm layout"
            mismatches.append(
                f"  shape mismatch: Keras variable {name!r} has shape {tuple(array.shape)} "
                f"({got}){reason}; timm's {key!r} has shape {shape}"
            )
            continue
        state[key] = np.ascontiguousarray(value)
    if unnamed or missing or extra or mismatches or duplicates:
        lines = [
            f"The {len(arrays)} Keras variables do not make timm's {architecture} "
            f"(num_classes={num_classes}, in_chans={in_channels}) one to one."
        ]
        if unnamed:
            lines.append(_listing("+ Keras variables with no timm name", unnamed))
        if extra:
            lines.append(_listing(f"+ Keras variables {architecture} has no key for", extra))
        if missing:
            lines.append(_listing(f"- timm keys of {architecture} with no Keras variable", missing))
        lines.extend(mismatches)
        lines.extend(duplicates)
        lines.append(
            "timm_state_dict accepts the variables of a ConvNeXt built by convnext_zoo "
            "('{layer name}/{variable name}', e.g. 'stages_0_blocks_0_mlp_fc1/kernel', "
            "as weights.keras_variables gives them) with the family and variant it was "
            "built as. Check family=/variant=, or export the model without the extra layers."
        )
        raise TimmFormatError("\n".join(lines))
    return state


def timm_support(family, variant, head="fc", strides=None, pooling="avg",
                 in_channels=3, layer_scale=True, architecture=None):
    """Whether timm can load a model of this architecture, and if not, why.

    Args:
        family, variant: the ConvNeXt variant.
        head: "fc" (classifier), "norm" (pooled embedding, num_classes=0)
            or "none" (backbone only, e.g. an FCMAE encoder).
        strides: the backbone's `strides` (stem, then the three
            downsamplings); `None` means the reference (4, 2, 2, 2).
        pooling: "avg" or "max" global pooling of the head.
        in_channels: input channels (timm's `in_chans`).
        layer_scale: whether a V1 model has layer scale (`gamma`).
        architecture: the options beyond the variant (see
            `architecture_options`).

    Returns:
        `(True, None)`, or `(False, reason)` with a sentence saying why and
        what to do.

    Example:
        >>> timm_support("v2", "atto", strides=(2, 2, 1, 1))[0]
        False
    """
    architecture = timm_architecture(family, variant, architecture)
    if strides is not None and tuple(strides) != STANDARD_STRIDES:
        return False, (
            f"The model runs with strides {tuple(strides)} (stem, downsampling), lowered "
            "for a small static input size (see convnext_zoo.variants.plan_strides); "
            f"timm's {architecture} always uses {STANDARD_STRIDES} and would compute "
            "something else with the same weights. Build the model with "
            "input_shape=(None, None, C) or adapt_small_inputs=False to export it for timm."
        )
    if head not in HEADS:
        raise ValueError(
            f"Received: head={head!r}.{suggest(head, HEADS)} Valid: {', '.join(HEADS)}."
        )
    if head == "none":
        return False, (
            f"The model has no head LayerNorm (an FCMAE encoder); timm's {architecture} "
            "always has head.norm, and its pretrained load is strict, so it fails on the "
            "missing keys head.norm.weight and head.norm.bias. Export a model with the "
            "head LayerNorm (include_top=False, pooling='avg', after fine-tuning it) instead."
        )
    if pooling not in POOLINGS:
        return False, (
            f"Received: pooling={pooling!r}; timm's ConvNeXt head matches this package's "
            f"for {', '.join(map(repr, POOLINGS))} only."
        )
    _check_int("in_channels", in_channels, 1)
    if family == "v1" and not layer_scale:
        return False, (
            f"The V1 model has no layer scale; timm's registered {architecture} has one "
            "(gamma) in every block. Export a model built with layer scale."
        )
    return True, None


def timm_config(family, variant, num_classes, image_size, preprocessing,
                label_names=None, license=None, in_channels=3, pooling="avg",
                zoo_section=None, architecture=None, head_norm_first=False, head_hidden_size=None):
    """The `config.json` timm reads for `local-dir:` and `hf-hub:` models.

    The fields are those timm's `save_config_for_hf` writes and
    `_parse_model_cfg` reads: `architecture`, `num_classes`, `num_features`,
    `global_pool`, `model_args` (only the constructor arguments that differ
    from the architecture's defaults: `in_chans`, `global_pool`,
    `head_norm_first`, `head_hidden_size`),
    `pretrained_cfg` (input size, preprocessing, classifier and first conv
    names) and `label_names`.

    Args:
        family, variant: the ConvNeXt variant.
        num_classes: classes of the head; 0 for the pooled embedding.
        image_size: `[height, width]` the weights were trained at.
        preprocessing: `{"mean", "std", "crop_pct", "crop_mode",
            "interpolation"}` (see `variants.default_preprocessing`).
        label_names: optional list of `num_classes` class names.
        license: licence of the weights (e.g. "apache-2.0"); omitted if None.
        in_channels: input channels.
        pooling: "avg" or "max".
        zoo_section: this package's own fields, stored verbatim under
            `"convnext_zoo"` (timm ignores them).
        architecture: the options beyond the variant (see
            `architecture_options`); what timm's named architecture lacks
            goes into `model_args` (see `timm_model_args`).
        head_norm_first, head_hidden_size: the head's form (see
            `ConvNeXtImageClassifier`), passed to timm in `model_args`.

    Returns:
        A JSON-serialisable dict.

    Example:
        >>> from convnext_zoo.variants import default_preprocessing
        >>> config = timm_config("v2", "atto", 1000, [224, 224], default_preprocessing())
        >>> config["architecture"], config["pretrained_cfg"]["input_size"]
        ('convnextv2_atto', [3, 224, 224])
    """
    name, model_args = timm_model_args(family, variant, architecture)
    dims = architecture_options(family, variant, architecture)["hidden_dims"]
    _check_int("num_classes", num_classes, 0)
    if pooling not in POOLINGS:
        raise ValueError(
            f"Received: pooling={pooling!r}.{suggest(pooling, POOLINGS)} Valid: 'avg', 'max'."
        )
    _check_int("in_channels", in_channels, 1)
    size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(
            "`image_size` must be [height, width] (or one int). "
            f"Received: image_size={image_size!r}."
        )
    keys = ("mean", "std", "crop_pct", "crop_mode", "interpolation")
    absent = [k for k in keys if k not in preprocessing]
    if absent:
        raise ValueError(
            f"`preprocessing` lacks {', '.join(absent)}. Required: {', '.join(keys)} "
            "(see convnext_zoo.variants.default_preprocessing())."
        )
    if label_names is not None and len(label_names) != num_classes:
        raise ValueError(
            f"Received {len(label_names)} label_names for num_classes={num_classes}; "
            "pass one name per class, or None."
        )
    if in_channels != 3:
        model_args["in_chans"] = in_channels
    if pooling != "avg":
        model_args["global_pool"] = pooling
    if head_norm_first:
        model_args["head_norm_first"] = True
    if head_hidden_size:
        _check_int("head_hidden_size", head_hidden_size, 1)
        model_args["head_hidden_size"] = head_hidden_size
    pretrained_cfg = {
        "input_size": [in_channels, *size],
        "fixed_input_size": False,
        "interpolation": preprocessing["interpolation"],
        "crop_pct": preprocessing["crop_pct"],
        "crop_mode": preprocessing["crop_mode"],
        "mean": list(preprocessing["mean"]),
        "std": list(preprocessing["std"]),
        "num_classes": num_classes,
        "pool_size": [size[0] // 32, size[1] // 32],
        "first_conv": "stem.0",
        "classifier": "head.fc",
        "custom_load": False,
    }
    if license is not None:
        pretrained_cfg["license"] = license
    config = {
        "architecture": name,
        "num_classes": num_classes,
        "num_features": dims[-1],
        "global_pool": pooling,
    }
    if model_args:
        config["model_args"] = model_args
    config["pretrained_cfg"] = pretrained_cfg
    if label_names is not None:
        config["label_names"] = list(label_names)
    if zoo_section is not None:
        config["convnext_zoo"] = zoo_section
    return config


def write_timm_weights(state_dict, path, metadata=None):
    """Writes a timm state dict as safetensors, then reads it back and compares.

    Streams one tensor at a time through `convnext_zoo.weights`' writer,
    every tensor C-contiguous (safetensors 0.8.0 writes non-contiguous
    arrays in the wrong element order), with `{"format": "pt"}` in the
    header as timm and transformers expect. The file is written beside
    `path` and renamed into place only after the safetensors library read
    every tensor back equal.

    Args:
        state_dict: `{timm key: numpy array}` (see `timm_state_dict`), all of
            one dtype: float32, float16 or bfloat16.
        path: the file to write (usually `<dir>/model.safetensors`).
        metadata: optional `{str: str}` added to the header.

    Returns:
        The number of tensors written.

    Raises:
        ValueError: mixed or unsupported dtypes.
        OSError: the file reads back different from the state dict.

    Example:
        >>> write_timm_weights(timm_state_dict(arrays, "v2", "atto"), "out/model.safetensors")  # doctest: +SKIP
    """
    from convnext_zoo.weights import SAFETENSORS_CODES, write_safetensors

    arrays = {key: np.asarray(value) for key, value in state_dict.items()}
    dtypes = sorted({array.dtype.name for array in arrays.values()})
    if len(dtypes) != 1 or dtypes[0] not in SAFETENSORS_CODES:
        raise ValueError(
            f"Every tensor must share one dtype of {', '.join(SAFETENSORS_CODES)}. Received: "
            f"{', '.join(dtypes) or 'no tensors'}. Cast the state dict first "
            "(e.g. {k: v.astype('float16') for k, v in state.items()})."
        )
    header = dict(metadata or {})
    header["format"] = "pt"
    path = os.fspath(path)
    partial = path + ".partial"
    try:
        count = write_safetensors(
            partial, [(key, array.shape, lambda array=array: array) for key, array in arrays.items()],
            dtypes[0], header,
        )
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return count


