"""The `prepare` stage: pull and check the data, split it, and write the split down.

`dvc repro` runs it first; the split file names every image (relative to the
data folder) with its class, so later stages and later commits can tell
exactly which images were trained on and which were held out. `scan` makes
the same split from the same `data.*` parameters, so `graft run` agrees with
the file without reading it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from components.config import Params
from components.data import Sample, Split, scan
from components.errors import DataError
from components.evaluate import write_json
from components.versioning import data_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareResult:
    """Where the split was written and what it holds."""

    split_path: Path
    data_md5: str
    classes: tuple[str, ...]
    train_images: int
    val_images: int


def prepare(params: Params, split_path: Path) -> PrepareResult:
    """Pull the data if it is DVC-tracked and missing, check every image, split it, write `split_path`."""
    cfg = params.data
    log.info("prepare: %s (val_fraction %s, seed %s)", cfg.dir, cfg.val_fraction, cfg.seed)
    md5 = data_version(cfg.dir)
    split = scan(cfg.dir, cfg.val_fraction, cfg.seed)
    write_json(
        split_path,
        {
            "data_md5": md5,
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
            "presplit": split.presplit,
            "classes": list(split.classes),
            "counts": split.counts(),
            "train": sample_rows(split.train, split.root),
            "val": sample_rows(split.val, split.root),
        },
    )
    log.info("split: %d train / %d val images in %d classes -> %s", len(split.train), len(split.val), len(split.classes), split_path)
    return PrepareResult(split_path, md5, split.classes, len(split.train), len(split.val))


def sample_rows(samples: tuple[Sample, ...], root: Path) -> list[list[object]]:
    """[path relative to `root`, label] per sample: how a split file lists images (`read_split` reads them)."""
    return [[s.path.relative_to(root).as_posix(), s.label] for s in samples]


def read_split(split_path: Path, data_dir: Path) -> Split:
    """The split `prepare` wrote, with paths under `data_dir`.

    Raises:
        DataError: the file is missing or unreadable, or names images that are not in `data_dir`.
    """
    try:
        raw = json.loads(split_path.read_text())
        classes = tuple(raw["classes"])
        train = tuple(Sample(data_dir / path, int(label)) for path, label in raw["train"])
        val = tuple(Sample(data_dir / path, int(label)) for path, label in raw["val"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"split file {split_path} is missing or unreadable ({exc}); run `graft prepare --split {split_path}`") from exc
    missing = [str(s.path) for s in train + val if not s.path.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} images named in {split_path} are not in {data_dir} (first: {missing[0]}); "
            f"run `dvc pull` or `graft prepare --split {split_path}` again"
        )
    return Split(root=data_dir, classes=classes, train=train, val=val, presplit=bool(raw.get("presplit", False)))
