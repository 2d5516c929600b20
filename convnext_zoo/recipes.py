"""The official ConvNeXt V1 / V2 training and fine-tuning recipes, as data, and their scaling.

Every recipe is a hyperparameter set published by the authors, with the
file it comes from. Learning rates are stored per 256 images (the official
linear scaling rule, `lr = base_lr * batch / 256`, as ConvNeXt-V2's
`main_finetune.py` computes from `--blr`; V1's commands give absolute rates
at an effective batch, converted here). `scale_recipe` turns a recipe into
the numbers of one run: the learning rate for the user's batch, warmup and
EMA horizon as the same fractions of the user's (much shorter) training.

Pure Python (no Keras): the command line validates `--recipe` before Keras
loads.

Sources (read at these commits):
    V1: facebookresearch/ConvNeXt TRAINING.md (f8a0e972), main.py and
        optim_factory.py (`get_num_layer_for_convnext`, 12 groups).
    V2: facebookresearch/ConvNeXt-V2 TRAINING.md (d7cc26f7), main_finetune.py
        (defaults: min_lr 1e-6, EMA decay 0.9999, head_init_scale 0.001,
        smoothing 0.1, reprob 0.25, RandAugment rand-m9-mstd0.5-inc1) and
        optim_factory.py (`get_num_layer_for_convnext_single` and the
        12-group function; `.gamma` / `.beta` excluded from weight decay).
"""

import copy
import difflib

IMAGENET_TRAIN_IMAGES = 1_281_167
V1_TRAINING = "https://github.com/facebookresearch/ConvNeXt/blob/main/TRAINING.md"
V2_TRAINING = "https://github.com/facebookresearch/ConvNeXt-V2/blob/main/TRAINING.md"

# Defaults shared by both repositories' argument parsers.
_COMMON = {
    "optimizer": "adamw",
    "min_lr": 1e-6,
    "smoothing": 0.1,
    "reprob": 0.25,
    "randaugment": {"num_ops": 2, "magnitude": 9},  # rand-m9-mstd0.5-inc1
    "flip": True,
    "ema_decay": 0.9999,
}

RECIPES = {
    # Supervised ImageNet-1k training from random weights (the V1 paper's
    # recipe; lr 4e-3 at an effective batch of 4096).
    "v1_in1k": {
        **_COMMON,
        "family": "v1",
        "description": "ImageNet-1k training from scratch (V1 paper, 300 epochs)",
        "source": V1_TRAINING + "#imagenet-1k-training",
        "from_scratch": True,
        "base_lr": 4e-3 * 256 / 4096,
        "reference_batch": 4096,
        "epochs": 300,
        "warmup_epochs": 20,
        "weight_decay": 0.05,
        "layer_decay": 1.0,
        "layer_decay_type": "group",
        "drop_path": {"tiny": 0.1, "small": 0.4, "base": 0.5, "large": 0.5},
        "mixup": 0.8,
        "cutmix": 1.0,
        "ema": True,
        "head_init_scale": 1.0,
    },
    # ImageNet-22k pre-trained -> ImageNet-1k at 224 (lr 5e-5 at 2x8x32 = 512).
    "v1_in22k_ft_in1k": {
        **_COMMON,
        "family": "v1",
        "description": "fine-tuning of ImageNet-22k weights on ImageNet-1k at 224 (30 epochs)",
        "source": V1_TRAINING + "#fine-tune-from-imagenet-22k-pre-training",
        "from_scratch": False,
        "base_lr": 5e-5 * 256 / 512,
        "reference_batch": 512,
        "epochs": 30,
        "warmup_epochs": 0,
        "weight_decay": 1e-8,
        "layer_decay": 0.8,
        "layer_decay_type": "group",
        "drop_path": {"base": 0.2, "large": 0.3, "xlarge": 0.4},
        "mixup": 0.0,
        "cutmix": 0.0,
        "ema": {"xlarge": True},
        "head_init_scale": 0.001,
    },
    # ImageNet-1k weights at 224 -> 384 px (lr 5e-5 at 2x8x32 = 512).
    "v1_in1k_ft_384": {
        **_COMMON,
        "family": "v1",
        "description": "fine-tuning of ImageNet-1k weights at 384 px (30 epochs)",
        "source": V1_TRAINING + "#finetune-from-imagenet-1k-pre-training",
        "from_scratch": False,
        "base_lr": 5e-5 * 256 / 512,
        "reference_batch": 512,
        "epochs": 30,
        "warmup_epochs": 0,
        "weight_decay": 1e-8,
        "layer_decay": 0.7,
        "layer_decay_type": "group",
        "drop_path": {"base": 0.8, "large": 0.95},
        "mixup": 0.0,
        "cutmix": 0.0,
        "ema": False,
        "head_init_scale": 0.001,
    },
    # FCMAE encoder -> ImageNet-1k (effective batch 4x8x32 = 1024, --blr given).
    "v2_fcmae_ft_in1k": {
        **_COMMON,
        "family": "v2",
        "description": "fine-tuning of FCMAE encoders (or any V2 weights) on ImageNet-1k",
        "source": V2_TRAINING + "#imagenet-1k-fine-tuning",
        "from_scratch": False,
        "base_lr": {"atto": 2e-4, "tiny": 8e-4, "base": 6.25e-4},
        "reference_batch": 1024,
        "epochs": {"atto": 600, "tiny": 300, "base": 100},
        "warmup_epochs": {"atto": 0, "tiny": 40, "base": 20},
        "weight_decay": {"atto": 0.3, "tiny": 0.05, "base": 0.05},
        "layer_decay": {"atto": 0.9, "tiny": 0.9, "base": 0.6},
        "layer_decay_type": {"atto": "single", "tiny": "single", "base": "group"},
        "drop_path": {"atto": 0.1, "tiny": 0.2, "base": 0.1},
        "mixup": {"atto": 0.0, "tiny": 0.8, "base": 0.8},
        "cutmix": {"atto": 0.0, "tiny": 1.0, "base": 1.0},
        "smoothing": {"atto": 0.2, "tiny": 0.1, "base": 0.1},
        "ema": True,
        "head_init_scale": 0.001,
    },
}

