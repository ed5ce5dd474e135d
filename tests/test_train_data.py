"""Training data: every reader on tiny real files, box maths on literals, splits, and bad data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from appliance.report import Inspection, Source, error_report, image_info, inspection_report
from appliance.schema import report_problems
from appliance.taxonomy import Taxonomy
from train.data import (
    QA,
    DataError,
    LabelMap,
    Obj,
    Provenance,
    Record,
    read_dataset,
    read_records,
    record_from_report,
    split_records,
    write_records,
)
from train.data.boxes import (
    box_problem,
    iou,
    normalised_to_pixels,
    pixels_to_normalised,
    resize_box,
    xywh_to_xyxy,
    xyxy_to_xywh,
    xyxy_to_yolo,
    yolo_to_xyxy,
)
from train.data.split import allocate

TAXONOMY = Taxonomy(labels=("scratch", "crack"), attributes={"severity": ("minor", "major")})


def png(path: Path, width: int = 40, height: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 90, 90)).save(path)
    return path


def error_of(call, *args, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    return info.value


# ---- boxes ---------------------------------------------------------------------------------------


def test_coco_and_normalised_conversions_on_literals():
    assert xywh_to_xyxy([10, 20, 30, 40]) == (10, 20, 40, 60)
    assert xyxy_to_xywh((10, 20, 40, 60)) == (10, 20, 30, 40)
    assert normalised_to_pixels((0.25, 0.5, 0.75, 1.0), 40, 30) == (10, 15, 30, 30)
    assert pixels_to_normalised((10, 15, 30, 30), 40, 30) == (0.25, 0.5, 0.75, 1.0)
    assert yolo_to_xyxy((0.5, 0.5, 0.5, 1.0), 40, 30) == (10, 0, 30, 30)
    assert xyxy_to_yolo((10, 0, 30, 30), 40, 30) == (0.5, 0.5, 0.5, 1.0)


def test_resize_follows_equations_1_to_4_with_rounding_and_clamping():
    # (H, W) = (200, 400) → (H', W') = (100, 100): x' = x·100/400, y' = y·100/200
    assert resize_box((40, 20, 202, 200), (200, 400), (100, 100)) == (10, 10, 51, 100)
    assert resize_box((40, 20, 202, 200), (200, 400), (100, 100), rounding=False) == (
        10,
        10,
        50.5,
        100,
    )
    assert resize_box((10, 10, 51, 100), (100, 100), (200, 400)) == (40, 20, 204, 200)
    assert resize_box((0, 0, 401, 201), (200, 400), (100, 100)) == (0, 0, 100, 100)  # clamped
    with pytest.raises(ValueError, match="positive"):
        resize_box((0, 0, 1, 1), (0, 10), (10, 10))


def test_iou_and_box_problems():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_problem([0, 0, 40, 30], 40, 30) is None
    assert box_problem([-1, -1, 41, 31], 40, 30) is None  # 1 px tolerance
    assert "outside" in box_problem([-1.5, 0, 10, 10], 40, 30)
    assert "x2 > x1" in box_problem([10, 0, 10, 10], 40, 30)
    assert "4 numbers" in box_problem([1, 2, 3], 40, 30)


# ---- readers -------------------------------------------------------------------------------------


def test_yolo_beside_images_with_classes_txt(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("1 0.5 0.5 0.5 1.0\n\n0 0.25 0.5 0.5 0.2\n")
    png(tmp_path / "b.png")  # no label file: an image without defects
    (tmp_path / "classes.txt").write_text("scratch\ncrack\n")
    records = read_dataset(tmp_path, "yolo")
    assert [r.image.name for r in records] == ["a.png", "b.png"]
    a = records[0]
    assert (a.width, a.height) == (40, 30)
    assert [(o.label, o.bbox) for o in a.objects] == [
        ("crack", (10, 0, 30, 30)),
        ("scratch", (0, 12, 20, 18)),
    ]
    assert records[1].objects == ()
    assert a.provenance == Provenance("dataset", ref="yolo:a.txt")


def test_yolo_parallel_trees_data_yaml_and_polygons(tmp_path):
    png(tmp_path / "images" / "train" / "a.png")
    labels = tmp_path / "labels" / "train"
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text("0 0.1 0.2 0.5 0.2 0.3 0.9\n")
    (tmp_path / "data.yaml").write_text("names:\n  0: crack\n")
    (record,) = read_dataset(tmp_path / "data.yaml", "yolo")
    assert record.objects[0].label == "crack"
    assert record.objects[0].bbox == pytest.approx((4, 6, 20, 27))


def test_voc_reader_finds_the_image_by_xml_name(tmp_path):
    png(tmp_path / "images" / "steel_1.jpg", 200, 100)
    xml = tmp_path / "annotations" / "steel_1.xml"
    xml.parent.mkdir()
    xml.write_text(
        "<annotation><filename>steel_1</filename><size><width>200</width><height>100</height>"
        "</size><object><name>scratch</name><difficult>0</difficult><bndbox><xmin>2</xmin>"
        "<ymin>3</ymin><xmax>200</xmax><ymax>101</ymax></bndbox></object></annotation>"
    )
    (record,) = read_dataset(tmp_path, "voc")
    assert record.image == tmp_path / "images" / "steel_1.jpg"
    assert record.objects == (Obj("scratch", (2, 3, 200, 100)),)  # ymax 101 clamped


def test_coco_reader_converts_xywh_and_skips_crowds(tmp_path):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "images" / "b.png")
    coco = {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 8, "file_name": "b.png", "width": 40, "height": 30},
        ],
        "categories": [{"id": 1, "name": "crack"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [5, 6, 10, 4.5]},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1},
        ],
    }
    (tmp_path / "train.json").write_text(json.dumps(coco))
    a, b = read_dataset(tmp_path / "train.json", "coco")
    assert a.objects == (Obj("crack", (5, 6, 15, 10.5)),)
    assert b.objects == ()


def labelme_file(folder: Path, shapes: list[dict], name: str = "a") -> Path:
    png(folder / f"{name}.png")
    path = folder / f"{name}.json"
    data = {"shapes": shapes, "imagePath": f"{name}.png", "imageWidth": 40, "imageHeight": 30}
    path.write_text(json.dumps(data, indent=1))
    return path


def test_labelme_reader_turns_shapes_into_boxes(tmp_path):
    shapes = [
        {"label": "crack", "shape_type": "polygon", "points": [[5, 5], [20, 8], [12, 25]]},
        {"label": "scratch", "shape_type": "rectangle", "points": [[30, 20], [10, 2]]},
        {"label": "crack", "shape_type": "linestrip", "points": [[1, 1], [3, 9], [8, 4]]},
        {"label": "scratch", "shape_type": "circle", "points": [[20, 15], [23, 19]]},
    ]
    labelme_file(tmp_path, shapes)
    (record,) = read_dataset(tmp_path, "labelme")
    assert [o.bbox for o in record.objects] == [
        (5, 5, 20, 25),
        (10, 2, 30, 20),
        (1, 1, 8, 9),
        (15, 10, 25, 20),
    ]


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="yolo, voc, coco, labelme, records"):
        read_dataset(tmp_path, "pascal")


# ---- records -------------------------------------------------------------------------------------


def test_records_round_trip_with_relative_paths(tmp_path):
    image = png(tmp_path / "images" / "a.png")
    record = Record(
        image=image,
        width=40,
        height=30,
        objects=(Obj("scratch", (1, 2, 30.5, 20), {"severity": "minor"}),),
        description="A scratch near the edge.",
        qa=(QA("What caused it?", "Handling.", "causes"),),
        provenance=Provenance("feedback", "j.doe", "2025-05-01T10:00:00Z"),
    )
    path = write_records(tmp_path / "data" / "records.jsonl", [record, Record(image, 40, 30)])
    line = json.loads(path.read_text().splitlines()[0])
    assert line["image"] == "../images/a.png"
    assert line["objects"][0]["bbox"] == [1, 2, 30.5, 20]
    assert read_records(path) == [record, Record(image, 40, 30)]
    assert read_dataset(path, "records")[0] == record


def build_report(defects: list[dict], narrative: dict | None = None) -> dict:
    return inspection_report(
        source=Source(kind="folder", line="l1", camera="c1", path="/cam/a.png"),
        image=image_info("ab" * 32, 40, 30, "PNG", "RGB"),
        bundle={"id": "bundle-1", "kind": "memory-bank"},
        inspection=Inspection(defects=defects, narrative=narrative),
        created_at="2025-05-01T10:00:00.000Z",
    )


def test_report_becomes_a_record_and_survives_the_records_file(tmp_path):
    defect = {
        "label": "scratch",
        "bbox": [1, 2, 30, 20],
        "score": 0.9,
        "attributes": {"severity": "major"},
    }
    narrative = {
        "summary": "A scratch.",
        "probable_causes": ["handling", "transport"],
        "urgency": "low",
        "recommended_actions": ["polish"],
    }
    report = build_report([defect], narrative)
    assert report_problems(report, TAXONOMY) == []
    image = png(tmp_path / "a.png")
    record = record_from_report(report, image, confirmed_by="j.doe")
    assert record.objects == (Obj("scratch", (1, 2, 30, 20), {"severity": "major"}),)
    assert record.description == "A scratch."
    assert [(q.perspective, q.answer) for q in record.qa] == [
        ("causes", "handling; transport"),
        ("urgency", "low"),
        ("repair", "polish"),
    ]
    assert record.provenance == Provenance("report", "j.doe", report["created_at"], report["id"])
    path = write_records(tmp_path / "confirmed.jsonl", [record])
    assert read_records(path) == [record]
    assert LabelMap(TAXONOMY).apply([record]) == [record]
    ok = record_from_report(build_report([]), image)
    assert ok.objects == () and ok.description is None


def test_error_reports_do_not_become_training_data(tmp_path):
    report = error_report(
        source=Source(kind="cli", line="l1", camera="c1"),
        image_sha256="ab" * 32,
        bundle={"id": "b", "kind": "memory-bank"},
        code="not_an_image",
        message="cannot identify image",
    )
    error = error_of(record_from_report, report, tmp_path / "a.png", where="r.json")
    assert str(error).startswith("r.json:verdict: error report (not_an_image")
    contradiction = {**build_report([]), "verdict": "defective"}
    error = error_of(record_from_report, contradiction, tmp_path / "a.png", where="r.json")
    assert str(error) == "r.json:defects: verdict 'defective' contradicts 0 defects"
    outside = build_report(
        [{"label": "crack", "bbox": [0, 0, 45, 9], "score": 1, "attributes": {}}]
    )
    error = error_of(record_from_report, outside, tmp_path / "a.png", where="r.json")
    assert str(error).startswith("r.json:defects[0]: label 'crack': box [0, 0, 45, 9] lies outside")


# ---- labels and splits ---------------------------------------------------------------------------


def test_label_map_renames_normalises_and_drops(tmp_path):
    image = tmp_path / "a.png"
    a = Record(image, 40, 30, (Obj("Crack", (0, 0, 5, 5)), Obj("dust", (0, 0, 5, 5))))
    assert LabelMap(TAXONOMY, {"Crack": "crack", "dust": None}).apply([a])[0].labels == ["crack"]
    assert LabelMap(TAXONOMY, normalise=True, unknown="drop").apply([a])[0].labels == ["crack"]
    assert LabelMap(TAXONOMY, normalise=True, unknown="drop_image").apply([a]) == []
    with pytest.raises(ValueError, match="'dust' → 'dirt'"):
        LabelMap(TAXONOMY, {"dust": "dirt"})
    bad_attr = Record(image, 40, 30, (Obj("crack", (0, 0, 5, 5), {"severity": "awful"}),))
    assert LabelMap(TAXONOMY, unknown="drop").apply([bad_attr])[0].objects[0].attributes == {}


def test_unknown_label_names_the_annotation_file_and_line(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n")
    records = read_dataset(tmp_path, "yolo", classes=["crack", "rust"])
    error = error_of(LabelMap(TAXONOMY).apply, records)
    assert str(error).startswith(f"{tmp_path / 'a.txt'}:2: unknown label 'rust'")


def make_records(tmp_path, spec: dict[str, int]) -> list[Record]:
    records = []
    for label, n in spec.items():
        for i in range(n):
            objects = () if label == "none" else (Obj(label, (0, 0, 5, 5)),)
            records.append(Record(tmp_path / f"{label}_{i}.png", 40, 30, objects))
    return records


def test_split_is_deterministic_order_free_and_stratified(tmp_path):
    records = make_records(tmp_path, {"scratch": 50, "crack": 20, "none": 10})
    both = (Obj("scratch", (0, 0, 5, 5)), Obj("crack", (0, 0, 5, 5)))
    records += [Record(tmp_path / f"both_{i}.png", 40, 30, both) for i in range(10)]
    first = split_records(records, (0.6, 0.2, 0.2), seed=3)
    again = split_records(list(reversed(records)), (0.6, 0.2, 0.2), seed=3)
    assert first == again
    assert first != split_records(records, (0.6, 0.2, 0.2), seed=4)
    sizes = {name: len(part) for name, part in first.parts().items()}
    assert sizes == {"train": 54, "val": 18, "test": 18}
    # an image with both labels belongs to the rarer class (crack: 30 objects, scratch: 60)
    for part, share in ((first.val, 0.2), (first.test, 0.2), (first.train, 0.6)):
        kinds = Counter(r.image.name.split("_")[0] for r in part)
        crack_class = kinds["crack"] + kinds["both"]
        assert (kinds["scratch"], crack_class, kinds["none"]) == (
            50 * share,
            30 * share,
            10 * share,
        )
    names = [r.image for part in first.parts().values() for r in part]
    assert sorted(names) == sorted(r.image for r in records)


def test_allocate_and_fraction_checks(tmp_path):
    assert allocate(1, (0.8, 0.1, 0.1)) == [1, 0, 0]
    assert allocate(10, (0.75, 0.15, 0.1)) == [8, 1, 1]
    with pytest.raises(ValueError, match="sum to 1"):
        split_records([], (0.8, 0.1, 0.2))


# ---- bad data names file and line ----------------------------------------------------------------


def test_records_errors_name_file_and_line(tmp_path):
    png(tmp_path / "a.png")
    good = '{"image": "a.png", "width": 40, "height": 30, "objects": []}'
    cases = {
        "{not json": "malformed JSON line",
        '{"image": "a.png", "width": 40, "height": 30}': "missing key(s) ['objects']",
        '{"image": "a.png", "width": 40, "height": 30, "objects": [], "colour": 1}': "unknown key",
        '{"image": "a.png", "width": 40, "height": 30, "objects": '
        '[{"label": "crack", "bbox": [0, 0, 42, 10]}]}': "objects[0]: label 'crack': box",
        '{"image": "a.png", "width": 40, "height": 30, "objects": '
        '[{"label": "crack", "bbox": [9, 0, 5, 10]}]}': "x2 > x1",
        '{"image": "gone.png", "width": 40, "height": 30, "objects": []}': "gone.png is missing",
        '{"image": "a.png", "width": 41, "height": 30, "objects": []}': "is 40x30",
    }
    path = tmp_path / "r.jsonl"
    for line, message in cases.items():
        path.write_text(f"{good}\n\n{line}\n")
        error = error_of(read_records, path)
        assert str(error).startswith(f"{path}:3: "), str(error)
        assert message in error.message
    path.write_text("\n")
    assert str(error_of(read_records, path)).startswith(f"{path}:1: file is empty")


def test_yolo_errors_name_file_and_line(tmp_path):
    png(tmp_path / "a.png")
    label = tmp_path / "a.txt"
    for text, message in {
        "0 0.5 0.5 0.2\n": "expected 'class cx cy w h'",
        "0 0.5 0.5 x 0.2\n": "not numbers",
        "3 0.5 0.5 0.2 0.2\n": "unknown class id 3",
        "0 0.95 0.5 0.2 0.2\n": "outside the 40x30 image",
    }.items():
        label.write_text("0 0.5 0.5 0.2 0.2\n" + text)
        error = error_of(read_dataset, tmp_path, "yolo", classes=["crack"])
        assert str(error).startswith(f"{label}:2: ") and message in error.message, str(error)
    label.write_text("")
    (tmp_path / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    error = error_of(read_dataset, tmp_path, "yolo", classes=["crack"])
    assert str(error).startswith(f"{tmp_path / 'orphan.txt'}: label file without an image")
    (tmp_path / "orphan.txt").unlink()
    assert "class names not found" in str(error_of(read_dataset, tmp_path, "yolo"))
    (tmp_path / "classes.txt").write_text("")
    assert str(error_of(read_dataset, tmp_path, "yolo")).startswith(
        f"{tmp_path / 'classes.txt'}:1: file is empty"
    )
    (tmp_path / "a.png").write_bytes(b"")
    error = error_of(read_dataset, tmp_path, "yolo", classes=["crack"])
    assert "is an empty file" in str(error) and str(error).startswith(str(label))


def voc_xml(box: str, name: str = "crack") -> str:
    return (
        "<annotation><size><width>40</width><height>30</height></size><object>"
        f"<name>{name}</name><bndbox>{box}</bndbox></object></annotation>"
    )


def test_voc_errors_name_file_and_element(tmp_path):
    png(tmp_path / "a.png")
    xml = tmp_path / "a.xml"
    ok = "<xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax>"
    for text, where, message in [
        (voc_xml(ok.replace(">10</xmax", ">45</xmax")), "object[1]/bndbox", "outside"),
        (voc_xml(ok.replace("<ymax>10</ymax>", "")), "object[1]/bndbox/ymax", "missing"),
        (voc_xml(ok.replace(">10</xmax", ">1</xmax")), "object[1]/bndbox", "x2 > x1"),
        (voc_xml(ok).replace("<width>40", "<width>50"), "size", "is 40x30"),
        ("<annotation><object>", 1, "malformed XML"),
        ("", 1, "file is empty"),
    ]:
        xml.write_text(text)
        error = error_of(read_dataset, tmp_path, "voc")
        assert str(error).startswith(f"{xml}:{where}: ") and message in error.message, str(error)
    (tmp_path / "a.png").unlink()
    xml.write_text(voc_xml(ok))
    assert str(error_of(read_dataset, tmp_path, "voc")).startswith(f"{xml}:filename: image missing")


def test_coco_errors_name_file_and_json_path(tmp_path):
    png(tmp_path / "a.png")
    path = tmp_path / "c.json"
    image = {"id": 1, "file_name": "a.png", "width": 40, "height": 30}
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}
    for change, where, message in [
        ({"category_id": 9}, "annotations[1].category_id", "unknown category id 9"),
        ({"image_id": 9}, "annotations[1].image_id", "unknown image id 9"),
        ({"bbox": [30, 0, 15, 5]}, "annotations[1].bbox", "outside"),
        ({"bbox": [3, 0, 0, 5]}, "annotations[1].bbox", "x2 > x1"),
    ]:
        coco = {
            "images": [image],
            "categories": [{"id": 1, "name": "crack"}],
            "annotations": [ann, {**ann, **change}],
        }
        path.write_text(json.dumps(coco))
        error = error_of(read_dataset, path, "coco")
        assert str(error).startswith(f"{path}:{where}: ") and message in error.message, str(error)
    coco["images"] = [{**image, "file_name": "gone.png"}]
    path.write_text(json.dumps(coco))
    assert "gone.png is missing" in str(error_of(read_dataset, path, "coco"))
    path.write_text('{\n"images": [,]}')
    assert str(error_of(read_dataset, path, "coco")).startswith(f"{path}:2: malformed JSON")
    path.write_text("  ")
    assert str(error_of(read_dataset, path, "coco")).startswith(f"{path}:1: file is empty")


def test_labelme_errors_name_file_and_json_path(tmp_path):
    point = {"label": "crack", "shape_type": "point", "points": [[5, 5]]}
    path = labelme_file(tmp_path, [point])
    error = error_of(read_dataset, tmp_path, "labelme")
    assert str(error).startswith(f"{path}:shapes[0].shape_type: a 'point' shape has no box")
    wide = {"label": "crack", "shape_type": "rectangle", "points": [[5, 5], [50, 9]]}
    path = labelme_file(tmp_path, [wide])
    assert str(error_of(read_dataset, tmp_path, "labelme")).startswith(f"{path}:shapes[0]: ")
    (tmp_path / "a.png").unlink()
    assert "a.png is missing" in str(error_of(read_dataset, tmp_path, "labelme"))


def test_data_error_text_and_pickling():
    import pickle

    error = DataError("a.txt", 3, "bad box")
    assert str(error) == "a.txt:3: bad box"
    assert str(DataError("a.txt", None, "no classes")) == "a.txt: no classes"
    assert str(pickle.loads(pickle.dumps(error))) == "a.txt:3: bad box"
