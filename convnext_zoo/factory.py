"""The public builders: `create_convnext_v1/v2` (fresh weights) and `from_preset`.

Both hand the model classes to the lower floors (`convnext_zoo.build`,
`convnext_zoo.pipeline`), which build every model through one function.
"""

from convnext_zoo import pipeline
from convnext_zoo.backbone import ConvNeXtBackbone
from convnext_zoo.build import build_network
from convnext_zoo.classifier import ConvNeXtImageClassifier
from convnext_zoo.variants import variant_config

EXTRA_OPTIONS = ("adapt_small_inputs", "dtype", "dropout", "trainable",
                 "stem", "norm_layer", "norm_epsilon", "conv_mlp")


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
    return build_network(
        ConvNeXtBackbone,
        ConvNeXtImageClassifier,
        family=family,
        depths=depths,
        hidden_dims=hidden_dims,
        num_classes=num_classes,
        input_shape=input_shape,
        include_top=include_top,
        pooling=pooling,
        drop_path_rate=drop_path_rate,
        layer_scale_init_value=layer_scale_init_value,
        head_init_scale=head_init_scale,
        classifier_activation=classifier_activation,
        name=name or f"convnext_{family}_{variant}",
        **options,
    )


def from_preset(
    preset,
    include_top=True,
    num_classes=None,
    input_shape=None,
    pooling=None,
    load_weights=True,
    dtype=None,
    force_download=False,
    revision=None,
    preprocessing=True,
    **kwargs,
):
    """Builds a ConvNeXt model from a preset, with its pretrained weights.

    Args:
        preset: a registered name ("convnext_v2_atto_fcmae_ft_in1k"), an
            alias ("convnext_v2_atto_imagenet", "convnext_v1_tiny"), a Hub
            handle ("hf://org/repo" or "hf://org/repo@revision"), a local
            directory (a preset of this package, a keras-hub preset written
            by `save_to_preset`, or a timm / transformers / official
            checkpoint, read on the fly) or a weights file.
        include_top: build the classification head. FCMAE presets have none:
            they load as backbones unless `num_classes` asks for a new head.
        num_classes: a different number of classes loads everything but the
            head and initialises a new one (logged once); `None` keeps the
            preset's.
        input_shape: `(height, width, channels)`; default: the shape the
            preset's network was built for, `(None, None, 3)` for most.
            The small-input rule applies to small static sizes.
        pooling: without the top, `None` returns the backbone's feature map,
            "avg"/"max" the pooled, normalised embedding.
        load_weights: `False` builds the architecture only (registered
            presets: offline).
        dtype: dtype policy, e.g. "bfloat16" or "mixed_float16".
        force_download: download again even if cached (repairs a corrupt
            cache).
        revision: Hub branch, tag or commit (overrides the registry's pin).
        preprocessing: attach the checkpoint's evaluation preprocessing to a
            classifier, so `predict` takes raw uint8 RGB images of any size.
            `False` leaves the model expecting normalised inputs.
        **kwargs: passed to the model builder (`drop_path_rate`,
            `classifier_activation`, `name`, `dropout`, ...).

    Returns:
        A `ConvNeXtImageClassifier`, or a `ConvNeXtBackbone` (include_top
        False and pooling None, or an FCMAE preset).

    Example:
        >>> model = convnext_zoo.from_preset("convnext_v2_atto_imagenet")  # doctest: +SKIP
        >>> backbone = convnext_zoo.from_preset("convnext_v2_atto", include_top=False)  # doctest: +SKIP
        >>> model10 = convnext_zoo.from_preset("convnext_v1_tiny", num_classes=10)  # doctest: +SKIP
    """
    return pipeline.load(
        preset, ConvNeXtBackbone, ConvNeXtImageClassifier, include_top=include_top,
        num_classes=num_classes, input_shape=input_shape, pooling=pooling,
        load_weights=load_weights, dtype=dtype, force_download=force_download,
        revision=revision, preprocessing=preprocessing, **kwargs,
    )
