"""Image folders: discovery, clear errors, and DVC-compatible versions (the split itself: test_split.py)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from components.core.errors import DataError
from components.data.folders import scan
from components.data.images import load_image
from components.data.versions import dir_md5


def _copy(digits_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "images"
    shutil.copytree(digits_dir, target)
    return target


def test_presplit_folder_is_used_as_is(digits_dir, tmp_path):
    root = tmp_path / "presplit"
    for part, names in (("train", slice(0, 8)), ("val", slice(8, 12)), ("test", slice(12, 15))):
        for cls in ("0", "1"):
            (root / part / cls).mkdir(parents=True)
            for path in sorted((digits_dir / cls).iterdir())[names]:
                shutil.copy(path, root / part / cls / path.name)
    split = scan(root)
    assert split.presplit and not split.test_is_val
    assert (len(split.train), len(split.val), len(split.test)) == (16, 8, 6)
    assert all(s.path.parent.parent.name == "test" for s in split.test)


def test_presplit_folders_named_as_kaggle_and_roboflow_name_them_are_the_splits_not_classes(digits_dir, tmp_path):
    """`Train/` and `Valid/` are the train and validation splits, not two classes called Train and Valid."""
    root = tmp_path / "kaggle"
    for part, names in (("Train", slice(0, 8)), ("Valid", slice(8, 12))):
        for cls in ("0", "1"):
            (root / part / cls).mkdir(parents=True)
            for path in sorted((digits_dir / cls).iterdir())[names]:
                shutil.copy(path, root / part / cls / path.name)
    split = scan(root)
    assert split.presplit and split.classes == ("0", "1") and len(split.train) == 16
    assert "folders Train/, Valid/" in split.source
    shutil.copytree(root / "Valid", root / "val")
    with pytest.raises(DataError, match=r"has 2 folders for the val split \(Valid/, val/\); merge them into one"):
        scan(root)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing", "does not exist"),
        ("a_file", "is a file, not a folder"),
        ("empty", "no class folders"),
        ("empty_class", "has no images"),
        ("corrupt", "not a readable image"),
        ("text_as_png", "not a readable image"),
        ("one_class", "at least 2 class folders"),
        ("one_image", "too few images for three splits"),
    ],
)
def test_bad_folders_get_one_clear_error_naming_the_path(digits_dir, tmp_path, breakage, message):
    root = _copy(digits_dir, tmp_path)
    culprit = root
    if breakage == "missing":
        culprit = tmp_path / "nowhere"
        root = culprit
    elif breakage == "a_file":
        culprit = root / "0" / "0000.png"
        root = culprit
    elif breakage == "empty":
        shutil.rmtree(root)
        root.mkdir()
    elif breakage == "empty_class":
        culprit = root / "9"
        culprit.mkdir()
    elif breakage == "corrupt":
        culprit = root / "0" / "0000.png"
        culprit.write_bytes(culprit.read_bytes()[:20])
    elif breakage == "text_as_png":
        culprit = root / "1" / "notes.png"
        culprit.write_text("not an image")
    elif breakage == "one_class":
        shutil.rmtree(root / "1")
        shutil.rmtree(root / "7")
    elif breakage == "one_image":
        culprit = root / "5"
        culprit.mkdir()
        shutil.copy(next((root / "0").iterdir()), culprit / "a.png")
    with pytest.raises(DataError, match=message) as err:
        scan(root)
    assert str(culprit.name) in str(err.value) or breakage == "one_class"


def test_a_class_folders_subfolders_count_as_that_class_and_hidden_ones_do_not(digits_dir, tmp_path):
    """A new batch added as `<class>/<batch>/` is trained on, not silently skipped; `.ipynb_checkpoints` and the like are."""
    root = _copy(digits_dir, tmp_path)
    before = scan(root)
    batch, hidden = root / "7" / "2026-12", root / "7" / ".ipynb_checkpoints"
    batch.mkdir()
    hidden.mkdir()
    for index, path in enumerate(sorted((digits_dir / "1").iterdir())[:4]):  # new images, unlike any 7 already there
        image = Image.open(path).convert("RGB").rotate(90 + index)
        image.save(batch / f"new-{index}.png")
        image.save(hidden / f"copy-{index}.png")
    after = scan(root)
    sevens = after.classes.index("7")
    found = {s.path for part in ("train", "val", "test") for s in getattr(after, part) if s.label == sevens}
    assert {batch / f"new-{i}.png" for i in range(4)} <= found and not any(".ipynb_checkpoints" in str(p) for p in found)
    assert after.classes == before.classes  # the batch folder is no class of its own
    assert sum(len(getattr(after, part)) for part in ("train", "val", "test")) == sum(len(getattr(before, part)) for part in ("train", "val", "test")) + 4


def test_a_train_folder_without_val_or_test_is_named_as_such_not_taken_for_a_class(digits_dir, tmp_path):
    root = tmp_path / "only-train"
    shutil.copytree(digits_dir, root / "train")
    with pytest.raises(DataError, match=r"has train/ with class folders but no val/ or test/ beside it: add .*/val/<class>/"):
        scan(root)


def test_validation_class_unknown_to_training_is_refused(digits_dir, tmp_path):
    root = tmp_path / "presplit"
    for part, classes in (("train", ("0", "1")), ("val", ("0", "1", "7"))):
        for cls in classes:
            shutil.copytree(digits_dir / cls, root / part / cls)
    with pytest.raises(DataError, match="classes the training set lacks: 7"):
        scan(root)


def test_symlink_outside_the_folder_is_refused(digits_dir, tmp_path):
    root = _copy(digits_dir, tmp_path)
    outside = tmp_path / "outside.png"
    shutil.copy(next((root / "0").iterdir()), outside)
    (root / "0" / "link.png").symlink_to(outside)
    (root / "1" / "other-link.png").symlink_to(outside)
    with pytest.raises(DataError, match="^2 files in .* cannot be used") as err:  # every link named at once
        scan(root)
    assert str(err.value).count("outside the data folder") == 2


def test_image_modes_are_converted_to_rgb(tmp_path):
    gray = Image.new("L", (8, 8), 200)
    gray.save(tmp_path / "g.png")
    gray.convert("RGBA").save(tmp_path / "a.png")
    gray.convert("P").save(tmp_path / "p.png")
    reference = load_image(tmp_path / "g.png", 16)
    assert reference.shape == (16, 16, 3) and reference.dtype.name == "uint8"
    for name in ("a.png", "p.png"):
        assert (load_image(tmp_path / name, 16) == reference).all()


def test_dir_md5_matches_what_dvc_add_records(digits_dir, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(digits_dir, repo / "images")
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=repo, check=True)
    subprocess.run([dvc, "add", "-q", "images"], cwd=repo, check=True)
    import yaml

    recorded = yaml.safe_load((repo / "images.dvc").read_text())["outs"][0]["md5"]
    assert dir_md5(repo / "images") == recorded
