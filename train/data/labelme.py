"""Reading labelme data sets: one JSON per image with ``shapes`` drawn by hand.

Every shape becomes the tightest box around it: rectangles (two corners), polygons, lines and
line strips (crack annotators often trace cracks as polylines), and circles (centre and a point on
the rim). A lone ``point`` has no extent and is an error rather than a silently dropped object.
``imagePath`` is relative to the JSON file; the embedded ``imageData`` is not used (the image must
be on disk, like every other format). Errors name the JSON file and path (``shapes[3].points``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from train.data.boxes import Box, points_to_xyxy
from train.data.coco import load_json
from train.data.errors import DataError
from train.data.images import check_image_size, image_size
from train.data.records import Obj, Provenance, Record, make_obj

POLYLINE_SHAPES = ("polygon", "rectangle", "line", "linestrip")


def _points(shape: dict, path: Path, where: str) -> list[tuple[float, float]]:
    points = shape.get("points")
    try:
        pairs = [(float(x), float(y)) for x, y in points]
    except (TypeError, ValueError):
        raise DataError(path, f"{where}.points", f"needs [[x, y], ...], got {points!r}") from None
    if not pairs:
        raise DataError(path, f"{where}.points", "no points")
    return pairs


def shape_box(shape: dict, path: Path, where: str) -> Box:
    """The box around one labelme shape."""
    kind = shape.get("shape_type") or "polygon"
    points = _points(shape, path, where)
    if kind in POLYLINE_SHAPES:
        if len(points) < 2:
            raise DataError(path, f"{where}.points", f"a {kind} needs at least 2 points")
        return points_to_xyxy(points)
    if kind == "circle" and len(points) == 2:
        (cx, cy), (px, py) = points
        r = math.hypot(px - cx, py - cy)
        return (cx - r, cy - r, cx + r, cy + r)
    raise DataError(
        path, f"{where}.shape_type", f"a {kind!r} shape has no box; use a rectangle or polygon"
    )


def _size(data: dict, path: Path, image: Path) -> tuple[int, int]:
    width, height = data.get("imageWidth"), data.get("imageHeight")
    if width is None or height is None:
        return image_size(image, path, "imagePath")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise DataError(path, "imageWidth", f"image size must be integers >= 1: {width}x{height}")
    check_image_size(image, width, height, path, "imageWidth")
    return width, height


def read_labelme_file(path: Path, base: Path) -> Record:
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise DataError(path, "shapes", "not a labelme file: needs a list 'shapes'")
    if not isinstance(data.get("imagePath"), str) or not data["imagePath"]:
        raise DataError(path, "imagePath", "missing: labelme files must name their image")
    image = Path(os.path.normpath(path.parent / data["imagePath"].replace("\\", "/")))
    width, height = _size(data, path, image)
    objects: list[Obj] = []
    for i, shape in enumerate(data["shapes"]):
        where = f"shapes[{i}]"
        if not isinstance(shape, dict):
            raise DataError(path, where, "a shape must be a JSON object")
        box = shape_box(shape, path, where)
        objects.append(make_obj(shape.get("label"), box, width, height, (str(path), where)))
    return Record(
        image=image,
        width=width,
        height=height,
        objects=tuple(objects),
        provenance=Provenance("dataset", ref=f"labelme:{path.relative_to(base).as_posix()}"),
        origin=(str(path), None),
    )


def read_labelme(root: str | Path) -> list[Record]:
    """Every labelme ``*.json`` under ``root`` (a folder) or the one file ``root`` names."""
    root = Path(root).absolute()
    files = [root] if root.is_file() else sorted(root.rglob("*.json"))
    if not files:
        raise DataError(root, None, "no labelme .json files found")
    base = root.parent if root.is_file() else root
    return [read_labelme_file(path, base) for path in files]
