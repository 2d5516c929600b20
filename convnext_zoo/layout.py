"""Every layout change between PyTorch ConvNeXt checkpoints and Keras.

Two kinds of change live here, and nowhere else:

* tensor layouts: PyTorch stores a conv kernel as `[out, in, kh, kw]`,
  Keras as `[kh, kw, in, out]`; a depthwise kernel `[C, 1, kh, kw]` becomes
  `[kh, kw, C, 1]`; a Linear weight `[out, in]` (or timm's 1x1 conv
  `[out, in, 1, 1]` in the small variants) becomes a Dense kernel `[in, out]`;
  the official and transformers GRN vectors `[1, 1, 1, 4d]` become `[4d]`.
* names: official and transformers keys are first renamed to timm keys
  (one table per layout), then one mechanical rule maps a timm key to the
  Keras variable `"{layer name}/{variable name}"`, because the Keras layers
  carry timm's module names with "_" for "." (the torch backend forbids
  dots in parameter names):
  `stages.2.blocks.5.mlp.fc1.weight` -> `stages_2_blocks_5_mlp_fc1/kernel`.
  The one key that needs more than its name is a stem module's: `stem.1`
  is the norm of the official (patchify) stem and the second conv of
  timm's overlapping stems, so the stem (`variants.STEMS`) is an argument.

This module needs only numpy, so it can be imported without Keras or torch.

Example:
    >>> timm_to_keras_name("stages.2.blocks.5.mlp.fc1.weight")
    ('stages_2_blocks_5_mlp_fc1/kernel', 'dense')
    >>> official_to_timm_name("stages.1.0.pwconv2.bias")
    'stages.1.blocks.0.mlp.fc2.bias'
"""

import re

import numpy as np

from convnext_zoo.variants import STEMS

LAYOUTS = ("official", "timm", "transformers", "open_clip", "dinov3")

# === Tensor layouts ===
# Each "kind" names the layout change of one tensor; `to_keras` and
# `to_torch` are inverses of each other for every kind.


def conv_to_keras(weight):
    """Conv kernel `[out, in, kh, kw]` -> Keras Conv2D kernel `[kh, kw, in, out]`."""
    _check_ndim(weight, 4, "conv kernel [out, in, kh, kw]")
    return np.transpose(weight, (2, 3, 1, 0))


def conv_to_torch(kernel):
    """Keras Conv2D kernel `[kh, kw, in, out]` -> `[out, in, kh, kw]`."""
    _check_ndim(kernel, 4, "Keras conv kernel [kh, kw, in, out]")
    return np.transpose(kernel, (3, 2, 0, 1))


def depthwise_to_keras(weight):
    """Depthwise kernel `[C, 1, kh, kw]` -> Keras `[kh, kw, C, 1]`."""
    _check_ndim(weight, 4, "depthwise kernel [C, 1, kh, kw]")
    if weight.shape[1] != 1:
        raise ValueError(
            "A depthwise kernel has one input channel per group. Received: "
            f"shape {tuple(weight.shape)}; expected [C, 1, kh, kw]."
        )
    return np.transpose(weight, (2, 3, 0, 1))


def depthwise_to_torch(kernel):
    """Keras depthwise kernel `[kh, kw, C, 1]` -> `[C, 1, kh, kw]`."""
    _check_ndim(kernel, 4, "Keras depthwise kernel [kh, kw, C, 1]")
    return np.transpose(kernel, (2, 3, 0, 1))


def dense_to_keras(weight):
    """Linear `[out, in]` or timm's 1x1 conv `[out, in, 1, 1]` -> Dense `[in, out]`."""
    if weight.ndim == 4:
        if weight.shape[2:] != (1, 1):
            raise ValueError(
                "Only a 1x1 conv can become a Dense kernel. Received: shape "
                f"{tuple(weight.shape)}; expected [out, in] or [out, in, 1, 1]."
            )
        weight = weight.reshape(weight.shape[:2])
    _check_ndim(weight, 2, "Linear weight [out, in]")
    return np.transpose(weight)


def dense_to_torch(kernel, conv_1x1=False):
    """Dense kernel `[in, out]` -> Linear `[out, in]` (`[out, in, 1, 1]` if `conv_1x1`)."""
    _check_ndim(kernel, 2, "Keras Dense kernel [in, out]")
    weight = np.transpose(kernel)
    return weight.reshape(weight.shape + (1, 1)) if conv_1x1 else weight


