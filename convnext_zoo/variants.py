"""Architecture of every ConvNeXt variant, as plain data.

This module imports nothing heavy, so the command line and the preset registry
can read it without loading Keras.
"""

import difflib

# (depths, hidden_dims) per variant, from the official repositories.
V1_VARIANTS = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}

V2_VARIANTS = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}

FAMILIES = {"v1": V1_VARIANTS, "v2": V2_VARIANTS}
# Initial layer scale of each family: V1 scales every residual branch, V2 has none.
LAYER_SCALE_INIT = {"v1": 1e-6, "v2": None}

# A checkpoint whose depths and widths are no named variant's: the preset
# config then records `depths` and `hidden_dims` itself.
CUSTOM = "custom"

# The stems, as the modules timm's `stem` Sequential holds in order (a
# parameterless activation keeps its index, so the Keras layers `stem_{i}`
# are named as timm's keys are numbered):
# - "patchify": the official 4x4 stride-4 conv, then the norm;
# - "overlap": timm's `_ols` stem, two 3x3 stride-2 convs (padding 1), then
#   the norm (nano_ols);
# - "overlap_tiered": the same with the first conv at half the width,
#   rounded as timm's `make_divisible` does (atto/femto/pico_ols);
# - "overlap_act": the same as "overlap" with an exact GELU between the
#   convs (zepto_rms_ols).
STEMS = {
    "patchify": ("conv", "norm"),
    "overlap": ("conv", "conv", "norm"),
    "overlap_tiered": ("conv", "conv", "norm"),
    "overlap_act": ("conv", "act", "conv", "norm"),
}
# Every norm of a network (stem, downsampling, blocks, head) is of one kind:
# - "layer_norm": LayerNorm over the channels (official);
# - "simple_norm": timm's SimpleNorm, `x / sqrt(var(x) + eps) * gamma` with
#   the unbiased variance over the channels, x not centred, no bias;
# - "rms_norm": `x / sqrt(mean(x**2) + eps) * gamma`, no bias.
NORM_LAYERS = ("layer_norm", "simple_norm", "rms_norm")
NORM_EPSILON = 1e-6


def stem_width(stem, dim):
    """Channels of the first stem conv of an overlapping stem: `dim`, or about half when tiered.

    The tiered width rounds `dim // 2` to a multiple of 8 as timm's
    `make_divisible` does (nearest multiple, at least 8, never below 90% of
    the value): 24 for atto's 40 channels.
    """
    if stem != "overlap_tiered":
        return dim
    half = dim // 2
    width = max(8, int(half + 4) // 8 * 8)
    return width + 8 if width < 0.9 * half else width


def check_options(stem="patchify", norm_layer="layer_norm", norm_epsilon=NORM_EPSILON):
    """A helpful ValueError for an unknown stem or norm, or a non-positive epsilon."""
    if stem not in STEMS:
        raise ValueError(
            f"Unknown stem. Received: stem={stem!r}.{suggest(stem, STEMS)} "
            f"Valid: {', '.join(STEMS)}."
        )
    if norm_layer not in NORM_LAYERS:
        raise ValueError(
            f"Unknown norm layer. Received: norm_layer={norm_layer!r}."
            f"{suggest(norm_layer, NORM_LAYERS)} Valid: {', '.join(NORM_LAYERS)}."
        )
    if isinstance(norm_epsilon, bool) or not isinstance(norm_epsilon, (int, float)) or not norm_epsilon > 0:
        raise ValueError(
            f"`norm_epsilon` must be a positive number. Received: norm_epsilon={norm_epsilon!r}. "
            f"The official value is {NORM_EPSILON}; timm's xxlarge uses 1e-5."
        )


def check_shape(depths, hidden_dims):
    """`(depths, hidden_dims)` as tuples of four positive ints, or a helpful ValueError."""
    if (
        not isinstance(depths, (list, tuple)) or not isinstance(hidden_dims, (list, tuple))
        or len(depths) != 4 or len(hidden_dims) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                   for v in (*depths, *hidden_dims))
    ):
        raise ValueError(
            "A custom ConvNeXt needs four stage depths and four widths, positive ints. "
            f"Received: depths={depths!r}, hidden_dims={hidden_dims!r}."
        )
    return tuple(depths), tuple(hidden_dims)


def named_variant(family, depths, hidden_dims):
    """The variant of `family` with these depths and widths, or `CUSTOM`."""
    key = (tuple(depths), tuple(hidden_dims))
    return next((name for name, spec in FAMILIES[check_family(family)].items() if spec == key), CUSTOM)


