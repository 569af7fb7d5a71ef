"""Decoding images into the exact uint8 arrays the models see.

Training, the ONNX parity check and every consumer call `load_image`, so a
prediction in production sees the same pixels the model was validated on.
Imports numpy and Pillow only: consumers load this without torch.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from components.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
MAX_PIXELS = 64_000_000
"""Images claiming more pixels than this are refused before decoding (decompression bombs)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode (L, P, RGBA, CMYK, I;16, ...) to 8-bit RGB, honouring EXIF rotation."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def open_image(source: Path | str | Image.Image) -> Image.Image:
    """Open and fully decode an image, refusing bombs and corrupt files with a `DataError`."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = Path(source)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise DataError(
                    f"{path}: claims {width}x{height} pixels, over the {MAX_PIXELS:,} limit; "
                    "resize it or remove it from the folder"
                )
            image.load()
            return to_rgb(image)
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused before decoding, a possible decompression bomb ({exc}); resize or remove it") from exc
    # Pillow's decoders also raise EOFError (truncated frames), struct.error (short headers) and
    # OverflowError (a TIFF offset past 2**63) for malformed files.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, OverflowError) as exc:
        raise DataError(f"{path}: not a readable image ({exc}); replace or remove the file") from exc


def to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image to `size`x`size` (bilinear) and return it as uint8 HxWx3."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def load_image(source: Path | str | Image.Image, size: int) -> np.ndarray:
    """Decode `source` into the uint8 HxWx3 array a Graft model takes."""
    return to_model_input(open_image(source), size)


def load_batch(sources: list[Path] | list[str] | list[Image.Image], size: int) -> np.ndarray:
    """Stack `load_image` over several sources into an N x size x size x 3 uint8 batch."""
    if not sources:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.stack([load_image(source, size) for source in sources])
