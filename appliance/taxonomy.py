"""The deployment's defect taxonomy: labels and attribute enums.

One taxonomy feeds everything downstream: the report JSON Schema, the decoding grammar, the reward
functions and the evaluation. It always holds the generic ``anomaly`` label, which is what the
few-shot anomaly detector reports when it cannot name a defect type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ANOMALY_LABEL = "anomaly"
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


@dataclass(frozen=True)
class Taxonomy:
    """Defect labels and, per attribute name, its allowed values (all lower-case identifiers)."""

    labels: tuple[str, ...]
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        labels = tuple(self.labels)
        if ANOMALY_LABEL not in labels:
            labels = (*labels, ANOMALY_LABEL)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(
            self, "attributes", {k: tuple(v) for k, v in sorted(self.attributes.items())}
        )
        for problem in taxonomy_problems(self):
            raise ValueError(problem)

    def __hash__(self) -> int:
        return hash((self.labels, tuple(self.attributes.items())))

    def to_dict(self) -> dict:
        return {
            "labels": list(self.labels),
            "attributes": {k: list(v) for k, v in self.attributes.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Taxonomy:
        return cls(labels=tuple(data["labels"]), attributes=dict(data.get("attributes", {})))

    def covers(self, other: Taxonomy) -> bool:
        """True when every label and attribute value of ``other`` is allowed here."""
        if not set(other.labels) <= set(self.labels):
            return False
        return all(
            name in self.attributes and set(values) <= set(self.attributes[name])
            for name, values in other.attributes.items()
        )


def taxonomy_problems(taxonomy: Taxonomy) -> list[str]:
    """Everything wrong with a taxonomy, as human-readable sentences (empty when it is valid)."""
    problems = []
    seen: set[str] = set()
    for label in taxonomy.labels:
        if not NAME_RE.match(label):
            problems.append(f"label {label!r} must match {NAME_RE.pattern} (lower-case identifier)")
        if label in seen:
            problems.append(f"label {label!r} is listed twice")
        seen.add(label)
    for name, values in taxonomy.attributes.items():
        if not NAME_RE.match(name):
            problems.append(f"attribute name {name!r} must match {NAME_RE.pattern}")
        if not values:
            problems.append(f"attribute {name!r} needs at least one allowed value")
        if len(set(values)) != len(values):
            problems.append(f"attribute {name!r} lists a value twice")
        for value in values:
            if not NAME_RE.match(value):
                problems.append(f"attribute {name!r} value {value!r} must match {NAME_RE.pattern}")
    return problems
