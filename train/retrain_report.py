"""The report a technician reads after ``appliance retrain``: markdown, with plots when matplotlib
is installed (a text loss curve otherwise).

Sections: the outcome and why, the data used, metrics before and after on the same held-out set,
per-class changes, the label confusion matrix of the new bundle (each ground-truth object against
the label of the prediction that overlaps it most at IoU >= 0.5, or "missed"; unmatched
predictions as "false alarm"), and the loss curve.
"""

from __future__ import annotations

from pathlib import Path

from appliance.metrics import iou_matrix

MISSED, FALSE_ALARM = "missed", "false alarm"


def confusion(pairs) -> dict[str, dict[str, int]]:
    """{ground-truth label: {predicted label | missed: count}}, plus false alarms. Pure."""
    from train.evaluate import record_truth, report_detections

    table: dict[str, dict[str, int]] = {}
    for pair in pairs:
        truth = record_truth(pair.record)
        found = report_detections(pair.report.report)
        used: set[int] = set()
        ious = iou_matrix([t.bbox for t in truth], [d.bbox for d in found])
        for i, gt in enumerate(truth):
            best = None
            if len(found):
                order = sorted(range(len(found)), key=lambda j: -ious[i, j])
                best = next((j for j in order if j not in used and ious[i, j] >= 0.5), None)
            label = MISSED if best is None else found[best].label
            if best is not None:
                used.add(best)
            row = table.setdefault(gt.label, {})
            row[label] = row.get(label, 0) + 1
        for j, det in enumerate(found):
            if j not in used:
                row = table.setdefault(FALSE_ALARM, {})
                row[det.label] = row.get(det.label, 0) + 1
    return table


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _curve_text(losses: list[tuple[int, float]], width: int = 40) -> str:
    if not losses:
        return "(no steps)"
    top = max(loss for _, loss in losses) or 1.0
    return "\n".join(
        f"{step:>5} {loss:8.4f} {'#' * max(1, round(width * loss / top))}" for step, loss in losses
    )


def _plot(run_dir: Path, losses: list[tuple[int, float]]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.plot([s for s, _ in losses], [v for _, v in losses])
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    figure.tight_layout()
    figure.savefig(run_dir / "loss.png", dpi=100)
    plt.close(figure)
    return "loss.png"


def write_report(run_dir: Path, summary: dict, losses, old: dict, new: dict, old_pairs, new_pairs):
    verdict = "PROMOTED" if summary["promoted"] else "KEPT THE SERVED BUNDLE"
    lines = [
        f"# Retrain {summary['run']}: {verdict}",
        "",
        f"By {summary['by']}, from bundle `{summary['parent']}`, {summary['steps']} steps, "
        f"{summary['seconds']} s.",
        "",
    ]
    if summary["reasons"]:
        lines += ["Why not promoted:", *[f"- {r}" for r in summary["reasons"]], ""]
    c = summary["counts"]
    lines += [
        f"Data: {c['feedback']} feedback records, {c['replay']} replayed earlier records; "
        f"{c['train']} for training, {c['holdout']} held out (the newest corrections included).",
        "",
        "| metric | served | new |",
        "| --- | ---: | ---: |",
    ]
    for key in (
        "map50",
        "precision",
        "recall",
        "f1",
        "per_image_f1",
        "schema_valid_rate",
        "image_auroc",
    ):
        lines.append(f"| {key} | {_fmt(old.get(key))} | {_fmt(new.get(key))} |")
    labels = sorted(set(old.get("per_class", {})) | set(new.get("per_class", {})))
    if labels:
        lines += [
            "",
            "| class | AP50 served | AP50 new | F1 served | F1 new |",
            "|---|---:|---:|---:|---:|",
        ]
        for label in labels:
            o, n = old["per_class"].get(label, {}), new["per_class"].get(label, {})
            lines.append(
                f"| {label} | {_fmt(o.get('ap50'))} | {_fmt(n.get('ap50'))} | "
                f"{_fmt(o.get('f1'))} | {_fmt(n.get('f1'))} |"
            )
    table = confusion(new_pairs)
    columns = sorted({p for row in table.values() for p in row})
    if table:
        lines += ["", "Confusion of the new bundle (rows: ground truth, columns: predicted):", ""]
        lines += ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for truth_label in sorted(table):
            row = table[truth_label]
            lines.append(
                f"| {truth_label} | " + " | ".join(str(row.get(p, 0)) for p in columns) + " |"
            )
    plot = _plot(run_dir, losses)
    lines += ["", "## Training loss", ""]
    lines += [f"![loss]({plot})", ""] if plot else []
    lines += ["```", _curve_text(losses), "```", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
