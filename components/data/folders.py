"""Image folders: discovery and validation, then the split (`components.data.split`).

A folder is either `<class>/<image>` (split here by each image's content hash)
or `train/<class>/<image>` plus `val/<class>/<image>` and/or `test/<class>/<image>`; a class folder's
subfolders count as that class (hidden ones do not). Every problem is reported
with the path at fault and what to do about it, before any training starts.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from components.core.errors import DataError
from components.core.files import file_md5
from components.data.images import IMAGE_EXTENSIONS, MAX_PIXELS
from components.data.split import PARTS, Sample, Split, SplitSettings, carve, check_parts, hash_split
from components.data.versions import dvc_file_for

log = logging.getLogger(__name__)

MAX_LISTED = 20
"""Unreadable files named in one error; the rest are counted."""


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _check_inside(path: Path, root: Path) -> None:
    if not path.resolve().is_relative_to(root.resolve()):
        raise DataError(f"{path}: a link to {path.resolve()}, outside the data folder {root}; copy the file in instead")


def _verify(path: Path) -> None:
    """Decode the file once (JPEGs at reduced scale), so corrupt or truncated files fail here, not mid-run."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); replace or remove it")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise DataError(f"{path}: claims {width}x{height} pixels, over the {MAX_PIXELS:,} limit; resize or remove it")
            image.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale; still reads every byte
            image.load()
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused before decoding, a possible decompression bomb ({exc}); resize or remove it") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc}); replace or remove the file") from exc


