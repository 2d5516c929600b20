"""The fastest way to run a model for inference: a compiled forward pass.

`model.predict` pays for Keras' data pipeline and step machinery on every
call (about 1.5x the time of the forward pass for ConvNeXt-T at batch 1 on a
2-core CPU). `inference_function` returns a compiled function of one batch
instead: `tf.function` on the TensorFlow backend, `jax.jit` of the stateless
call on JAX, `torch.no_grad` on PyTorch. See benchmarks/bench_cpu.py for
the measurements behind the defaults.
"""

import keras
import numpy as np

_BACKENDS = ("tensorflow", "jax", "torch")
# keras' default batch size of `predict`.
_DEFAULT_PREDICT_BATCH = 32


class SingleBatchPredict:
    """`predict` of one in-memory batch through `predict_on_batch`.

    `Model.predict` builds a data pipeline (tf.data on TensorFlow) on every
    call: about 12 ms at batch 1 on a 2-core CPU, 40% of V2 atto's forward
    pass. When `x` is a single array (or backend tensor) that fits in one
    batch and no `steps` or callbacks are given, the same compiled predict
    step runs directly on it: same outputs, without the pipeline and without
    the one-step progress bar. An explicit `verbose=1` or `2` asks for the
    progress output, so it goes through `Model.predict` too, as does
    anything else.
    """

    def predict(self, x=None, batch_size=None, verbose="auto", steps=None, callbacks=None, **kwargs):
        quiet = verbose in ("auto", 0)
        if quiet and steps is None and not callbacks and not kwargs and _one_batch(x, batch_size):
            return self.predict_on_batch(x)
        return super().predict(
            x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks, **kwargs
        )


def _one_batch(x, batch_size):
    if not (isinstance(x, np.ndarray) or keras.ops.is_tensor(x)) or len(x.shape) == 0:
        return False
    return 0 < x.shape[0] <= (batch_size or _DEFAULT_PREDICT_BATCH)


def inference_function(model, jit_compile=None):
    """Compiles `model(images, training=False)` into a fast batch function.

    The returned function takes one batch (a NumPy array or a backend tensor,
    float32, `(batch, height, width, 3)` for a ConvNeXt) and returns the
    model's output as a backend tensor; `keras.ops.convert_to_numpy` turns it
    into a NumPy array. It reads the model's current weights on every call
    (later `load_weights` or training steps are seen), and traces once per
    new input shape, so feed a fixed batch size and image size for the best
    speed (pad the last batch).

    Args:
        model: a built Keras model, e.g. from `convnext_zoo.from_preset` or
            `create_convnext_v2`. With a preprocessor attached, the function
            runs the network only: feed preprocessed (normalised) images.
        jit_compile: TensorFlow backend only: compile with XLA. `None`
            (default) picks plain `tf.function` graphs with TensorFlow's
            native CPU kernels, measured faster than XLA for ConvNeXt on
            CPUs (XLA's depthwise convolution is slow there). Ignored on
            JAX (always XLA) and PyTorch (eager).

    Returns:
        A callable `f(images) -> outputs`.

    Raises:
        ValueError: if the Keras backend is not one of tensorflow, jax, torch.

    Example:
        >>> import numpy as np, convnext_zoo
        >>> model = convnext_zoo.create_convnext_v2("atto", input_shape=(224, 224, 3))
        >>> predict = convnext_zoo.inference_function(model)
        >>> images = np.zeros((8, 224, 224, 3), "float32")
        >>> logits = keras.ops.convert_to_numpy(predict(images))
        >>> logits.shape
        (8, 1000)
    """
    backend = keras.config.backend()
    if backend == "tensorflow":
        return _tensorflow(model, bool(jit_compile))
    if backend == "jax":
        return _jax(model)
    if backend == "torch":
        return _torch(model)
    raise ValueError(
        f"inference_function supports the Keras backends {', '.join(_BACKENDS)}. "
        f"Received: backend={backend!r}. Set KERAS_BACKEND to one of them "
        "before importing keras."
    )


def _tensorflow(model, jit_compile):
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile, reduce_retracing=True, autograph=False)
    def forward(images):
        return model(images, training=False)

    def run(images):
        return forward(tf.convert_to_tensor(images, dtype=model.compute_dtype))

    run.concrete_function = forward
    return run


def _jax(model):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def forward(trainable, non_trainable, images):
        outputs, _ = model.stateless_call(trainable, non_trainable, images, training=False)
        return outputs

    def run(images):
        # Variables are read per call, so weight updates are always seen.
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        return forward(trainable, non_trainable, jnp.asarray(images, dtype=model.compute_dtype))

    return run


def _torch(model):
    import torch

    def run(images):
        with torch.no_grad():
            if not isinstance(images, torch.Tensor):
                images = torch.as_tensor(images)
            return model(images, training=False)

    return run
