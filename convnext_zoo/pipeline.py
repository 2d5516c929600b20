"""The loading pipeline: resolve -> read -> build -> assign -> attach preprocessing.

Every way in goes through `load` (`convnext_zoo.from_preset`,
`ConvNeXtBackbone.from_preset`, `ConvNeXtImageClassifier.from_preset`)
or through `read_source` and `fill` (`convert_checkpoint`, `verify`, the
publisher). One module per step, each called once, data flowing one way:

* `convnext_zoo.resolve.locate`: the handle -> local files (downloads);
* `convnext_zoo.readers.read`: the files -> a preset config and the
  tensors under Keras names (one reader per format);
* `convnext_zoo.build.build_model`: config + the caller's request -> the
  network, with pending variables;
* `convnext_zoo.weights.assign_strict`: every tensor into its variable,
  with the +/- accounting;
* `convnext_zoo.build.attach_preprocessing`: the evaluation transform.
"""

import logging
import os

from convnext_zoo import build, readers, resolve, weights
from convnext_zoo.checkpoint_io import CheckpointError
from convnext_zoo.internals import initialize_pending

# Keyword arguments of `load` that are not `build.build_model`'s.
_LOCATE = ("force_download", "revision")
logger = logging.getLogger("convnext_zoo")


def read_source(source, source_format="auto", revision=None, force_download=False, **overrides):
    """Steps 1 and 2: a handle -> a `readers.Checkpoint` (no tensor data read yet).

    Args:
        source: anything `resolve.locate` accepts.
        source_format: "auto" or one of `readers.FORMATS`.
        revision, force_download: as in `load`.
        **overrides: `readers.READ_OVERRIDES`.
    """
    located = resolve.locate(source, revision=revision, force_download=force_download)
    return readers.read(located, source_format, **overrides)


def fill(checkpoint, where, backbone_cls, classifier_cls, load_weights=True,
         description=None, **request):
    """Steps 3 and 4: builds the requested network and assigns the checkpoint to it.

    Args:
        checkpoint: a `readers.Checkpoint`.
        where: the preset, named in messages.
        backbone_cls, classifier_cls: the model classes.
        load_weights: `False` builds with fresh weights.
        description: label of the assignment's progress bar.
        **request: `build.build_model`'s keyword arguments.

    Returns:
        The `build.Built`.
    """
    if not load_weights:
        return build.build_model(checkpoint.config, where, backbone_cls, classifier_cls,
                                 load_weights=False, **request)
    # The tensors are read on a loader thread while the model is built.
    with weights.TensorPrefetch(checkpoint.tensors, build.variable_dtype(request.get("dtype")),
                                skip=checkpoint.unused) as prefetch:
        built = build.build_model(checkpoint.config, where, backbone_cls, classifier_cls,
                                  load_weights=True, **request)
        if checkpoint.unused:
            logger.info(
                "%s: %d tensors deliberately unused (not part of the image model): %s%s",
                where, len(checkpoint.unused), ", ".join(checkpoint.unused[:5]),
                " ..." if len(checkpoint.unused) > 5 else "",
            )
        weights.assign_strict(
            weights.keras_variables(built.model), checkpoint.tensors, source=checkpoint.source,
            allow_unused=built.allow_unused + checkpoint.unused,
            allow_unassigned=built.allow_unassigned,
            description=description, prefetch=prefetch,
        )
    # Variables no checkpoint holds (DropPath's random-number state: in
    # `model.variables`, not `model.weights`) take their own initializers.
    initialize_pending(built.model.variables)
    return built


def load(preset, backbone_cls, classifier_cls=None, *, include_top=True, num_classes=None,
         input_shape=None, pooling=None, load_weights=True, dtype=None, force_download=False,
         revision=None, preprocessing=True, **options):
    """A model from a preset handle, with its weights (see `convnext_zoo.from_preset`).

    Args:
        preset: a registered name or alias, `hf://` handle, directory or file.
        backbone_cls, classifier_cls: the model classes to build
            (`classifier_cls` may be `None` when only a backbone is asked for).
        preprocessing: attach the preset's evaluation transform to a
            classifier.
        Others: as `convnext_zoo.from_preset`.

    Returns:
        The model.
    """
    located = resolve.locate(preset, revision=revision, force_download=force_download,
                             download=load_weights)
    try:
        checkpoint = readers.read(located)
        if include_top and num_classes is None and checkpoint.config["head"] == "none":
            # FCMAE encoders (no head) load as backbones unless num_classes asks for one.
            include_top = False
        built = fill(
            checkpoint, preset, backbone_cls, classifier_cls, load_weights=load_weights,
            description=f"Loading {os.path.basename(checkpoint.source)}" if load_weights else None,
            include_top=include_top, num_classes=num_classes, input_shape=input_shape,
            pooling=pooling, dtype=dtype, **options,
        )
    except CheckpointError as error:
        local = located.path or ""
        hint = "" if located.entry is None else " " + resolve.redownload_hint(preset, local)
        raise resolve.PresetDownloadError(
            f"Could not read the checkpoint of preset {preset!r} at {local}: {error}{hint}"
        ) from None
    if preprocessing:
        build.attach_preprocessing(built.model, checkpoint.config, input_shape)
    return built.model
