"""A ConvNeXt training step on TensorFlow with and without the layer norm's training form.

On the TensorFlow backend, `PointwiseLayerNorm` called with `training=True`
takes a form of its own (`convnext_zoo.layers._training_layer_norm`: rsqrt
and the layer norm's closed-form gradient) where TensorFlow would otherwise
differentiate the inference form (`_short_layer_norm`). This builds one
model per form from the same seed, each compiled as bench_train.py does
(`training.make_optimizer`'s AdamW, cross-entropy on logits) and traced with
its form, then alternates `train_on_batch` steps round by round in the same
process and prints median seconds and ratios:

    python benchmarks/tf_step_forms.py --model v2_atto --rounds 12
    python benchmarks/tf_step_forms.py --model v1_tiny --rounds 5 --output /tmp/forms.json

`tensorflow`: TensorFlow's own gradient of the inference form; `library`:
the package as it is. Before timing, the two gradients of one batch (same
weights) are compared. The batch is 32 scikit-image photographs
(bench_train.py's). For steadier figures give the process jemalloc, as
`bench_train.py --allocator jemalloc` does.
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_cpu  # noqa: E402  (thread settings)
import bench_train  # noqa: E402  (the batch, the optimizer plan)
import workers  # noqa: E402  (machine facts, alternated rounds)

# name: whether the layer norm takes its training form
FORMS = {"tensorflow": False, "library": True}


def traced_forms(model_name, batch, size):
    """`{form: (model, gradients of one batch, first step s)}`, each traced with its form."""
    import keras
    import tensorflow as tf

    import convnext_zoo
    from convnext_zoo import layers, training

    family, variant = model_name.split("_")
    create = convnext_zoo.create_convnext_v1 if family == "v1" else convnext_zoo.create_convnext_v2
    images = tf.constant(bench_train.photo_batch(batch, size))
    labels = tf.constant(bench_train.labels(batch))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    library = layers._training_layer_norm
    forms = {}
    try:
        for name, training_form in FORMS.items():
            layers._training_layer_norm = library if training_form else layers._short_layer_norm
            keras.utils.set_random_seed(0)
            model = create(variant, num_classes=1000, input_shape=(size, size, 3), adapt_small_inputs=False)
            model.compile(optimizer=training.make_optimizer(model, bench_train._optimizer_plan()), loss=loss)

            @tf.function(autograph=False)
            def gradient(model=model):
                with tf.GradientTape() as tape:
                    value = loss(labels, model(images, training=True))
                return tape.gradient(value, model.trainable_variables)

            gradients = [g.numpy() for g in gradient()]  # traced now, with this form
            start = time.perf_counter()
            model.train_on_batch(images, labels)  # the train function, traced now
            forms[name] = (model, gradients, time.perf_counter() - start)
    finally:
        layers._training_layer_norm = library
    return forms, images, labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="v2_atto", help="v2_atto, v1_tiny, v2_tiny, ...")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=8, help="timed steps per form, alternated")
    p.add_argument("--output", default=None, help="a JSON file for the results")
    args = p.parse_args(argv)
    bench_cpu._set_thread_env(args.threads)
    import keras

    if keras.config.backend() != "tensorflow":
        sys.exit("tf_step_forms.py times a TensorFlow training form: run it with KERAS_BACKEND=tensorflow. "
                 f"Received: backend={keras.config.backend()!r}.")
    import tensorflow as tf

    from convnext_zoo.internals import onednn_enabled

    bench_cpu._tf_threads(args.threads)
    facts = workers.machine()
    allocator = workers.allocator()
    print(f"Machine: {facts['cpu']}, AVX-512 {'yes' if facts['avx512'] else 'no'}, {facts['cpu_count']} cores, "
          f"load average at start {facts['load_average_at_start']}, allocator {allocator}, "
          f"TensorFlow {tf.__version__}, oneDNN {'on' if onednn_enabled() else 'off'}, {args.threads} threads")
    forms, images, labels = traced_forms(args.model, args.batch, args.image_size)
    # Both compute the same gradient: the library's largest difference from TensorFlow's own, relative to the
    # largest value of that variable's gradient.
    reference = forms["tensorflow"][1]
    differences = {name: max(float(abs(a - b).max()) / max(float(abs(b).max()), 1e-30)
                             for a, b in zip(gradients, reference))
                   for name, (_, gradients, _) in forms.items()}
    for model, _, _ in forms.values():
        # Untimed: a train function traced before another model was built traces once more at its next call.
        model.train_on_batch(images, labels)

    def step_seconds(name):
        start = time.perf_counter()
        forms[name][0].train_on_batch(images, labels)
        return time.perf_counter() - start

    times = workers.alternate(step_seconds, forms, args.rounds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    # Per round, the tensorflow form's time over this form's: the median of those ratios.
    ratios = {name: statistics.median(a / b for a, b in zip(times["tensorflow"], t)) for name, t in times.items()}
    print(f"{args.model}, batch {args.batch}, {args.image_size} px, train_on_batch, median of {args.rounds}:")
    for name, median in medians.items():
        print(f"  {name:10s} {median:7.3f} s   tensorflow / {name} {ratios[name]:.2f}x (per round)   "
              f"first step {forms[name][2]:.1f} s   max gradient difference {differences[name]:.1e}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"machine": facts, "allocator": allocator, "onednn": onednn_enabled(), "args": vars(args),
                       "seconds": times, "median_s": medians, "speedup_per_round": ratios,
                       "max_relative_difference": differences}, f, indent=1)


if __name__ == "__main__":
    main()