def vector_to_keras(weight):
    """Any `[1, ..., 1, n]` or `[n]` tensor (GRN, norm, bias, layer scale) -> `[n]`."""
    if weight.ndim > 1 and any(s != 1 for s in weight.shape[:-1]):
        raise ValueError(
            "Expected a vector, possibly with leading axes of size 1. "
            f"Received: shape {tuple(weight.shape)}."
        )
    return weight.reshape(weight.shape[-1:])


def vector_to_torch(vector, shape=None):
    """Keras vector `[n]` -> `shape` (e.g. `(1, 1, 1, n)` for an official GRN)."""
    _check_ndim(vector, 1, "Keras vector [n]")
    return vector.reshape(shape) if shape is not None else vector


def sparse_conv_to_keras(kernel):
    """MinkowskiEngine conv kernel `[k*k, in, out]` -> Keras Conv2D kernel `[k, k, in, out]`.

    Minkowski's kernel offsets run column-major over the 2-D window:
    offset `q * k + p` is row `p`, column `q` (the official
    `remap_checkpoint_keys` reads them so for fine-tuning).
    """
    _check_ndim(kernel, 3, "sparse conv kernel [k*k, in, out]")
    k = _window_side(kernel.shape[0])
    return np.transpose(kernel.reshape((k, k) + kernel.shape[1:]), (1, 0, 2, 3))


def sparse_depthwise_to_keras(kernel):
    """MinkowskiEngine depthwise kernel `[k*k, C]` -> Keras depthwise `[k, k, C, 1]`."""
    _check_ndim(kernel, 2, "sparse depthwise kernel [k*k, C]")
    k = _window_side(kernel.shape[0])
    return np.transpose(kernel.reshape(k, k, kernel.shape[1]), (1, 0, 2))[..., None]


def token_to_keras(weight):
    """FCMAE's mask token `[1, C, 1, 1]` -> `[C]`."""
    if weight.ndim != 4 or weight.shape[0] != 1 or weight.shape[2:] != (1, 1):
        raise ValueError(
            f"Expected a mask token of shape [1, C, 1, 1]. Received: shape {tuple(weight.shape)}."
        )
    return weight.reshape(weight.shape[1])


def _window_side(volume):
    side = int(round(volume**0.5))
    if side * side != volume:
        raise ValueError(
            f"A sparse kernel's first axis is a square window's size. Received: {volume}."
        )
    return side


TO_KERAS = {
    "conv": conv_to_keras,
    "depthwise": depthwise_to_keras,
    "dense": dense_to_keras,
    "vector": vector_to_keras,
    "sparse_conv": sparse_conv_to_keras,
    "sparse_depthwise": sparse_depthwise_to_keras,
    "token": token_to_keras,
}


def to_keras(kind, weight):
    """Applies the layout change `kind` (a value of `timm_to_keras_name`)."""
    return TO_KERAS[kind](np.asarray(weight))


def keras_shape(kind, shape):
    """The Keras shape a source tensor of `shape` takes, without reading it.

    Lets the converter check every shape before it reads any data.
    """
    shape = tuple(int(s) for s in shape)
    if kind == "conv" and len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    if kind == "depthwise" and len(shape) == 4:
        return (shape[2], shape[3], shape[0], shape[1])
    if kind == "dense" and len(shape) in (2, 4):
        if len(shape) == 4 and shape[2:] != (1, 1):
            return None
        return (shape[1], shape[0])
    if kind == "vector" and len(shape) >= 1 and all(s == 1 for s in shape[:-1]):
        return (shape[-1],)
    side = int(round(shape[0] ** 0.5)) if shape else 0
    if kind == "sparse_conv" and len(shape) == 3 and side * side == shape[0]:
        return (side, side, shape[1], shape[2])
    if kind == "sparse_depthwise" and len(shape) == 2 and side * side == shape[0]:
        return (side, side, shape[1], 1)
    if kind == "token" and len(shape) == 4 and shape[0] == 1 and shape[2:] == (1, 1):
        return (shape[1],)
    return None


def _check_ndim(array, ndim, what):
    if array.ndim != ndim:
        raise ValueError(
            f"Expected a {ndim}-D {what}. Received: shape {tuple(array.shape)}."
        )


# === Names: timm <-> Keras ===

