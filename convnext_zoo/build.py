"""Step 3 of loading: the one place models are built, and preprocessing attached.

`build_network` instantiates a backbone and, when asked, a classifier
around it; the factories (`create_convnext_v1/v2`) and the loading pipeline
both call it. `build_model` turns a preset config plus the caller's request
(`include_top`, `num_classes`, `input_shape`, `pooling`, `dtype`, ...) into
the network to fill, and says which head tensors the strict assignment must
let pass (a head dropped or replaced). `attach_preprocessing` gives a
classifier the preset's evaluation transform.

The model classes are passed in (`backbone_cls`, `classifier_cls`) rather
than imported: they sit above this module (their `from_preset` calls down
into the pipeline), and the import graph has no cycle.
"""

import contextlib
import logging

from convnext_zoo.internals import weights_to_be_loaded
from convnext_zoo.preset_dir import POOLINGS, PresetError, backbone_arguments
from convnext_zoo.variants import LAYER_SCALE_INIT, NORM_EPSILON, suggest

logger = logging.getLogger("convnext_zoo")

DEFAULT_INPUT_SHAPE = (224, 224, 3)
# Keyword options the factories and `from_preset` pass through to the network.
NETWORK_OPTIONS = (
    "adapt_small_inputs", "dtype", "dropout", "trainable", "drop_path_rate",
    "layer_scale_init_value", "head_init_scale", "classifier_activation", "name",
)


def check_input_shape(input_shape, default=DEFAULT_INPUT_SHAPE):
    if input_shape is None:
        return tuple(default)
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3:
        raise ValueError(
            "`input_shape` must be (height, width, channels), channels last. "
            f"Received: input_shape={input_shape!r}. Examples: (224, 224, 3), "
            "(32, 32, 3), (None, None, 3) for variable sizes."
        )
    return tuple(input_shape)


def variable_dtype(dtype=None):
    """The dtype of the variables `build_model(dtype=dtype)` makes.

    `None` is Keras' global policy. A dtype Keras does not know gives its
    float type here: `build_model` reports it.
    """
    import keras

    try:
        policy = keras.dtype_policies.get(dtype) if dtype is not None else keras.config.dtype_policy()
    except (TypeError, ValueError):
        return keras.config.floatx()
    return policy.variable_dtype


def build_network(
    backbone_cls,
    classifier_cls,
    *,
    family,
    depths,
    hidden_dims,
    num_classes=1000,
    input_shape=None,
    include_top=True,
    pooling=None,
    drop_path_rate=0.0,
    layer_scale_init_value=None,
    head_init_scale=1.0,
    classifier_activation=None,
    name=None,
    adapt_small_inputs=True,
    dtype=None,
    dropout=0.0,
    trainable=True,
    stem="patchify",
    norm_layer="layer_norm",
    norm_epsilon=NORM_EPSILON,
    conv_mlp=False,
    head_norm_first=False,
    head_hidden_size=None,
):
    """A ConvNeXt backbone, with a classification head unless only the backbone is asked for.

    Args: as `create_convnext_v1`, plus the classes to instantiate and the
        architecture (`family` names the default model name; `stem`,
        `norm_layer`, `norm_epsilon`, `conv_mlp` as `ConvNeXtBackbone`).

    Returns:
        A `classifier_cls` instance, or a `backbone_cls` instance when
        `include_top=False` and `pooling=None`.
    """
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
    name = name or f"convnext_{family}"
    returns_backbone = not include_top and pooling is None
    if not returns_backbone and classifier_cls is None:
        raise ValueError(
            "A classifier or pooled model was asked for where only the backbone class is "
            "known: use ConvNeXtImageClassifier.from_preset or convnext_zoo.from_preset."
        )
    backbone = backbone_cls(
        depths=depths,
        hidden_dims=hidden_dims,
        use_grn=family == "v2",
        layer_scale_init_value=layer_scale_init_value,
        drop_path_rate=drop_path_rate,
        image_shape=check_input_shape(input_shape),
        adapt_small_inputs=adapt_small_inputs,
        stem=stem,
        norm_layer=norm_layer,
        norm_epsilon=norm_epsilon,
        conv_mlp=conv_mlp,
        dtype=dtype,
        name=name if returns_backbone else f"{name}_backbone",
    )
    if returns_backbone:
        backbone.trainable = trainable
        return backbone
    model = classifier_cls(
        backbone,
        num_classes=num_classes if include_top else 0,
        pooling=pooling or "avg",
        activation=classifier_activation,
        dropout=dropout,
        head_init_scale=head_init_scale,
        head_norm_first=head_norm_first,
        head_hidden_size=head_hidden_size,
        name=name,
    )
    model.trainable = trainable
    return model


class Built:
    """A model built for a preset, and what the strict assignment must let pass.

    Attributes:
        model: the network, variables pending when built for loading.
        allow_unused: prefixes of checkpoint tensors deliberately not loaded.
        allow_unassigned: prefixes of variables deliberately left fresh.
        fresh: the head layers initialised afresh (for messages).
    """

    def __init__(self, model, allow_unused, allow_unassigned, fresh):
        self.model = model
        self.allow_unused = tuple(allow_unused)
        self.allow_unassigned = tuple(allow_unassigned)
        self.fresh = tuple(fresh)


