"""The embedded demo data: scikit-learn's bundled handwritten digits as an image folder.

`make run` pulls these files from the DVC remote shipped in the repo; this
writer is how they were made (`python -m components.demo data`), kept so the
data's origin is code, not folklore.
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


if __name__ == "__main__":
    write_digits(Path(sys.argv[1] if len(sys.argv) > 1 else "data"))
