"""``appliance eval``: the metric maths against pycocotools and literals, then the command end to end."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from appliance.cli import main as appliance_main
from appliance.metrics import (
    Detection,
    GroundTruth,
    attribute_f1,
    average_precision_50,
    detection_counts,
    macro_f1,
    match_pairs,
    mean_ap,
    per_image_f1,
    precision_recall_f1,
)
from appliance.report import Inspection, Source, image_info, inspection_report
from train.data import Obj, Record, read_dataset
from train.evaluate import ReportLine, judge_messages, match_reports, parse_judge_score

# --- AP@0.5 agrees with pycocotools ------------------------------------------------------------

CLASSES = ("scratch", "crack", "spot", "dent")


def _random_box(rng: random.Random, integer: bool) -> list[float]:
    x, y = rng.uniform(0, 200), rng.uniform(0, 200)
    w, h = rng.uniform(4, 60), rng.uniform(4, 60)
    box = [x, y, x + w, y + h]
    return [float(round(v)) for v in box] if integer else box


def _jitter(rng: random.Random, box: list[float], amount: float) -> list[float]:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    return [
        x1 + rng.uniform(-amount, amount) * w,
        y1 + rng.uniform(-amount, amount) * h,
        x2 + rng.uniform(-amount, amount) * w,
        y2 + rng.uniform(-amount, amount) * h,
    ]


def synthetic_case(seed: int, n_images: int = 25, integer: bool = False, max_dets: int = 6):
    """Many images and classes, near and far misses, wrong labels, score ties, a missing class."""
    rng = random.Random(seed)
    classes = CLASSES[: rng.randint(2, 4)]
    truth, detections = [], []
    for _ in range(n_images):
        gts = [
            GroundTruth(rng.choice(classes[:-1]), _random_box(rng, integer))  # last: no truth
            for _ in range(rng.randint(0, 4))
        ]
        dets = []
        for gt in gts:
            if rng.random() < 0.8:
                label = gt.label if rng.random() < 0.85 else rng.choice(classes)
                box = _jitter(rng, list(gt.bbox), rng.choice([0.05, 0.2, 0.4]))
                if integer:
                    box = [float(round(v)) for v in box]
                box = [box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1)]
                dets.append(Detection(label, box, rng.choice([0.3, 0.5, 0.9, rng.random()])))
        for _ in range(rng.randint(0, max_dets)):  # false alarms, some with tied scores
            dets.append(
                Detection(rng.choice(classes), _random_box(rng, integer), rng.choice([0.5, 0.9]))
            )
        rng.shuffle(dets)
        truth.append(gts)
        detections.append(dets)
    return detections, truth


def pycocotools_ap50(detections, truth) -> tuple[dict[str, float], float]:
    """Per-class AP and mAP at IoU 0.5, maxDets 100, area "all", straight from COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels = sorted(
        {g.label for image in truth for g in image} | {d.label for i in detections for d in i}
    )
    cat_ids = {label: k + 1 for k, label in enumerate(labels)}
    gt_json = {
        "images": [{"id": i + 1, "width": 400, "height": 400} for i in range(len(truth))],
        "categories": [{"id": cid, "name": label} for label, cid in cat_ids.items()],
        "annotations": [],
    }
    for i, image in enumerate(truth):
        for g in image:
            x1, y1, x2, y2 = g.bbox
            gt_json["annotations"].append(
                {
                    "id": len(gt_json["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": cat_ids[g.label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    results = [
        {
            "image_id": i + 1,
            "category_id": cat_ids[d.label],
            "bbox": [d.bbox[0], d.bbox[1], d.bbox[2] - d.bbox[0], d.bbox[3] - d.bbox[1]],
            "score": d.score,
        }
        for i, image in enumerate(detections)
        for d in image
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_json
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results) if results else COCO()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.iouThrs = np.array([0.5])
        evaluator.params.maxDets = [100]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][0, :, :, 0, 0]  # [recall, class] at IoU 0.5, area all
    per_class = {
        label: float(np.mean(precision[:, k]))
        for k, label in enumerate(labels)
        if (precision[:, k] > -1).all()
    }
    valid = precision[precision > -1]
    return per_class, float(np.mean(valid)) if valid.size else -1.0


@pytest.mark.parametrize(
    "seed, integer, max_dets",
    [(0, False, 6), (1, True, 6), (2, False, 2), (3, True, 10), (4, False, 0), (5, True, 3)],
)
def test_ap50_agrees_with_pycocotools(seed, integer, max_dets):
    detections, truth = synthetic_case(seed, integer=integer, max_dets=max_dets)
    expected_per_class, expected_map = pycocotools_ap50(detections, truth)
    per_class = average_precision_50(detections, truth)
    assert set(per_class) == set(expected_per_class)
    for label, ap in expected_per_class.items():
        assert per_class[label] == pytest.approx(ap, abs=1e-6), label
    assert mean_ap(per_class) == pytest.approx(expected_map, abs=1e-6)
    assert 0.0 < expected_map < 1.0  # the case is neither trivial nor hopeless


def test_ap50_caps_detections_per_image_and_class_like_pycocotools():
    rng = random.Random(7)
    truth = [[GroundTruth("spot", _random_box(rng, False)) for _ in range(3)] for _ in range(2)]
    # 120 confident false alarms bury the real hits beyond the 100-detection cap in image 0.
    detections = [
        [Detection("spot", [300, 300, 310, 310], 0.5) for _ in range(120)]
        + [Detection("spot", list(g.bbox), 0.1) for g in truth[0]],
        [Detection("spot", list(g.bbox), 0.9) for g in truth[1]],
    ]
    expected, expected_map = pycocotools_ap50(detections, truth)
    assert average_precision_50(detections, truth)["spot"] == pytest.approx(expected["spot"])
    # Image 1's hits reach recall 0.5 at precision 1; image 0's are cut, so recall stops there.
    assert expected_map == pytest.approx(51 / 101)


def test_ap50_literals():
    truth = [[GroundTruth("crack", [0, 0, 10, 10])], [GroundTruth("crack", [0, 0, 10, 10])]]
    perfect = [[Detection("crack", [0, 0, 10, 10], 0.9)], [Detection("crack", [0, 0, 10, 10], 0.8)]]
    assert average_precision_50(perfect, truth) == {"crack": pytest.approx(1.0)}
    # One hit (recall 0.5 at precision 1) and nothing else: 51 of 101 recall points.
    half = [[Detection("crack", [0, 0, 10, 10], 0.9)], [Detection("crack", [50, 50, 60, 60], 0.8)]]
    assert average_precision_50(half, truth)["crack"] == pytest.approx(51 / 101)
    # A class with detections and no truth has no AP; one with truth and no detections has 0.
    wrong = [[Detection("dent", [0, 0, 10, 10], 0.9)], []]
    assert average_precision_50(wrong, truth) == {"crack": 0.0}
    assert mean_ap({}) is None


# --- precision / recall / F1 on literals -------------------------------------------------------


def test_match_pairs_is_greedy_label_aware_highest_iou_first():
    truth = [("scratch", [0, 0, 10, 10]), ("scratch", [0, 0, 10, 12]), ("crack", [0, 0, 10, 10])]
    predicted = [("scratch", [0, 0, 10, 11]), ("scratch", [0, 0, 10, 10]), ("dent", [0, 0, 10, 10])]
    # pred 1 = truth 0 exactly (IoU 1) goes first; pred 0 then takes truth 1 (IoU 11/12).
    assert match_pairs(predicted, truth) == [(1, 0), (0, 1)]
    assert match_pairs([("crack", [0, 0, 10, 10])], [("crack", [0, 0, 10, 20])]) == [(0, 0)]
    assert match_pairs([("crack", [0, 0, 10, 10])], [("crack", [0, 0, 10, 21])]) == []
    assert match_pairs([], truth) == []


def test_precision_recall_f1_literals():
    truth = [
        [GroundTruth("scratch", [0, 0, 10, 10]), GroundTruth("crack", [20, 20, 40, 40])],
        [GroundTruth("spot", [5, 5, 15, 15])],
        [],
    ]
    detections = [
        [Detection("scratch", [1, 0, 10, 10], 0.9), Detection("crack", [60, 60, 70, 70], 0.4)],
        [],
        [],
    ]
    precision, recall, f1 = precision_recall_f1(detections, truth)
    assert (precision, recall, f1) == (pytest.approx(0.5), pytest.approx(1 / 3), pytest.approx(0.4))
    counts = detection_counts(detections, truth)
    assert (counts["crack"].tp, counts["crack"].predicted, counts["crack"].truth) == (0, 1, 1)
    assert counts["spot"].precision == 1.0 and counts["spot"].recall == 0.0
    # Per image: 2·1/4, 0 (missed spot), 1 (nothing there, nothing claimed).
    assert per_image_f1(detections, truth) == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert precision_recall_f1([[]], [[]]) == (1.0, 1.0, 1.0)
    assert precision_recall_f1([[Detection("dent", [0, 0, 1, 1])]], [[]]) == (0.0, 1.0, 0.0)


def test_attribute_f1_macro_over_values_of_matched_pairs():
    box = [0, 0, 10, 10]
    far = [50, 50, 60, 60]
    truth = [
        [GroundTruth("scratch", box, {"severity": "minor", "surface": "top"})],
        [GroundTruth("scratch", box, {"severity": "major"})],
        [GroundTruth("scratch", box, {"severity": "major", "surface": None})],
        [GroundTruth("scratch", far, {"severity": "minor"})],  # unmatched: not scored
    ]
    detections = [
        [Detection("scratch", box, 0.9, {"severity": "minor", "surface": "top"})],
        [Detection("scratch", box, 0.9, {"severity": "minor"})],
        [Detection("scratch", box, 0.9, {})],
        [Detection("scratch", box, 0.9, {"severity": "major"})],
    ]
    # severity: true [minor, major, major], predicted [minor, minor, missing]
    # minor: tp 1, 2 predicted, 1 true → 2/3; major: tp 0 → 0; macro 1/3.
    assert attribute_f1(detections, truth) == {
        "severity": pytest.approx(1 / 3),
        "surface": pytest.approx(1.0),
    }
    assert macro_f1(["a", "b"], ["a", "b"]) == 1.0
    assert macro_f1(["a"], ["c"]) == 0.0
    assert macro_f1([], []) == 1.0


# --- the command end to end --------------------------------------------------------------------

W, H = 100, 80
BUNDLE = {"id": "bundle-1", "kind": "vlm"}
# Ground truth per image (pixels), and what the model reported.
TRUTH = {
    "a.png": [("scratch", [10, 10, 50, 30]), ("crack", [60, 40, 90, 70])],
    "b.png": [("crack", [20, 20, 40, 60])],
    "c.png": [],
}
FOUND = {
    "a.png": [("scratch", [10, 10, 50, 30], 0.9), ("crack", [0, 0, 10, 10], 0.8)],  # crack missed
    "b.png": [("crack", [20, 20, 40, 60], 0.7)],
    "c.png": [],
}
# crack: a's false alarm (0.8) ranks above b's hit (0.7): precision 0.5 up to recall 0.5.
EXPECTED_AP = {"scratch": 1.0, "crack": 0.5 * 51 / 101}


def write_images(folder):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(TRUTH):
        Image.new("RGB", (W, H), (40 * k, 90, 160)).save(folder / name)
    return folder


def make_report(name: str, defects: list, path: str | None = None, **attributes) -> dict:
    sha = format(sum(map(ord, name)), "064x")
    return inspection_report(
        source=Source(kind="folder", line="line1", camera="cam1", path=path or f"/in/{name}"),
        image=image_info(sha, W, H, "PNG", "RGB"),
        bundle=BUNDLE,
        inspection=Inspection(
            defects=[
                {"label": label, "bbox": box, "score": score, "attributes": attributes}
                for label, box, score in defects
            ]
        ),
        created_at="2025-05-01T10:00:00.000Z",
    )


def write_reports(path, reports: list[dict], extra_lines: tuple[str, ...] = ()):
    lines = [json.dumps(r) for r in reports] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def standard_reports() -> list[dict]:
    reports = [make_report(name, FOUND[name]) for name in TRUTH]
    reports[2]["timings_ms"]["bogus_stage"] = 1.0  # breaks the schema: 2 of 3 valid
    return reports


def yolo_dataset(root):
    write_images(root)
    (root / "classes.txt").write_text("scratch\ncrack\n")
    names = ["scratch", "crack"]
    for name, objects in TRUTH.items():
        lines = []
        for label, (x1, y1, x2, y2) in objects:
            cx, cy = (x1 + x2) / 2 / W, (y1 + y2) / 2 / H
            lines.append(f"{names.index(label)} {cx} {cy} {(x2 - x1) / W} {(y2 - y1) / H}")
        (root / name).with_suffix(".txt").write_text("\n".join(lines))
    return root


def coco_dataset(root):
    write_images(root / "images")
    data = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": "scratch"}, {"id": 2, "name": "crack"}],
    }
    for i, (name, objects) in enumerate(TRUTH.items(), start=1):
        data["images"].append({"id": i, "file_name": name, "width": W, "height": H})
        for label, (x1, y1, x2, y2) in objects:
            data["annotations"].append(
                {
                    "id": len(data["annotations"]) + 1,
                    "image_id": i,
                    "category_id": 1 if label == "scratch" else 2,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    path = root / "train.json"
    path.write_text(json.dumps(data))
    return path


def run_eval_cli(capsys, *args) -> tuple[int, str, str]:
    code = appliance_main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("fmt, make", [("yolo", yolo_dataset), ("coco", coco_dataset)])
def test_eval_cli_prints_the_table_and_writes_the_metrics(tmp_path, capsys, fmt, make):
    data = make(tmp_path / "data")
    reports = write_reports(tmp_path / "reports.jsonl", standard_reports())
    out_json = tmp_path / "metrics.json"
    code, out, err = run_eval_cli(
        capsys, "--reports", reports, "--data", data, "--format", fmt, "--json", out_json
    )
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["per_class_ap50"] == pytest.approx(EXPECTED_AP)
    assert result["map50"] == pytest.approx((1.0 + 0.5 * 51 / 101) / 2)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["per_image_f1"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)  # c: nothing, nothing
    assert result["attribute_f1"] == {}
    assert result["schema_valid_rate"] == pytest.approx(2 / 3)
    assert list(result["schema_problems"]) == ["3"]
    assert (result["reports"], result["images"], result["images_without_report"]) == (3, 3, 0)
    assert "judge_score" not in result
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["scratch"] == ["1", "1", "1", "1.000", "1.000", "1.000", "1.000"]
    assert rows["crack"] == ["2", "2", "1", f"{0.5 * 51 / 101:.3f}", "0.500", "0.500", "0.500"]
    assert rows["all"][:4] == ["3", "3", "2", f"{(1 + 0.5 * 51 / 101) / 2:.3f}"]
    assert "schema-valid reports          0.667" in out


def records_dataset(root) -> Path:
    """Records with attributes and a description (YOLO and COCO carry neither)."""
    write_images(root / "images")
    attributes = {"a.png": ["minor", "major"], "b.png": ["major"], "c.png": []}
    lines = [
        {
            "image": f"images/{name}",
            "width": W,
            "height": H,
            "objects": [
                {"label": label, "bbox": box, "attributes": {"severity": severity}}
                for (label, box), severity in zip(objects, attributes[name], strict=True)
            ],
            "description": f"{len(objects)} defects on the plate.",
        }
        for name, objects in TRUTH.items()
    ]
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_eval_cli_attribute_f1_and_images_without_a_report(tmp_path, capsys):
    data = records_dataset(tmp_path / "data")
    # a: scratch matched, predicted "minor" (right); b: crack matched, predicted "minor" (wrong).
    reports = [
        make_report("a.png", FOUND["a.png"], severity="minor"),
        make_report("b.png", FOUND["b.png"], severity="minor"),
    ]
    path = write_reports(tmp_path / "reports.jsonl", reports)
    code, out, err = run_eval_cli(
        capsys, "--reports", path, "--data", data, "--json", tmp_path / "m.json"
    )
    assert code == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    # severity true [minor, major], predicted [minor, minor]: minor 2/3, major 0 → 1/3.
    assert result["attribute_f1"] == {"severity": pytest.approx(1 / 3)}
    assert (result["images"], result["images_without_report"]) == (2, 1)
    assert result["schema_valid_rate"] == 1.0
    assert "1 without a report, left out" in out


def test_eval_cli_names_the_line_of_a_report_for_an_unknown_image(tmp_path, capsys):
    data = yolo_dataset(tmp_path / "data")
    reports = standard_reports()[:2] + [make_report("zzz.png", [])]
    path = write_reports(tmp_path / "reports.jsonl", reports)
    code, out, err = run_eval_cli(capsys, "--reports", path, "--data", data, "--format", "yolo")
    assert code == 2 and out == ""
    assert f"{path}:3: report for image 'zzz.png', which is not in the ground truth" in err


def test_eval_cli_names_an_unreadable_line(tmp_path, capsys):
    data = yolo_dataset(tmp_path / "data")
    path = write_reports(
        tmp_path / "reports.jsonl", standard_reports()[:1], ('{"verdict": "ok", ',)
    )
    code, _, err = run_eval_cli(capsys, "--reports", path, "--data", data, "--format", "yolo")
    assert code == 2
    assert f"{path}:2: not a JSON report line" in err


def test_eval_refuses_two_reports_for_one_image_and_a_different_image_size(tmp_path, capsys):
    data = yolo_dataset(tmp_path / "data")
    twice = write_reports(
        tmp_path / "twice.jsonl",
        [make_report("a.png", []), make_report("a.png", [], path="/other/a.png")],
    )
    code, _, err = run_eval_cli(capsys, "--reports", twice, "--data", data, "--format", "yolo")
    assert code == 2 and f"{twice}:2: second report for" in err and "first is line 1" in err
    resized = make_report("b.png", [])
    resized["image"]["width"] = 200
    path = write_reports(tmp_path / "resized.jsonl", [resized])
    code, _, err = run_eval_cli(capsys, "--reports", path, "--data", data, "--format", "yolo")
    assert code == 2 and f"{path}:1: report says the image is 200x80" in err


def test_reports_without_a_path_match_by_image_hash(tmp_path):
    data = yolo_dataset(tmp_path / "data")
    records = read_dataset(data, "yolo")
    report = make_report("b.png", [])
    report["source"]["path"] = None
    report["image"]["sha256"] = hashlib.sha256((data / "b.png").read_bytes()).hexdigest()
    pairs = match_reports([ReportLine(1, report)], records, tmp_path / "r.jsonl")
    assert [p.record.image.name for p in pairs] == ["b.png"]


# --- the judge ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, score",
    [
        ("7", 7.0),
        (" 10\n", 10.0),
        ("Rating: [[8]]", 8.0),
        ("I would rate it 6/10 because ...", 6.0),
        ("Score: 4.5", 4.5),
        ("The report is good. 9 out of 10", 9.0),
        ("11", None),
        ("0", None),
        ("excellent", None),
        ("", None),
    ],
)
def test_parse_judge_score(answer, score):
    assert parse_judge_score(answer) == score


def test_judge_messages_show_truth_and_report_and_ask_for_a_number():
    record = Record(
        Path("/x/a.png"),
        W,
        H,
        (Obj("scratch", (10.0, 10.0, 50.0, 30.0), {"severity": "minor"}),),
        description="A shallow scratch near the top edge.",
    )
    report = make_report("a.png", [("scratch", [11, 10, 50, 30], 0.9)], severity="major")
    report["narrative"] = {
        "summary": "Scratch on the top.",
        "probable_causes": ["handling"],
        "urgency": "low",
        "recommended_actions": ["polish", "check the gripper"],
    }
    system, user = judge_messages(record, report)
    assert system["role"] == "system" and "impartial" in system["content"]
    text = user["content"]
    assert "- scratch at [10.0, 10.0, 50.0, 30.0] (severity=minor)" in text
    assert "Description: A shallow scratch near the top edge." in text
    assert "- scratch at [11.0, 10.0, 50.0, 30.0] (severity=major)" in text
    assert "Recommended actions: polish; check the gripper" in text
    assert "Urgency: low" in text
    assert text.rstrip().endswith("Answer with the number only.")
    assert "from 1 (wrong or useless) to 10" in text


class _JudgeHandler(http.server.BaseHTTPRequestHandler):
    answers = ["7", "Rating: [[9]]", "no idea"]
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, self.headers.get("Authorization"), body))
        answer = self.answers[(len(self.seen) - 1) % len(self.answers)]
        data = json.dumps(
            {
                "model": body["model"],
                "choices": [{"message": {"content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 2},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    _JudgeHandler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _JudgeHandler.seen
    server.shutdown()
    server.server_close()


def test_eval_cli_asks_the_judge_about_reports_with_a_narrative(tmp_path, capsys, judge_server):
    url, seen = judge_server
    data = records_dataset(tmp_path / "data")
    narrative = {
        "summary": "Defects on the plate.",
        "probable_causes": ["handling"],
        "urgency": "low",
        "recommended_actions": ["rework"],
    }
    reports = [make_report(name, FOUND[name]) for name in TRUTH]
    for report in reports[:2]:  # c.png's report has no narrative: nothing to judge
        report["narrative"] = narrative
    path = write_reports(tmp_path / "reports.jsonl", reports)
    key = tmp_path / "judge.key"
    key.write_text("sk-test\n")
    key.chmod(0o600)
    code, out, err = run_eval_cli(
        capsys,
        "--reports", path, "--data", data, "--json", tmp_path / "m.json",
        "--judge-url", url, "--judge-model", "judge-7b", "--judge-key-file", key,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    assert (result["judge_score"], result["judged"], result["judge_unparsed"]) == (8.0, 2, 0)
    assert len(seen) == 2
    route, auth, body = seen[0]
    assert (route, auth, body["model"], body["temperature"]) == (
        "/v1/chat/completions",
        "Bearer sk-test",
        "judge-7b",
        0.0,
    )
    assert "Summary: Defects on the plate." in body["messages"][1]["content"]
    assert "judge score (1-10)            8.000 (2 rated" in out


def test_eval_cli_judge_needs_a_model_name(tmp_path, capsys):
    data = records_dataset(tmp_path / "data")
    path = write_reports(tmp_path / "reports.jsonl", [make_report("a.png", [])])
    code, _, err = run_eval_cli(
        capsys, "--reports", path, "--data", data, "--judge-url", "http://127.0.0.1:9/v1"
    )
    assert code == 2 and "--judge-url needs --judge-model" in err
