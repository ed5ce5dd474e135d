"""Detection and attribute metrics as pure functions: the numbers ``appliance eval`` prints.

They live in the runtime (numpy only) so the appliance can gate a retrained bundle on them without
the trainer. Inputs are plain values: per image, a list of ``Detection`` (label, ``[x1, y1, x2, y2]``
box in pixels, score, attributes) and a list of ``GroundTruth`` (label, box, attributes).

* ``average_precision_50``: COCO's AP at IoU 0.5, computed as pycocotools' ``COCOeval`` does (bbox,
  one IoU threshold 0.5, area "all", ``maxDets=100``, no crowd regions). Per image and class the
  detections are sorted by score (stable) and cut to 100 — pycocotools applies ``maxDets`` per image
  *and class*; each detection takes the still-free ground truth of highest IoU >= 0.5 (on equal IoU
  the later one, as pycocotools' loop does); then over the data set the precision envelope is read at
  101 recall points. A class without ground truth has no AP and stays out of the mean (mAP), as in
  pycocotools; a class with ground truth and no detections has AP 0.
* ``detection_counts``/``precision_recall_f1``: the greedy label-aware matching of the GRPO rewards
  (``match_pairs``: same label, IoU >= 0.5, highest IoU first, ties by index, each box used once),
  counted over the data set. Empty denominators read as "nothing went wrong": precision is 1 without
  predictions, recall is 1 without ground truth, F1 is 1 when both are empty (and 0 when only one
  is). ``per_image_f1`` averages each image's F1 (seed 000), so an image with neither ground truth
  nor predictions scores 1.0.
* ``attribute_f1``: per attribute, over the matched pairs whose ground truth sets it, the macro F1
  over the values seen (seed 001). A missing prediction is wrong for the true value but is not a value
  of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

IOU_THRESHOLD = 0.5
MAX_DETECTIONS = 100
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's recThrs


@dataclass(frozen=True)
class GroundTruth:
    label: str
    bbox: Sequence[float]  # [x1, y1, x2, y2] in pixels
    attributes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Detection:
    label: str
    bbox: Sequence[float]
    score: float = 1.0
    attributes: dict = field(default_factory=dict)


def iou_matrix(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of every ``a`` box with every ``b`` box, shape ``(len(a), len(b))``; 0 for empty unions."""
    a = np.asarray(a, dtype=float).reshape(-1, 4)
    b = np.asarray(b, dtype=float).reshape(-1, 4)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# --- COCO AP@0.5 -------------------------------------------------------------------------------


def _match_image_class(
    detections: list[Detection], truth: list[GroundTruth], max_detections: int
) -> tuple[list[float], list[bool]]:
    """Scores and true-positive flags of one image's detections of one class (pycocotools order)."""
    order = np.argsort([-d.score for d in detections], kind="mergesort")[:max_detections]
    kept = [detections[i] for i in order]
    if not kept:
        return [], []
    ious = iou_matrix([d.bbox for d in kept], [g.bbox for g in truth])
    taken = np.zeros(len(truth), dtype=bool)
    flags = []
    for row in ious:
        best, match = min(IOU_THRESHOLD, 1 - 1e-10), -1
        for j, overlap in enumerate(row):
            if taken[j] or overlap < best:
                continue
            best, match = overlap, j
        if match >= 0:
            taken[match] = True
        flags.append(match >= 0)
    return [d.score for d in kept], flags


def _interpolated_ap(scores: list[float], flags: list[bool], n_truth: int) -> float:
    """101-point interpolated precision averaged over recall points (COCOeval.accumulate)."""
    if not scores:
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=float), kind="mergesort")
    tp = np.asarray(flags, dtype=float)[order]
    tp_sum, fp_sum = np.cumsum(tp), np.cumsum(1 - tp)
    recall = tp_sum / n_truth
    precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope, right to left
    at = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0)
    return float(np.mean(sampled))


def average_precision_50(
    detections: Sequence[Sequence[Detection]],
    truth: Sequence[Sequence[GroundTruth]],
    max_detections: int = MAX_DETECTIONS,
) -> dict[str, float]:
    """COCO AP@0.5 per class, for the classes that have ground truth (images aligned by index)."""
    if len(detections) != len(truth):
        raise ValueError(f"{len(detections)} detection lists for {len(truth)} images")
    classes = sorted({g.label for image in truth for g in image})
    result = {}
    for label in classes:
        scores, flags, n_truth = [], [], 0
        for image_dets, image_truth in zip(detections, truth, strict=True):
            gts = [g for g in image_truth if g.label == label]
            n_truth += len(gts)
            dets = [d for d in image_dets if d.label == label]
            image_scores, image_flags = _match_image_class(dets, gts, max_detections)
            scores += image_scores
            flags += image_flags
        result[label] = _interpolated_ap(scores, flags, n_truth)
    return result


def mean_ap(per_class: dict[str, float]) -> float | None:
    """The mean over classes with ground truth; None when there is none (pycocotools says -1)."""
    return float(np.mean(list(per_class.values()))) if per_class else None


# --- greedy label-aware matching, precision / recall / F1 --------------------------------------


