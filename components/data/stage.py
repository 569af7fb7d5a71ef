"""The `prepare` stage: pull and check the data, split it, and write the split down.

`dvc repro` runs it first; the split file names every image (relative to the
data folder) with its class, so later stages and later commits can tell
exactly which images were trained on and which were held out. `scan` makes
the same split from the same `data.*` parameters, so `graft run` agrees with
the file without reading it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from components.core.config import Params
from components.core.files import write_json
from components.data.folders import scan
from components.data.split import SplitSettings, split_document
from components.data.versions import data_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareResult:
    """Where the split was written and what it holds."""

    split_path: Path
    data_md5: str
    classes: tuple[str, ...]
    train_images: int
    val_images: int
    test_images: int


def prepare(params: Params, split_path: Path) -> PrepareResult:
    """Pull the data if it is DVC-tracked and missing, check every image, split it, write `split_path`."""
    settings = SplitSettings.from_config(params.data)
    log.info("prepare: %s (%s)", params.data.dir, settings.describe())
    md5 = data_version(params.data.dir)
    split = scan(params.data.dir, settings)
    write_json(split_path, {"data_md5": md5, **split_document(split)})
    log.info("split: %d train / %d val / %d test images in %d classes -> %s",
             len(split.train), len(split.val), len(split.test), len(split.classes), split_path)
    return PrepareResult(split_path, md5, split.classes, len(split.train), len(split.val), len(split.test))
