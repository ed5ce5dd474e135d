"""One taxonomy, one schema: reports are validated against the schema generated from the taxonomy."""

import json
import subprocess
import sys

from appliance.report import Inspection, Source, error_report, image_info, inspection_report
from appliance.schema import report_problems, report_schema
from appliance.taxonomy import Taxonomy

TAXONOMY = Taxonomy(labels=("scratch", "crack"), attributes={"severity": ("minor", "major")})
SHA = "ab" * 32
BUNDLE = {"id": "memory-bank-test", "kind": "memory-bank"}
SOURCE = Source(kind="folder", line="l1", camera="c1", path="/x/a.png")
NARRATIVE = {
    "summary": "A scratch.",
    "probable_causes": ["handling"],
    "urgency": "low",
    "recommended_actions": ["polish"],
}


def defective(**defect) -> dict:
    item = {
        "label": "scratch",
        "bbox": [1, 2, 30, 40],
        "score": 0.9,
        "attributes": {"severity": "minor"},
        **defect,
    }
    return inspection_report(
        source=SOURCE,
        image=image_info(SHA, 64, 48, "PNG", "RGB"),
        bundle=BUNDLE,
        inspection=Inspection(
            defects=[item],
            anomaly={"score": 2.0, "threshold": 1.0},
            narrative=NARRATIVE,
            timings_ms={"vision": 3.5},
        ),
    )


def test_schema_enums_come_from_the_taxonomy():
    schema = report_schema(TAXONOMY)
    defect = schema["properties"]["defects"]["items"]["properties"]
    assert defect["label"]["enum"] == ["scratch", "crack", "anomaly"]
    assert defect["attributes"]["properties"]["severity"]["enum"] == ["minor", "major"]
    assert schema["$schema"].endswith("2020-12/schema")


def test_valid_reports_pass():
    assert report_problems(defective(), TAXONOMY) == []
    error = error_report(
        source=SOURCE, image_sha256=SHA, bundle=BUNDLE, code="empty_file", message="0 bytes"
    )
    assert report_problems(error, TAXONOMY) == []


def test_report_id_depends_on_content_and_bundle_only():
    first, second = defective(), defective(score=0.5)
    assert first["id"] == second["id"]
    other = inspection_report(
        source=SOURCE,
        image=image_info("cd" * 32, 1, 1, None, None),
        bundle=BUNDLE,
        inspection=Inspection(),
    )
    assert other["id"] != first["id"] and other["verdict"] == "ok"


def test_taxonomy_violations_are_caught():
    assert any("defects/0/label" in p for p in report_problems(defective(label="dent"), TAXONOMY))
    bad_attr = defective(attributes={"severity": "huge"})
    assert any("defects/0/attributes/severity" in p for p in report_problems(bad_attr, TAXONOMY))
    unknown_attr = defective(attributes={"colour": "red"})
    assert report_problems(unknown_attr, TAXONOMY)
    assert report_problems(defective(score=1.5), TAXONOMY)
    assert report_problems(defective(bbox=[1, 2, 3]), TAXONOMY)


def test_verdict_must_agree_with_defects_and_error():
    report = defective()
    report["verdict"] = "ok"
    assert report_problems(report, TAXONOMY)
    report = defective()
    report["verdict"] = "error"
    assert report_problems(report, TAXONOMY)
    report = defective()
    report["narrative"]["urgency"] = "whenever"
    assert any("narrative" in p for p in report_problems(report, TAXONOMY))


def test_error_codes_are_a_closed_set():
    report = error_report(source=SOURCE, image_sha256=SHA, bundle=BUNDLE, code="oops", message="")
    assert any("error" in p for p in report_problems(report, TAXONOMY))


def test_schema_command_prints_the_schema(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        '[state]\ndir="s"\n[outbox]\ndir="o"\n[taxonomy]\nlabels=["dent"]\n'
        '[model]\nbundle="b"\n[[sources.folder]]\npath="in"\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "appliance", "schema", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    schema = json.loads(run.stdout)
    labels = schema["properties"]["defects"]["items"]["properties"]["label"]["enum"]
    assert labels == ["dent", "anomaly"]
