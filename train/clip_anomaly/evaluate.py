"""Image AUROC, pixel AUROC and description accuracy (numpy; no scikit-learn needed).

AUROC is the Mann-Whitney statistic with ties counted half, which equals scikit-learn's
``roc_auc_score`` (tested). Pixel AUROC pools every pixel of every test image, as MVTec-AD / VisA
papers (and anomalib's ``PixelAUROC``) do. Description accuracy is the fraction of defective images
whose generated description names the true taxonomy label and no other one (``names_label``);
normal images count as correct when the description names no label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from appliance.taxonomy import ANOMALY_LABEL


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of binary ``labels`` (1 = anomalous) ranked by ``scores``."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("AUROC needs both normal and anomalous samples")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average ranks over ties (1-based)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def pixel_auroc(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> float:
    """AUROC over every pixel of every image (masks binary, maps at the masks' size)."""
    truth = np.concatenate([np.asarray(m).ravel() > 0 for m in masks])
    scores = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in maps])
    return auroc(truth, scores)


def names_label(text: str, label: str, labels: Sequence[str]) -> bool:
    """True when ``text`` names ``label`` (words, ``_`` as space) and no other specific label."""
    words = f" {' '.join(text.lower().replace('_', ' ').split())} "
    specific = [name for name in labels if name != ANOMALY_LABEL]

    def named(name: str) -> bool:
        return f" {name.replace('_', ' ')} " in words

    if label == ANOMALY_LABEL or label is None:
        return not any(named(other) for other in specific)
    return named(label) and not any(named(o) for o in specific if o != label)


def description_accuracy(
    texts: Sequence[str], truth: Sequence[str | None], labels: Sequence[str]
) -> float:
    """Fraction of descriptions naming their true label (None / ``anomaly``: naming none)."""
    if len(texts) != len(truth) or not texts:
        raise ValueError("need as many descriptions as true labels, at least one")
    hits = [names_label(t, y, labels) for t, y in zip(texts, truth, strict=True)]
    return float(np.mean(hits))


def anomaly_metrics(pairs: Sequence, labels: Sequence[str]) -> dict:
    """Image AUROC and description accuracy of ``appliance eval`` pairs (``train.evaluate.Pair``).

    The image label is whether the record has any object; the score is the report's
    ``anomaly.score``. The description is the report's ``anomaly.description`` (what the adapter's
    language model wrote) or, without one, the report's defect labels joined (the label the CLIP
    text side reads), scored by ``names_label`` against the record's first label.
    Reports without an anomaly section (errors, ``vlm`` bundles) are left out. Pixel AUROC needs
    masks and raw maps, which reports do not carry: ``bench/seed002_tables.py`` measures it.
    """
    kept = [p for p in pairs if (p.report.report.get("anomaly") or {}).get("score") is not None]
    truth = [bool(p.record.objects) for p in kept]
    scores = [float(p.report.report["anomaly"]["score"]) for p in kept]
    texts = [_description(p.report.report) for p in kept]
    expected = [p.record.objects[0].label if p.record.objects else None for p in kept]
    result = {"anomaly_images": len(kept), "image_auroc": None, "description_accuracy": None}
    if any(truth) and not all(truth):
        result["image_auroc"] = auroc(truth, scores)
    if kept:
        result["description_accuracy"] = description_accuracy(texts, expected, labels)
    return result


def _description(report: dict) -> str:
    written = (report.get("anomaly") or {}).get("description")
    return written or " ".join(d.get("label", "") for d in report.get("defects", []))
