"""Samples and splits: which image is trained on, which stops training early, and which judges the model.

Three splits, each with one job:

- **train**: the weights are fitted on it;
- **val**: early stopping, the softmax temperature and the candidates' probes look at it;
- **test**: nothing looks at it until the model is trained; the gate, the reported metrics, the
  model card and the DVC `evaluate` stage are computed on it.

An image's split is a pure function of the image and the split settings (TFX's hash buckets):
the sha256 of the seed and the md5 of its bytes, read as a number in [0, 1), puts it in test below
`test_fraction`, in val below `test_fraction + val_fraction`, else in train. Adding, removing or
renaming other images never moves it; byte-identical copies always share a split. Pre-split folders
(`train/`, `val/`, `test/`) are honoured; a missing `test/` is carved from `val/` (and a missing
`val/` from `train/`) by the same rule.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from components.core.errors import DataError
from components.core.files import file_md5

PARTS = ("train", "val", "test")

RUN_SPLIT = "split.json"
"""In each run's folder: the split the run trained and tested on (`split_document`), for `graft evaluate --summary`."""
MANIFEST_FILE = "split_manifest.json"
"""The registered version's record of which images it trained and early-stopped on (beside `model.onnx`)."""


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: Path
    label: int
    md5: str = field(default="", compare=False)
    """The md5 of the file's bytes when known (the split was made from it)."""

    @property
    def digest(self) -> str:
        """The md5 of the image's bytes: its identity in split manifests, feature caches and resume keys."""
        return self.md5 or file_md5(self.path)


