"""Reading COCO detection files: one JSON with ``images``, ``annotations`` and ``categories``.

Boxes are COCO ``[x, y, width, height]`` and become ``[x1, y1, x2, y2]``. Crowd annotations
(``iscrowd: 1``) mark regions of many instances, not objects, and are skipped, as COCO's own
evaluation does. Images listed without annotations are images without defects. ``file_name`` is
relative to ``images_dir`` (default: the JSON's folder, then its ``images/`` subfolder). Errors name
the JSON file and the JSON path, e.g. ``train.json:annotations[12].bbox: ...``.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.data.boxes import xywh_to_xyxy
from train.data.errors import DataError
from train.data.images import check_image_size
from train.data.records import Obj, Provenance, Record, make_obj


def load_json(path: Path) -> object:
    """Parsed JSON, with empty and malformed files reported at their line."""
    if not path.is_file():
        raise DataError(path, None, "file does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(path, 1, "file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, f"malformed JSON: {exc.msg}") from None


def _list(data: dict, key: str, path: Path) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise DataError(path, key, f"a COCO file needs a list {key!r}")
    return value


def _categories(data: dict, path: Path) -> dict[int, str]:
    names = {}
    for i, cat in enumerate(_list(data, "categories", path)):
        if not isinstance(cat, dict) or not isinstance(cat.get("name"), str) or "id" not in cat:
            raise DataError(path, f"categories[{i}]", "needs an 'id' and a string 'name'")
        names[cat["id"]] = cat["name"]
    return names


def _image_path(file_name: str, images_dir: Path | None, path: Path) -> Path:
    if images_dir is not None:
        return images_dir / file_name
    beside = path.parent / file_name
    return beside if beside.exists() else path.parent / "images" / file_name


def _images(data: dict, path: Path, images_dir: Path | None) -> dict[object, tuple[Path, int, int]]:
    images = {}
    for i, entry in enumerate(_list(data, "images", path)):
        where = f"images[{i}]"
        if not isinstance(entry, dict) or not {"id", "file_name", "width", "height"} <= set(entry):
            raise DataError(path, where, "needs id, file_name, width and height")
        width, height = entry["width"], entry["height"]
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            raise DataError(
                path, where, f"width and height must be integers >= 1: {width}x{height}"
            )
        if entry["id"] in images:
            raise DataError(path, f"{where}.id", f"image id {entry['id']!r} is listed twice")
        image = _image_path(entry["file_name"], images_dir, path)
        check_image_size(image, width, height, path, where)
        images[entry["id"]] = (image, width, height)
    return images


def _objects(data: dict, path: Path, images: dict, names: dict) -> dict[object, list[Obj]]:
    objects: dict[object, list[Obj]] = {image_id: [] for image_id in images}
    for i, ann in enumerate(_list(data, "annotations", path)):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError(path, where, "an annotation must be a JSON object")
        if ann.get("iscrowd", 0):
            continue
        if ann.get("image_id") not in images:
            raise DataError(path, f"{where}.image_id", f"unknown image id {ann.get('image_id')!r}")
        if ann.get("category_id") not in names:
            cid = ann.get("category_id")
            raise DataError(path, f"{where}.category_id", f"unknown category id {cid!r}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DataError(path, f"{where}.bbox", f"needs [x, y, width, height], got {bbox!r}")
        _, width, height = images[ann["image_id"]]
        label = names[ann["category_id"]]
        try:
            box = xywh_to_xyxy(bbox)
        except (TypeError, ValueError):
            raise DataError(path, f"{where}.bbox", f"not numbers: {bbox!r}") from None
        objects[ann["image_id"]].append(
            make_obj(label, box, width, height, (str(path), f"{where}.bbox"))
        )
    return objects


def read_coco(path: str | Path, images_dir: str | Path | None = None) -> list[Record]:
    """Every image of a COCO JSON file, in the file's order."""
    path = Path(path).absolute()
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(
            path, "$", "a COCO file is a JSON object with images/annotations/categories"
        )
    images_dir = Path(images_dir).absolute() if images_dir is not None else None
    names = _categories(data, path)
    images = _images(data, path, images_dir)
    objects = _objects(data, path, images, names)
    return [
        Record(
            image=image,
            width=width,
            height=height,
            objects=tuple(objects[image_id]),
            provenance=Provenance("dataset", ref=f"coco:{path.name}#{image_id}"),
            origin=(str(path), None),
        )
        for image_id, (image, width, height) in images.items()
    ]
