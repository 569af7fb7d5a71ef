"""The offline data sets the choose benchmark ranks backbones on."""

import hashlib

from components.data.demo import PHOTO_IMAGES, write_photos
from components.data.folders import scan


def _digest(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_photos_are_a_presplit_colour_set_made_the_same_way_every_time(tmp_path):
    first = write_photos(tmp_path / "a", per_class=4, size=16)
    split = scan(first)
    assert split.presplit and len(split.classes) == sum(len(named) for named in PHOTO_IMAGES.values()) == 11
    assert set(split.counts()["train"].values()) == {2} and set(split.counts()["val"].values()) == {1}
    assert set(split.counts()["test"].values()) == {1}
    assert _digest(first) == _digest(write_photos(tmp_path / "b", per_class=4, size=16))
    assert _digest(first) != _digest(write_photos(tmp_path / "c", per_class=4, size=16, seed=1))