@dataclass(frozen=True)
class SplitSettings:
    """What decides an image's split besides the image itself."""

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    """0 runs with two splits: the test metrics are then validation metrics, and every report says so."""
    seed: int = 42

    @classmethod
    def from_config(cls, data) -> SplitSettings:  # noqa: ANN001 - components.core.config.DataConfig
        return cls(data.val_fraction, data.test_fraction, data.seed)

    def bucket(self, md5: str) -> float:
        """The image's place in [0, 1): the same for the same bytes and seed, whatever else is in the folder."""
        digest = hashlib.sha256(f"graft-split-v1|{self.seed}|{md5}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def part(self, md5: str) -> str:
        """train, val or test for an image of a folder that is not pre-split."""
        place = self.bucket(md5)
        if place < self.test_fraction:
            return "test"
        return "val" if place < self.test_fraction + self.val_fraction else "train"

    def describe(self) -> str:
        test = f"test {self.test_fraction:.0%}" if self.test_fraction else "no test split (test = val)"
        return f"val {self.val_fraction:.0%}, {test}, seed {self.seed}"

    def to_dict(self) -> dict[str, float | int]:
        return {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction, "seed": self.seed}


@dataclass(frozen=True)
class Split:
    """The classes and the train, validation and test samples of one image folder."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...] = ()
    presplit: bool = False
    settings: SplitSettings = SplitSettings()
    source: str = "content hash"
    """How the parts were made: `content hash`, or the folders (and what was carved from which)."""
    duplicates: int = 0
    """Held-out images whose exact bytes also appear in the training split (pre-split folders only)."""

    def describe(self) -> str:
        """How the parts were made, in words: the content hash and its settings, or the folders (what was carved
        from which, and how much, is in `source`; the fractions of a folder that is not pre-split do not apply)."""
        return self.source if self.presplit else f"{self.source}; {self.settings.describe()}"

    @property
    def test_is_val(self) -> bool:
        """True when there is no separate test split: test metrics are then validation metrics."""
        return self.test == self.val

    @property
    def evaluation(self) -> tuple[Sample, ...]:
        """The images the reported metrics and the gate are computed on: test (val when there is no test split)."""
        return self.test or self.val

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each part, for logs and summaries."""
        out: dict[str, dict[str, int]] = {}
        for part in PARTS:
            tally = Counter(sample.label for sample in getattr(self, part))
            out[part] = {name: tally.get(index, 0) for index, name in enumerate(self.classes)}
        return out

    def manifest(self) -> SplitManifest:
        """The content hashes of each part, as a registered version records them."""
        return SplitManifest(
            settings=self.settings, classes=self.classes,
            parts={part: tuple(sorted({s.digest for s in getattr(self, part)})) for part in PARTS},
        )


@dataclass(frozen=True)
class SplitManifest:
    """Which images (by the md5 of their bytes) a model trained on, early-stopped on, and was tested on."""

    settings: SplitSettings
    classes: tuple[str, ...]
    parts: dict[str, tuple[str, ...]]

    @property
    def seen(self) -> frozenset[str]:
        """Images that influenced the model: its training and validation images."""
        return frozenset(self.parts["train"]) | frozenset(self.parts["val"])

    def to_json(self) -> str:
        content = {"format": 1, "settings": self.settings.to_dict(), "classes": list(self.classes),
                   **{part: list(self.parts[part]) for part in PARTS}}
        return json.dumps(content, sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> SplitManifest:
        """Read a manifest written by `to_json`.

        Raises:
            DataError: the text is not a split manifest.
        """
        try:
            raw = json.loads(text)
            return cls(SplitSettings(**raw["settings"]), tuple(raw["classes"]), {part: tuple(raw[part]) for part in PARTS})
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"not a Graft split manifest ({exc.__class__.__name__}: {exc})") from exc


def hash_split(files: dict[str, list[Path]], settings: SplitSettings) -> dict[str, list[Sample]]:
    """Each image of a `<class>/<image>` folder in the part its content hash gives it."""
    parts: dict[str, list[Sample]] = {part: [] for part in PARTS}
    for label, paths in enumerate(files.values()):
        for path in paths:
            md5 = file_md5(path)
            parts[settings.part(md5)].append(Sample(path, label, md5))
    return parts


def carve(samples: list[Sample], share: float, settings: SplitSettings) -> tuple[list[Sample], list[Sample]]:
    """(kept, carved): the `share` of `samples` whose content hash falls lowest goes to `carved`.

    Used for a pre-split folder that lacks `test/` (carved from `val/`) or `val/` (carved from `train/`);
    by the same hash rule as an unsplit folder, so an image stays where it is when others are added.
    """
    kept, carved_out = [], []
    for sample in samples:
        (carved_out if settings.bucket(sample.digest) < share else kept).append(sample)
    return kept, carved_out


def check_parts(split: Split) -> None:
    """Every class needs an image in train, in val and (with a test split) in test.

    Raises:
        DataError: listing every class that lacks one, with its counts and the fixes.
    """
    counts = split.counts()
    needed = ("train", "val") if split.test_is_val else PARTS
    thin = [
        f"'{name}' ({', '.join(f'{counts[part][name]} {part}' for part in PARTS)})"
        for name in split.classes
        if any(counts[part][name] == 0 for part in needed)
    ]
    if not thin:
        return
    how = (
        "each image's split is fixed by its content hash (data.seed), so"
        if not split.presplit else f"the folders of {split.root} give"
    )
    raise DataError(
        f"too few images for three splits: {how} these classes have an empty part: {', '.join(thin)}; "
        f"add images to those classes, raise data.val_fraction / data.test_fraction (now {split.settings.val_fraction:g} / "
        f"{split.settings.test_fraction:g}), pre-split the folder into train/ val/ test/, or set data.test_fraction=0 "
        "to run with two splits (the test metrics are then validation metrics)"
    )


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
    """[path relative to `root`, label, md5] per sample: how a split file lists images (`read_split` reads them)."""
    return [[s.path.relative_to(root).as_posix(), s.label, s.digest] for s in samples]


def split_document(split: Split) -> dict[str, object]:
    """The split as `graft prepare` writes it: settings, classes, counts and every image of each part."""
    return {
        "settings": split.settings.to_dict(),
        "source": split.source,
        "presplit": split.presplit,
        "test_is_val": split.test_is_val,
        "classes": list(split.classes),
        "counts": split.counts(),
        **{part: sample_rows(getattr(split, part), split.root) for part in PARTS},
    }


def read_split(split_path: Path, data_dir: Path) -> Split:
    """The split `prepare` wrote (`split_document`), with paths under `data_dir`.

    Raises:
        DataError: the file is missing or unreadable, or names images that are not in `data_dir`.
    """
    try:
        raw = json.loads(split_path.read_text())
        classes = tuple(raw["classes"])
        parts = {part: tuple(Sample(data_dir / row[0], int(row[1]), *row[2:3]) for row in raw[part]) for part in PARTS}
        settings = SplitSettings(**raw["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"split file {split_path} is missing or unreadable ({exc}); run `graft prepare --split {split_path}`") from exc
    missing = [str(s.path) for part in parts.values() for s in part if not s.path.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} images named in {split_path} are not in {data_dir} (first: {missing[0]}); "
            f"point --data at the folder the split was made from; run `dvc pull` if it is DVC-tracked and not pulled yet, "
            f"or `graft prepare --split {split_path}` again if the folder changed since"
        )
    test = parts["val"] if raw.get("test_is_val") else parts["test"]
    return Split(root=data_dir, classes=classes, train=parts["train"], val=parts["val"], test=test,
                 presplit=bool(raw.get("presplit")), settings=settings, source=str(raw.get("source", "content hash")))
