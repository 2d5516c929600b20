"""Checks a folder of images before any training starts (no Keras), and the run's work folder.

`scan_images` reads the layout (class sub-folders, optionally `train/` and
`val/`), opens every image with PIL, and raises `DataError` with one line
that names the problem and the fix: an empty folder, a single class, an
empty class folder, more than a few unreadable image files (a few are left
out with a warning), validation classes that differ from the training
classes. Files that are not images by their extension are
counted and left out (as `image_dataset_from_directory` does).
`scan_unlabelled` is the same check for pre-training: every image under the
folder, at any depth, labels (folder names) ignored.

`start_work` / `check_identity`: a run works in `OUT_DIR.partial/`, whose
`run.json` records the settings a `--resume` must share.
"""

import json
import os
import shutil

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # image_dataset_from_directory's
_LIST = 3
_TOLERATED = 3  # unreadable files skipped with a warning (or 1 % of the images if more)
RUN_FILE = "run.json"


class DataError(ValueError):
    """The data folder cannot be trained on as it is."""


class ImageFolder:
    """What `scan_images` found.

    Attributes:
        train_dir, val_dir: the folders of class sub-folders (`val_dir` None
            when a split of `train_dir` is the validation set).
        class_names: sorted class folder names.
        counts: `{class name: training images}`.
        num_train, num_val: image counts (`num_val` of `val_dir`, else 0).
        ignored: files left out (not images by their extension).
        unreadable: image files PIL cannot open, left out (a few are
            tolerated: `tolerated_unreadable`).
        modes: PIL modes seen (e.g. {"L", "RGBA"}): converted to RGB.
        max_side: the largest width or height of any image (0 unchecked).
    """

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _class_images(directory):
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    images, ignored = {}, []
    for name in classes:
        files = []
        for root, _, names in os.walk(os.path.join(directory, name)):
            for file in sorted(names):
                path = os.path.join(root, file)
                (files if file.lower().endswith(IMAGE_EXTENSIONS) else ignored).append(path)
        images[name] = files
    return images, ignored


def _check_readable(paths, modes, sizes):
    """The paths PIL cannot open; records the modes and the largest side seen."""
    from PIL import Image, UnidentifiedImageError

    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                modes.add(image.mode)
                sizes.append(max(image.size))
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            bad.append(path)
    return bad


def tolerated_unreadable(num_images):
    """How many unreadable files a run skips before refusing: a few, or 1 %."""
    return max(_TOLERATED, num_images // 100)


def _refuse_unreadable(bad, num_images):
    if len(bad) > tolerated_unreadable(num_images):
        shown = ", ".join(bad[:_LIST]) + (f" and {len(bad) - _LIST} more" if len(bad) > _LIST else "")
        raise DataError(
            f"{len(bad)} of {num_images} image files cannot be read: {shown}. Delete or replace "
            f"them (up to {tolerated_unreadable(num_images)} are skipped with a warning)."
        )


def scan_images(data_dir, check_files=True):
    """Checks `data_dir` and returns an `ImageFolder`.

    Args:
        data_dir: a folder of class sub-folders, or one with `train/` and
            `val/` folders of class sub-folders.
        check_files: open every image (PIL) to find unreadable ones.

    Raises:
        DataError: one line naming the problem and the fix.
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"No such data folder: {data_dir}. Pass a folder of class sub-folders.")
    train_dir, val_dir = data_dir, None
    if os.path.isdir(os.path.join(data_dir, "val")):
        val_dir = os.path.join(data_dir, "val")
        if os.path.isdir(os.path.join(data_dir, "train")):
            train_dir = os.path.join(data_dir, "train")
    images, ignored = _class_images(train_dir)
    if val_dir is not None and train_dir == data_dir:
        images.pop("val", None)
    if not images or not any(images.values()):
        raise DataError(
            f"No images in {train_dir}: expected one sub-folder per class holding "
            f"{', '.join(IMAGE_EXTENSIONS)} files (e.g. {train_dir}/cat/1.jpg, {train_dir}/dog/2.jpg)."
        )
    empty = [name for name, files in images.items() if not files]
    if empty:
        raise DataError(
            f"Class folder(s) without images in {train_dir}: {', '.join(empty[:_LIST])}. "
            "Add images or remove the folder(s)."
        )
    if len(images) < 2:
        raise DataError(
            f"Only one class ({next(iter(images))!r}) in {train_dir}: a classifier needs at least two "
            "class sub-folders."
        )
    modes, sizes, unreadable = set(), [], []
    num_val = 0
    if val_dir is not None:
        val_images, val_ignored = _class_images(val_dir)
        ignored += val_ignored
        if sorted(val_images) != sorted(images):
            raise DataError(
                f"The classes of {val_dir} ({', '.join(sorted(val_images)) or 'none'}) differ from "
                f"the training classes ({', '.join(sorted(images))}). Use the same class folders."
            )
        num_val = sum(len(v) for v in val_images.values())
        if num_val == 0:
            raise DataError(f"No images in {val_dir}. Add validation images or remove the folder.")
        if check_files:
            bad = _check_readable([p for v in val_images.values() for p in v], modes, sizes)
            _refuse_unreadable(bad, num_val)
            unreadable += bad
            num_val -= len(bad)
    num_train = sum(len(v) for v in images.values())
    if check_files:
        bad = _check_readable([p for v in images.values() for p in v], modes, sizes)
        _refuse_unreadable(bad, num_train)
        unreadable += bad
        num_train -= len(bad)
        emptied = [name for name, files in images.items() if not set(files) - set(bad)]
        if emptied:
            raise DataError(
                f"Class folder(s) with no readable image in {train_dir}: {', '.join(emptied[:_LIST])}. "
                "Replace the unreadable files or remove the folder(s)."
            )
    return ImageFolder(
        train_dir=train_dir, val_dir=val_dir, class_names=sorted(images),
        counts={k: len([p for p in v if p not in unreadable]) for k, v in images.items()},
        num_train=num_train, num_val=num_val, ignored=ignored, unreadable=unreadable,
        modes=modes, max_side=max(sizes, default=0),
    )


def scan_unlabelled(data_dir, check_files=True):
    """Checks `data_dir` for pre-training: every image in it or in any sub-folder.

    Returns:
        An `ImageFolder` with `files` (the readable images, sorted) and
        `class_names` empty.

    Raises:
        DataError: a missing folder, no images, or more than a few
            unreadable ones.
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"No such data folder: {data_dir}. Pass a folder of images (sub-folders allowed).")
    files, ignored = [], []
    for root, dirs, names in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(names):
            path = os.path.join(root, file)
            (files if file.lower().endswith(IMAGE_EXTENSIONS) else ignored).append(path)
    if not files:
        raise DataError(
            f"No images in {data_dir} or its sub-folders: expected {', '.join(IMAGE_EXTENSIONS)} "
            f"files (e.g. {data_dir}/1.jpg or {data_dir}/any/folder/2.png)."
        )
    modes, sizes, bad = set(), [], []
    if check_files:
        bad = _check_readable(files, modes, sizes)
        _refuse_unreadable(bad, len(files))
    readable = [p for p in files if p not in set(bad)]
    return ImageFolder(
        train_dir=data_dir, val_dir=None, class_names=[], files=readable, counts={},
        num_train=len(readable), num_val=0, ignored=ignored, unreadable=bad, modes=modes,
        max_side=max(sizes, default=0),
    )


