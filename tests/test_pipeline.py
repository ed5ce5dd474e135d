"""One queued image → one report, whatever goes wrong: vanished files, invalid reports, crashes."""

import json

import pytest

from appliance.outbox import Outbox, Quarantine
from appliance.pipeline import MAX_ATTEMPTS, Pipeline
from appliance.report import Inspection
from appliance.samples import make_sample
from appliance.schema import report_problems
from appliance.store import Store
from appliance.taxonomy import Taxonomy

from .conftest import save_png

TAXONOMY = Taxonomy(labels=("scratch",))


class StubInspector:
    """Stands in for the models (not under test here): returns what the test asks for."""

    bundle_ref = {"id": "stub-bundle", "kind": "memory-bank"}

    def __init__(self, defects=None, fail=False):
        self.defects = defects or []
        self.fail = fail
        self.calls = 0

    def inspect_batch(self, images, contexts):
        self.calls += 1
        if self.fail:
            raise RuntimeError("GPU fell off the bus")
        return [
            Inspection(
                defects=list(self.defects),
                anomaly={"score": 1.0, "threshold": 2.0},
                timings_ms={"vision": 1.0},
            )
            for _ in images
        ]


@pytest.fixture
def make_pipeline(tmp_path):
    def make(inspector) -> tuple[Pipeline, Store]:
        store = Store(tmp_path / "q.sqlite3")
        pipeline = Pipeline(
            store=store,
            inspector=inspector,
            taxonomy=TAXONOMY,
            outbox=Outbox(tmp_path / "out"),
            quarantine=Quarantine(tmp_path / "quarantine"),
            topic_prefix="p",
        )
        return pipeline, store

    return make


def enqueue(store, path, name="x"):
    return store.enqueue(
        fingerprint=name, source_kind="folder", line="l", camera="c", path=str(path)
    )


def only_report(tmp_path) -> dict:
    [path] = list((tmp_path / "out").rglob("*.json"))
    return json.loads(path.read_text())


def test_vanished_file_gives_an_error_report(tmp_path, make_pipeline):
    pipeline, store = make_pipeline(StubInspector())
    enqueue(store, tmp_path / "gone.png")
    assert pipeline.run_once(4) == 1
    report = only_report(tmp_path)
    assert report["error"]["code"] == "file_vanished" and report_problems(report, TAXONOMY) == []
    assert store.stats()["publish_backlog"] == 1


def test_invalid_report_is_kept_counted_and_replaced(tmp_path, make_pipeline):
    bad_defect = {"label": "not_in_taxonomy", "bbox": [0, 0, 1, 1], "score": 0.5, "attributes": {}}
    pipeline, store = make_pipeline(StubInspector(defects=[bad_defect]))
    enqueue(store, save_png(make_sample(1).rgb, tmp_path / "a.png"))
    pipeline.run_once(4)
    report = only_report(tmp_path)
    assert report["verdict"] == "error" and report["error"]["code"] == "invalid_report"
    [kept] = list((tmp_path / "quarantine" / "invalid-reports").iterdir())
    body = json.loads(kept.read_text())
    assert body["report"]["defects"][0]["label"] == "not_in_taxonomy" and body["problems"]
    assert store.stats()["counters"]["invalid_reports"] == 1


def test_inference_failure_is_an_error_report_not_a_crash(tmp_path, make_pipeline):
    pipeline, store = make_pipeline(StubInspector(fail=True))
    for n in range(2):
        enqueue(store, save_png(make_sample(n).rgb, tmp_path / f"{n}.png"), name=str(n))
    assert pipeline.run_once(4) == 2
    codes = [json.loads(p.read_text())["error"]["code"] for p in (tmp_path / "out").rglob("*.json")]
    assert codes == ["inference_failed", "inference_failed"]


def test_image_that_keeps_crashing_the_daemon_is_given_up(tmp_path, make_pipeline):
    inspector = StubInspector()
    pipeline, store = make_pipeline(inspector)
    seq = enqueue(store, save_png(make_sample(3).rgb, tmp_path / "poison.png"))
    for _ in range(MAX_ATTEMPTS):
        store.mark_attempt(seq)  # what MAX_ATTEMPTS crashes mid-inspection leave behind
    pipeline.run_once(4)
    assert inspector.calls == 0
    report = only_report(tmp_path)
    assert (
        report["error"]["code"] == "inference_failed"
        and "interrupted" in report["error"]["message"]
    )


def test_same_content_twice_gives_one_report(tmp_path, make_pipeline):
    pipeline, store = make_pipeline(StubInspector())
    first = save_png(make_sample(5).rgb, tmp_path / "one.png")
    second = tmp_path / "two.png"
    second.write_bytes(first.read_bytes())
    enqueue(store, first, "1")
    enqueue(store, second, "2")
    pipeline.run_once(1)
    pipeline.run_once(1)
    assert len(list((tmp_path / "out").rglob("*.json"))) == 1
    assert store.stats()["duplicates"] == 1


def test_same_content_twice_in_one_batch_gives_one_report(tmp_path, make_pipeline):
    pipeline, store = make_pipeline(StubInspector())
    first = save_png(make_sample(6).rgb, tmp_path / "one.png")
    second = tmp_path / "two.png"
    second.write_bytes(first.read_bytes())
    enqueue(store, first, "1")
    enqueue(store, second, "2")
    assert pipeline.run_once(4) == 2
    assert len(list((tmp_path / "out").rglob("*.json"))) == 1
    stats = store.stats()
    assert stats["duplicates"] == 1 and stats["reports_total"] == 1 and stats["queue_depth"] == 0
