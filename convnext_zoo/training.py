"""Training pieces of the official recipes, on what Keras ships.

* `layer_id` / `layer_decay_multipliers`: the official layer-wise learning
  rate decay. ConvNeXt V1 (and V2 base/large, `layer_decay_type="group"`)
  groups the blocks into 12 layers (`get_num_layer_for_convnext`: stem 0,
  stage 0 -> 1, stage 1 and the downsampling before it -> 2, every 3 blocks
  of stage 2 -> 3, 4, ..., the last downsampling and stage 3 -> 12, head 13);
  ConvNeXt V2 small models (`"single"`) give every block its own id
  (`get_num_layer_for_convnext_single`: stem 1, downsampling i and the first
  block of stage i share `sum(depths[:i]) + 1`, head `sum(depths) + 1`).
  The multiplier of id `k` is `decay ** (num_layers + 1 - k)`, with
  num_layers 12 ("group") or `sum(depths)` ("single").
* `LayerDecayAdamW`: `keras.optimizers.AdamW` whose update (and decoupled
  weight decay, as PyTorch's AdamW per parameter group) uses
  `learning_rate * multiplier` per variable. Works on the TensorFlow, JAX
  and PyTorch backends, serialises with the model and resumes.
* The official weight-decay exclusions (1-D parameters and biases; V2 also
  GRN gamma/beta): in Keras every variable but the kernels, given to
  `exclude_from_weight_decay`.
* `learning_rate_schedule`: linear warmup, then cosine decay to `min_lr`
  (`keras.optimizers.schedules.CosineDecay`).
* `augmentation`: RandomFlip, RandAugment, RandomErasing, MixUp, CutMix from
  `keras.layers`, applied in the `tf.data` pipeline.
* `EpochLog`: the per-epoch JSON log of a run (fine-tuning, pre-training),
  kept across `--resume`; `begin_run`: the checks and settings before a
  run's first write.
"""

import json
import os
import re
import time

import keras
import numpy as np

from convnext_zoo import distribute
from convnext_zoo.finetune_data import start_work

NO_WEIGHT_DECAY = ("bias", "gamma", "beta")  # every Keras ConvNeXt variable but kernels
GROUP_LAYERS = 12
_BLOCK = re.compile(r"^stages_(\d+)_blocks_(\d+)_")
_DOWNSAMPLE = re.compile(r"^stages_(\d+)_downsample_")


def _stage_position(layer_name):
    """`("stem"|"downsample"|"block"|"head", stage, block)` of a Keras layer name."""
    if layer_name.startswith("stem_"):
        return "downsample", 0, None
    match = _DOWNSAMPLE.match(layer_name)
    if match:
        return "downsample", int(match.group(1)), None
    match = _BLOCK.match(layer_name)
    if match:
        return "block", int(match.group(1)), int(match.group(2))
    return "head", None, None


def layer_id(layer_name, depths, layer_decay_type):
    """The official layer id of a Keras layer of this package's ConvNeXt.

    Keras names map to the official modules mechanically: `stem_*` is
    `downsample_layers.0`, `stages_{i}_downsample_*` is `downsample_layers.{i}`,
    `stages_{i}_blocks_{j}_*` is `stages.{i}.{j}`, anything else (head) is
    neither.

    Args:
        layer_name: e.g. "stages_2_blocks_5_mlp_fc1".
        depths: blocks per stage.
        layer_decay_type: "group" (12 groups, V1 and V2 base/large) or
            "single" (one id per block, V2 atto..tiny).

    Example:
        >>> layer_id("stages_2_blocks_5_mlp_fc1", (3, 3, 27, 3), "group")
        4
        >>> layer_id("stem_0", (2, 2, 6, 2), "single")
        1
    """
    kind, stage, block = _stage_position(layer_name)
    if layer_decay_type == "single":
        if kind == "head":
            return sum(depths) + 1
        return sum(depths[:stage]) + (block or 0) + 1
    if layer_decay_type != "group":
        raise ValueError(
            f"Received: layer_decay_type={layer_decay_type!r}. Valid: 'group', 'single'."
        )
    if kind == "head":
        return GROUP_LAYERS + 1
    if kind == "downsample":
        return {0: 0, 1: 2, 2: 3}.get(stage, GROUP_LAYERS)
    if stage in (0, 1):
        return stage + 1
    if stage == 2:
        return 3 + block // 3
    return GROUP_LAYERS


