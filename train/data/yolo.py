"""Reading YOLO data sets: one ``class cx cy w h`` line per object, normalised to the image size.

Two layouts are found: label files beside their images (``a.jpg`` + ``a.txt``), and Ultralytics'
parallel trees (``images/train/a.jpg`` + ``labels/train/a.txt``). An image without a label file, or
with an empty one, is an image without defects (YOLO's convention for background images); a label
file without an image is an error. Lines with more than five numbers are Ultralytics segment
polygons (``class x1 y1 x2 y2 ...``) and become their bounding box.

YOLO files hold class ids only, so class names come from ``classes=[...]``, else ``classes.txt``
(one name per line) or a ``data.yaml`` / ``dataset.yaml`` with ``names`` (list or id → name map).
"""

from __future__ import annotations

from pathlib import Path

from train.data.boxes import normalised_to_pixels, points_to_xyxy, yolo_to_xyxy
from train.data.errors import DataError
from train.data.images import find_images, image_size
from train.data.records import Obj, Provenance, Record, make_obj

CLASS_FILES = ("classes.txt", "data.yaml", "dataset.yaml")


def _names_from_yaml(path: Path) -> list[str]:
    try:
        import yaml  # PyYAML arrives with the train extra (transformers); classes.txt needs nothing
    except ImportError as exc:
        raise DataError(path, None, "reading data.yaml needs PyYAML; or write classes.txt") from exc
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DataError(path, mark.line + 1 if mark else None, f"malformed YAML: {exc}") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        ids = sorted(names)
        if ids != list(range(len(ids))):
            raise DataError(path, "names", f"class ids must be 0..{len(ids) - 1}, got {ids}")
        names = [names[i] for i in ids]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(path, "names", "needs 'names': a list of class names or an id → name map")
    return names


def _names_from_txt(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DataError(path, 1, "file is empty: list one class name per line")
    for number, name in enumerate(names, start=1):
        if not name:
            raise DataError(path, number, "blank class name (class ids follow line order)")
    return names


def class_names(root: Path, classes: list[str] | None) -> list[str]:
    """The id → name list: given, or from the first class file found in ``root`` or ``root/labels``."""
    if classes is not None:
        return list(classes)
    if root.is_file():
        return _names_from_yaml(root)
    for folder in (root, root / "labels"):
        for name in CLASS_FILES:
            candidate = folder / name
            if candidate.is_file():
                reader = _names_from_txt if name.endswith(".txt") else _names_from_yaml
                return reader(candidate)
    raise DataError(
        root, None, "YOLO class names not found: pass classes=[...] or add classes.txt / data.yaml"
    )


def label_file(image: Path) -> Path | None:
    """The label file of ``image``: beside it, or in the parallel ``labels/`` tree."""
    beside = image.with_suffix(".txt")
    if beside.is_file():
        return beside
    parts = list(image.parts)
    if "images" in parts:
        index = len(parts) - 1 - parts[::-1].index("images")
        parts[index] = "labels"
        parallel = Path(*parts).with_suffix(".txt")
        if parallel.is_file():
            return parallel
    return None


def _parse_line(text: str, names: list[str], size: tuple[int, int], where) -> Obj:
    fields = text.split()
    if len(fields) < 5 or (len(fields) > 5 and len(fields) % 2 == 0):
        raise DataError(*where, f"expected 'class cx cy w h' (or a polygon), got {text.strip()!r}")
    try:
        class_id = int(fields[0])
        numbers = [float(v) for v in fields[1:]]
    except ValueError:
        raise DataError(*where, f"not numbers: {text.strip()!r}") from None
    if not 0 <= class_id < len(names):
        raise DataError(*where, f"unknown class id {class_id}: the class list has {len(names)}")
    width, height = size
    if len(numbers) == 4:
        box = yolo_to_xyxy(numbers, width, height)
    else:
        xs_ys = list(zip(numbers[0::2], numbers[1::2], strict=True))
        box = normalised_to_pixels(points_to_xyxy(xs_ys), width, height)
    return make_obj(names[class_id], box, width, height, where)


def _read_labels(path: Path, names: list[str], size: tuple[int, int]) -> tuple[Obj, ...]:
    objects = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text.strip():
            objects.append(_parse_line(text, names, size, (str(path), number)))
    return tuple(objects)


def _orphan_labels(used: set[Path]) -> list[Path]:
    folders = {p.parent for p in used}
    candidates = {p for folder in folders for p in folder.glob("*.txt")}
    return sorted(p for p in candidates - used if p.name not in CLASS_FILES)


def read_yolo(root: str | Path, classes: list[str] | None = None) -> list[Record]:
    """Every image under ``root`` (a folder, or a data.yaml whose folder holds the images)."""
    root = Path(root)
    names = class_names(root, classes)
    folder = (root.parent if root.is_file() else root).absolute()
    images = find_images(folder)
    if not images:
        raise DataError(folder, None, "no images found (looked for .jpg/.png/.bmp/.tif/.webp)")
    records, used = [], set()
    for image in images:
        labels = label_file(image)
        size = image_size(image, labels or image, None)
        objects = () if labels is None else _read_labels(labels, names, size)
        if labels is not None:
            used.add(labels)
        ref = f"yolo:{(labels or image).relative_to(folder).as_posix()}"
        origin = (str(labels or image), None)
        provenance = Provenance("dataset", ref=ref)
        records.append(Record(image, *size, objects, provenance=provenance, origin=origin))
    orphans = _orphan_labels(used)
    if orphans:
        raise DataError(orphans[0], None, f"label file without an image ({len(orphans)} in all)")
    return records
