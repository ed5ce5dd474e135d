"""Decoding untrusted image bytes into RGB arrays, or a precise reason why not.

Line cameras produce odd but valid images (16-bit grayscale, CMYK, palette, alpha, EXIF rotation,
TIFF/BMP): these are converted, not rejected. Broken input (empty, truncated, not an image, a
decompression bomb) raises ``ImageRejected`` with one of the report schema's error codes, so the
daemon can write an error report and quarantine the file instead of dying.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own bomb guard is process-global; we check sizes ourselves against the configured limit.
Image.MAX_IMAGE_PIXELS = None


class ImageRejected(Exception):
    """The bytes cannot be inspected; ``code`` is a report error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # H x W x 3, uint8, upright (EXIF orientation applied)
    format: str
    mode: str  # the mode the file was stored in, before conversion

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def decode_image(data: bytes, *, max_pixels: int = 80_000_000) -> DecodedImage:
    """Decode ``data`` into an upright 8-bit RGB array or raise ImageRejected."""
    if not data:
        raise ImageRejected("empty_file", "the file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected(
            "not_an_image", f"not a recognised image format ({_magic(data)})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("not_an_image", f"unreadable image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected("unsupported_image", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageRejected(
            "decompression_bomb",
            f"declared size {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} (ingest.max_image_pixels)",
        )
    stored_mode, fmt = image.mode, image.format or "unknown"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            rgb = to_rgb(ImageOps.exif_transpose(image))
    except OSError as exc:
        code = "truncated_image" if "truncat" in str(exc).lower() else "unsupported_image"
        raise ImageRejected(code, f"cannot decode {fmt} image: {exc}") from None
    except (ValueError, SyntaxError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("unsupported_image", f"cannot decode {fmt} image: {exc}") from None
    return DecodedImage(rgb=rgb, format=fmt, mode=stored_mode)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode → H x W x 3 uint8. 16-bit and float data are scaled by their full range."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        full = 65535.0 if mode.startswith("I;16") or array.max(initial=0) <= 65535 else array.max()
        gray = np.clip(array / full * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min(initial=0)), float(array.max(initial=1))
        gray = np.clip((array - low) / max(high - low, 1e-12) * 255.0 + 0.5, 0, 255).astype(
            np.uint8
        )
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _magic(data: bytes) -> str:
    head = data[:8]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "looks like text"
    return "first bytes " + head.hex()
