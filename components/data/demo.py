"""The embedded demo data: scikit-learn's bundled handwritten digits as an image folder.

`make run` pulls these files from the DVC remote shipped in the repo; this
writer is how they were made (`python -m components.data.demo data`), kept so the
data's origin is code, not folklore.

`write_textures` makes a second, natural-image set from the photographs and
textures bundled inside the scikit-image wheel (no download): one class per
picture, samples are random crops. It is where ImageNet pre-training matters.
`write_photos` makes a third from the colour photographs bundled with
scikit-image, scikit-learn and matplotlib: smaller crops, turned and mirrored,
pre-split into train/, val/ and test/. The choose benchmark ranks backbones on all three.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path, per_class: int | None = None, classes: tuple[int, ...] | None = None) -> Path:
    """Write the 1,797 8x8 digit scans as `root/<digit>/<index>.png` (8-bit grayscale).

    Args:
        root: Folder to create; it must not exist yet or be empty.
        per_class: Keep only the first N images of each digit (tests use a few).
        classes: Keep only these digits.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen: dict[int, int] = {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(label)
        if classes is not None and label not in classes:
            continue
        if per_class is not None and seen.get(label, 0) >= per_class:
            continue
        seen[label] = seen.get(label, 0) + 1
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        gray = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(gray).save(folder / f"{index:04d}.png", optimize=False)
    return root


# Pictures shipped inside the scikit-image wheel (skimage/data/*.png); the others
# in skimage.data are fetched with pooch at first use and are not allowed here.
TEXTURE_IMAGES: dict[str, str] = {
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "moon": "moon.png",
    "camera": "camera.png",
    "coins": "coins.png",
    "astronaut": "astronaut.png",
    "cat": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
}


def write_textures(root: Path, per_class: int | None = None, size: int = 64, seed: int = 0) -> Path:
    """Write random crops of scikit-image's bundled photos as `root/<class>/<n>.png`.

    Each class is one picture (brick, grass, gravel, moon, camera, coins,
    astronaut, cat, coffee, rocket); its samples are square crops of 20-45% of
    the picture's short side at random places, resized to `size` and converted
    to 8-bit grayscale so colour alone cannot tell the classes apart. The same
    seed gives the same files.

    Args:
        root: Folder to create; it must not exist yet or be empty.
        per_class: Crops per class (default 60: 48 train / 12 val at the default split).
        size: Side of the written square images in pixels.
        seed: Seed of the crop positions.
    """
    from importlib.resources import files

    count = 60 if per_class is None else per_class
    bundled = files("skimage") / "data"
    for index, (label, filename) in enumerate(TEXTURE_IMAGES.items()):
        with Image.open(str(bundled / filename)) as opened:
            picture = opened.convert("L")
        rng = np.random.default_rng([seed, index])
        width, height = picture.size
        short = min(width, height)
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(count):
            side = int(rng.uniform(0.20, 0.45) * short)
            left = int(rng.integers(0, width - side + 1))
            top = int(rng.integers(0, height - side + 1))
            crop = picture.crop((left, top, left + side, top + side))
            crop.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{n:03d}.png", optimize=False)
    return root


# Colour photographs shipped inside pip wheels (no download): package -> {class: file in its data folder}.
PHOTO_IMAGES: dict[str, dict[str, str]] = {
    "skimage": {
        "astronaut": "data/astronaut.png",
        "cat": "data/chelsea.png",
        "coffee": "data/coffee.png",
        "rocket": "data/rocket.jpg",
        "motorcycle": "data/motorcycle_left.png",
        "galaxies": "data/hubble_deep_field.jpg",
        "retina": "data/retina.jpg",
        "stained_tissue": "data/ihc.png",
    },
    "sklearn": {"temple": "datasets/images/china.jpg", "flower": "datasets/images/flower.jpg"},
    "matplotlib": {"portrait": "mpl-data/sample_data/grace_hopper.jpg"},
}


def write_photos(root: Path, per_class: int = 80, size: int = 32, seed: int = 0) -> Path:
    """Write small colour crops of the photographs bundled with scikit-image, scikit-learn and matplotlib.

    Each class is one photograph (11 classes); its samples are square crops of 5-12% of the
    picture's short side at random places, turned by a random multiple of 90 degrees, mirrored
    half the time and shrunk to `size`. Crops that small show a patch of skin, fur, sky or metal,
    which several pictures share: harder than `write_textures`, and the backbones differ here.
    The folder is pre-split into `root/train/<class>/` (half the crops), `root/val/<class>/` and
    `root/test/<class>/` (a quarter each), so its held-out sets do not depend on Graft's split.
    The same seed gives the same files.

    Args:
        root: Folder to create; it must not exist yet or be empty.
        per_class: Crops per class: half for training, a quarter each for validation and test.
        size: Side of the written square images in pixels.
        seed: Seed of the crop positions and turns.
    """
    from importlib.resources import files

    pictures = [(package, label, name) for package, named in PHOTO_IMAGES.items() for label, name in named.items()]
    for index, (package, label, filename) in enumerate(pictures):
        with Image.open(str(files(package) / filename)) as opened:
            picture = opened.convert("RGB")
        rng = np.random.default_rng([seed, index])
        width, height = picture.size
        short = min(width, height)
        for n in range(per_class):
            side = int(rng.uniform(0.05, 0.12) * short)
            left = int(rng.integers(0, width - side + 1))
            top = int(rng.integers(0, height - side + 1))
            crop = picture.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
            crop = crop.rotate(90 * int(rng.integers(0, 4)))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            folder = root / ("train", "train", "val", "test")[n % 4] / label
            folder.mkdir(parents=True, exist_ok=True)
            crop.save(folder / f"{n:03d}.png", optimize=False)
    return root

if __name__ == "__main__":
    write_digits(Path(sys.argv[1] if len(sys.argv) > 1 else "data"))