def _images_in(folder: Path) -> list[Path]:
    """Every image in a class folder, in its subfolders too (a new batch added as `cats/2026-12/`, as torchvision's
    ImageFolder reads them), sorted; hidden files and folders (`.ipynb_checkpoints`, `.thumbnails`) are left out."""
    return sorted(p for p in folder.rglob("*") if _is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _warn_about_other_files(root: Path, folders: list[Path]) -> None:
    """One warning naming the files in the class folders that are not read: a `.heic` photo left out without a word
    would be a class smaller than the user thinks (hidden files, `.DS_Store` and the like, are not counted)."""
    others = sorted(p for folder in folders for p in folder.rglob("*")
                    if p.is_file() and not _is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if others:
        shown = ", ".join(str(p.relative_to(root)) for p in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        log.warning("%d files in %s are not images Graft reads, so they are left out: %s (read: %s); convert any that are pictures",
                    len(others), root, shown, ", ".join(sorted(IMAGE_EXTENSIONS)))


def check_data_folder(root: Path) -> None:
    """The checks that cost nothing, for a command to make before it starts anything: `root` is a folder, or a
    DVC-tracked one not pulled yet (the run pulls it). `scan` makes these and every other check again.

    Raises:
        DataError: `root` is a file, or does not exist and no `.dvc` file tracks it.
    """
    if root.is_file():
        raise DataError(f"data folder '{root}' is a file, not a folder: pass --data DIR with <class>/<image> folders")
    if not root.is_dir() and not dvc_file_for(root).is_file():
        raise DataError(f"data folder '{root}' does not exist: pass --data DIR with <class>/<image> folders")


def _class_folders(root: Path) -> dict[str, list[Path]]:
    """Map class name -> sorted image files, checking each class folder is usable."""
    if root.is_file():
        raise DataError(f"data folder '{root}' is a file, not a folder: pass --data DIR with <class>/<image> folders")
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist: pass --data DIR with <class>/<image> folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(
            f"data folder '{root}' has no class folders: put images in {root}/<class>/ "
            f"(or {root}/train/<class>/, {root}/val/<class>/ and {root}/test/<class>/)"
        )
    classes: dict[str, list[Path]] = {}
    unreadable: list[str] = []
    for folder in folders:
        _check_inside(folder, root)
        files = _images_in(folder)
        if not files:
            raise DataError(
                f"class folder '{folder}' has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add images or remove the folder"
            )
        for path in files:
            try:  # every bad file at once: a fix-and-rerun per file costs a start-up each
                _check_inside(path, root)
                _verify(path)
            except DataError as exc:
                unreadable.append(str(exc))
        classes[folder.name] = files
    _warn_about_other_files(root, folders)
    if len(unreadable) == 1:
        raise DataError(unreadable[0])
    if unreadable:
        shown = "\n  ".join(unreadable[:MAX_LISTED])
        more = f"\n  ... and {len(unreadable) - MAX_LISTED} more" if len(unreadable) > MAX_LISTED else ""
        raise DataError(f"{len(unreadable)} files in '{root}' cannot be used; replace or remove them:\n  {shown}{more}")
    return classes


PART_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
"""The folder names each part of a pre-split folder goes by, in any case (`Train/`, `valid/`: Kaggle's and Roboflow's)."""


def split_folders(root: Path) -> dict[str, Path]:
    """The pre-split part folders directly under `root`, by part (train, val, test), in that order.

    Raises:
        DataError: two folders name the same part (`val/` and `valid/`).
    """
    if not root.is_dir():
        return {}
    by_name = {name: part for part, names in PART_NAMES.items() for name in names}
    found: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        part = by_name.get(folder.name.lower())
        if part is not None:
            found.setdefault(part, []).append(folder)
    for part, folders in found.items():
        if len(folders) > 1:
            raise DataError(f"'{root}' has {len(folders)} folders for the {part} split ({', '.join(f.name + '/' for f in folders)}); "
                            "merge them into one, or move one out")
    return {part: found[part][0] for part in PARTS if part in found}


def scan(root: Path, settings: SplitSettings = SplitSettings()) -> Split:
    """Find and check every image under `root` and split it into train, validation and test.

    Raises:
        DataError: for a missing or empty folder, a class without images, a corrupt file, fewer
            than two classes, held-out classes that do not match the training classes, or a class
            left without an image in one of the splits.
    """
    root = Path(root)
    parts = split_folders(root)
    present = list(parts)
    if present == ["train"] and any(folder.is_dir() and _images_in(folder) for folder in parts["train"].iterdir()):
        train = parts["train"].name
        raise DataError(
            f"'{root}' has {train}/ with class folders but no val/ or test/ beside it: add {root}/val/<class>/ (and test/, "
            f"or let Graft carve it from val/), or put the class folders directly in {root} to have Graft split them"
        )
    if "train" in present and len(present) > 1:
        split = _presplit(root, parts, settings)
    else:
        files = _class_folders(root)
        parts = hash_split(files, settings)
        test = parts["test"] if settings.test_fraction else parts["val"]
        split = Split(root, tuple(files), tuple(parts["train"]), tuple(parts["val"]), tuple(test), settings=settings)
    if len(split.classes) < 2:
        raise DataError(
            f"'{root}' has {len(split.classes)} class ({', '.join(split.classes)}); a classifier needs at least 2 class folders"
        )
    _warn_about_conflicting_labels(split)  # first: a split that fails for too few images may fail because of the copy
    check_parts(split)
    _warn_about_balance(split)
    counts = ", ".join(f"{len(getattr(split, part))} {part}" for part in PARTS)
    log.info("data %s: %d classes, %s images (%s)%s", root, len(split.classes), counts, split.describe(),
             "; no test split: test metrics are validation metrics (data.test_fraction=0)" if split.test_is_val else "")
    return split


def _presplit(root: Path, folders: dict[str, Path], settings: SplitSettings) -> Split:
    """A folder with `train/` and `val/` and/or `test/` (`split_folders`): those parts, the missing one carved by content hash."""
    present = list(folders)
    found = {part: _class_folders(folders[part]) for part in present}
    classes = tuple(found["train"])
    train = folders["train"]
    for part in present[1:]:
        unknown = sorted(set(found[part]) - set(classes))
        if unknown:
            raise DataError(
                f"{folders[part]} has classes the training set lacks: {', '.join(unknown)}; "
                f"add them to {train} or remove them from {folders[part]}"
            )
        missing = sorted(set(classes) - set(found[part]))
        if missing:
            raise DataError(
                f"{folders[part]} lacks classes the model will learn: {', '.join(missing)}; add images of them to {folders[part]}"
            )
    parts = {
        part: [Sample(p, i, file_md5(p)) for i, c in enumerate(classes) for p in found[part][c]] for part in present
    }
    source = f"folders {', '.join(f'{folders[part].name}/' for part in present)}"
    if "val" not in parts:  # carved from train/
        held_out = settings.val_fraction / (1 - settings.test_fraction) if settings.test_fraction < 1 else settings.val_fraction
        parts["train"], parts["val"] = carve(parts["train"], held_out, settings)
        source += f"; val carved from train/ by content hash ({held_out:.0%})"
        log.info("no %s/val folder: %d images of train/ form the validation split, by content hash", root, len(parts["val"]))
    if "test" not in parts:
        if settings.test_fraction:  # carved from val/
            share = settings.test_fraction / (settings.test_fraction + settings.val_fraction)
            parts["val"], parts["test"] = carve(parts["val"], share, settings)
            source += f"; test carved from val/ by content hash ({share:.0%} of it)"
            log.info("no %s/test folder: %d images of val/ form the test split, by content hash (data.test_fraction)", root, len(parts["test"]))
        else:
            parts["test"] = parts["val"]
    split = Split(root, classes, tuple(parts["train"]), tuple(parts["val"]), tuple(parts["test"]), presplit=True,
                  settings=settings, source=source)
    return replace(split, duplicates=_count_duplicates(split))


def _count_duplicates(split: Split) -> int:
    """Held-out images whose bytes also occur in the training split (folders given pre-split only:
    the content-hash split keeps byte-identical copies together)."""
    seen = {s.digest for s in split.train}
    held_out = {s.digest for s in split.val + split.test}
    count = len(held_out & seen)
    if count:
        log.warning(
            "%d validation or test image(s) are byte-identical to training images: their scores will be optimistic; "
            "remove the duplicates from one side", count,
        )
    return count


def _warn_about_conflicting_labels(split: Split) -> None:
    """The same image (byte for byte) under two classes: the model is taught both answers, and the gate scores one
    of them wrong whatever it learns."""
    labels: dict[str, dict[int, Path]] = {}
    for sample in split.train + split.val + split.test:
        labels.setdefault(sample.digest, {}).setdefault(sample.label, sample.path)
    conflicts = [paths for paths in labels.values() if len(paths) > 1]
    if conflicts:
        shown = "; ".join(" = ".join(str(path) for path in paths.values()) for paths in conflicts[:5])
        log.warning(
            "%d image(s) appear under more than one class, byte for byte (%s%s): keep each in its right class only",
            len(conflicts), shown, "; ..." if len(conflicts) > 5 else "",
        )


def _warn_about_balance(split: Split) -> None:
    counts = split.counts()["train"]
    largest, smallest = max(counts.values()), min(counts.values())
    if smallest and largest / smallest >= 10:
        rare = min(counts, key=counts.get)
        log.warning(
            "classes are imbalanced %d:1 (class '%s' has %d training images); accuracy will flatter the model, "
            "watch balanced accuracy and per-class recall", largest // smallest, rare, smallest,
        )
