"""Deterministic, class-stratified train/val/test splits.

A held-out split must not change between runs (or the before/after numbers compare different
images), must not depend on the order files were listed in, and must hold every class in the same
proportion as the whole set, or a rare defect may vanish from validation. So:

- an image's class is its rarest label (fewest objects over the whole set; ties by name), or
  ``"none"`` for an image without objects, so rare defects drive the stratification;
- each class's images are sorted by path, shuffled with ``random.Random(f"{seed}/{class}")`` and cut
  by the fractions with largest-remainder rounding (a class of one image goes to ``train``);
- the same records and seed give the same split on every machine and Python version.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from train.data.labels import label_counts
from train.data.records import Record, write_records

SPLIT_NAMES = ("train", "val", "test")
NO_OBJECTS = "none"


@dataclass(frozen=True)
class Split:
    train: list[Record]
    val: list[Record]
    test: list[Record]

    def parts(self) -> dict[str, list[Record]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def image_class(record: Record, counts: Counter[str]) -> str:
    """The rarest label of ``record`` under ``counts``, or ``"none"`` without objects."""
    if not record.objects:
        return NO_OBJECTS
    return min(set(record.labels), key=lambda label: (counts[label], label))


def allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items by ``fractions`` with largest-remainder rounding (sums to ``n``)."""
    quotas = [n * f for f in fractions]
    sizes = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be three numbers >= 0 (train, val, test): {fractions}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {sum(fractions)} from {fractions}")


def split_records(
    records: Sequence[Record],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> Split:
    """Split ``records`` into train/val/test, stratified by ``image_class``."""
    _check_fractions(fractions)
    counts = label_counts(records)
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(image_class(record, counts), []).append(record)
    parts: list[list[Record]] = [[], [], []]
    for name in sorted(groups):
        group = sorted(groups[name], key=lambda r: str(r.image))
        random.Random(f"{seed}/{name}").shuffle(group)
        start = 0
        for part, size in zip(parts, allocate(len(group), fractions), strict=True):
            part.extend(group[start : start + size])
            start += size
    return Split(*(sorted(part, key=lambda r: str(r.image)) for part in parts))


def write_split(folder: str | Path, split: Split) -> dict[str, Path]:
    """``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` in ``folder`` (empty parts are skipped)."""
    folder = Path(folder)
    return {
        name: write_records(folder / f"{name}.jsonl", part)
        for name, part in split.parts().items()
        if part
    }
