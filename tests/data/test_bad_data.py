"""Hostile and awkward image data: each case ends in a clear error or a logged, documented handling."""

import io
import logging
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.core.errors import DataError
from components.data.folders import scan
from components.data.images import MAX_PIXELS, load_image
from tests.models import png_claiming


def _copy(digits_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(digits_dir, tmp_path / "images"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("zero.png", b"", "empty file"),
        ("notes.png", b"hello, I am text", "not a readable image"),
        ("cut.png", None, "not a readable image"),
        # 72 M pixels: over Graft's limit, under the ~89 M where Pillow itself warns (and ~179 M where it refuses)
        ("bomb.png", png_claiming(9000, 8000), f"claims 9000x8000 pixels, over the {MAX_PIXELS:,} limit"),
    ],
)
def test_bad_files_in_training_data_are_refused_with_their_path(digits_dir, tmp_path, name, content, message):
    root = _copy(digits_dir, tmp_path)
    target = root / "0" / name
    if content is None:
        good = next((root / "0").iterdir()).read_bytes()
        content = good[: len(good) // 2]
    target.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        scan(root)
    assert name in str(err.value)


def test_every_unreadable_file_is_named_in_one_error(digits_dir, tmp_path):
    """A folder with several bad files is one fix, not one rerun per file."""
    root = _copy(digits_dir, tmp_path)
    bad = [root / "0" / "notes.png", root / "1" / "empty.jpg", root / "7" / "cut.png"]
    bad[0].write_text("hello, I am text")
    bad[1].write_bytes(b"")
    good = next((root / "7").iterdir()).read_bytes()
    bad[2].write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"^3 files in .* cannot be used; replace or remove them:") as err:
        scan(root)
    assert all(str(path) in str(err.value) for path in bad)


def test_files_that_are_not_images_are_named_in_one_warning(digits_dir, tmp_path, caplog):
    """A `.heic` photo left out without a word makes a class smaller than its owner thinks; hidden files are not counted."""
    root = _copy(digits_dir, tmp_path)
    (root / "0" / "holiday.heic").write_bytes(b"not read")
    (root / "1" / "notes.txt").write_text("labels checked by Ann")
    (root / "1" / ".DS_Store").write_bytes(b"finder")
    with caplog.at_level(logging.WARNING, logger="components.data.folders"):
        scan(root)
    assert "2 files in" in caplog.text and "0/holiday.heic, 1/notes.txt" in caplog.text and ".DS_Store" not in caplog.text


def test_the_same_image_under_two_classes_is_warned_about(digits_dir, tmp_path, caplog):
    root = _copy(digits_dir, tmp_path)
    twin = sorted((root / "0").iterdir())[0]
    shutil.copy(twin, root / "7" / "looks-like-a-seven.png")
    with caplog.at_level(logging.WARNING, logger="components.data.folders"):
        scan(root)
    assert "1 image(s) appear under more than one class" in caplog.text and "looks-like-a-seven.png" in caplog.text


def test_a_copy_under_another_class_is_warned_about_even_when_the_split_then_fails(digits_dir, tmp_path, caplog):
    """A class of one image, a copy of another class's: the run stops for too few images, and says why it might be."""
    root = _copy(digits_dir, tmp_path)
    (root / "9").mkdir()
    shutil.copy(sorted((root / "0").iterdir())[0], root / "9" / "nine.png")
    with caplog.at_level(logging.WARNING, logger="components.data.folders"), pytest.raises(DataError, match="too few images"):
        scan(root)
    assert "1 image(s) appear under more than one class" in caplog.text and "nine.png" in caplog.text


def test_truncated_jpeg_is_caught_at_scan_time(digits_dir, tmp_path):
    root = _copy(digits_dir, tmp_path)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "1" / "cut.jpg").write_bytes(buffer.getvalue()[:400])
    with pytest.raises(DataError, match="cut.jpg"):
        scan(root)


def test_bomb_is_refused_before_decoding_at_inference_too(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(9000, 8000))
    assert 9000 * 8000 > MAX_PIXELS and 9000 * 8000 < Image.MAX_IMAGE_PIXELS  # Graft's limit refuses it, not Pillow's
    with pytest.raises(DataError, match=f"claims 9000x8000 pixels, over the {MAX_PIXELS:,} limit"):
        load_image(path, 32)


def test_wrong_extension_is_read_by_content(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "really_a_png.jpg", format="PNG")
    assert (load_image(tmp_path / "really_a_png.jpg", 16) == rgb).all()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_other_modes_give_the_same_pixels_as_their_rgb_version(tmp_path, mode):
    gray = np.random.default_rng(2).integers(0, 255, (16, 16), dtype=np.uint8)
    rgb = Image.fromarray(np.stack([gray] * 3, axis=-1))
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)
    elif mode == "CMYK":
        image = rgb.convert("CMYK")
    else:
        image = rgb.convert(mode) if mode != "P" else rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    path = tmp_path / f"img.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    image.save(path)
    converted = load_image(path, 16).astype(int)
    expected = np.asarray(rgb).astype(int)
    assert np.abs(converted - expected).max() <= (8 if mode == "P" else 1)


