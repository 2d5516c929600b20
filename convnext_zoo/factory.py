"""Shared implementation of `create_convnext_v1` and `create_convnext_v2`."""

from convnext_zoo.backbone import ConvNeXtBackbone
from convnext_zoo.classifier import POOLINGS, ConvNeXtImageClassifier
from convnext_zoo.variants import suggest, variant_config

DEFAULT_INPUT_SHAPE = (224, 224, 3)
EXTRA_OPTIONS = ("adapt_small_inputs", "dtype", "dropout", "trainable")


def check_input_shape(input_shape):
    if input_shape is None:
        return DEFAULT_INPUT_SHAPE
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3:
        raise ValueError(
            "`input_shape` must be (height, width, channels), channels last. "
            f"Received: input_shape={input_shape!r}. Examples: (224, 224, 3), "
            "(32, 32, 3), (None, None, 3) for variable sizes."
        )
    return tuple(input_shape)


def create_convnext(
    family,
    variant,
    num_classes,
    input_shape,
    include_top,
    pooling,
    drop_path_rate,
    layer_scale_init_value,
    head_init_scale,
    classifier_activation,
    name,
    options,
):
    depths, hidden_dims = variant_config(family, variant)
    unknown = sorted(set(options) - set(EXTRA_OPTIONS))
    if unknown:
        raise TypeError(
            f"Unexpected keyword arguments: {', '.join(unknown)}. Besides the "
            f"named arguments, accepted: {', '.join(EXTRA_OPTIONS)}."
        )
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(
            f"Unknown pooling. Received: pooling={pooling!r}."
            f"{suggest(pooling, POOLINGS)} Valid: None, 'avg', 'max'."
        )
    if include_top and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(
            "With `include_top=True`, `num_classes` must be an int >= 1. "
            f"Received: num_classes={num_classes!r}. Use include_top=False "
            "for a feature extractor."
        )
    if drop_path_rate is None or drop_path_rate < 0:
        raise ValueError(
            f"`drop_path_rate` must be >= 0. Received: "
            f"drop_path_rate={drop_path_rate!r}. Use 0.0 to switch it off."
        )
    name = name or f"convnext_{family}_{variant}"
    dtype = options.get("dtype")
    returns_backbone = not include_top and pooling is None
    backbone = ConvNeXtBackbone(
        depths=depths,
        hidden_dims=hidden_dims,
        use_grn=family == "v2",
        layer_scale_init_value=layer_scale_init_value,
        drop_path_rate=drop_path_rate,
        image_shape=check_input_shape(input_shape),
        adapt_small_inputs=options.get("adapt_small_inputs", True),
        dtype=dtype,
        name=name if returns_backbone else f"{name}_backbone",
    )
    if returns_backbone:
        backbone.trainable = options.get("trainable", True)
        return backbone
    model = ConvNeXtImageClassifier(
        backbone,
        num_classes=num_classes if include_top else 0,
        pooling=pooling or "avg",
        activation=classifier_activation,
        dropout=options.get("dropout", 0.0),
        head_init_scale=head_init_scale,
        name=name,
    )
    model.trainable = options.get("trainable", True)
    return model
