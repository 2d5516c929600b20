"""Data and model parallelism for training and inference (`--distribute data|model`).

`distribution_scope(mode)` is the one entry point: build, compile, fit,
evaluate and predict inside it, and Keras spreads the work over the
machine's accelerators (or virtual CPU devices):

* `"data"` (data parallelism): every device holds a full copy of the model
  and takes `global_batch / devices` images of each batch; the gradients
  are averaged across devices, so a step is the same step as on one device
  with the same global batch (ConvNeXt has no batch statistics: LayerNorm
  and GRN are per image). JAX: `keras.distribution.DataParallel`;
  TensorFlow: `tf.distribute.MirroredStrategy` (Keras splits the `tf.data`
  batches). Use it when the model fits one device and you want throughput.
* `"model"` (model parallelism, JAX only: Keras' `ModelParallel` is built
  on JAX's sharding): a `DeviceMesh` with axes `("batch", "model")` and a
  `LayoutMap` that shards the large matrices of this package's layers
  across the `model` axis, Megatron-style: each block's `mlp_fc1` kernel on
  its output (hidden) dimension, `mlp_fc2` on its input dimension (so the
  hidden activations stay sharded between them and one all-reduce ends the
  MLP), and the head kernel (`head_fc`) on its input dimension (the class
  count may be odd; the feature width never is). Everything else is
  replicated; XLA inserts the communication. The MLPs hold 80 % (atto) to
  96 % (huge) of a ConvNeXt's weights, so their share of the weights,
  gradients and AdamW slots on each device shrinks by the model-axis size. Use it when a model's training state does not fit one device.

Devices: `keras.distribution.list_devices()` on JAX (accelerators first,
else CPU devices), TensorFlow's logical GPUs (else logical CPUs). One
device is an error: on a multi-GPU machine every GPU is used; to try the
feature on a CPU, `CONVNEXT_ZOO_CPU_DEVICES=2` splits the CPU into 2
devices before the backend starts (`configure_cpu_devices`; on JAX the
same as `XLA_FLAGS=--xla_force_host_platform_device_count=2`, on
TensorFlow two logical CPU devices). Virtual CPU devices share the same
cores: they show the numerics of a distributed run, not a speed-up.

Multi-GPU machine:

    KERAS_BACKEND=jax convnext-zoo finetune PRESET DATA --output OUT --distribute data

Multi-host TPU or GPU slice (JAX): every host runs the same command, with
`keras.distribution.initialize()` called first (on Cloud TPU it finds the
coordinator, the process count and this process' id itself; elsewhere set
`KERAS_DISTRIBUTION_JOB_ADDRESSES`, `KERAS_DISTRIBUTION_NUM_PROCESSES` and
`KERAS_DISTRIBUTION_PROCESS_ID` on each host):

    python -c "import sys, keras; keras.distribution.initialize(); \
        from convnext_zoo.cli import main; sys.exit(main())" \
        finetune PRESET DATA --output OUT --distribute data

`devices()` then lists the global devices, Keras feeds each host its
share of every global batch (which must divide by the replicas), and each
host writes the same preset to its own `OUT` (use a host-local path).

Example:
    >>> with distribution_scope("data", global_batch=32) as placement:  # 2+ devices  # doctest: +SKIP
    ...     model = convnext_zoo.from_preset("convnext_v2_atto", num_classes=10)
    ...     model.compile(optimizer="adamw", loss="categorical_crossentropy")
    ...     model.fit(dataset.batch(32))       # 32 / placement.replicas per device
    ...     scores = placement.predict(model, images, batch_size=32)
"""

import contextlib
import os

import keras

MODES = ("data", "model")
CPU_DEVICES_ENV = "CONVNEXT_ZOO_CPU_DEVICES"
BACKENDS = {"data": ("jax", "tensorflow"), "model": ("jax",)}

# Keys are matched in full (`re.fullmatch`) against `variable.path`; the
# `(.*/)?` admits the same layers inside an enclosing model's path.
MODEL_PARALLEL_LAYOUT = {
    r"(.*/)?stages_\d+_blocks_\d+_mlp_fc1/kernel": (None, "model"),
    r"(.*/)?stages_\d+_blocks_\d+_mlp_fc2/kernel": ("model", None),
    r"(.*/)?head_fc/kernel": ("model", None),
}


class DistributeError(ValueError):
    """The requested distribution cannot run on this backend or these devices."""