# Not an official recipe: the published ones assume ImageNet (1.28 M images,
# batch 4096, 300 epochs; v1_in1k scaled to batch 32 gives lr 3.1e-5 and
# augmentation strong enough to stall a model trained on a few thousand
# images). This is the run measured on scikit-learn's 1,797 digits from
# random weights (benchmarks/results/finetune: 99.7 % held-out accuracy):
# a higher rate, light regularisation, no MixUp / CutMix / RandAugment /
# random erasing and no flips (small from-scratch sets are often digits,
# characters or other shapes a mirror changes; `--flip` turns them on).
RECIPES["small_from_scratch"] = {
    **_COMMON,
    "family": "v2",
    "description": "training from random weights on a small dataset (this package's, 40 epochs)",
    "source": "benchmarks/results/finetune (convnext_zoo; measured on the scikit-learn digits)",
    "from_scratch": True,
    "base_lr": 2e-3 * 256 / 32,
    "reference_batch": 32,
    "reference_images": 1437,  # the digits' training split
    "epochs": 40,
    "default_epochs": 40,
    "warmup_epochs": 3,
    "weight_decay": 0.05,
    "layer_decay": 1.0,
    "layer_decay_type": "group",
    "drop_path": 0.1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "randaugment": None,
    "reprob": 0.0,
    "flip": False,
    "min_lr": 5e-7,
    "ema": True,
    "ema_decay": 0.995,
    "head_init_scale": 1.0,
}

# FCMAE pre-training (ConvNeXt-V2 TRAINING.md, "ImageNet-1K FCMAE
# Pre-Training", and main_pretrain.py's defaults): 8 nodes x 8 GPUs x 64 =
# an effective batch of 4096, --blr 1.5e-4, 1600 epochs (V2-Base; 800 is
# main_pretrain.py's default), 40 warmup epochs, then a half-cycle cosine to
# min_lr 0; AdamW betas (0.9, 0.95), weight decay 0.05; RandomResizedCrop
# (scale 0.2-1.0, bicubic) and horizontal flips; mask ratio 0.6,
# norm_pix_loss, decoder 512 wide and 1 block deep, 224 px.
V2_PRETRAINING = V2_TRAINING + "#imagenet-1k-fcmae-pre-training"
FCMAE_PRETRAINING = {
    "description": "FCMAE masked pre-training (ConvNeXt V2, ImageNet-1k)",
    "source": V2_PRETRAINING,
    "base_lr": 1.5e-4,
    "reference_batch": 4096,
    "epochs": 1600,
    "warmup_epochs": 40,
    "min_lr": 0.0,
    "weight_decay": 0.05,
    "betas": (0.9, 0.95),
    "crop_scale": (0.2, 1.0),
    "crop_ratio": (3 / 4, 4 / 3),
    "flip": True,
    "mask_ratio": 0.6,
    "norm_pix_loss": True,
    "decoder_dim": 512,
    "decoder_depth": 1,
    "image_size": 224,
}


