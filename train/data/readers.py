"""One entry point for every training-data format: ``read_dataset(path, format)``.

The trainer, ``appliance eval --format`` and the benchmarks name a format and get ``Record``
objects, whatever the annotation tool was. One reader per file (``yolo.py``, ``voc.py``,
``coco.py``, ``labelme.py``, ``records.py``); this table is the only list of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from train.data.coco import read_coco
from train.data.labelme import read_labelme
from train.data.records import Record, read_records
from train.data.voc import read_voc
from train.data.yolo import read_yolo

# format name → (reader, what ``path`` is)
READERS: dict[str, tuple[Callable[..., list[Record]], str]] = {
    "yolo": (read_yolo, "folder of images + .txt labels, or its data.yaml"),
    "voc": (read_voc, "folder of .xml annotations and their images"),
    "coco": (read_coco, "COCO .json file"),
    "labelme": (read_labelme, "folder of labelme .json files, or one file"),
    "records": (read_records, "inspection records .jsonl file"),
}
FORMATS = tuple(READERS)


def read_dataset(path: str | Path, format: str, **options) -> list[Record]:
    """Read ``path`` in ``format`` (one of ``FORMATS``); ``options`` go to that format's reader.

    Options: yolo ``classes=[...]``; coco ``images_dir=...``; records ``check_images=False``.
    """
    if format not in READERS:
        raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    reader, _ = READERS[format]
    return reader(Path(path), **options)
