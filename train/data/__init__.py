"""Training data: readers for public formats, the inspection-records format, labels and splits.

Everything in ``train/`` reads data through here: ``read_dataset(path, format)`` gives ``Record``
objects with pixel ``[x1, y1, x2, y2]`` boxes, ``LabelMap`` puts them on the deployment taxonomy
and ``split_records`` makes the held-out sets. Bad data raises ``DataError`` (``path:line: why``).
Plain Python, numpy and Pillow only: no torch, so the appliance can convert reports without it.
"""

from train.data.errors import DataError
from train.data.labels import LabelMap, label_counts
from train.data.readers import FORMATS, read_dataset
from train.data.records import (
    QA,
    Obj,
    Provenance,
    Record,
    read_records,
    record_from_report,
    write_records,
)
from train.data.split import Split, split_records

__all__ = [
    "FORMATS",
    "QA",
    "DataError",
    "LabelMap",
    "Obj",
    "Provenance",
    "Record",
    "Split",
    "label_counts",
    "read_dataset",
    "read_records",
    "record_from_report",
    "split_records",
    "write_records",
]