def configure_cpu_devices(count=None):
    """Splits the CPU into `count` devices before the backend starts.

    `count` defaults to the `CONVNEXT_ZOO_CPU_DEVICES` environment variable;
    nothing happens when neither is set. For trying `--distribute` on a
    machine without accelerators (the devices share the same cores).

    Returns:
        The number of CPU devices set, or None.

    Raises:
        DistributeError: a count that is not an integer >= 1, the PyTorch
            backend, or a backend that has already started.
    """
    raw = count if count is not None else os.environ.get(CPU_DEVICES_ENV)
    if raw in (None, ""):
        return None
    try:
        count = int(raw)
        if count < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise DistributeError(
            f"{CPU_DEVICES_ENV} must be an integer >= 1. Received: {raw!r}. "
            f"Example: {CPU_DEVICES_ENV}=2."
        ) from None
    backend = keras.config.backend()
    try:
        if backend == "jax":
            import jax

            jax.config.update("jax_num_cpu_devices", count)
        elif backend == "tensorflow":
            import tensorflow as tf

            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
        else:
            raise DistributeError(
                f"{CPU_DEVICES_ENV} needs the JAX or TensorFlow backend; this run uses "
                f"{backend!r}. Set KERAS_BACKEND=jax or KERAS_BACKEND=tensorflow."
            )
    except RuntimeError as error:  # the backend has initialised its devices
        if _cpu_device_count(backend) == count:
            return count  # already split so (a second call, or XLA_FLAGS)
        raise DistributeError(
            f"{CPU_DEVICES_ENV}={count} came too late: the {backend} backend has already "
            f"started ({' '.join(str(error).split())}). Set it before the first Keras operation."
        ) from None
    return count


def _cpu_device_count(backend):
    if backend == "jax":
        import jax

        return len(jax.devices("cpu"))
    import tensorflow as tf

    return len(tf.config.list_logical_devices("CPU"))


def devices(backend=None):
    """The devices a distribution spreads over (accelerators, else CPU devices)."""
    backend = backend or keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        found = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return [d.name for d in found]
    if backend == "jax":
        return list(keras.distribution.list_devices())
    return []


class Placement:
    """What a distribution spreads over: the answer of `plan_distribution`.

    Attributes:
        mode: None, "data" or "model".
        backend: the Keras backend.
        devices: device names (one, `"default"`, when `mode` is None).
        replicas: how many ways each batch is split (data-parallel replicas).
        model_shards: how many ways the sharded kernels are split.
    """

    def __init__(self, mode, backend, devices, replicas, model_shards):
        self.mode, self.backend, self.devices = mode, backend, list(devices)
        self.replicas, self.model_shards = replicas, model_shards

    def batch_split(self, global_batch):
        """`(global_batch, per_replica_batch)`; the global batch must divide by the replicas."""
        return batch_split(global_batch, self.replicas)

    def predict(self, model, images, batch_size=32, **kwargs):
        """`model.predict` on an array of any length, inside the scope.

        Every batch must split evenly over the replicas (JAX refuses an
        uneven shard, TensorFlow a replica without images), so the images
        are padded to a multiple of the replicas by repeating the last one,
        and the padding's outputs are dropped.

        Args:
            model: a model built inside the scope.
            images: a NumPy array (or anything `np.asarray` takes), batch first.
            batch_size: the global batch (a multiple of the replicas).
            **kwargs: more `model.predict` arguments (e.g. `verbose`).
        """
        import numpy as np

        self.batch_split(batch_size)
        images = np.asarray(images)
        count = len(images)
        extra = -count % self.replicas
        if extra:
            images = np.concatenate([images, np.repeat(images[-1:], extra, axis=0)])
        kwargs.setdefault("verbose", 0)
        outputs = model.predict(images, batch_size=batch_size, **kwargs)
        return outputs[:count]

    def describe(self):
        """A JSON-serialisable summary (for logs)."""
        return {"mode": self.mode, "backend": self.backend, "devices": len(self.devices),
                "replicas": self.replicas, "model_shards": self.model_shards}