def architecture_shape(family, variant, depths=None, hidden_dims=None):
    """`(depths, hidden_dims)` of a named variant, or of a custom one from its own fields.

    Example:
        >>> architecture_shape("v1", "custom", [1, 1, 3, 1], [24, 48, 96, 192])
        ((1, 1, 3, 1), (24, 48, 96, 192))
    """
    if variant == CUSTOM:
        return check_shape(depths, hidden_dims)
    shape = variant_config(family, variant)
    if depths is not None or hidden_dims is not None:
        if (tuple(depths or ()), tuple(hidden_dims or ())) != shape:
            raise ValueError(
                f"variant={variant!r} has depths={shape[0]}, hidden_dims={shape[1]}. "
                f"Received: depths={depths!r}, hidden_dims={hidden_dims!r}. Use "
                f"variant={CUSTOM!r} for other shapes."
            )
    return shape


# Evaluation preprocessing of the official 224 px checkpoints.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_preprocessing():
    """A fresh dict of the official 224 px evaluation preprocessing."""
    return {
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bicubic",
    }

# Below this side length the network cannot produce a feature map at all.
MIN_INPUT_SIZE = 32
# The small-input rule keeps the last feature map at least this large.
MIN_FEATURE_SIZE = 4
STANDARD_STRIDES = (4, 2, 2, 2)


def suggest(received, valid):
    """Returns ` Did you mean 'x'?` for the closest valid name, or ''."""
    close = difflib.get_close_matches(str(received), list(valid), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def check_family(family):
    if family not in FAMILIES:
        raise ValueError(
            f"Received: family={family!r}.{suggest(family, FAMILIES)} "
            f"Valid: {', '.join(FAMILIES)}."
        )
    return family


def variant_config(family, variant):
    """Returns `(depths, hidden_dims)` of a variant, or a helpful ValueError.

    Example:
        >>> variant_config("v2", "atto")
        ((2, 2, 6, 2), (40, 80, 160, 320))
    """
    variants = FAMILIES[check_family(family)]
    if variant not in variants:
        raise ValueError(
            f"Unknown ConvNeXt {family.upper()} variant. Received: "
            f"variant={variant!r}.{suggest(variant, variants)} "
            f"Valid: {', '.join(variants)}."
        )
    return variants[variant]


def _output_size(size, stride, kernel):
    # A stride equal to the kernel uses 'valid' padding (floor division, as in
    # the reference network); a lowered stride uses 'same' padding.
    if stride == kernel:
        return size // stride
    return -(-size // stride)


def _stem_output_size(size, stride, stem):
    if stem == "patchify":
        return _output_size(size, stride, 4)
    # The overlapping stems: two 3x3 convs padded one pixel on each side,
    # taking the stride as min(stride, 2) then the rest; each rounds up.
    for conv_stride in (min(stride, 2), max(stride // 2, 1)):
        size = -(-size // conv_stride)
    return size


def feature_sizes(size, strides, stem="patchify"):
    """Side lengths of the four stage outputs for one input side length.

    Args:
        size: the input's side length.
        strides: stem, then downsampling before stages 1-3 (`plan_strides`).
        stem: a key of `STEMS`: the patchify stem at stride 4 floors
            (`size // 4`), the overlapping stems round up (`ceil(size / 4)`).
    """
    check_options(stem, NORM_LAYERS[0], NORM_EPSILON)
    sizes = [_stem_output_size(size, strides[0], stem)]
    for stride in strides[1:]:
        sizes.append(_output_size(sizes[-1], stride, 2))
    return sizes


def plan_strides(height, width, adapt_small_inputs=True, stem="patchify"):
    """Chooses the stem and downsampling strides for an input size.

    The reference network divides the input by 4 (stem) and then by 2 before
    stages 1, 2 and 3: a 32 px image ends as a 1x1 map. When
    `adapt_small_inputs` is on and the smaller static side would leave the
    last feature map under `MIN_FEATURE_SIZE` pixels, strides are lowered
    one at a time, the deepest downsampling first (stage 3, 2, 1 to stride 1),
    then the stem (4 to 2 to 1), until the last map is large enough. Kernel
    shapes never change, so pretrained weights load unchanged. Inputs of 128
    px and more always keep the reference strides (128 // 32 == 4). The
    map sizes are the `stem`'s own (`feature_sizes`): an overlapping stem
    rounds up where the patchify stem floors, so it keeps the reference
    strides down to 125 px (patchify: 128) and may need fewer lowered.

    Args:
        height: static input height, or `None`.
        width: static input width, or `None`.
        adapt_small_inputs: `False` always keeps the reference strides.
        stem: a key of `STEMS`.

    Returns:
        A tuple of four strides: stem, then downsampling before stages 1-3.
    """
    strides = list(STANDARD_STRIDES)
    if not adapt_small_inputs or height is None or width is None:
        return tuple(strides)
    side = min(height, width)
    for index in (3, 2, 1, 0):
        while feature_sizes(side, strides, stem)[-1] < MIN_FEATURE_SIZE and strides[index] > 1:
            strides[index] = strides[index] // 2 if index == 0 else 1
    return tuple(strides)