def num_layers(depths, layer_decay_type):
    return GROUP_LAYERS if layer_decay_type == "group" else sum(depths)


def layer_decay_multipliers(model, layer_decay, layer_decay_type):
    """`{layer name: learning-rate multiplier}` for every layer with trainable weights.

    Args:
        model: a `ConvNeXtImageClassifier` or `ConvNeXtBackbone`.
        layer_decay: the decay (1.0: every multiplier is 1).
        layer_decay_type: "group" or "single".
    """
    backbone = getattr(model, "backbone", model)
    depths = list(backbone.depths)
    top = num_layers(depths, layer_decay_type) + 1
    names = sorted({v.path.split("/")[-2] for v in model.trainable_variables})
    return {
        name: float(layer_decay ** (top - layer_id(name, depths, layer_decay_type)))
        for name in names
    }


@keras.saving.register_keras_serializable(package="convnext_zoo")
class LayerDecayAdamW(keras.optimizers.AdamW):
    """AdamW with a learning-rate multiplier per layer (layer-wise LR decay).

    Each variable's step (and its decoupled weight decay, as in PyTorch's
    AdamW with `lr_scale` per parameter group) uses
    `learning_rate * lr_multipliers[layer name]` (1.0 for layers not listed).
    Variables whose name matches `no_weight_decay` get no weight decay.

    Args:
        lr_multipliers: `{layer name: multiplier}` (see
            `layer_decay_multipliers`).
        no_weight_decay: variable names excluded from weight decay
            (default: biases, norms, GRN and layer scale).
        **kwargs: `keras.optimizers.AdamW` arguments (`learning_rate`,
            `weight_decay`, `use_ema`, `ema_momentum`, ...).

    Example:
        >>> model = convnext_zoo.create_convnext_v2("atto", num_classes=10)
        >>> optimizer = LayerDecayAdamW(
        ...     layer_decay_multipliers(model, 0.9, "single"), learning_rate=1e-3)
    """

    def __init__(self, lr_multipliers=None, no_weight_decay=NO_WEIGHT_DECAY, **kwargs):
        super().__init__(**kwargs)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        self.no_weight_decay = list(no_weight_decay or ())
        if self.no_weight_decay:
            self.exclude_from_weight_decay(
                var_names=[f"^{re.escape(n)}$" for n in self.no_weight_decay]
            )
        self._multipliers = []
        self._decays = []

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._multipliers = [
            self.lr_multipliers.get(v.path.split("/")[-2] if "/" in v.path else v.path, 1.0)
            for v in var_list
        ]
        # Decided on the Keras variables: TensorFlow hands `update_step` its
        # own variables, named "bias:0".
        self._decays = [self._use_weight_decay(v) for v in var_list]

    def multiplier(self, variable):
        return self._multipliers[self._get_variable_index(variable)]

    def _apply_weight_decay(self, variables):
        # Applied per variable in `update_step`, with that variable's rate.
        return

    def update_step(self, gradient, variable, learning_rate):
        scale = self.multiplier(variable)
        lr = keras.ops.cast(learning_rate, variable.dtype) * scale
        if self.weight_decay is not None and self._decays[self._get_variable_index(variable)]:
            wd = keras.ops.cast(self.weight_decay, variable.dtype)
            self.assign_sub(variable, variable * wd * lr)
        super().update_step(gradient, variable, lr)

    def get_config(self):
        config = super().get_config()
        config.update(lr_multipliers=dict(self.lr_multipliers),
                      no_weight_decay=list(self.no_weight_decay))
        return config