def match_pairs(
    predicted: Sequence[tuple[str, Sequence[float]]],
    truth: Sequence[tuple[str, Sequence[float]]],
    threshold: float = IOU_THRESHOLD,
) -> list[tuple[int, int]]:
    """Greedy label-aware matching of ``(label, box)`` lists: ``(pred, truth)`` index pairs.

    A pair qualifies when the labels are equal and IoU >= ``threshold``; pairs are taken highest IoU
    first, ties broken by prediction then truth index, each box used once.
    """
    if not predicted or not truth:
        return []
    ious = iou_matrix([box for _, box in predicted], [box for _, box in truth])
    candidates = sorted(
        (-float(ious[i, j]), i, j)
        for i, (pred_label, _) in enumerate(predicted)
        for j, (true_label, _) in enumerate(truth)
        if pred_label == true_label and ious[i, j] >= threshold
    )
    used_pred, used_truth, pairs = set(), set(), []
    for _, i, j in candidates:
        if i not in used_pred and j not in used_truth:
            used_pred.add(i)
            used_truth.add(j)
            pairs.append((i, j))
    return pairs


def _pairs(detections: Sequence[Detection], truth: Sequence[GroundTruth]) -> list[tuple[int, int]]:
    return match_pairs([(d.label, d.bbox) for d in detections], [(g.label, g.bbox) for g in truth])


@dataclass(frozen=True)
class Counts:
    """Matched pairs, predictions and ground truth objects."""

    tp: int
    predicted: int
    truth: int

    @property
    def precision(self) -> float:
        return self.tp / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        return self.tp / self.truth if self.truth else 1.0

    @property
    def f1(self) -> float:
        total = self.predicted + self.truth
        return 2.0 * self.tp / total if total else 1.0


def detection_counts(
    detections: Sequence[Sequence[Detection]], truth: Sequence[Sequence[GroundTruth]]
) -> dict[str | None, Counts]:
    """Counts over the data set (key ``None``) and per label (a match always shares its label)."""
    tp: dict[str, int] = {}
    for image_dets, image_truth in zip(detections, truth, strict=True):
        for i, _ in _pairs(image_dets, image_truth):
            tp[image_dets[i].label] = tp.get(image_dets[i].label, 0) + 1
    n_pred = _label_counts(d.label for image in detections for d in image)
    n_truth = _label_counts(g.label for image in truth for g in image)
    labels = sorted(set(n_pred) | set(n_truth))
    counts: dict[str | None, Counts] = {
        label: Counts(tp.get(label, 0), n_pred.get(label, 0), n_truth.get(label, 0))
        for label in labels
    }
    counts[None] = Counts(sum(tp.values()), sum(n_pred.values()), sum(n_truth.values()))
    return counts


def _label_counts(labels) -> dict[str, int]:
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return counts


def precision_recall_f1(
    detections: Sequence[Sequence[Detection]], truth: Sequence[Sequence[GroundTruth]]
) -> tuple[float, float, float]:
    """Data-set precision, recall and F1 at IoU 0.5 (greedy label-aware matching)."""
    total = detection_counts(detections, truth)[None]
    return total.precision, total.recall, total.f1


def per_image_f1(
    detections: Sequence[Sequence[Detection]], truth: Sequence[Sequence[GroundTruth]]
) -> float | None:
    """The mean of each image's F1 (1.0 for an image with neither truth nor predictions)."""
    scores = [
        Counts(len(_pairs(d, g)), len(d), len(g)).f1 for d, g in zip(detections, truth, strict=True)
    ]
    return float(np.mean(scores)) if scores else None


# --- attributes --------------------------------------------------------------------------------


def macro_f1(true_values: Sequence[str], predicted_values: Sequence[str | None]) -> float:
    """Macro F1 over the values in either list (None: no prediction, wrong but not a value)."""
    values = sorted({*true_values, *(v for v in predicted_values if v is not None)})
    scores = []
    for value in values:
        tp = sum(
            t == value and p == value for t, p in zip(true_values, predicted_values, strict=True)
        )
        n_pred = sum(p == value for p in predicted_values)
        n_true = sum(t == value for t in true_values)
        scores.append(2.0 * tp / (n_pred + n_true))
    return float(np.mean(scores)) if scores else 1.0


def attribute_pairs(
    detections: Sequence[Sequence[Detection]], truth: Sequence[Sequence[GroundTruth]]
) -> dict[str, tuple[list[str], list[str | None]]]:
    """Per attribute name, the (true, predicted) values over matched pairs whose truth sets it."""
    found: dict[str, tuple[list[str], list[str | None]]] = {}
    for image_dets, image_truth in zip(detections, truth, strict=True):
        for i, j in _pairs(image_dets, image_truth):
            predicted = image_dets[i].attributes or {}
            for name, value in (image_truth[j].attributes or {}).items():
                if value is None:  # unset
                    continue
                true_list, pred_list = found.setdefault(name, ([], []))
                true_list.append(value)
                pred_list.append(predicted.get(name))
    return found


def attribute_f1(
    detections: Sequence[Sequence[Detection]], truth: Sequence[Sequence[GroundTruth]]
) -> dict[str, float]:
    """Macro F1 per attribute over the matched pairs (attributes no matched truth sets are absent)."""
    pairs = attribute_pairs(detections, truth)
    return {name: macro_f1(*pairs[name]) for name in sorted(pairs)}