def build_model(
    config, where, backbone_cls, classifier_cls, *, include_top=True, num_classes=None,
    input_shape=None, pooling=None, dtype=None, load_weights=True, fresh_head=False,
    **options,
):
    """Builds the network a preset config describes, as the caller asks for it.

    Args:
        config: the preset config (see `convnext_zoo.preset_dir`).
        where: the preset, named in messages.
        backbone_cls, classifier_cls: the classes to instantiate.
        include_top: build the classification head. A preset with a pooled
            embedding only (head "norm") gives that embedding; one without
            any head (FCMAE, head "none") needs `num_classes`.
        num_classes: `None` keeps the preset's; another number loads all but
            `head_fc`, which is freshly initialised (logged once).
        input_shape: default: the shape the preset's network was built for
            (`config["image_shape"]`, so a small-input network keeps its
            lowered strides).
        pooling: without the top: `None` for the backbone, "avg"/"max" for
            the pooled embedding; with it: default the preset's.
        dtype: dtype policy.
        load_weights: build with pending variables (`weights_to_be_loaded`):
            the caller assigns every weight next.
        fresh_head: initialise the head afresh even where the checkpoint has
            one of the same size (`convert_checkpoint(init_head=True)`).
        **options: `NETWORK_OPTIONS`.

    Returns:
        A `Built`.
    """
    unknown = sorted(set(options) - set(NETWORK_OPTIONS))
    if unknown:
        raise TypeError(
            f"Unexpected keyword arguments: {', '.join(unknown)}.{suggest(unknown[0], NETWORK_OPTIONS)} "
            f"Besides the named arguments, accepted: {', '.join(NETWORK_OPTIONS)}."
        )
    head, preset_classes = config["head"], config["num_classes"]
    if include_top and num_classes is None:
        if head == "none":
            raise PresetError(
                f"Preset {where!r} is a headless encoder (e.g. FCMAE): it has no "
                "classifier. Pass num_classes=N for a freshly initialised head, "
                "or include_top=False for the backbone."
            )
        num_classes = preset_classes
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0
    ):
        raise ValueError(
            f"`num_classes` must be an int >= 1 (or 0 for the pooled embedding). "
            f"Received: num_classes={num_classes!r}."
        )
    # By default the network the preset was built as (a small static input
    # lowers the strides); an explicit shape is the caller's choice, as for
    # fine-tuning pretrained weights on small images.
    input_shape = check_input_shape(input_shape, default=config["image_shape"])
    adapt = options.pop("adapt_small_inputs", config["adapt_small_inputs"])
    architecture = backbone_arguments(config)
    del architecture["use_grn"]  # build_network derives it from the family
    if include_top:
        pooling = pooling or config["pooling"]
    options.setdefault("layer_scale_init_value", LAYER_SCALE_INIT[config["family"]])
    options.setdefault("name", f"convnext_{config['family']}_{config['variant']}")
    with weights_to_be_loaded() if load_weights else contextlib.nullcontext():
        model = build_network(
            backbone_cls, classifier_cls,
            family=config["family"], **architecture,
            num_classes=num_classes if include_top else 0,
            include_top=bool(include_top and num_classes),
            input_shape=input_shape, pooling=pooling, dtype=dtype,
            adapt_small_inputs=adapt, head_norm_first=config["head_norm_first"],
            head_hidden_size=config["head_hidden_size"], **options,
        )
    return _head_accounting(model, where, head, preset_classes, num_classes, fresh_head, load_weights)


def _head_accounting(model, where, head, preset_classes, num_classes, fresh_head, load_weights):
    from convnext_zoo.weights import keras_variables

    names = set(keras_variables(model))
    has_fc = any(n.startswith("head_fc/") for n in names)
    norm = next((p for p in ("head_norm", "norm_pre") if any(n.startswith(p + "/") for n in names)), None)
    has_norm = norm is not None
    allow_unused, allow_unassigned, fresh = [], [], []
    # Head layers the requested model lacks (a backbone, an embedding model)
    # leave their checkpoint tensors unused on purpose.
    for layer in ("head_fc", "head_norm", "norm_pre", "head_pre_logits_fc"):
        if not any(n.startswith(layer + "/") for n in names):
            allow_unused.append(layer + "/")
    if has_fc and (fresh_head or head != "fc" or num_classes != preset_classes):
        allow_unused.append("head_fc/")
        allow_unassigned.append("head_fc/")
        fresh.append("head_fc")
    if has_norm and (fresh_head or head == "none"):
        allow_unused.append(norm + "/")
        allow_unassigned.append(norm + "/")
        fresh.append(norm)
    if fresh and load_weights and not fresh_head:
        logger.warning(
            "Preset %s: loaded every weight except %s, which %s freshly "
            "initialised (preset head: %s, %d classes; requested: %d classes).",
            where, " and ".join(fresh), "is" if len(fresh) == 1 else "are",
            head, preset_classes, num_classes or 0,
        )
    return Built(model, allow_unused, allow_unassigned, fresh)


def attach_preprocessing(model, config, input_shape=None):
    """Gives a classifier the preset's evaluation transform (resize, crop, normalise).

    The classifier's class names its preprocessor class and that one its
    image converter class (keras-hub's `preprocessor_cls` /
    `image_converter_cls`). Backbones are returned unchanged.
    """
    preprocessor_cls = getattr(type(model), "preprocessor_cls", None)
    if preprocessor_cls is None or not hasattr(model, "backbone"):
        return model
    converter_cls = preprocessor_cls.image_converter_cls
    size = list(config["image_size"])
    if input_shape is not None and input_shape[0] and input_shape[1]:
        size = [int(input_shape[0]), int(input_shape[1])]
    prep = dict(config["preprocessing"])
    interpolation = prep["interpolation"]
    converter = converter_cls(
        image_size=tuple(size),
        crop_pct=float(prep["crop_pct"]),
        crop_mode=prep["crop_mode"],
        mean=tuple(prep["mean"]),
        std=tuple(prep["std"]),
        interpolation=interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic",
    )
    model.preprocessor = preprocessor_cls(converter)
    return model