# The stem's modules are convs or the norm depending on the stem
# (`variants.STEMS`): `_stem_rules` decides them.
_STEM_MODULE = re.compile(r"^stem\.(\d+)$")
_CONV_MODULES = re.compile(r"^stages\.\d+\.downsample\.1$")
_NORM_MODULES = re.compile(
    r"^(stages\.\d+\.downsample\.0|stages\.\d+\.blocks\.\d+\.norm|head\.norm|norm_pre)$"
)
_CONV_PARAMS = {"weight": ("kernel", "conv"), "bias": ("bias", "vector")}
_NORM_PARAMS = {"weight": ("gamma", "vector"), "bias": ("beta", "vector")}
_DEPTHWISE_MODULES = re.compile(r"^stages\.\d+\.blocks\.\d+\.conv_dw$")
_DENSE_MODULES = re.compile(
    r"^(stages\.\d+\.blocks\.\d+\.mlp\.fc[12]|head\.fc|head\.pre_logits\.fc)$"
)
_GRN_MODULES = re.compile(r"^stages\.\d+\.blocks\.\d+\.mlp\.grn$")
_LAYER_SCALE = re.compile(r"^(stages\.\d+\.blocks\.\d+)\.gamma$")

# (module pattern, {torch parameter: (keras variable, kind)})
_TIMM_RULES = (
    (_CONV_MODULES, _CONV_PARAMS),
    (_NORM_MODULES, _NORM_PARAMS),
    (
        _DEPTHWISE_MODULES,
        {"weight": ("kernel", "depthwise"), "bias": ("bias", "vector")},
    ),
    (_DENSE_MODULES, {"weight": ("kernel", "dense"), "bias": ("bias", "vector")}),
    (_GRN_MODULES, {"weight": ("gamma", "vector"), "bias": ("beta", "vector")}),
)


def _stem_params(module, stem):
    """The parameter rules of stem module `stem.{i}`, or `None` (no parameters there)."""
    kinds = STEMS[stem]
    index = int(_STEM_MODULE.match(module).group(1))
    kind = kinds[index] if index < len(kinds) else None
    return {"conv": _CONV_PARAMS, "norm": _NORM_PARAMS}.get(kind)


def timm_to_keras_name(key, stem="patchify"):
    """Maps a timm state-dict key to `(keras variable name, layout kind)`.

    Args:
        key: a timm ConvNeXt key such as `"stages.0.blocks.1.conv_dw.weight"`.
        stem: the network's stem (`variants.STEMS`): it says which `stem.{i}`
            is a conv and which the norm (`stem.1` is the norm of the
            patchify stem and the second conv of an overlapping one).

    Returns:
        `("stages_0_blocks_1_conv_dw/kernel", "depthwise")`, or
        `None` when the key is not a ConvNeXt parameter (the caller lists it
        as unused).

    Example:
        >>> timm_to_keras_name("stages.0.blocks.0.gamma")
        ('stages_0_blocks_0_gamma/gamma', 'vector')
    """
    match = _LAYER_SCALE.match(key)
    if match:
        return f"{keras_layer_name(match.group(1))}_gamma/gamma", "vector"
    module, _, param = key.rpartition(".")
    rules = _TIMM_RULES
    if _STEM_MODULE.match(module):
        rules = ((_STEM_MODULE, _stem_params(module, stem) or {}),)
    for pattern, params in rules:
        if pattern.match(module) and param in params:
            variable, kind = params[param]
            return f"{keras_layer_name(module)}/{variable}", kind
    return None


_KERAS_VARIABLES = {
    "kernel": "weight",
    "depthwise_kernel": "weight",
    "gamma": "weight",
    "beta": "bias",
    "bias": "bias",
}


def keras_layer_name(module):
    """timm module name -> Keras layer name: every "." becomes "_".

    Keras' torch backend registers variables under their paths and torch
    forbids "." in parameter names, so the layers use "_".

    Example:
        >>> keras_layer_name("stages.2.blocks.5.mlp.fc1")
        'stages_2_blocks_5_mlp_fc1'
    """
    return module.replace(".", "_")


# timm module names with an "_" of their own, restored after "_" -> ".".
_UNDERSCORED = (("conv.dw", "conv_dw"), ("norm.pre", "norm_pre"), ("pre.logits", "pre_logits"))


def timm_module_name(layer):
    """Keras layer name -> timm module name (inverse of `keras_layer_name`).

    Example:
        >>> timm_module_name("head_pre_logits_fc")
        'head.pre_logits.fc'
    """
    name = layer.replace("_", ".")
    for dotted, underscored in _UNDERSCORED:
        name = name.replace(dotted, underscored)
    return name


