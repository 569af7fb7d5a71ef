"""Samples and splits: which image is trained on and which is held out.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core.errors import DataError


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: Path
    label: int


@dataclass(frozen=True)
class Split:
    """The classes and the train/validation samples of one image folder."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    presplit: bool
    duplicates: int = 0
    """Images whose exact bytes appear in both train and val (they inflate validation scores)."""

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each part, for logs and summaries."""
        out: dict[str, dict[str, int]] = {}
        for part in ("train", "val"):
            tally = Counter(sample.label for sample in getattr(self, part))
            out[part] = {name: tally.get(index, 0) for index, name in enumerate(self.classes)}
        return out


def stratified_split(files: dict[str, list[Path]], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label, (name, paths) in enumerate(files.items()):
        if len(paths) < 2:
            raise DataError(
                f"class '{name}' has {len(paths)} image; at least 2 are needed to split it into train and val: "
                "add images, or pre-split the folder into train/ and val/"
            )
        order = rng.permutation(len(paths))
        n_val = min(max(1, round(len(paths) * val_fraction)), len(paths) - 1)
        val += [Sample(paths[i], label) for i in sorted(order[:n_val])]
        train += [Sample(paths[i], label) for i in sorted(order[n_val:])]
    return train, val


def stratified_sample(samples: tuple[Sample, ...], size: int, seed: int) -> list[Sample]:
    """Up to `size` samples with every class represented in proportion (at least 2 each when possible)."""
    if len(samples) <= size:
        return list(samples)
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    picked: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = min(len(members), max(2, round(size * len(members) / len(samples))))
        picked += rng.choice(members, size=take, replace=False).tolist()
    return [samples[i] for i in sorted(picked)]


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
