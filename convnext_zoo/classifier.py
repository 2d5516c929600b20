"""`ConvNeXtImageClassifier`: backbone + ConvNeXt head as a keras-hub task."""

import keras
from keras_hub.models import ImageClassifier, Task

from convnext_zoo import pipeline
from convnext_zoo.backbone import ConvNeXtBackbone
from convnext_zoo.inference import PortableExport, SingleBatchPredict
from convnext_zoo.internals import deferred_while_loading
from convnext_zoo.layers import channel_norm
from convnext_zoo.preprocessing import ConvNeXtImageClassifierPreprocessor
from convnext_zoo.preset_dir import POOLINGS
from convnext_zoo.variants import suggest


@keras.saving.register_keras_serializable(package="convnext_zoo")
class ConvNeXtImageClassifier(PortableExport, SingleBatchPredict, ImageClassifier):
    """ConvNeXt classifier: global pool -> LayerNorm (the backbone's norm) -> Dense.

    The head pools first and normalises second, as the reference network
    does. With `num_classes=0` the model has no Dense layer and returns the
    pooled, normalised embedding (timm's `num_classes=0` output).

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
        # The head norm is of the backbone's kind and epsilon, as in timm.
        self.head_norm = channel_norm(
            backbone.norm_layer, backbone.norm_epsilon, head_dtype, "head_norm"
        )
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
            x = self.pooler(x)
            x = self.head_norm(x)
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

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """A classifier from a preset: registered name, alias, `hf://`, directory or file.

        Uses convnext_zoo's registry and loading pipeline
        (`convnext_zoo.from_preset`) and attaches the checkpoint's
        preprocessing unless `preprocessing=False`.

        Example:
            >>> model = ConvNeXtImageClassifier.from_preset("convnext_v2_atto")
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
        config.update({"head_init_scale": self.head_init_scale})
        return config
