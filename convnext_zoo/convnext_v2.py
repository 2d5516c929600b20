"""ConvNeXt V2 (Woo et al., 2023): atto to huge, with Global Response Normalization."""

from convnext_zoo.factory import create_convnext
from convnext_zoo.variants import V2_VARIANTS

VARIANTS = tuple(V2_VARIANTS)


def create_convnext_v2(
    variant="atto",
    num_classes=1000,
    input_shape=None,
    include_top=True,
    pooling=None,
    drop_path_rate=0.0,
    head_init_scale=1.0,
    classifier_activation=None,
    name=None,
    **kwargs,
):
    """Builds a ConvNeXt V2 model with freshly initialised weights.

    Same arguments as `create_convnext_v1`, without layer scale (V2 has GRN
    in its MLP instead).

    Args:
        variant: one of "atto", "femto", "pico", "nano", "tiny", "base",
            "large", "huge".
        num_classes: classes of the head (with `include_top=True`).
        input_shape: `(height, width, channels)`, default `(224, 224, 3)`.
        include_top: build the classification head.
        pooling: without the top: `None`, "avg" or "max" (see V1).
        drop_path_rate: stochastic depth rate of the last block.
        head_init_scale: multiplies the head's initial weights.
        classifier_activation: activation of the last layer; `None` = logits.
        name: model name, default `convnext_v2_{variant}`.
        **kwargs: `adapt_small_inputs`, `dtype`, `dropout`, `trainable`,
            `stem`, `norm_layer`, `norm_epsilon`, `conv_mlp`.

    Returns:
        A `ConvNeXtImageClassifier`, or a `ConvNeXtBackbone` when
        `include_top=False` and `pooling=None`.

    Example:
        >>> model = create_convnext_v2("atto", num_classes=10, input_shape=(48, 48, 3))
        >>> model.output.shape
        (None, 10)
    """
    return create_convnext(
        "v2", variant, num_classes, input_shape, include_top, pooling,
        drop_path_rate, None, head_init_scale, classifier_activation, name,
        kwargs,
    )