def keras_to_timm_name(name):
    """Inverse of `timm_to_keras_name`: `"stem_0/kernel"` -> `"stem.0.weight"`."""
    layer, _, variable = name.rpartition("/")
    layer = timm_module_name(layer)
    if _LAYER_SCALE.match(layer):
        return layer
    if variable not in _KERAS_VARIABLES:
        return None
    key = f"{layer}.{_KERAS_VARIABLES[variable]}"
    # The Keras variable says whether a stem module is a conv or the norm.
    if any((timm_to_keras_name(key, stem) or (None,))[0] == name for stem in STEMS):
        return key
    return None


# === Names between source layouts: rules from paired templates ===

# Each table pairs the name templates of two layouts, applied in order (the
# first match wins) in either direction. A slot such as `{s}` is captured on
# one side and written on the other; a trailing `$` anchors the whole name.
_SLOTS = {"s": r"\d+", "b": r"\d+", "i": r"\d", "f": "[12]", "w": "weight|bias"}


def _rule(source, target):
    """`(pattern, replacement)` renaming names of template `source` to `target`."""
    anchored = source.endswith("$")
    pattern = re.sub(
        r"\\\{(\w)\\\}",
        lambda slot: f"(?P<{slot.group(1)}>{_SLOTS[slot.group(1)]})",
        re.escape(source.rstrip("$")),
    )
    replacement = re.sub(r"\{(\w)\}", r"\\g<\1>", target.rstrip("$"))
    return "^" + pattern + ("$" if anchored else ""), replacement


def _both_ways(pairs):
    """The rule tables from left to right and from right to left."""
    return tuple(_rule(a, b) for a, b in pairs), tuple(_rule(b, a) for a, b in pairs)


# === Names: official <-> timm ===

# Mirrors the official repositories' module names (facebookresearch/ConvNeXt
# and ConvNeXt-V2).
_OFFICIAL_TIMM = (
    ("downsample_layers.0.{i}.", "stem.{i}."),
    ("downsample_layers.{s}.{i}.", "stages.{s}.downsample.{i}."),
    ("stages.{s}.{b}.dwconv.", "stages.{s}.blocks.{b}.conv_dw."),
    ("stages.{s}.{b}.norm.", "stages.{s}.blocks.{b}.norm."),
    ("stages.{s}.{b}.pwconv{f}.", "stages.{s}.blocks.{b}.mlp.fc{f}."),
    ("stages.{s}.{b}.grn.gamma$", "stages.{s}.blocks.{b}.mlp.grn.weight$"),
    ("stages.{s}.{b}.grn.beta$", "stages.{s}.blocks.{b}.mlp.grn.bias$"),
    ("stages.{s}.{b}.gamma$", "stages.{s}.blocks.{b}.gamma$"),
    ("norm.", "head.norm."),
    ("head.{w}$", "head.fc.{w}$"),
)
_OFFICIAL_TO_TIMM, _TIMM_TO_OFFICIAL = _both_ways(_OFFICIAL_TIMM)

# === Names: transformers <-> timm ===
# The model prefix ("convnext." / "convnextv2.") is stripped before renaming.

_TRANSFORMERS_TIMM = (
    ("embeddings.patch_embeddings.", "stem.0."),
    ("embeddings.layernorm.", "stem.1."),
    ("encoder.stages.{s}.downsampling_layer.{i}.", "stages.{s}.downsample.{i}."),
    ("encoder.stages.{s}.layers.{b}.dwconv.", "stages.{s}.blocks.{b}.conv_dw."),
    ("encoder.stages.{s}.layers.{b}.layernorm.", "stages.{s}.blocks.{b}.norm."),
    ("encoder.stages.{s}.layers.{b}.pwconv{f}.", "stages.{s}.blocks.{b}.mlp.fc{f}."),
    ("encoder.stages.{s}.layers.{b}.grn.", "stages.{s}.blocks.{b}.mlp.grn."),
    ("encoder.stages.{s}.layers.{b}.layer_scale_parameter$", "stages.{s}.blocks.{b}.gamma$"),
    ("layernorm.", "head.norm."),
    ("classifier.", "head.fc."),
)
_TRANSFORMERS_TO_TIMM, _TIMM_TO_TRANSFORMERS = _both_ways(_TRANSFORMERS_TIMM)

TRANSFORMERS_PREFIXES = ("convnextv2.", "convnext.")