def scale_pretraining(*, epochs, batch_size, steps_per_epoch, lr=None, warmup_epochs=None):
    """The numbers of one FCMAE pre-training run from `FCMAE_PRETRAINING`.

    The learning rate follows the linear scaling rule (`base_lr * batch /
    256`, as main_pretrain.py computes it from --blr) unless `lr` is given;
    the warmup is the recipe's fraction of training (40 of 1600 epochs)
    unless `warmup_epochs` is given.

    Returns:
        A JSON-serialisable dict with `lr`, `min_lr`, `warmup_steps`,
        `total_steps`, `weight_decay`, `betas`, the augmentation and the
        recipe it came from; `training.learning_rate_schedule` reads it.

    Example:
        >>> plan = scale_pretraining(epochs=10, batch_size=64, steps_per_epoch=20)
        >>> plan["lr"], plan["warmup_steps"]
        (3.75e-05, 5)
    """
    recipe = copy.deepcopy(FCMAE_PRETRAINING)
    if epochs < 1 or batch_size < 1 or steps_per_epoch < 1:
        raise ValueError(
            f"epochs, batch_size and steps_per_epoch must be >= 1. Received: {epochs}, "
            f"{batch_size}, {steps_per_epoch}."
        )
    total = epochs * steps_per_epoch
    if warmup_epochs is None:
        warmup = int(round(recipe["warmup_epochs"] / recipe["epochs"] * total))
    else:
        warmup = min(int(round(warmup_epochs * steps_per_epoch)), total)
    peak = float(lr) if lr is not None else recipe["base_lr"] * batch_size / 256
    return {
        "recipe": "fcmae_pretraining",
        "description": recipe["description"],
        "source": recipe["source"],
        "lr": peak,
        "lr_from": "--lr" if lr is not None else f"base_lr {recipe['base_lr']:g} x {batch_size} / 256",
        "min_lr": recipe["min_lr"],
        "warmup_steps": warmup,
        "total_steps": total,
        "epochs": epochs,
        "batch_size": batch_size,
        "weight_decay": recipe["weight_decay"],
        "betas": list(recipe["betas"]),
        "crop_scale": list(recipe["crop_scale"]),
        "crop_ratio": list(recipe["crop_ratio"]),
        "flip": recipe["flip"],
        "reference": {"epochs": recipe["epochs"], "batch": recipe["reference_batch"],
                      "base_lr": recipe["base_lr"], "warmup_epochs": recipe["warmup_epochs"]},
    }


# Runs shorter than any official recipe: `--epochs` without a value.
DEFAULT_EPOCHS = 10

# Variants a recipe does not list take the values of the nearest listed one
# (said in the scaled plan as `values_from`).
_NEAREST = {
    "v1": {"tiny": ("tiny", "small", "base"), "small": ("small", "tiny", "base"),
           "base": ("base", "large"), "large": ("large", "base"),
           "xlarge": ("xlarge", "large", "base")},
    "v2": {"atto": ("atto",), "femto": ("atto",), "pico": ("atto",), "nano": ("atto", "tiny"),
           "tiny": ("tiny",), "base": ("base",), "large": ("base",), "huge": ("base",)},
}

PER_VARIANT = ("base_lr", "epochs", "warmup_epochs", "weight_decay", "layer_decay",
               "layer_decay_type", "drop_path", "mixup", "cutmix", "smoothing", "ema")


def default_recipe(family, from_scratch):
    """The recipe `finetune` uses without `--recipe`."""
    if from_scratch:
        # v1_in1k, the only published supervised recipe from random weights,
        # needs ImageNet's scale; a user's folder is small.
        return "small_from_scratch"
    return "v1_in22k_ft_in1k" if family == "v1" else "v2_fcmae_ft_in1k"


def default_epochs(name=None, from_scratch=False):
    """Epochs of a run without `--epochs`: the recipe's `default_epochs`, else 10."""
    name = name or default_recipe("v2", from_scratch)
    return get_recipe(name).get("default_epochs", DEFAULT_EPOCHS)