def test_paths_with_spaces_and_non_ascii_names_work(digits_dir, tmp_path):
    root = tmp_path / "my images ü"
    for cls, new in (("0", "zéro"), ("1", "un un")):
        shutil.copytree(digits_dir / cls, root / new)
        for path in list((root / new).iterdir())[:3]:
            path.rename(path.with_name(f"ça {path.name}"))
    split = scan(root)
    assert split.classes == ("un un", "zéro")
    assert any("ça " in s.path.name for s in split.train + split.val)


def test_duplicates_across_train_and_val_are_counted_and_warned(digits_dir, tmp_path, caplog):
    root = tmp_path / "presplit"
    for cls in ("0", "1"):
        files = sorted((digits_dir / cls).iterdir())
        for part, chosen in (("train", files[:10]), ("val", files[8:14])):
            (root / part / cls).mkdir(parents=True, exist_ok=True)
            for path in chosen:
                shutil.copy(path, root / part / cls / path.name)
    with caplog.at_level(logging.WARNING, logger="components.data.folders"):
        split = scan(root)
    assert split.duplicates == 4
    assert "4 validation or test image(s) are byte-identical" in caplog.text


def test_heavy_imbalance_is_warned_about(digits_dir, tmp_path, caplog):
    root = tmp_path / "presplit"
    for part in ("train", "val", "test"):
        for cls in ("0", "7"):
            shutil.copytree(digits_dir / cls, root / part / cls)
    for path in sorted((root / "train" / "7").iterdir())[2:]:
        path.unlink()
    for i in range(200):
        Image.new("L", (8, 8), i).save(root / "train" / "0" / f"extra{i}.png")
    with caplog.at_level(logging.WARNING, logger="components.data.folders"):
        scan(root)
    assert "imbalanced" in caplog.text and "'7'" in caplog.text


def test_empty_validation_split_is_refused(digits_dir, tmp_path):
    root = tmp_path / "presplit"
    for cls in ("0", "1"):
        shutil.copytree(digits_dir / cls, root / "train" / cls)
        (root / "val" / cls).mkdir(parents=True)
    with pytest.raises(DataError, match="has no images"):
        scan(root)


def test_class_present_only_in_validation_is_refused(digits_dir, tmp_path):
    root = tmp_path / "presplit"
    shutil.copytree(digits_dir / "0", root / "train" / "0")
    shutil.copytree(digits_dir / "1", root / "train" / "1")
    for cls in ("0", "1", "7"):
        shutil.copytree(digits_dir / cls, root / "val" / cls)
    with pytest.raises(DataError, match="lacks: 7"):
        scan(root)


def _tiff_with_a_strip_offset_past_2_63() -> bytes:
    """An 8x8 TIFF whose StripOffsets tag is a LONG8 holding 2**63 + 1 (Pillow raises OverflowError)."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "TIFF")
    data = bytearray(out.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for index in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * index
        if struct.unpack_from("<H", data, at)[0] == 273:  # StripOffsets
            struct.pack_into("<HHII", data, at, 273, 16, 1, len(data))
    return bytes(data + struct.pack("<Q", 2**63 + 1))


def test_a_tiff_with_a_strip_offset_past_2_63_is_a_data_error(tmp_path: Path):
    path = tmp_path / "overflow.tif"
    path.write_bytes(_tiff_with_a_strip_offset_past_2_63())
    with pytest.raises(DataError, match="not a readable image") as err:  # from a file the seek fails with ValueError
        load_image(path, 32)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "error",
    [OverflowError("Python int too large to convert to C ssize_t"), EOFError("no more frames"), struct.error("short")],
    ids=type,
)
def test_what_pillow_decoders_raise_for_malformed_files_is_a_data_error(tmp_path: Path, monkeypatch, error):
    """The same TIFF read from memory makes Pillow raise OverflowError; other plugins raise EOFError or struct.error."""
    from PIL import TiffImagePlugin

    with pytest.raises(OverflowError):  # what the server's decoder saw
        Image.open(io.BytesIO(_tiff_with_a_strip_offset_past_2_63())).load()

    def fail(self):  # noqa: ANN001, ANN202
        raise error

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", fail)
    path = tmp_path / "overflow.tif"
    path.write_bytes(_tiff_with_a_strip_offset_past_2_63())
    with pytest.raises(DataError, match="not a readable image") as err:
        load_image(path, 32)
    assert err.value.__cause__ is error and str(path) in str(err.value)
