"""Finding training images on disk and reading their sizes, with errors that name the file.

Readers need an image's size to check and convert boxes (YOLO stores fractions) and must refuse
annotations whose image is missing, empty or not an image. Pillow reads only the header here, so a
size check over thousands of images costs milliseconds each, not a decode.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from train.data.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def find_images(root: Path) -> list[Path]:
    """Every image file under ``root`` (recursively), sorted for a stable order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and is_image(p))


def image_size(image: Path, where: str | Path, line: int | str | None) -> tuple[int, int]:
    """``(width, height)`` of ``image``; problems are reported at ``where:line`` (the annotation)."""
    if not image.is_file():
        raise DataError(where, line, f"image {image} is missing")
    if image.stat().st_size == 0:
        raise DataError(where, line, f"image {image} is an empty file")
    try:
        with Image.open(image) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(where, line, f"image {image} cannot be read: {exc}") from exc


def check_image_size(
    image: Path, width: int, height: int, where: str | Path, line: int | str | None
) -> None:
    """Refuse annotations whose stated size disagrees with the image file (boxes would be wrong)."""
    actual = image_size(image, where, line)
    if actual != (width, height):
        raise DataError(
            where,
            line,
            f"annotation says the image is {width}x{height} but {image} is "
            f"{actual[0]}x{actual[1]}; fix the size or the image path",
        )


def index_by_stem(images: Iterable[Path]) -> dict[str, list[Path]]:
    """Images grouped by file stem, for formats that name an annotation after its image."""
    index: dict[str, list[Path]] = {}
    for image in images:
        index.setdefault(image.stem, []).append(image)
    return index