def get_recipe(name):
    """A copy of a recipe, or a ValueError listing the valid names."""
    if name not in RECIPES:
        close = difflib.get_close_matches(str(name), RECIPES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown recipe {name!r}.{hint} Valid: {', '.join(RECIPES)}.")
    return copy.deepcopy(RECIPES[name])


def recipe_for_variant(name, variant, family=None):
    """The recipe's values for one variant: `(values, values_from)`.

    Per-variant fields (dicts keyed by variant) are resolved; a variant the
    recipe does not list takes the nearest listed one's values.
    """
    recipe = get_recipe(name)
    family = family or recipe["family"]
    values_from = variant
    for field in PER_VARIANT:
        table = recipe.get(field)
        if not isinstance(table, dict):
            continue
        choices = [v for v in _NEAREST[family].get(variant, (variant,)) if v in table]
        pick = choices[0] if choices else None
        if pick is None:
            # e.g. `ema` listed only for xlarge: False elsewhere.
            recipe[field] = False if field == "ema" else list(table.values())[0]
            continue
        recipe[field] = table[pick]
        if pick != variant:
            values_from = pick
    recipe["values_from"] = values_from
    return recipe


def scale_recipe(name, variant, *, epochs, batch_size, steps_per_epoch, lr=None,
                 layer_decay=None, family=None, **overrides):
    """The numbers of one run from a recipe.

    Args:
        name: a key of `RECIPES`.
        variant: the model variant ("atto", "tiny", ...).
        epochs, batch_size, steps_per_epoch: the user's run.
        lr: an absolute peak learning rate instead of `base_lr * batch / 256`.
        layer_decay: instead of the recipe's.
        family: "v1" / "v2" of the model (decides the layer ids).
        **overrides: any other plan field (`mixup`, `cutmix`, `smoothing`,
            `drop_path`, `randaugment`, `flip`, `weight_decay`, `ema`, `reprob`,
            `head_init_scale`).

    Returns:
        A JSON-serialisable dict: `lr`, `min_lr`, `warmup_steps`,
        `total_steps`, `ema_decay`, and the augmentation and regularisation
        values.

    Example:
        >>> plan = scale_recipe("v2_fcmae_ft_in1k", "atto", epochs=10,
        ...                     batch_size=32, steps_per_epoch=45)
        >>> round(plan["lr"], 8)
        2.5e-05
    """
    recipe = recipe_for_variant(name, variant, family)
    if epochs < 1 or batch_size < 1 or steps_per_epoch < 1:
        raise ValueError(
            f"epochs, batch_size and steps_per_epoch must be >= 1. Received: {epochs}, "
            f"{batch_size}, {steps_per_epoch}."
        )
    unknown = sorted(set(overrides) - {"mixup", "cutmix", "smoothing", "drop_path", "randaugment", "flip",
                                       "weight_decay", "ema", "reprob", "head_init_scale"})
    if unknown:
        raise TypeError(f"Unknown recipe overrides: {', '.join(unknown)}.")
    scaled_lr = recipe["base_lr"] * batch_size / 256
    peak_lr = float(lr) if lr is not None else scaled_lr
    total_steps = epochs * steps_per_epoch
    fraction = recipe["warmup_epochs"] / recipe["epochs"]
    # The EMA averages over the same fraction of training as in the recipe
    # (1 / (1 - decay) steps of the reference run's steps), bounded so a
    # short run still averages a few steps and never more than the recipe.
    reference_steps = (recipe["epochs"] * recipe.get("reference_images", IMAGENET_TRAIN_IMAGES)
                       / recipe["reference_batch"])
    horizon = max(total_steps * (1 / (1 - recipe["ema_decay"])) / reference_steps, 10.0)
    ema_decay = min(1 - 1 / horizon, recipe["ema_decay"])
    plan = {
        "recipe": name,
        "description": recipe["description"],
        "source": recipe["source"],
        "values_from": recipe["values_from"],
        "family": family or recipe["family"],
        "lr": peak_lr,
        "lr_from": "--lr" if lr is not None else f"base_lr {recipe['base_lr']:g} x {batch_size} / 256",
        "min_lr": recipe["min_lr"] * peak_lr / (recipe["base_lr"] * recipe["reference_batch"] / 256),
        "warmup_steps": int(round(fraction * total_steps)),
        "total_steps": total_steps,
        "epochs": epochs,
        "batch_size": batch_size,
        "weight_decay": recipe["weight_decay"],
        "layer_decay": float(layer_decay if layer_decay is not None else recipe["layer_decay"]),
        "layer_decay_type": recipe["layer_decay_type"],
        "drop_path": recipe["drop_path"],
        "mixup": recipe["mixup"],
        "cutmix": recipe["cutmix"],
        "smoothing": recipe["smoothing"],
        "randaugment": recipe["randaugment"],
        "flip": recipe["flip"],
        "reprob": recipe["reprob"],
        "ema": bool(recipe["ema"]),
        "ema_decay": ema_decay,
        "head_init_scale": recipe["head_init_scale"],
        "reference": {"epochs": recipe["epochs"], "batch": recipe["reference_batch"],
                      "base_lr": recipe["base_lr"], "ema_decay": recipe["ema_decay"]},
    }
    plan.update(overrides)
    return plan
