"""Reading Pascal VOC data sets: one XML file per image with ``<object><name>`` and ``<bndbox>``.

The image is found by the XML file's name (``a.xml`` → ``a.jpg`` anywhere under the data-set root),
falling back to the ``<filename>`` tag: tags are unreliable in the wild (NEU-DET's lack the
extension). Coordinates are taken as written, in pixel-edge convention (VOC's 1-based ``xmax == W``
is inside the 1 px tolerance). ``difficult``/``truncated`` flags are not training targets and are
ignored. Images without an XML file are not read (VOC gives a defect-free image an XML without
objects). A size of 0 in ``<size>`` (some tools write it) means: read it from the image. Errors
name the XML file and the element path, e.g. ``a.xml:object[2]/bndbox/xmax: ...``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from train.data.errors import DataError
from train.data.images import check_image_size, find_images, image_size, index_by_stem
from train.data.records import Obj, Provenance, Record, make_obj


def _number(element: ET.Element, tag: str, xml: Path, where: str) -> float:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(xml, f"{where}/{tag}", "missing")
    try:
        return float(child.text)
    except ValueError:
        raise DataError(xml, f"{where}/{tag}", f"not a number: {child.text.strip()!r}") from None


def _parse(xml: Path) -> ET.Element:
    if xml.stat().st_size == 0:
        raise DataError(xml, 1, "file is empty")
    try:
        return ET.parse(xml).getroot()
    except ET.ParseError as exc:
        raise DataError(xml, exc.position[0], f"malformed XML: {exc}") from None


def _find_image(xml: Path, root: ET.Element, index: dict[str, list[Path]]) -> Path:
    tag = (root.findtext("filename") or "").strip()
    candidates = index.get(xml.stem) or index.get(Path(tag).stem) or []
    if len(candidates) > 1:
        near = [c for c in candidates if c.parent in (xml.parent, xml.parent.parent / "JPEGImages")]
        candidates = near or candidates
    if not candidates:
        raise DataError(xml, "filename", f"image missing: no image named {xml.stem}.* or {tag!r}")
    if len(candidates) > 1:
        raise DataError(xml, "filename", f"ambiguous image: {[str(c) for c in candidates]}")
    return candidates[0]


def _size(xml: Path, root: ET.Element, image: Path) -> tuple[int, int]:
    size = root.find("size")
    if size is None:
        return image_size(image, xml, "size")
    width, height = (_number(size, tag, xml, "size") for tag in ("width", "height"))
    if width <= 0 or height <= 0:
        return image_size(image, xml, "size")
    if not (width.is_integer() and height.is_integer()):
        raise DataError(xml, "size", f"image size must be whole pixels, got {width}x{height}")
    check_image_size(image, int(width), int(height), xml, "size")
    return int(width), int(height)


def _objects(xml: Path, root: ET.Element, width: int, height: int) -> tuple[Obj, ...]:
    objects = []
    for i, element in enumerate(root.findall("object"), start=1):
        where = f"object[{i}]"
        name = (element.findtext("name") or "").strip()
        if not name:
            raise DataError(xml, f"{where}/name", "missing object name")
        bndbox = element.find("bndbox")
        if bndbox is None:
            raise DataError(xml, f"{where}/bndbox", "missing")
        tags = ("xmin", "ymin", "xmax", "ymax")
        box = [_number(bndbox, t, xml, f"{where}/bndbox") for t in tags]
        objects.append(make_obj(name, box, width, height, (str(xml), f"{where}/bndbox")))
    return tuple(objects)


def read_voc_file(xml: Path, index: dict[str, list[Path]], base: Path) -> Record:
    """One VOC XML file → ``Record``; ``index`` maps image stems to image paths."""
    root = _parse(xml)
    if root.tag != "annotation":
        raise DataError(xml, root.tag, "not a VOC file: the root element must be <annotation>")
    image = _find_image(xml, root, index)
    width, height = _size(xml, root, image)
    return Record(
        image=image,
        width=width,
        height=height,
        objects=_objects(xml, root, width, height),
        provenance=Provenance("dataset", ref=f"voc:{xml.relative_to(base).as_posix()}"),
        origin=(str(xml), None),
    )


def read_voc(root: str | Path) -> list[Record]:
    """Every ``*.xml`` under ``root``, each matched to its image under ``root``."""
    root = Path(root).absolute()
    xmls = sorted(root.rglob("*.xml"))
    if not xmls:
        raise DataError(root, None, "no VOC .xml annotation files found")
    index = index_by_stem(find_images(root))
    return [read_voc_file(xml, index, root) for xml in xmls]
