"""Mapping data-set labels onto the deployment taxonomy.

A public data set names its classes its own way (NEU-DET's ``rolled-in_scale``, a YOLO set's
``Crack``); the model must learn the deployment's labels, because those are what the report schema,
the grammar and the rewards accept. ``LabelMap`` renames labels (``mapping``; a label that is
already a taxonomy label maps to itself), can drop a label on purpose (map it to ``None``), and
decides what happens to labels it does not know (``unknown``):

- ``"raise"`` (default): a ``DataError`` naming the annotation's file and line;
- ``"drop"``: the object is removed and the image kept — beware, the image still shows the defect,
  so a detector learns to ignore it; fine for classes that are not defects;
- ``"drop_image"``: the whole image is removed, the safe choice for detection training.

Attributes are checked the same way against the taxonomy's attribute enums.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import NoReturn

from appliance.taxonomy import Taxonomy
from train.data.errors import DataError
from train.data.records import Obj, Record

UNKNOWN_POLICIES = ("raise", "drop", "drop_image")


def identifier(name: str) -> str:
    """A data-set label as a taxonomy identifier: ``"Rolled-in Scale"`` → ``"rolled_in_scale"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


class _Dropped(Exception):
    """Internal: this object (or its image, by policy) leaves the data set."""


@dataclass(frozen=True)
class LabelMap:
    taxonomy: Taxonomy
    mapping: dict[str, str | None] = field(default_factory=dict)
    unknown: str = "raise"
    normalise: bool = False  # also accept labels whose ``identifier`` is a taxonomy label

    def __post_init__(self) -> None:
        if self.unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown={self.unknown!r}; choose one of {UNKNOWN_POLICIES}")
        wrong = sorted(
            f"{k!r} → {v!r}"
            for k, v in self.mapping.items()
            if v is not None and v not in self.taxonomy.labels
        )
        if wrong:
            raise ValueError(
                f"label mapping targets must be taxonomy labels {list(self.taxonomy.labels)}; "
                f"not: {', '.join(wrong)}"
            )

    def target(self, label: str) -> str | None:
        """The taxonomy label for ``label``; None when it is dropped on purpose.

        Raises KeyError when the label is unknown.
        """
        if label in self.mapping:
            return self.mapping[label]
        if label in self.taxonomy.labels:
            return label
        if self.normalise and identifier(label) in self.taxonomy.labels:
            return identifier(label)
        raise KeyError(label)

    def _unknown(self, obj: Obj, message: str) -> NoReturn:
        if self.unknown == "raise":
            path, line = obj.origin or ("<records>", None)
            raise DataError(path, line, message)
        raise _Dropped(self.unknown)

    def _attributes(self, obj: Obj) -> dict[str, str]:
        allowed = self.taxonomy.attributes
        kept = {}
        for name, value in obj.attributes.items():
            if name in allowed and value in allowed[name]:
                kept[name] = value
            elif self.unknown == "drop":
                continue  # an unknown attribute costs the attribute, not the object
            else:
                self._unknown(obj, f"attribute {name}={value!r} is not in the taxonomy {allowed}")
        return kept

    def map_object(self, obj: Obj) -> Obj | None:
        """``obj`` with taxonomy label and attributes; None when dropped (raises by policy)."""
        try:
            label = self.target(obj.label)
        except KeyError:
            self._unknown(
                obj,
                f"unknown label {obj.label!r}: map it to one of {list(self.taxonomy.labels)} "
                "(LabelMap mapping), or set unknown='drop'/'drop_image'",
            )
        if label is None:
            return None
        return replace(obj, label=label, attributes=self._attributes(obj))

    def map_record(self, record: Record) -> Record | None:
        """``record`` on the taxonomy; None when ``drop_image`` removes it."""
        try:
            objects = [self.map_object(obj) for obj in record.objects]
        except _Dropped as dropped:
            if str(dropped) == "drop_image":
                return None
            objects = [self._keep(obj) for obj in record.objects]
        return replace(record, objects=tuple(o for o in objects if o is not None))

    def _keep(self, obj: Obj) -> Obj | None:
        try:
            return self.map_object(obj)
        except _Dropped:
            return None

    def apply(self, records: Iterable[Record]) -> list[Record]:
        """Every record mapped onto the taxonomy, dropped ones left out."""
        mapped = (self.map_record(record) for record in records)
        return [record for record in mapped if record is not None]


def label_counts(records: Iterable[Record]) -> Counter[str]:
    """How many objects carry each label."""
    return Counter(label for record in records for label in record.labels)
