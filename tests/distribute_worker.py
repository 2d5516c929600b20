"""Runs of `tests/test_distribute.py`, each in its own process (device counts are fixed at start).

    python -m tests.distribute_worker CASE OUT_JSON [ARG...]

The parent sets KERAS_BACKEND and CONVNEXT_ZOO_CPU_DEVICES; the result is
written to OUT_JSON (arrays to OUT_JSON's `.npz` sibling).
"""

import json
import os
import sys

sys.modules.setdefault("triton", None)  # see tests/conftest.py

import numpy as np  # noqa: E402

import keras  # noqa: E402

from convnext_zoo import distribute  # noqa: E402

distribute.configure_cpu_devices()  # before any Keras operation

import convnext_zoo  # noqa: E402
from convnext_zoo import cli, finetune_data, recipes, training, writer  # noqa: E402
from convnext_zoo.finetune import finetune  # noqa: E402
from tests.run_helpers import write_shallow_preset  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from write_digits import write_digits  # noqa: E402


def _options(preset, data, output, distribute_mode, epochs, batch):
    return {
        "preset": preset, "output": output, "epochs": epochs, "batch_size": batch,
        "image_size": 32, "val_split": 0.1, "recipe": None, "lr": 2e-3, "layer_decay": None,
        "dtype": None, "resume": False, "seed": 0, "from_scratch": False,
        # Nothing random in training but the (seeded) shuffle: the runs must agree.
        "overrides": {"drop_path": 0.0, "mixup": 0.0, "cutmix": 0.0, "randaugment": None,
                      "reprob": 0.0, "flip": False},
        "distribute": distribute_mode,
    }


def data_parallel(out, work):
    """Single-device and data-parallel fine-tuning (10 one-step epochs), predict, CLI errors."""
    data = os.path.join(work, "digits")
    # 10 training images and a global batch of 10: each epoch is one step on
    # all of them, whatever order the (seeded) shuffle gives each run.
    write_digits(data, per_class=1)
    folder = finetune_data.scan_images(data)
    preset = write_shallow_preset(os.path.join(work, "shallow"))
    logs = {}
    for mode in (None, "data"):
        # The preset's weights are loaded inside the distribution's scope.
        logs[str(mode)] = finetune(_options(preset, data, os.path.join(work, f"out_{mode}"), mode, 10, 10),
                                   folder, verbose=0)
    images = np.stack([np.asarray(keras.utils.load_img(os.path.join(root, name)))
                       for root, _, names in sorted(os.walk(os.path.join(data, "val")))
                       for name in sorted(names)][:5])
    single = convnext_zoo.from_preset(os.path.join(work, "out_data"))
    expected = np.asarray(single.predict(images, verbose=0))
    with distribute.distribution_scope("data") as placement:
        model = convnext_zoo.from_preset(os.path.join(work, "out_data"))
        predicted = placement.predict(model, images, batch_size=4)
    # A global batch that does not divide: one line, exit 2, nothing written.
    import contextlib
    import io

    stderr = io.StringIO()
    output = os.path.join(work, "cli_out")
    with contextlib.redirect_stderr(stderr):
        status = cli.main(["finetune", "convnext_v2_atto", data, "--output", output,
                           "--from-scratch", "--image-size", "32", "--batch-size", "3",
                           "--distribute", "data", "--verbose", "0"])
    result = {
        "losses": {k: [e["loss"] for e in log["epochs"]] for k, log in logs.items()},
        "final": {k: log["final"] for k, log in logs.items()},
        "distribute": {k: log["distribute"] for k, log in logs.items()},
        "predict_max_diff": float(np.max(np.abs(predicted - expected))),
        "predict_scale": float(np.max(np.abs(expected))),
        "predict_shape": list(predicted.shape),
        "cli": {"status": status, "stderr": stderr.getvalue(),
                "written": sorted(p for p in os.listdir(work) if p.startswith("cli_out"))},
    }
    _write(out, result)


def _photographs(count, size):
    import skimage.data
    from PIL import Image

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
    images = [np.asarray(Image.fromarray(getattr(skimage.data, n)()[..., :3]).resize(
        (size, size), Image.BICUBIC)) for n in names[:count]]
    return np.stack(images).astype("float32") / 127.5 - 1.0


def _spec(variable):
    """The mesh axes a (JAX) variable is sharded over, per dimension; None on one device."""
    spec = getattr(variable.value.sharding, "spec", None)
    if spec is None:
        return None
    return [None if a is None else str(a) for a in spec] + [None] * (len(variable.shape) - len(spec))


def model_parallel_step(out, preset, modes, size="32", batch="2"):
    """One training step of `preset` (random weights) with the recipe's optimizer per mode.

    `modes`: comma-separated "none" (one device) and/or "model"; the results
    go to `OUT_JSON` as `{mode: result}`, the kept weights to `OUT.<mode>.npz`.
    """
    results = {}
    for mode in modes.split(","):
        results[mode] = _one_step(out[:-5] + f".{mode}.npz", preset, mode, int(size), int(batch))
    _write(out, results)


def _one_step(npz, preset, mode, size, batch):
    mode = None if mode == "none" else mode
    keras.utils.set_random_seed(0)
    images = _photographs(batch, size)
    labels = keras.ops.one_hot(np.arange(batch) % 10, 10)
    with distribute.distribution_scope(mode) as placement:
        model = convnext_zoo.from_preset(preset, num_classes=10, input_shape=(size, size, 3),
                                         load_weights=False, preprocessing=False)
        family = "v2" if model.backbone.use_grn else "v1"
        variant = writer.model_config(model)["variant"]
        plan = recipes.scale_recipe("v1_in1k", variant, epochs=1, batch_size=batch,
                                    steps_per_epoch=1, lr=1e-3, family=family, drop_path=0.0)
        plan["warmup_steps"] = 0
        model.compile(optimizer=training.make_optimizer(model, plan),
                      loss=training.make_loss(plan), metrics=[])
        sharding = {v.path: _spec(v) for v in model.weights}
        loss = float(model.train_on_batch(images, labels))
        slots = {v.path: _spec(v) for v in model.optimizer.variables
                 if v.path.endswith(("fc1_kernel_momentum", "head_fc_kernel_velocity"))}
        kept = [v for v in model.weights if v.path.endswith("kernel")]
        # A subset for the large variants: the stem, one block's MLP, the head.
        if len(kept) > 40:
            kept = [v for v in kept if v.path.startswith(("stem_", "stages_2_blocks_0_mlp",
                                                          "head_fc"))]
        np.savez(npz, **{v.path.replace("/", "__"): np.asarray(v.value) for v in kept})
    return {"loss": loss, "sharding": sharding, "slots": slots, "placement": placement.describe()}


def _write(path, result):
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    case, out, *args = sys.argv[1:]
    {"data_parallel": data_parallel, "model_parallel_step": model_parallel_step}[case](out, *args)
