"""Image folders: discovery and validation, then the split (`components.data.split`).

A folder is either `<class>/<image>` (split here, stratified, with a fixed seed)
or `train/<class>/<image>` plus `val/<class>/<image>`. Every problem is reported
with the path at fault and what to do about it, before any training starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from components.core.errors import DataError
from components.core.files import file_md5
from components.data.images import IMAGE_EXTENSIONS, MAX_PIXELS
from components.data.split import Sample, Split, stratified_split

log = logging.getLogger(__name__)


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


def _class_folders(root: Path) -> dict[str, list[Path]]:
    """Map class name -> sorted image files, checking each class folder is usable."""
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist: pass --data DIR with <class>/<image> folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(
            f"data folder '{root}' has no class folders: put images in {root}/<class>/ "
            f"(or {root}/train/<class>/ and {root}/val/<class>/)"
        )
    classes: dict[str, list[Path]] = {}
    for folder in folders:
        _check_inside(folder, root)
        files = sorted(p for p in folder.iterdir() if _is_image_file(p))
        if not files:
            raise DataError(
                f"class folder '{folder}' has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add images or remove the folder"
            )
        for path in files:
            _check_inside(path, root)
            _verify(path)
        classes[folder.name] = files
    return classes


def scan(root: Path, val_fraction: float = 0.2, seed: int = 42) -> Split:
    """Find and check every image under `root` and split it into train and validation.

    Raises:
        DataError: for a missing or empty folder, a class without images, a
            corrupt file, fewer than two classes, or validation classes that
            do not match the training classes.
    """
    root = Path(root)
    presplit = (root / "train").is_dir() and (root / "val").is_dir()
    if presplit:
        train_files = _class_folders(root / "train")
        val_files = _class_folders(root / "val")
        unknown = sorted(set(val_files) - set(train_files))
        if unknown:
            raise DataError(
                f"{root}/val has classes the training set lacks: {', '.join(unknown)}; "
                f"add them to {root}/train or remove them from {root}/val"
            )
        missing = sorted(set(train_files) - set(val_files))
        if missing:
            raise DataError(
                f"{root}/val lacks classes the model will learn: {', '.join(missing)}; "
                f"add images of them to {root}/val"
            )
        classes = tuple(train_files)
        train = [Sample(p, i) for i, c in enumerate(classes) for p in train_files[c]]
        val = [Sample(p, i) for i, c in enumerate(classes) for p in val_files[c]]
    else:
        files = _class_folders(root)
        classes = tuple(files)
        train, val = stratified_split(files, val_fraction, seed)
    if len(classes) < 2:
        raise DataError(
            f"'{root}' has {len(classes)} class ({', '.join(classes)}); a classifier needs at least 2 class folders"
        )
    split = Split(
        root=root, classes=classes, train=tuple(train), val=tuple(val), presplit=presplit,
        duplicates=_count_duplicates(train, val),
    )
    _warn_about_balance(split)
    log.info("data %s: %d classes, %d train / %d val images", root, len(classes), len(train), len(val))
    return split


def _count_duplicates(train: list[Sample], val: list[Sample]) -> int:
    """Validation images whose bytes also occur in the training split."""
    seen = {file_md5(s.path) for s in train}
    count = sum(file_md5(s.path) in seen for s in val)
    if count:
        log.warning(
            "%d validation image(s) are byte-identical to training images: validation scores will be optimistic; "
            "remove the duplicates from one side", count,
        )
    return count


def _warn_about_balance(split: Split) -> None:
    counts = split.counts()["train"]
    largest, smallest = max(counts.values()), min(counts.values())
    if smallest and largest / smallest >= 10:
        rare = min(counts, key=counts.get)
        log.warning(
            "classes are imbalanced %d:1 (class '%s' has %d training images); accuracy will flatter the model, "
            "watch balanced accuracy and per-class recall", largest // smallest, rare, smallest,
        )
