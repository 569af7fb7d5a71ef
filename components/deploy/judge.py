"""Judging the challenger against the champion on test images that neither of them has seen.

Every registered version carries its split manifest (`split_manifest.json` beside
`model.onnx`, its sha256 in the version's `split.manifest_sha256` tag): the content
hashes of the images it trained and early-stopped on. The gate compares the two
models only on the current test images outside both manifests' train and val
parts, so growing the data, renaming files or changing the split settings can never
let a champion be scored on its own training images.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from components.core.errors import DataError, GraftError
from components.core.files import sha256
from components.core.lineage import CHAMPION, MANIFEST_SHA_TAG
from components.data.images import load_batch
from components.data.split import MANIFEST_FILE, Split, SplitManifest
from components.evaluate.gate import Comparison, GateRules, Verdict, judge
from components.registry.history import last_champion
from components.registry.versions import download_artifact, version_by_alias
from components.runtime.model import OnnxClassifier

log = logging.getLogger(__name__)


class TestImages:
    """The test images and labels, decoded once per image size (challenger and champion may differ)."""

    __test__ = False  # not a pytest class

    def __init__(self, split: Split) -> None:
        self.samples = split.evaluation
        self.paths = [s.path for s in self.samples]
        self.labels = np.array([s.label for s in self.samples])
        self._decoded: dict[int, np.ndarray] = {}

    def at(self, size: int) -> np.ndarray:
        if size not in self._decoded:
            self._decoded[size] = load_batch(self.paths, size)
        return self._decoded[size]


def champion_manifest(client, name: str, version) -> SplitManifest:  # noqa: ANN001 - MlflowClient, ModelVersion
    """The split manifest a registered version carries, checked against the digest in its tags.

    Raises:
        DataError: the version has no manifest, or its file does not match the recorded digest.
    """
    expected = (version.tags or {}).get(MANIFEST_SHA_TAG)
    if not expected:
        raise DataError(
            f"v{version.version} has no split manifest (registered before Graft recorded one), so the images it "
            "trained on are unknown"
        )
    root = client.get_model_version_download_uri(name, version.version).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="graft-manifest-") as tmp:
        try:
            path = download_artifact(f"{root}/{MANIFEST_FILE}", Path(tmp))
        except GraftError as exc:
            raise DataError(f"v{version.version}'s split manifest cannot be read ({exc})") from exc
        actual = sha256(path)
        if actual != expected:
            raise DataError(
                f"v{version.version}'s split manifest has sha256 {actual[:12]}..., its tag says {expected[:12]}... (altered)"
            )
        return SplitManifest.from_json(path.read_text())


def comparison_set(split: Split, champion: SplitManifest, champion_version: str) -> Comparison:
    """The test images neither the challenger (this split) nor the champion trained or early-stopped on."""
    challenger_seen = {s.digest for s in split.train} | (set() if split.test_is_val else {s.digest for s in split.val})
    seen = champion.seen | challenger_seen
    fair = np.array([s.digest not in seen for s in split.evaluation], dtype=bool)
    notes = []
    if champion.settings != split.settings:
        notes.append(f"the split settings changed since champion v{champion_version} "
                     f"({champion.settings.describe()} then, {split.settings.describe()} now)")
    if split.test_is_val:
        notes.append("no test split (data.test_fraction=0): these are validation images, which chose the challenger's epoch")
    return Comparison(fair, tuple(notes))


def champion_probabilities(name: str, champion, classes: tuple[str, ...], images_at: Callable[[int], np.ndarray]) -> tuple[np.ndarray | None, str | None]:  # noqa: ANN001 - mlflow ModelVersion
    """(the champion's probabilities on `images_at(its image size)`, or None and why it cannot be compared)."""
    try:
        model = OnnxClassifier.load(f"models:/{name}/{champion.version}")
    except GraftError as exc:
        return None, f"it cannot be loaded ({exc})"
    if model.classes != classes:
        return None, f"its classes {list(model.classes)} differ from the challenger's {list(classes)}"
    return model.predict_proba(images_at(model.image_size)), None


def judge_challenger(
    client,  # noqa: ANN001 - MlflowClient
    name: str,
    split: Split,
    onnx_path: Path,
    classes: tuple[str, ...],
    rules: GateRules,
    images: TestImages | None = None,
    challenger_probs: np.ndarray | None = None,
) -> Verdict:
    """The gate's verdict on the exported challenger: floors on every test image, the comparison with the
    champion on the test images neither has seen.

    `images` are the split's test images when the caller decoded them already; `challenger_probs`, the
    challenger's probabilities on them when the caller computed them already (else onnxruntime runs it here)."""
    images = images if images is not None else TestImages(split)
    if challenger_probs is None:
        challenger = OnnxClassifier(onnx_path)
        challenger_probs = challenger.predict_proba(images.at(challenger.image_size))
    if len(challenger_probs) != len(images.labels):
        raise ValueError(f"{len(challenger_probs)} rows of challenger probabilities for {len(images.labels)} test images")
    champion, note = version_by_alias(client, name, CHAMPION), None
    if champion is None:
        last = last_champion(client, name, alias_read=True)
        if last is None:
            return judge(challenger_probs, images.labels, rules, classes=classes)
        # the alias was removed outside Graft: a removal is no evidence that a weaker model should go live, so the
        # version that was champion last (what a running `graft serve` still serves) is the one to beat
        champion = client.get_model_version(name, last)
        note = f"no `champion` alias: it was removed outside Graft; compared with v{last}, the champion last"
    champion_probs, problem = champion_probabilities(name, champion, classes, images.at)
    comparison = None
    if problem is None:
        try:
            comparison = comparison_set(split, champion_manifest(client, name, champion), str(champion.version))
        except DataError as exc:
            problem = f"{exc}; no fair comparison is possible"
    verdict = judge(challenger_probs, images.labels, rules, champion_probs, str(champion.version), problem, classes, comparison)
    return verdict.with_note("champion", note) if note else verdict