def learning_rate_schedule(plan):
    """Linear warmup from 0 to `plan["lr"]`, then cosine decay to `plan["min_lr"]`."""
    warmup = int(plan["warmup_steps"])
    decay_steps = max(int(plan["total_steps"]) - warmup, 1)
    peak = float(plan["lr"])
    alpha = min(float(plan["min_lr"]) / peak, 1.0) if peak > 0 else 0.0
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak,
        decay_steps=decay_steps,
        alpha=alpha,
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


def make_optimizer(model, plan):
    """The recipe's optimizer for `model`: `LayerDecayAdamW` with the schedule and EMA."""
    multipliers = (
        layer_decay_multipliers(model, plan["layer_decay"], plan["layer_decay_type"])
        if plan["layer_decay"] != 1.0 else {}
    )
    return LayerDecayAdamW(
        lr_multipliers=multipliers,
        learning_rate=learning_rate_schedule(plan),
        weight_decay=plan["weight_decay"],
        use_ema=plan["ema"],
        ema_momentum=plan["ema_decay"],
    )


def make_loss(plan):
    """Cross-entropy on one-hot (or mixed) labels with the recipe's label smoothing."""
    return keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=float(plan["smoothing"])
    )


def augmentation(plan, seed=None):
    """The recipe's per-image and per-batch augmentation as Keras layers.

    Returns:
        `(image_layers, batch_layers)`: image layers take uint8-range float
        images, batch layers take `{"images", "labels"}` with one-hot labels.
    """
    image_layers = []
    if plan["flip"]:
        image_layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if plan["randaugment"]:
        ra = plan["randaugment"]
        image_layers.append(keras.layers.RandAugment(
            value_range=(0, 255), num_ops=int(ra["num_ops"]),
            factor=float(ra["magnitude"]) / 10, seed=seed,
        ))
    if plan["reprob"]:
        image_layers.append(keras.layers.RandomErasing(
            factor=float(plan["reprob"]), value_range=(0, 255), seed=seed,
        ))
    batch_layers = []
    if plan["mixup"]:
        batch_layers.append(keras.layers.MixUp(alpha=float(plan["mixup"]), seed=seed))
    if plan["cutmix"]:
        batch_layers.append(keras.layers.CutMix(factor=float(plan["cutmix"]), seed=seed))
    return image_layers, batch_layers


def begin_run(options, identity):
    """A training command's start: checks, then seeds, then its work folder.

    Args:
        options: dict with `distribute` (optional), `batch_size` (global),
            `seed`, `dtype` (None or a policy), `output`, `resume`.
        identity: the run's settings, for `run.json` (checked on `--resume`).

    Returns:
        `(placement, work folder)`: `distribute.plan_distribution`'s plan,
        checked before anything is written (the backend, the devices, the
        batch split), and the folder from `finetune_data.start_work`.
    """
    placement = distribute.plan_distribution(options.get("distribute"),
                                             global_batch=options["batch_size"])
    keras.utils.set_random_seed(options["seed"])
    if options["dtype"]:
        keras.config.set_dtype_policy(options["dtype"])
    return placement, start_work(options["output"], options["resume"], identity)


class EpochLog(keras.callbacks.Callback):
    """Appends every finished epoch to the JSON log in the work folder (survives a resume).

    Args:
        path: the log file (`WORK/epochs.json`).
        resume: keep the records an interrupted run left in `path`.
    """

    def __init__(self, path, resume):
        super().__init__()
        previous = []
        if resume and os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                previous = json.load(handle)
        self.path, self.epochs = path, previous
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        lr = optimizer.learning_rate
        record = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - self._start, 2),
                  "learning_rate": float(np.asarray(lr))}
        record.update({k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"})
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch + 1] + [record]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self.epochs, handle, indent=1)
        os.replace(tmp, self.path)