# === Names: OpenCLIP -> timm ===
# OpenCLIP's image tower is a timm ConvNeXt under "visual.trunk." (its
# classifier removed, the head LayerNorm kept) followed by the CLIP
# projection under "visual.head.": a bias-free Linear ("proj", timm's
# `convnext_base.clip_*`: `head.fc`) or an MLP ("mlp.fc1", GELU, "mlp.fc2",
# timm's `convnext_large_mlp.clip_*`: `head.pre_logits.fc`, `head.fc`).
# Everything outside "visual." is the text tower. Read one way only.
_OPEN_CLIP_TO_TIMM = tuple(_rule(a, b) for a, b in (
    ("visual.head.proj.", "head.fc."),
    ("visual.head.mlp.fc1.", "head.pre_logits.fc."),
    ("visual.head.mlp.fc2.", "head.fc."),
    ("visual.trunk.", ""),
))
OPEN_CLIP_VISUAL = "visual."

# === Names: transformers' DINOv3ConvNextModel -> timm ===
# Stage 0's "downsample_layers" are the stem (conv, norm); the other stages'
# are the usual norm + 2x2 conv. The final "layer_norm" is DINOv3's norm of
# the pooled token and of every patch token: timm's `head.norm`. The
# encoder's "model." prefix is in the module's state dict, not in the files
# `save_pretrained` writes; it is stripped first.
_DINOV3_TO_TIMM = tuple(_rule(a, b) for a, b in (
    ("stages.0.downsample_layers.{i}.", "stem.{i}."),
    ("stages.{s}.downsample_layers.{i}.", "stages.{s}.downsample.{i}."),
    ("stages.{s}.layers.{b}.depthwise_conv.", "stages.{s}.blocks.{b}.conv_dw."),
    ("stages.{s}.layers.{b}.layer_norm.", "stages.{s}.blocks.{b}.norm."),
    ("stages.{s}.layers.{b}.pointwise_conv{f}.", "stages.{s}.blocks.{b}.mlp.fc{f}."),
    ("stages.{s}.layers.{b}.gamma$", "stages.{s}.blocks.{b}.gamma$"),
    ("layer_norm.", "head.norm."),
))



def _rename(key, table):
    for pattern, replacement in table:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return None


def official_to_timm_name(key):
    """Official key -> timm key, or `None` for a key that is not ConvNeXt's.

    Example:
        >>> official_to_timm_name("downsample_layers.2.1.weight")
        'stages.2.downsample.1.weight'
    """
    return _rename(key, _OFFICIAL_TO_TIMM)


def timm_to_official_name(key):
    """timm key -> official key (inverse of `official_to_timm_name`)."""
    return _rename(key, _TIMM_TO_OFFICIAL)


def transformers_to_timm_name(key):
    """transformers key (with or without its model prefix) -> timm key.

    Example:
        >>> transformers_to_timm_name("convnextv2.encoder.stages.0.layers.1.grn.weight")
        'stages.0.blocks.1.mlp.grn.weight'
    """
    for prefix in TRANSFORMERS_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return _rename(key, _TRANSFORMERS_TO_TIMM)


def timm_to_transformers_name(key, family):
    """timm key -> transformers key of `ConvNext[V2]ForImageClassification`."""
    name = _rename(key, _TIMM_TO_TRANSFORMERS)
    if name is None:
        return None
    if name.startswith("classifier."):
        return name
    return ("convnextv2." if family == "v2" else "convnext.") + name


def open_clip_to_timm_name(key):
    """OpenCLIP key -> timm key; `None` for the text tower and anything else.

    Example:
        >>> open_clip_to_timm_name("visual.head.mlp.fc1.weight")
        'head.pre_logits.fc.weight'
    """
    return _rename(key, _OPEN_CLIP_TO_TIMM)


def dinov3_to_timm_name(key):
    """transformers `DINOv3ConvNextModel` key -> timm key.

    Example:
        >>> dinov3_to_timm_name("stages.0.downsample_layers.1.weight")
        'stem.1.weight'
    """
    return _rename(key.removeprefix("model."), _DINOV3_TO_TIMM)


TO_TIMM_NAME = {
    "timm": lambda key: key,
    "official": official_to_timm_name,
    "transformers": transformers_to_timm_name,
    "open_clip": open_clip_to_timm_name,
    "dinov3": dinov3_to_timm_name,
}


def source_to_keras_name(key, layout):
    """Any layout's key -> `(keras variable name, kind)` or `None`.

    Example:
        >>> source_to_keras_name("head.weight", "official")
        ('head_fc/kernel', 'dense')
    """
    timm_key = TO_TIMM_NAME[layout](key)
    return timm_to_keras_name(timm_key) if timm_key else None


