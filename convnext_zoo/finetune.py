"""Fine-tunes a preset on a folder of labelled images and writes the result as a preset.

The run behind `convnext-zoo finetune PRESET DATA_DIR --output OUT_DIR`:
`image_dataset_from_directory` reads the images (grayscale and RGBA become
RGB), the recipe's augmentation runs in `tf.data` (Keras layers), the model
trains with `LayerDecayAdamW` (warmup + cosine, EMA), validation every
epoch, `BackupAndRestore` for `--resume`. The final (EMA) weights are
written with `convnext_zoo.writer.save_preset`, the class names as labels,
with `training_log.json` and `training_curves.png` beside them.

Work happens in `OUT_DIR.partial/` (backups, the log so far); the finished
preset is renamed to `OUT_DIR` at the very end, so `OUT_DIR` is either
absent or complete.
"""

import json
import os
import platform
import shutil
import time

import numpy as np

import keras

import convnext_zoo
from convnext_zoo import distribute, recipes, training, writer
from convnext_zoo.finetune_data import readable_view, run_identity
from convnext_zoo.variants import IMAGENET_MEAN, IMAGENET_STD

LOG_FILE = "training_log.json"
CURVES_FILE = "training_curves.png"


def _dataset(folder, options, plan, num_classes, work, replicas=1):
    import tensorflow as tf

    train_dir, val_dir = readable_view(folder, os.path.join(work, "readable"))
    size = (options["image_size"], options["image_size"])
    common = dict(labels="inferred", label_mode="categorical", class_names=folder.class_names,
                  color_mode="rgb", image_size=size, seed=options["seed"], batch_size=None,
                  verbose=False)
    if val_dir is None:
        train, val = keras.utils.image_dataset_from_directory(
            train_dir, validation_split=options["val_split"], subset="both",
            shuffle=True, **common)
    else:
        train = keras.utils.image_dataset_from_directory(train_dir, shuffle=True, **common)
        val = keras.utils.image_dataset_from_directory(val_dir, shuffle=False, **common)
    num_train = int(train.cardinality().numpy())
    num_val = int(val.cardinality().numpy())
    batch = options["batch_size"]
    if batch > num_train:
        raise ValueError(
            f"--batch-size {batch} is larger than the {num_train} training images; "
            f"pass --batch-size {max(1, num_train // 4)} or less."
        )
    image_layers, batch_layers = training.augmentation(plan, seed=options["seed"])
    mean = tf.constant(np.array(IMAGENET_MEAN, "float32") * 255)
    std = tf.constant(np.array(IMAGENET_STD, "float32") * 255)

    def augment(image, label):
        for layer in image_layers:
            image = layer(image, training=True)
        return image, label

    def mix(images, labels):
        if not batch_layers:
            return images, labels
        data = {"images": images, "labels": labels}
        if len(batch_layers) == 1:
            out = batch_layers[0](data, training=True)
        else:  # timm's Mixup: MixUp or CutMix per batch, switch probability 0.5
            out = tf.cond(tf.random.uniform(()) < 0.5,
                          lambda: batch_layers[0](data, training=True),
                          lambda: batch_layers[1](data, training=True))
        return out["images"], out["labels"]

    def normalize(images, labels):
        return (tf.cast(images, "float32") - mean) / std, labels

    autotune = tf.data.AUTOTUNE
    train = (train.shuffle(min(num_train, 10_000), seed=options["seed"],
                           reshuffle_each_iteration=True)
             .map(augment, num_parallel_calls=autotune)
             .batch(batch, drop_remainder=True)
             .map(mix, num_parallel_calls=autotune)
             .map(normalize, num_parallel_calls=autotune)
             .prefetch(autotune))

    def batched(images):
        return images.batch(batch).map(normalize, num_parallel_calls=autotune).cache().prefetch(autotune)

    val_all = batched(val)
    # Every batch must split evenly over the replicas: fit's per-epoch
    # validation skips the last `num_val % replicas` images (the final
    # evaluation, on a single-device copy, sees them all).
    val_fit = batched(val.take(num_val // replicas * replicas)) if replicas > 1 else val_all
    return train, val_fit, val_all, num_train, num_val


def plot_curves(epochs, path, title):
    """Loss and accuracy per epoch (training and validation) as a PNG; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [e["epoch"] for e in epochs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        left.plot(x, [e.get(key) for e in epochs], label=label)
    for key, label in (("categorical_accuracy", "train"), ("val_categorical_accuracy", "validation")):
        right.plot(x, [e.get(key) for e in epochs], label=label)
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    right.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _build(options, num_classes, plan, load_weights, dtype=None):
    size = options["image_size"]
    return convnext_zoo.from_preset(
        options["preset"], num_classes=num_classes, input_shape=(size, size, 3),
        load_weights=load_weights, preprocessing=False, dtype=dtype,
        drop_path_rate=plan["drop_path"] if plan else 0.0,
        head_init_scale=plan["head_init_scale"] if plan else 1.0,
    )


def finetune(options, folder, verbose=1):
    """Runs the fine-tuning that `options` describes on the checked `folder`.

    Args:
        options: dict with `preset`, `output`, `epochs`, `batch_size`,
            `image_size`, `val_split`, `recipe` (None: the default),
            `lr`, `layer_decay`, `dtype`, `resume`, `seed`, `from_scratch`,
            `overrides` (recipe fields, e.g. {"mixup": 0.0}), optionally
            `distribute` (None, "data" or "model": see
            `convnext_zoo.distribute`; `batch_size` is the global batch).
        folder: `convnext_zoo.finetune_data.scan_images(...)`.
        verbose: Keras' progress bar setting.

    Returns:
        The training log (also written to `OUT_DIR/training_log.json`).
    """
    started = time.perf_counter()
    placement, work = training.begin_run(options, run_identity(options, folder))

    num_classes = len(folder.class_names)
    model = _build(options, num_classes, None, load_weights=False)  # the family, cheaply
    family = "v2" if model.backbone.use_grn else "v1"
    variant = writer.model_config(model)["variant"]
    recipe = options["recipe"] or recipes.default_recipe(family, options["from_scratch"])
    # Steps per epoch need the split sizes; a provisional plan gives the augmentation.
    provisional = recipes.scale_recipe(recipe, variant, epochs=options["epochs"],
                                       batch_size=options["batch_size"], steps_per_epoch=1,
                                       lr=options["lr"], layer_decay=options["layer_decay"],
                                       family=family, **options["overrides"])
    train, val, val_all, num_train, num_val = _dataset(folder, options, provisional, num_classes,
                                                       work, placement.replicas)
    steps = num_train // options["batch_size"]
    plan = recipes.scale_recipe(recipe, variant, epochs=options["epochs"],
                                batch_size=options["batch_size"], steps_per_epoch=steps,
                                lr=options["lr"], layer_decay=options["layer_decay"],
                                family=family, **options["overrides"])
    if options["from_scratch"]:
        plan["layer_decay"] = 1.0 if options["layer_decay"] is None else plan["layer_decay"]
    # Built, trained and evaluated on every device; the preset below is a plain
    # single-device copy of the (gathered) weights.
    with distribute.distribution_scope(options.get("distribute")):
        model = _build(options, num_classes, plan, load_weights=not options["from_scratch"])
        # A metric object, not its name: see `distribute.OptimizerBuiltFirst`.
        model.compile(optimizer=training.make_optimizer(model, plan), loss=training.make_loss(plan),
                      metrics=[keras.metrics.CategoricalAccuracy()])
        epoch_log = training.EpochLog(os.path.join(work, "epochs.json"), options["resume"])
        callbacks = [keras.callbacks.BackupAndRestore(os.path.join(work, "backup")), epoch_log]
        train_start = time.perf_counter()
        # shuffle=False: the dataset shuffles itself (Keras warns that its own is ignored).
        model.fit(train, validation_data=val, epochs=options["epochs"], callbacks=callbacks,
                  shuffle=False, verbose=verbose)
        train_seconds = time.perf_counter() - train_start
        # fit() ended by copying the EMA into the model (finalize_variable_values).
        weights = model.get_weights()

    # The preset is written from a float32 copy without drop path.
    keras.config.set_dtype_policy("float32")
    export = _build(options, num_classes, None, load_weights=False)
    export.set_weights(weights)
    # The final numbers are the written preset's, on every validation image.
    # A metric object, not its name: Keras would make a named metric's
    # variables inside the traced step, and TensorFlow would trace it twice.
    export.compile(loss=training.make_loss(plan), metrics=[keras.metrics.CategoricalAccuracy()])
    final_loss, final_accuracy = export.evaluate(val_all, verbose=0)
    size = options["image_size"]
    config = writer.model_config(
        export, image_size=[size, size], class_names=list(folder.class_names), label_set=None,
        preprocessing={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "crop_pct": 1.0,
                       "crop_mode": "squash", "interpolation": "bilinear"},
        base_model=None if options["from_scratch"] else str(options["preset"]),
        provenance={"source_format": "keras",
                    "source": f"convnext-zoo finetune of {options['preset']}"
                              + (" (from scratch)" if options["from_scratch"] else "")},
    )
    log = {
        "preset": str(options["preset"]), "from_scratch": options["from_scratch"],
        "data_dir": os.path.abspath(folder.train_dir), "val_dir": folder.val_dir and
        os.path.abspath(folder.val_dir), "class_names": list(folder.class_names),
        "num_train": num_train, "num_val": num_val, "ignored_files": len(folder.ignored),
        "unreadable_files": [os.path.relpath(p, folder.train_dir) for p in folder.unreadable],
        "image_size": size, "dtype": options["dtype"] or "float32", "seed": options["seed"],
        "distribute": dict(placement.describe(), per_replica_batch=placement.batch_split(
            options["batch_size"])[1]),
        "plan": plan, "epochs": epoch_log.epochs,
        "final": {"weights": "ema" if plan["ema"] else "last", "val_loss": float(final_loss),
                  "val_accuracy": float(final_accuracy)},
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "backend": keras.config.backend(), "keras": keras.__version__,
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }
    staged = os.path.join(work, "preset")
    if os.path.exists(staged):
        shutil.rmtree(staged)
    writer.save_preset(export, staged, config=config)
    plotted = plot_curves(epoch_log.epochs, os.path.join(staged, CURVES_FILE),
                f"{options['preset']} on {os.path.basename(os.path.normpath(folder.train_dir))}: "
                f"{final_accuracy:.2%} validation accuracy ({log['final']['weights']} weights)")
    log["curves"] = CURVES_FILE if plotted else "not drawn: pip install \"convnext_zoo[train]\" (matplotlib)"
    with open(os.path.join(staged, LOG_FILE), "w", encoding="utf-8") as handle:
        json.dump(log, handle, indent=1)
    os.replace(staged, options["output"])
    shutil.rmtree(work, ignore_errors=True)
    return log
