"""The three splits: each image's part follows from its bytes and the split settings alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from components.core.config import load_params
from components.core.errors import DataError
from components.core.files import file_md5
from components.data.demo import write_digits
from components.data.folders import scan
from components.data.split import PARTS, SplitManifest, SplitSettings, read_split
from components.data.stage import prepare
from tests.conftest import REPO


def _parts_by_md5(split) -> dict[str, str]:
    return {sample.digest: part for part in PARTS for sample in getattr(split, part)}


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A real image folder (10 digit classes, 60 images each), and the same folder grown by 10% per class
    with some files renamed and one class folder renamed too."""
    root = tmp_path_factory.mktemp("grow")
    everything = write_digits(root / "all", per_class=66)
    before, after = root / "before", root / "after"
    for folder in sorted(everything.iterdir()):
        files = sorted(folder.iterdir())
        (before / folder.name).mkdir(parents=True)
        for path in files[:60]:
            shutil.copy(path, before / folder.name / path.name)
    shutil.copytree(before, after)
    for folder in sorted(everything.iterdir()):
        for path in sorted(folder.iterdir())[60:]:  # 10% more per class
            shutil.copy(path, after / folder.name / path.name)
    for index, path in enumerate(sorted((after / "3").iterdir())):  # renamed files keep their split
        path.rename(path.with_name(f"renamed-{index}.png"))
    return before, after


def test_growing_and_renaming_never_moves_an_image_out_of_its_split(grown):
    before, after = grown
    old, new = scan(before), scan(after)
    old_parts, new_parts = _parts_by_md5(old), _parts_by_md5(new)
    assert len(new_parts) == len(old_parts) + 60
    moved = {md5: (part, new_parts[md5]) for md5, part in old_parts.items() if new_parts[md5] != part}
    assert moved == {}
    # the train images of the smaller folder are still train images; no val or test image was trained on before
    assert {s.digest for s in old.train} <= {s.digest for s in new.train}
    assert not {s.digest for s in new.val + new.test} & {s.digest for s in old.train}


def test_the_split_follows_the_fractions_and_the_seed(grown):
    before, _ = grown
    split = scan(before, SplitSettings(val_fraction=0.2, test_fraction=0.1, seed=7))
    total = len(split.train) + len(split.val) + len(split.test)
    assert total == 600 and not split.test_is_val
    assert len(split.val) / total == pytest.approx(0.2, abs=0.05) and len(split.test) / total == pytest.approx(0.1, abs=0.04)
    assert scan(before, SplitSettings(val_fraction=0.2, test_fraction=0.1, seed=7)) == split  # deterministic
    other = _parts_by_md5(scan(before, SplitSettings(val_fraction=0.2, test_fraction=0.1, seed=8)))
    assert sum(other[md5] != part for md5, part in _parts_by_md5(split).items()) > 50  # the seed is the salt


def test_byte_identical_copies_share_a_split(digits_dir, tmp_path):
    root = shutil.copytree(digits_dir, tmp_path / "images")
    for path in sorted((root / "0").iterdir())[:5]:
        shutil.copy(path, root / "0" / f"copy-{path.name}")
    parts: dict[str, set[str]] = {}
    for part in PARTS:
        for sample in getattr(scan(root), part):
            parts.setdefault(file_md5(sample.path), set()).add(part)
    assert all(len(found) == 1 for found in parts.values())


def test_a_presplit_folder_without_test_has_it_carved_from_val_and_says_so(digits_dir, tmp_path, caplog):
    root = tmp_path / "presplit"
    for cls in ("0", "1", "7"):
        files = sorted((digits_dir / cls).iterdir())
        for part, chosen in (("train", files[:10]), ("val", files[10:])):
            (root / part / cls).mkdir(parents=True)
            for path in chosen:
                shutil.copy(path, root / part / cls / path.name)
    with caplog.at_level("INFO", logger="components.data.folders"):
        split = scan(root, SplitSettings(seed=3))
    assert "images of val/ form the test split" in caplog.text
    assert len(split.train) == 30 and len(split.val) + len(split.test) == 30 and split.test
    assert {s.path.parent.parent.name for s in split.val + split.test} == {"val"}
    assert "test carved from val/" in split.source


def test_too_few_images_for_three_splits_names_the_classes_and_the_fixes(digits_dir, tmp_path):
    root = shutil.copytree(digits_dir, tmp_path / "images")
    for path in sorted((root / "7").iterdir())[3:]:
        path.unlink()
    with pytest.raises(DataError, match=r"too few images for three splits: .*'7' \(\d train, \d val, \d test\).*data.test_fraction=0"):
        scan(root)


def test_two_splits_on_request_make_the_test_metrics_validation_metrics(digits_dir):
    split = scan(digits_dir, SplitSettings(val_fraction=0.3, test_fraction=0.0))
    assert split.test_is_val and split.evaluation == split.val and split.val
    assert split.manifest().parts["test"] == split.manifest().parts["val"]


def test_prepare_writes_a_split_read_split_reads_back_and_the_manifest_round_trips(digits_dir, tmp_path):
    params = load_params(REPO / "params.yaml", [f"data.dir={digits_dir}"])
    result = prepare(params, tmp_path / "split.json")
    written = json.loads(result.split_path.read_text())
    assert written["settings"] == {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 42}
    assert (result.train_images, result.val_images, result.test_images) == tuple(len(written[part]) for part in PARTS)
    assert all(not Path(row[0]).is_absolute() for part in PARTS for row in written[part])
    again = read_split(result.split_path, digits_dir)
    assert again == scan(digits_dir)
    manifest = again.manifest()
    assert SplitManifest.from_json(manifest.to_json()) == manifest and len(manifest.sha256()) == 64
    assert manifest.seen == {s.digest for s in again.train + again.val}
