"""FCMAE pre-training on a folder of images, written as an encoder preset and a whole FCMAE.

The run behind `convnext-zoo pretrain DATA_DIR --variant atto --output OUT_DIR`:
every image under DATA_DIR (sub-folders and their names ignored) is read by
`tf.data`, cropped and flipped as the official recipe does
(`convnext_zoo.recipes.FCMAE_PRETRAINING`: RandomResizedCrop with scale
0.2-1.0 drawn by `tf.image.sample_distorted_bounding_box`, bicubic resize,
`keras.layers.RandomFlip`), normalised with the ImageNet statistics, and an
`FCMAE` trains on it with `keras.optimizers.AdamW` (betas 0.9 / 0.95,
weight decay 0.05 except on biases, norms and GRN) under linear warmup and
cosine decay (`training.learning_rate_schedule`). Keras' progress bar,
`BackupAndRestore` for `--resume`, the per-epoch log and
`distribute.distribution_scope` are the fine-tuning run's.

After every epoch a PNG grid (`reconstructions/epoch_NNN.png`) shows fixed
images: original, masked (removed patches grey) and reconstructed (visible
patches as given, removed ones predicted; with `norm_pix_loss` each
predicted patch is un-normalised with the original patch's mean and std).

Output, all renamed into place at the very end (`OUT_DIR` is absent or
complete; the work happens in `OUT_DIR.partial/`):

    OUT_DIR/encoder/          preset: from_preset(..., num_classes=N), `convnext-zoo finetune`
    OUT_DIR/fcmae/            the whole FCMAE (`convnext_zoo.fcmae.load_fcmae`, `--init`)
    OUT_DIR/reconstructions/  one grid per epoch
    OUT_DIR/pretraining_log.json

`--init` continues from an FCMAE encoder of the same variant: a registered
`convnext_v2_*_fcmae` preset or an encoder preset directory (decoder
fresh), an official FCMAE `.pt` file (decoder and mask token loaded too),
or the `fcmae/` folder (or the OUT_DIR) of an earlier run (everything).
"""

import json
import os
import platform
import shutil
import time

import numpy as np

import keras

from convnext_zoo import distribute, fcmae, recipes, training, writer
from convnext_zoo.variants import IMAGENET_MEAN, IMAGENET_STD

LOG_FILE = "pretraining_log.json"
GRID_DIR = "reconstructions"
GRID_IMAGES = 8
NO_WEIGHT_DECAY = training.NO_WEIGHT_DECAY


def run_identity(options, folder):
    """The settings a resumed run must share with the interrupted one."""
    keys = ("variant", "init", "image_size", "batch_size", "epochs", "mask_ratio", "dtype", "lr",
            "warmup_epochs", "seed", "flip", "crop_scale", "distribute")
    identity = {k: options.get(k) for k in keys}
    identity["images"] = folder.num_train
    return identity


def init_kind(init):
    """How `--init` is read: None, "fcmae" (a whole FCMAE directory), "official" or "encoder"."""
    if init is None:
        return None
    if os.path.isdir(init) and fcmae.is_fcmae_directory(os.path.join(init, "fcmae")):
        return "fcmae"
    if os.path.isdir(init) and fcmae.is_fcmae_directory(init):
        return "fcmae"
    if os.path.isfile(init):
        return "official"
    return "encoder"


def _fcmae_directory(init):
    nested = os.path.join(init, "fcmae")
    return nested if fcmae.is_fcmae_directory(nested) else init


def read_image(path, channels=3):
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return tf.cast(image, "float32")


def random_resized_crop(image, size, scale, ratio, seed=None):
    """The official RandomResizedCrop: a random box of `scale` of the area and `ratio` aspect, resized.

    The box is drawn by `tf.image.sample_distorted_bounding_box` (area and
    aspect ranges, 10 attempts, else the whole image), resized bicubically.
    """
    import tensorflow as tf

    begin, box_size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
        max_attempts=10, use_image_if_no_bounding_boxes=True, seed=seed)
    crop = tf.slice(image, begin, box_size)
    resized = tf.image.resize(crop, (size, size), method="bicubic")
    return tf.clip_by_value(resized, 0.0, 255.0)


def _dataset(folder, options, plan):
    import tensorflow as tf

    size, batch, seed = options["image_size"], options["batch_size"], options["seed"]
    flip = keras.layers.RandomFlip("horizontal", seed=seed) if plan["flip"] else None
    mean = tf.constant(np.array(IMAGENET_MEAN, "float32") * 255)
    std = tf.constant(np.array(IMAGENET_STD, "float32") * 255)

    def augment(path):
        image = random_resized_crop(read_image(path), size, plan["crop_scale"], plan["crop_ratio"],
                                    seed=seed)
        if flip is not None:
            image = flip(image, training=True)
        return (image - mean) / std

    autotune = tf.data.AUTOTUNE
    return (tf.data.Dataset.from_tensor_slices(list(folder.files))
            .shuffle(len(folder.files), seed=seed, reshuffle_each_iteration=True)
            .map(augment, num_parallel_calls=autotune)
            .batch(batch, drop_remainder=True)
            .prefetch(autotune))


