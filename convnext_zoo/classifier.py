"""`ConvNeXtImageClassifier`: backbone + ConvNeXt head as a keras-hub task."""

import keras
from keras_hub.models import ImageClassifier, Task

from convnext_zoo import pipeline
from convnext_zoo.backbone import ConvNeXtBackbone
from convnext_zoo.distribute import OptimizerBuiltFirst
from convnext_zoo.inference import PortableExport, SingleBatchPredict
from convnext_zoo.internals import deferred_while_loading
from convnext_zoo.layers import ExactGelu, channel_norm
from convnext_zoo.preprocessing import ConvNeXtImageClassifierPreprocessor
from convnext_zoo.preset_dir import POOLINGS
from convnext_zoo.variants import suggest


@keras.saving.register_keras_serializable(package="convnext_zoo")
class ConvNeXtImageClassifier(OptimizerBuiltFirst, PortableExport, SingleBatchPredict, ImageClassifier):
    """ConvNeXt classifier: global pool -> LayerNorm (the backbone's norm) -> [MLP] -> Dense.

    The head pools first and normalises second, as the reference network
    does. With `num_classes=0` the model has no Dense layer and returns the
    pooled, normalised embedding (timm's `num_classes=0` output). Two head
    forms of timm ride on options: `head_norm_first` (timm's `*_hnf`:
    LayerNorm on the feature map, then pool and Dense) and
    `head_hidden_size` (timm's `convnext_large_mlp` and OpenCLIP's MLP
    projection: pool, LayerNorm, Dense(hidden) + GELU, Dense). A CLIP image
    tower is this classifier whose Dense is the CLIP projection: its output
    is the projected image embedding (`num_classes` = the embedding size).

    `embedding_output` is the pooled embedding in the graph (the input of
    the last Dense; timm's `forward_head(..., pre_logits=True)`), and
    `patch_features(images)` gives the last feature map with the head's
    LayerNorm applied at every position: DINOv3's normalised patch tokens,
    the features its dense tasks use.

    Args:
        backbone: a `ConvNeXtBackbone`.
        num_classes: number of classes; 0 for the embedding only.
        preprocessor: optional keras-hub preprocessor applied by
            `fit`/`predict`/`evaluate` (presets attach one).
        pooling: "avg" (the reference head) or "max".
        activation: activation of the Dense layer; `None` returns logits.
        dropout: dropout rate before the Dense layer.
        head_init_scale: multiplies the initial Dense kernel (and bias); the
            official fine-tuning recipes use 0.001.
        head_dtype: dtype policy of the head; defaults to the backbone's.
        head_norm_first: normalise the feature map before pooling (layer
            `norm_pre`, timm's `head_norm_first=True`) instead of the
            pooled vector.
        head_hidden_size: `None`, or the width of a Dense + GELU layer
            (`head_pre_logits_fc`) between the LayerNorm and the last Dense
            (timm's `head_hidden_size`); the pooled embedding is its output.
            Not with `head_norm_first`.

    Example:
        >>> backbone = ConvNeXtBackbone((1, 1, 1, 1), (8, 16, 24, 32))
        >>> ConvNeXtImageClassifier(backbone, num_classes=10).output.shape
        (None, 10)
    """

    backbone_cls = ConvNeXtBackbone
    preprocessor_cls = ConvNeXtImageClassifierPreprocessor

    def __init__(
        self,
        backbone,
        num_classes,
        preprocessor=None,
        pooling="avg",
        activation=None,
        dropout=0.0,
        head_init_scale=1.0,
        head_dtype=None,
        head_norm_first=False,
        head_hidden_size=None,
        **kwargs,
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(
                "`num_classes` must be a positive int (or 0 for the pooled "
                f"embedding without a classification layer). Received: "
                f"num_classes={num_classes!r}."
            )
        if pooling not in POOLINGS:
            raise ValueError(
                f"Unknown pooling. Received: pooling={pooling!r}."
                f"{suggest(pooling, POOLINGS)} Valid: 'avg', 'max'."
            )
        if head_hidden_size is not None and (
            isinstance(head_hidden_size, bool) or not isinstance(head_hidden_size, int)
            or head_hidden_size < 1
        ):
            raise ValueError(
                "`head_hidden_size` must be None (no MLP in the head) or an int >= 1. "
                f"Received: head_hidden_size={head_hidden_size!r}."
            )
        if head_norm_first and head_hidden_size:
            raise ValueError(
                "`head_norm_first=True` and `head_hidden_size` exclude each other (timm "
                f"builds neither head). Received: head_hidden_size={head_hidden_size}. "
                "Pass one of them."
            )
        head_dtype = head_dtype or backbone.dtype_policy

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        pool_cls = (
            keras.layers.GlobalAveragePooling2D
            if pooling == "avg"
            else keras.layers.GlobalMaxPooling2D
        )
        self.pooler = pool_cls(dtype=head_dtype, name="head_global_pool")
        # The head norm is of the backbone's kind and epsilon, as in timm,
        # named after timm's module in either place (`norm_pre` /
        # `head.norm`), so the mapping to checkpoints stays mechanical.
        self.head_norm = channel_norm(
            backbone.norm_layer, backbone.norm_epsilon, head_dtype,
            "norm_pre" if head_norm_first else "head_norm",
        )
        self.head_hidden = None
        if head_hidden_size:
            self.head_hidden = keras.layers.Dense(
                head_hidden_size,
                kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
                dtype=head_dtype,
                name="head_pre_logits_fc",
            )
            # A layer of its own, with the GELU form LiteRT accepts.
            self.head_hidden_act = ExactGelu(dtype=head_dtype, name="head_pre_logits_act")
        self.output_dropout = keras.layers.Dropout(
            dropout, dtype=head_dtype, name="head_drop"
        )
        self.output_dense = None
        if num_classes:
            # Scaling the std scales the whole initial kernel; the bias is 0.
            self.output_dense = keras.layers.Dense(
                num_classes,
                activation=activation,
                kernel_initializer=keras.initializers.TruncatedNormal(
                    stddev=0.02 * head_init_scale
                ),
                dtype=head_dtype,
                name="head_fc",
            )

        # === Functional model ===
        inputs = self.backbone.input
        with deferred_while_loading():
            x = self.backbone(inputs)
            if head_norm_first:
                x = self.pooler(self.head_norm(x))
            else:
                x = self.head_norm(self.pooler(x))
            if self.head_hidden is not None:
                x = self.head_hidden_act(self.head_hidden(x))
            # timm's `pre_logits` output: what feature extraction reads.
            self.embedding_output = x
            if self.output_dense is not None:
                x = self.output_dropout(x)
                x = self.output_dense(x)
        # The head differs from ImageClassifier's (a norm between pool and
        # Dense), so the parent's graph is skipped.
        Task.__init__(self, inputs=inputs, outputs=x, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.pooling = pooling
        self.activation = activation
        self.dropout = dropout
        self.head_init_scale = head_init_scale
        self.head_norm_first = bool(head_norm_first)
        self.head_hidden_size = head_hidden_size

    def patch_features(self, images, training=False):
        """The last feature map, LayerNorm-ed at every position by the head's norm.

        DINOv3's normalised patch tokens (transformers'
        `DINOv3ConvNextModel` `last_hidden_state[:, 1:]`, reshaped to the
        map): the input of dense heads (segmentation, detection,
        retrieval). For a `head_norm_first` model it is the map the head
        pools. Called eagerly, so the functional graph is left as it is.

        Args:
            images: `(batch, height, width, channels)`, preprocessed.
            training: passed to the backbone (drop path).

        Returns:
            `(batch, height / 32, width / 32, channels)` at standard strides.

        Example:
            >>> model = convnext_zoo.from_preset("path/to/dinov3")  # doctest: +SKIP
            >>> model.patch_features(images).shape  # doctest: +SKIP
            (1, 7, 7, 768)
        """
        return self.head_norm(self.backbone(images, training=training))

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """A classifier from a preset: registered name, alias, `hf://`, directory or file.

        Uses convnext_zoo's registry and loading pipeline
        (`convnext_zoo.from_preset`) and attaches the checkpoint's
        preprocessing unless `preprocessing=False`.

        Example:
            >>> model = ConvNeXtImageClassifier.from_preset("convnext_v2_atto")  # doctest: +SKIP
        """
        model = pipeline.load(
            preset, cls.backbone_cls, cls, include_top=True, load_weights=load_weights, **kwargs
        )
        if not isinstance(model, cls):
            raise ValueError(
                f"Preset {preset!r} has no classification head (an FCMAE encoder). "
                "Pass num_classes=N for a classifier with a fresh head, or use "
                "ConvNeXtBackbone.from_preset for the encoder."
            )
        return model

    def compile_from_config(self, config):
        """Compiles a loaded `.keras` model as it was saved (optimizer state included).

        keras-hub's `Task.compile` only adds defaults, so the saved
        arguments replay through it; Keras' own method skips every
        overridden `compile` and would lose the optimizer and its state.
        """
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self):
        config = super().get_config()
        config.update({
            "head_init_scale": self.head_init_scale,
            "head_norm_first": self.head_norm_first,
            "head_hidden_size": self.head_hidden_size,
        })
        return config