def readable_view(folder, root):
    """`folder` without its unreadable files, for `image_dataset_from_directory`.

    Returns `(train_dir, val_dir)`: the original folders when every image is
    readable, else trees of symbolic links to the readable images under
    `root` (Keras reads a directory as it is and fails mid-run on a bad file).
    """
    if not folder.unreadable:
        return folder.train_dir, folder.val_dir
    skip = set(folder.unreadable)
    views = []
    for name, source in (("train", folder.train_dir), ("val", folder.val_dir)):
        if source is None:
            views.append(None)
            continue
        target = os.path.join(root, name)
        shutil.rmtree(target, ignore_errors=True)
        for class_name in folder.class_names:
            for dirpath, _, names in os.walk(os.path.join(source, class_name)):
                relative = os.path.relpath(dirpath, source)
                for file in names:
                    path = os.path.join(dirpath, file)
                    if path in skip or not file.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    os.makedirs(os.path.join(target, relative), exist_ok=True)
                    os.symlink(os.path.abspath(path), os.path.join(target, relative, file))
        views.append(target)
    return tuple(views)


class ResumeError(ValueError):
    """`--resume` of a run with other settings."""


def work_dir(output_dir):
    return os.path.normpath(output_dir) + ".partial"


def run_identity(options, folder):
    """The settings a resumed run must share with the interrupted one."""
    keys = ("preset", "recipe", "image_size", "batch_size", "epochs", "from_scratch", "dtype",
            "lr", "layer_decay", "seed", "val_split", "overrides")
    identity = {k: options[k] for k in keys}
    identity["distribute"] = options.get("distribute")  # None: one device
    identity["class_names"] = list(folder.class_names)
    return identity


def check_resume(options, folder):
    """Raises ResumeError unless `--resume` matches the interrupted run (no Keras)."""
    check_identity(options["output"], run_identity(options, folder))


def start_work(output_dir, resume, identity):
    """The work folder of a run: kept on `resume`, else made afresh; `run.json` written."""
    work = work_dir(output_dir)
    if not resume and os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, RUN_FILE), "w", encoding="utf-8") as handle:
        json.dump(identity, handle, indent=1)
    return work


def check_identity(output_dir, identity):
    """Raises ResumeError unless the interrupted run in `OUT_DIR.partial` had `identity`."""
    work = work_dir(output_dir)
    path = os.path.join(work, RUN_FILE)
    if not os.path.exists(path):
        raise ResumeError(
            f"Nothing to resume: {work} holds no interrupted run. Run without --resume."
        )
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    current = json.loads(json.dumps(identity))
    differing = [k for k in current if saved.get(k) != current[k]]
    if differing:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in differing[:3])
        raise ResumeError(
            f"--resume of another run ({shown}). Rerun with the interrupted run's settings, "
            f"or delete {work} to start afresh."
        )