def preview_images(files, size, count=GRID_IMAGES):
    """`count` images spread over the (sorted) files, squashed to `size` (bicubic), ImageNet-normalised.

    Spread rather than the first ones: sorted class folders would show one class only.
    """
    from PIL import Image

    count = min(count, len(files))
    images = []
    for path in [files[i * len(files) // count] for i in range(count)]:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), "float32"))
    images = np.stack(images) / 255.0
    return ((images - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).astype("float32")


def fixed_masks(model, count, seed):
    """`count` masks of the model's grid, the same every epoch (the official count kept)."""
    rng = np.random.default_rng(seed)
    removed = np.ones((count, model.num_patches), "float32")
    for row in removed:
        row[rng.permutation(model.num_patches)[:model.num_kept]] = 0
    return removed.reshape((count, *model.grid_shape))


def reconstruction_grid(model, images, removed):
    """A uint8 RGB grid: originals, masked (removed patches grey), reconstructions; one column each."""
    pred = model.decode(model.encode(images, removed, training=False), removed, training=False)
    recon = keras.ops.convert_to_numpy(model.reconstruct(images, pred, removed))
    pixels = np.kron(removed, np.ones((1, model.patch_size, model.patch_size)))[..., None]

    def to_uint8(x):
        x = x * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)
        return (np.clip(x, 0, 1) * 255).round().astype("uint8")

    grey = np.full_like(images, 0.0) - np.float32(IMAGENET_MEAN) / np.float32(IMAGENET_STD) \
        + 0.5 / np.float32(IMAGENET_STD)
    masked = images * (1 - pixels) + grey * pixels
    rows = [np.concatenate(list(to_uint8(x)), axis=1) for x in (images, masked, recon)]
    return np.concatenate(rows, axis=0)


def save_grid(grid, path, scale=None):
    """Writes the grid as a PNG, atomically, scaled up (nearest) so small images stay visible."""
    from PIL import Image

    image = Image.fromarray(grid)
    rows = 3
    scale = scale or max(1, 96 // (grid.shape[0] // rows))
    if scale > 1:
        image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, path)


class ReconstructionGrid(keras.callbacks.Callback):
    """After every epoch, `folder/epoch_NNN.png`: original / masked / reconstructed."""

    def __init__(self, folder, images, removed):
        super().__init__()
        self.folder, self.images, self.removed = folder, images, removed
        os.makedirs(folder, exist_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        save_grid(reconstruction_grid(self.model, self.images, self.removed),
                  os.path.join(self.folder, f"epoch_{epoch + 1:03d}.png"))


def build_fcmae(options, load_weights=True):
    """The FCMAE the options describe, with `--init`'s weights when `load_weights`."""
    import convnext_zoo

    size, init = options["image_size"], options.get("init")
    kind = init_kind(init)
    extra = {"mask_ratio": options["mask_ratio"], "seed": options["seed"]}
    if kind == "fcmae":
        return fcmae.load_fcmae(_fcmae_directory(init), image_size=size, load_weights=load_weights,
                                **extra)
    if kind == "encoder" and load_weights:
        encoder = convnext_zoo.ConvNeXtBackbone.from_preset(init, input_shape=(size, size, 3))
    else:
        encoder = convnext_zoo.create_convnext_v2(options["variant"], include_top=False,
                                                  input_shape=(size, size, 3))
    model = fcmae.FCMAE(encoder, **extra)
    if kind == "official" and load_weights:
        model.load_official_weights(init)
    return model


def make_optimizer(plan):
    """AdamW with the recipe's betas, weight decay and schedule (no decay on biases, norms, GRN)."""
    beta_1, beta_2 = plan["betas"]
    optimizer = keras.optimizers.AdamW(
        learning_rate=training.learning_rate_schedule(plan), weight_decay=plan["weight_decay"],
        beta_1=beta_1, beta_2=beta_2)
    optimizer.exclude_from_weight_decay(var_names=[f"^{name}$" for name in NO_WEIGHT_DECAY])
    return optimizer


def training_plan(options, steps_per_epoch):
    """The official pre-training recipe scaled to this run, with the command's overrides.

    `recipes.scale_pretraining`'s plan for `options["epochs"]` x
    `steps_per_epoch` steps at `options["batch_size"]`; `lr` and
    `warmup_epochs` (None: the recipe's) are passed on, `flip` and
    `crop_scale` (the smallest crop area; None: the recipe's) replace the
    recipe's augmentation.
    """
    plan = recipes.scale_pretraining(epochs=options["epochs"], batch_size=options["batch_size"],
                                     steps_per_epoch=steps_per_epoch, lr=options.get("lr"),
                                     warmup_epochs=options.get("warmup_epochs"))
    if options.get("flip") is not None:
        plan["flip"] = bool(options["flip"])
    if options.get("crop_scale") is not None:
        plan["crop_scale"] = [float(options["crop_scale"]), plan["crop_scale"][1]]
    return plan


def pretrain(options, folder, verbose=1):
    """Runs the FCMAE pre-training that `options` describes on the checked `folder`.

    Args:
        options: dict with `variant`, `output`, `epochs`, `batch_size`,
            `image_size`, `mask_ratio`, `init` (None or see the module
            docstring), `dtype`, `lr` (None: the recipe's scaled rate),
            `warmup_epochs` (None: the recipe's fraction), `flip`,
            `crop_scale` (None: the recipe's smallest crop area), `resume`,
            `overwrite`, `seed`, `distribute` (None or "data").
        folder: `convnext_zoo.finetune_data.scan_unlabelled(...)`.
        verbose: Keras' progress bar setting.

    Returns:
        The log (also written to `OUT_DIR/pretraining_log.json`).
    """
    started = time.perf_counter()
    placement, work = training.begin_run(options, run_identity(options, folder))
    plan = training_plan(options, steps_per_epoch=folder.num_train // options["batch_size"])
    train = _dataset(folder, options, plan)
    preview = preview_images(folder.files, options["image_size"])
    with distribute.distribution_scope(options.get("distribute")):
        model = build_fcmae(options)
        model.compile(optimizer=make_optimizer(plan))
        removed = fixed_masks(model, len(preview), options["seed"])
        epoch_log = training.EpochLog(os.path.join(work, "epochs.json"), options["resume"])
        # Order at an epoch's end: its grid, the backup, then its log record, so
        # that an epoch in the log has its grid and is never trained again.
        callbacks = [keras.callbacks.TerminateOnNaN(),
                     ReconstructionGrid(os.path.join(work, GRID_DIR), preview, removed),
                     keras.callbacks.BackupAndRestore(os.path.join(work, "backup")), epoch_log]
        train_start = time.perf_counter()
        history = model.fit(train, epochs=options["epochs"], callbacks=callbacks, shuffle=False,
                            verbose=verbose)
        train_seconds = time.perf_counter() - train_start
        losses = history.history.get("loss", [])
        if losses and not np.isfinite(losses[-1]):
            shutil.rmtree(work, ignore_errors=True)
            raise FloatingPointError(
                f"The loss became {losses[-1]} in epoch {len(losses)}; nothing was written to "
                f"{options['output']}. Lower --lr (it was {plan['lr']:g}) and rerun.")
        weights = model.get_weights()

    # Written from a float32, single-device copy.
    keras.config.set_dtype_policy("float32")
    export = build_fcmae(options, load_weights=False)
    export.set_weights(weights)
    final_loss = float(keras.ops.convert_to_numpy(export.reconstruction_loss(
        preview, export.decode(export.encode(preview, removed), removed), removed)))
    size = options["image_size"]
    log = {
        "variant": options["variant"], "init": options.get("init"),
        "data_dir": os.path.abspath(folder.train_dir), "num_images": folder.num_train,
        "ignored_files": len(folder.ignored),
        "unreadable_files": [os.path.relpath(p, folder.train_dir) for p in folder.unreadable],
        "image_size": size, "patch_size": export.patch_size, "grid": list(export.grid_shape),
        "mask_ratio": export.mask_ratio, "norm_pix_loss": export.norm_pix_loss,
        "decoder": {"dim": export.decoder_dim, "depth": export.decoder_depth},
        "dtype": options["dtype"] or "float32", "seed": options["seed"],
        "distribute": dict(placement.describe(), per_replica_batch=placement.batch_split(
            options["batch_size"])[1]),
        "plan": plan, "epochs": epoch_log.epochs,
        "final": {"preview_loss": final_loss, "grid": f"{GRID_DIR}/epoch_{options['epochs']:03d}.png"},
        "train_seconds": round(train_seconds, 1),
        "backend": keras.config.backend(), "keras": keras.__version__,
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }
    staged = os.path.join(work, "result")
    shutil.rmtree(staged, ignore_errors=True)
    os.makedirs(staged)
    config = writer.model_config(
        export.encoder, image_size=[size, size],
        preprocessing={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "crop_pct": 1.0,
                       "crop_mode": "squash", "interpolation": "bicubic"},
        base_model=str(options["init"]) if options.get("init") else None,
        provenance={"source_format": "keras",
                    "source": f"convnext-zoo pretrain (FCMAE) of ConvNeXt V2-{options['variant']}"
                              + (f" from {options['init']}" if options.get("init") else "")},
    )
    writer.save_preset(export.encoder, os.path.join(staged, "encoder"), config=config)
    fcmae.save_fcmae(export, os.path.join(staged, "fcmae"),
                     metadata={"family": "v2", "variant": options["variant"], "image_size": size})
    os.replace(os.path.join(work, GRID_DIR), os.path.join(staged, GRID_DIR))
    log["wall_seconds"] = round(time.perf_counter() - started, 1)
    with open(os.path.join(staged, LOG_FILE), "w", encoding="utf-8") as handle:
        json.dump(log, handle, indent=1)
    output = options["output"]
    if os.path.exists(output):  # --overwrite: the old output goes only once the new one is complete
        old = work + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
        os.replace(staged, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, output)
    shutil.rmtree(work, ignore_errors=True)
    return log
