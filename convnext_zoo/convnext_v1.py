"""ConvNeXt V1 (Liu et al., 2022): tiny, small, base, large, xlarge."""

from convnext_zoo.factory import create_convnext
from convnext_zoo.variants import V1_VARIANTS

VARIANTS = tuple(V1_VARIANTS)


def create_convnext_v1(
    variant="tiny",
    num_classes=1000,
    input_shape=None,
    include_top=True,
    pooling=None,
    drop_path_rate=0.0,
    layer_scale_init_value=1e-6,
    head_init_scale=1.0,
    classifier_activation=None,
    name=None,
    **kwargs,
):
    """Builds a ConvNeXt V1 model with freshly initialised weights.

    Args:
        variant: one of "tiny", "small", "base", "large", "xlarge".
        num_classes: classes of the head (with `include_top=True`).
        input_shape: `(height, width, channels)`, default `(224, 224, 3)`;
            `(None, None, 3)` accepts any size of 32 px and more.
        include_top: build the classification head (pool, LayerNorm, Dense).
        pooling: without the top: `None` returns the last feature map
            (a `ConvNeXtBackbone`), "avg" the pooled, normalised embedding,
            "max" the max-pooled, normalised embedding.
        drop_path_rate: stochastic depth rate of the last block.
        layer_scale_init_value: initial layer scale; `None` or 0 disables it.
        head_init_scale: multiplies the head's initial weights.
        classifier_activation: activation of the last layer, e.g. "softmax";
            `None` returns logits.
        name: model name, default `convnext_v1_{variant}`.
        **kwargs: `adapt_small_inputs` (default True: small static inputs
            keep a last feature map of at least 4 px), `dtype` (a dtype
            policy such as "mixed_bfloat16"), `dropout` (before the Dense),
            `trainable`, and the architecture options of `ConvNeXtBackbone`
            (`stem`, `norm_layer`, `norm_epsilon`, `conv_mlp`).

    Returns:
        A `ConvNeXtImageClassifier`, or a `ConvNeXtBackbone` when
        `include_top=False` and `pooling=None`.

    Example:
        >>> model = create_convnext_v1("tiny", num_classes=10, input_shape=(32, 32, 3))
        >>> model.output.shape
        (None, 10)
    """
    return create_convnext(
        "v1", variant, num_classes, input_shape, include_top, pooling,
        drop_path_rate, layer_scale_init_value, head_init_scale,
        classifier_activation, name, kwargs,
    )