def batch_split(global_batch, replicas):
    """`(global_batch, per_replica_batch)` of a batch split over `replicas`.

    Raises:
        DistributeError: the global batch does not divide by the replicas.

    Example:
        >>> batch_split(32, 2)
        (32, 16)
    """
    if global_batch < replicas or global_batch % replicas:
        lower = max(replicas, global_batch // replicas * replicas)
        raise DistributeError(
            f"The global batch size {global_batch} does not divide by the {replicas} "
            f"data-parallel replicas (devices). Pass a multiple of {replicas}, e.g. "
            f"--batch-size {lower} or {lower + replicas}."
        )
    return global_batch, global_batch // replicas


def plan_distribution(mode, backend=None, global_batch=None, model_axis_size=None):
    """Checks that `mode` can run here and says how; changes nothing.

    Args:
        mode: None (one device), "data" or "model".
        backend: the Keras backend (default: the current one).
        global_batch: when given, checked to divide by the replicas.
        model_axis_size: "model" mode: devices per model replica (default:
            all devices; the rest of the mesh is the `batch` axis).

    Returns:
        A `Placement`.

    Raises:
        DistributeError: an unknown mode, a backend without that mode, a
            single device, or a batch that does not divide.
    """
    backend = backend or keras.config.backend()
    if mode is None:
        return Placement(None, backend, ["default"], 1, 1)
    if mode not in MODES:
        raise DistributeError(
            f"Received: distribute={mode!r}. Valid: 'data' (data parallelism), 'model' "
            "(model parallelism), or None for one device."
        )
    if backend not in BACKENDS[mode]:
        if mode == "data":
            hint = ("--distribute data runs on the JAX backend (keras.distribution.DataParallel) "
                    "or TensorFlow (tf.distribute.MirroredStrategy)")
            fix = "Set KERAS_BACKEND=jax or KERAS_BACKEND=tensorflow and rerun"
        else:
            hint = ("--distribute model runs on the JAX backend only (Keras' ModelParallel is "
                    "built on JAX sharding)")
            fix = "Set KERAS_BACKEND=jax and rerun, or use --distribute data"
        raise DistributeError(f"{hint}; this run uses {backend!r}. {fix}.")
    found = devices(backend)
    if len(found) < 2:
        raise DistributeError(
            f"--distribute {mode} needs at least 2 devices; the {backend} backend sees "
            f"{len(found)} ({', '.join(found) or 'none'}). Run on a machine with several GPUs "
            f"or TPU cores, or, to try it on a CPU, set {CPU_DEVICES_ENV}=2 (on JAX also "
            "XLA_FLAGS=--xla_force_host_platform_device_count=2) before starting."
        )
    if mode == "data":
        placement = Placement(mode, backend, found, len(found), 1)
    else:
        shards = len(found) if model_axis_size is None else int(model_axis_size)
        if shards < 1 or len(found) % shards:
            raise DistributeError(
                f"Received: model_axis_size={model_axis_size}; it must divide the "
                f"{len(found)} devices. Pass one of "
                f"{', '.join(str(d) for d in range(1, len(found) + 1) if len(found) % d == 0)}."
            )
        placement = Placement(mode, backend, found, len(found) // shards, shards)
    if global_batch is not None:
        placement.batch_split(global_batch)
    return placement


def layout_map(mesh):
    """The "model" mode `keras.distribution.LayoutMap` of this package's ConvNeXt on `mesh`.

    Args:
        mesh: a `keras.distribution.DeviceMesh` with a `"model"` axis.
    """
    layouts = keras.distribution.LayoutMap(mesh)
    for pattern, axes in MODEL_PARALLEL_LAYOUT.items():
        layouts[pattern] = axes
    return layouts


@contextlib.contextmanager
def distribution_scope(mode, backend=None, global_batch=None, model_axis_size=None):
    """Spreads models built, trained and run inside it over the devices.

    Args:
        mode: None (one device: a no-op), "data" or "model" (see the module
            docstring).
        backend: the Keras backend (default: the current one).
        global_batch: when given, checked to divide by the replicas.
        model_axis_size: "model" mode only, see `plan_distribution`.

    Yields:
        The `Placement` (devices, replicas, `batch_split`).

    Raises:
        DistributeError: as `plan_distribution`, before anything changes.

    Example:
        >>> with distribution_scope("data") as placement:  # doctest: +SKIP
        ...     model = build()
        ...     model.compile(optimizer="adamw", loss="mse")
        ...     model.fit(x, y, batch_size=placement.batch_split(32)[0])
    """
    placement = plan_distribution(mode, backend, global_batch, model_axis_size)
    if mode is None:
        yield placement
        return
    if placement.backend == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy(devices=placement.devices)
        with strategy.scope():
            yield placement
        return
    if mode == "data":
        distribution = keras.distribution.DataParallel(devices=placement.devices)
    else:
        mesh = keras.distribution.DeviceMesh(
            shape=(placement.replicas, placement.model_shards), axis_names=("batch", "model"),
            devices=placement.devices)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map(mesh), batch_dim_name="batch")
    with distribution.scope():
        yield placement


def build_optimizer(model):
    """Builds the compiled `model.optimizer`'s variables now (if not yet), beside the model's.

    Without a tf.distribute strategy, Keras builds them inside the first
    traced train step, and TensorFlow then traces the whole step a second
    time (a function that created variables is always retraced): V2 atto's
    first step took 29 s instead of 12 on a 2-core CPU. On TensorFlow they
    are made in the model's strategy's scope, as Keras' own early build
    under a strategy does; elsewhere in the current distribution's.
    """
    optimizer = getattr(model, "optimizer", None)  # None before `compile`
    if optimizer is None or optimizer.built:
        return
    if keras.backend.backend() == "tensorflow":
        with model.distribute_strategy.scope():
            optimizer.build(model.trainable_variables)
    else:
        optimizer.build(model.trainable_variables)


class OptimizerBuiltFirst:
    """A Keras model mixin: `fit` and `train_on_batch` build the optimizer before the first step.

    See `build_optimizer`: TensorFlow then traces the train step once. Pass
    metrics to `compile` as objects (or keep a default), for the same
    reason: Keras makes a named metric's variables inside that step too.
    """

    def fit(self, *args, **kwargs):
        build_optimizer(self)
        return super().fit(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        build_optimizer(self)
        return super().train_on_batch(*args, **kwargs)