# === Names: the official FCMAE checkpoint -> Keras ===

# The official pre-training checkpoint (`models/fcmae.py`) holds the sparse
# encoder under "encoder." in MinkowskiEngine's naming (`.kernel`, `.ln.`,
# `.linear.`), then the decoder: `proj`, `mask_token`, `decoder.{b}` (a plain
# ConvNeXt V2 block) and `pred`. The encoder's names become official dense
# names and go on through the official -> timm -> Keras rules above; the
# decoder's follow the same timm-style block names under "decoder.{b}".
_FCMAE_DECODER_TIMM = (
    ("decoder.{b}.dwconv.", "decoder.{b}.conv_dw."),
    ("decoder.{b}.norm.", "decoder.{b}.norm."),
    ("decoder.{b}.pwconv{f}.", "decoder.{b}.mlp.fc{f}."),
    ("decoder.{b}.grn.gamma$", "decoder.{b}.mlp.grn.weight$"),
    ("decoder.{b}.grn.beta$", "decoder.{b}.mlp.grn.bias$"),
    ("proj.{w}$", "proj.{w}$"),
    ("pred.{w}$", "pred.{w}$"),
)
_FCMAE_DECODER_TO_TIMM, _ = _both_ways(_FCMAE_DECODER_TIMM)
_FCMAE_DECODER_RULES = (
    (re.compile(r"^decoder\.\d+\.conv_dw$"),
     {"weight": ("kernel", "depthwise"), "bias": ("bias", "vector")}),
    (re.compile(r"^decoder\.\d+\.norm$"),
     {"weight": ("gamma", "vector"), "bias": ("beta", "vector")}),
    (re.compile(r"^(decoder\.\d+\.mlp\.fc[12]|proj|pred)$"),
     {"weight": ("kernel", "dense"), "bias": ("bias", "vector")}),
    (re.compile(r"^decoder\.\d+\.mlp\.grn$"),
     {"weight": ("gamma", "vector"), "bias": ("beta", "vector")}),
)
_SPARSE_KINDS = {"conv": "sparse_conv", "depthwise": "sparse_depthwise"}


def fcmae_encoder_official_name(key):
    """An FCMAE checkpoint's encoder key -> the official dense ConvNeXt V2 key, or `None`.

    Example:
        >>> fcmae_encoder_official_name("encoder.stages.0.1.pwconv1.linear.weight")
        'stages.0.1.pwconv1.weight'
    """
    if not key.startswith("encoder."):
        return None
    name = key[len("encoder."):]
    if name.endswith(".kernel"):  # MinkowskiConvolution's weight
        name = name[: -len("kernel")] + "weight"
    # MinkowskiLayerNorm and MinkowskiLinear wrap the torch module as `.ln` / `.linear`.
    return re.sub(r"\.(ln|linear)\.(weight|bias)$", r".\2", name)


def fcmae_to_timm_name(key):
    """An FCMAE checkpoint's encoder key -> timm key (names only; the kernels stay sparse)."""
    name = fcmae_encoder_official_name(key)
    return official_to_timm_name(name) if name else None


# Names only: the reader gives the sparse kernels their own kinds (`fcmae_to_keras_name`).
TO_TIMM_NAME["fcmae"] = fcmae_to_timm_name


def fcmae_to_keras_name(key):
    """An official FCMAE checkpoint key -> `(Keras variable name, kind)`, or `None`.

    Example:
        >>> fcmae_to_keras_name("encoder.stages.0.1.dwconv.kernel")
        ('stages_0_blocks_1_conv_dw/kernel', 'sparse_depthwise')
        >>> fcmae_to_keras_name("decoder.0.pwconv1.weight")
        ('decoder_0_mlp_fc1/kernel', 'dense')
    """
    if key == "mask_token":
        return "mask_token/mask_token", "token"
    if key.startswith("encoder."):
        name, sparse = fcmae_encoder_official_name(key), key.endswith(".kernel")
        target = source_to_keras_name(name, "official")
        if target is None or not sparse:
            return target
        keras_name, kind = target
        return (keras_name, _SPARSE_KINDS[kind]) if kind in _SPARSE_KINDS else None
    timm_key = _rename(key, _FCMAE_DECODER_TO_TIMM)
    if timm_key is None:
        return None
    module, _, param = timm_key.rpartition(".")
    for pattern, params in _FCMAE_DECODER_RULES:
        if pattern.match(module) and param in params:
            variable, kind = params[param]
            return f"{keras_layer_name(module)}/{variable}", kind
    return None
