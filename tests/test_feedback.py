"""Technicians' feedback: pure application on literals, the records it writes (read back by the
trainer's reader), the ``appliance review`` command on a real daemon's report, MQTT feedback through
a real broker, and the import of a labelled folder."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.feedback import (
    FeedbackError,
    apply_feedback,
    check_feedback,
    feedback_problems,
    feedback_schema,
)
from appliance.feedback_store import Entry, FeedbackStore, ReceivedImages
from appliance.samples import make_sample
from appliance.taxonomy import Taxonomy

from .conftest import report_files, save_png, wait_for, write_config
from .test_cli import run_cli as cli
from .test_daemon import make_raw_png, publish

TAXONOMY = Taxonomy(
    labels=("scratch", "crack", "spot"), attributes={"severity": ("minor", "major")}
)
RID = "0123456789abcdef0123456789abcdef"
WHEN = "2025-05-01T10:00:00Z"


def report(defects: list[dict], verdict: str | None = None) -> dict:
    return {
        "id": RID,
        "verdict": verdict or ("defective" if defects else "ok"),
        "image": {"sha256": "ab" * 32, "width": 320, "height": 240, "format": "PNG"},
        "source": {"kind": "folder", "line": "l1", "camera": "c1", "path": "/x/a.png"},
        "defects": defects,
        "error": None,
    }


SCRATCH = {"label": "scratch", "bbox": [10, 20, 50.5, 60], "score": 0.9, "attributes": {}}
SPOT = {"label": "spot", "bbox": [100, 100, 120, 130], "score": 0.4, "attributes": {}}


def fb(action: str, **fields) -> dict:
    return check_feedback(
        {"report_id": RID, "who": "ana", "when": WHEN, "action": action, **fields}, TAXONOMY
    )


def problems_of(call, *args) -> list[str]:
    with pytest.raises(FeedbackError) as caught:
        call(*args)
    return caught.value.problems


def run_cli(*args, check: bool = True, user: str = "ana") -> subprocess.CompletedProcess:
    return cli(*args, check=check, env={**os.environ, "USER": user, "LOGNAME": user})


# -- pure ----------------------------------------------------------------------------------------
def test_accept_keeps_the_defects_without_scores_and_reject_drops_them():
    two = report([SCRATCH, SPOT])
    assert apply_feedback(two, fb("accept")) == [
        {"label": "scratch", "bbox": [10, 20, 50.5, 60], "attributes": {}},
        {"label": "spot", "bbox": [100, 100, 120, 130], "attributes": {}},
    ]
    assert apply_feedback(two, fb("reject")) == []
    missed = {"label": "crack", "bbox": [1, 2, 30, 40]}
    assert apply_feedback(two, fb("reject", add=[missed])) == [{**missed, "attributes": {}}]
    assert apply_feedback(report([]), fb("accept")) == []


def test_fix_edits_label_box_attributes_and_removes_by_report_index():
    base = report([{**SCRATCH, "attributes": {"severity": "minor"}}, SPOT])
    edits = [
        {"defect": 0, "label": "crack", "attributes": {"severity": None}},
        {"defect": 1, "bbox": [90, 95, 125, 140], "attributes": {"severity": "major"}},
    ]
    added = {"label": "spot", "bbox": [200, 10, 210, 20], "attributes": {"severity": "minor"}}
    assert apply_feedback(base, fb("fix", edits=edits, add=[added])) == [
        {"label": "crack", "bbox": [10, 20, 50.5, 60], "attributes": {}},
        {"label": "spot", "bbox": [90, 95, 125, 140], "attributes": {"severity": "major"}},
        added,
    ]
    removed = fb("fix", edits=[{"defect": 0, "remove": True}, {"defect": 1, "label": "crack"}])
    assert [o["label"] for o in apply_feedback(base, removed)] == ["crack"]


def test_problems_name_the_field():
    bad = {
        "report_id": "nope",
        "who": "",
        "when": "yesterday",
        "action": "fix",
        "edits": [{"defect": 0}, {"defect": 1, "label": "rust"}],
        "add": [{"label": "spot", "bbox": [1, 2, 3]}],
        "colour": "red",
    }
    found = "\n".join(feedback_problems(bad, TAXONOMY))
    for field in ("report_id:", "who:", "when:", "edits[0]:", "edits[1].label:", "add[0].bbox:"):
        assert field in found, (field, found)
    assert "'colour' was unexpected" in found
    assert "edits: only a 'fix'" in "\n".join(
        feedback_problems(
            {
                "report_id": RID,
                "who": "a",
                "when": WHEN,
                "action": "accept",
                "edits": [{"defect": 0, "label": "spot"}],
            },
            TAXONOMY,
        )
    )
    assert problems_of(fb, "fix") == ["action: 'fix' needs at least one entry in edits or add"]
    two = report([SCRATCH, SPOT])
    assert problems_of(apply_feedback, two, fb("fix", edits=[{"defect": 2, "label": "spot"}])) == [
        "edits[0].defect: the report has 2 defect(s) (indexes 0..1)"
    ]
    outside = fb("fix", add=[{"label": "spot", "bbox": [300, 10, 330, 20]}])
    assert problems_of(apply_feedback, two, outside)[0].startswith("add[0].bbox: ")
    assert problems_of(apply_feedback, report([]), fb("reject"))[0].startswith("action: ")
    error = {**report([], verdict="error"), "error": {"code": "not_an_image", "message": "x"}}
    assert "not_an_image" in problems_of(apply_feedback, error, fb("accept"))[0]


def test_feedback_id_is_given_or_a_content_hash_and_the_schema_follows_the_taxonomy():
    assert fb("accept", id="tablet-1")["id"] == "tablet-1"
    assert fb("accept")["id"] == fb("accept")["id"] != fb("reject")["id"]
    schema = feedback_schema(TAXONOMY)
    added = schema["properties"]["add"]["items"]["properties"]
    assert added["label"]["enum"] == ["scratch", "crack", "spot", "anomaly"]
    edit_attrs = schema["properties"]["edits"]["items"]["properties"]["attributes"]
    assert edit_attrs["properties"]["severity"]["enum"] == ["minor", "major", None]


# -- files ---------------------------------------------------------------------------------------
def entry(store: FeedbackStore, png: bytes, fid: str, when: str, labels: list[str]) -> Entry:
    image = store.keep_image(png, "png")
    record = {
        "image": image,
        "width": 320,
        "height": 240,
        "objects": [{"label": lb, "bbox": [1, 2, 30, 40], "attributes": {}} for lb in labels],
        "provenance": {"source": "feedback", "who": "ana", "when": when, "ref": RID},
    }
    return Entry(id=fid, key=f"report:{RID}", via="cli", who="ana", when=when, record=record)


def test_store_keeps_history_latest_wins_dedupes_and_read_records_reads_it(tmp_path):
    from train.data.records import read_records

    png = make_raw_png(5)
    store = FeedbackStore(tmp_path / "feedback")
    assert store.add([entry(store, png, "f1", "2025-05-01T10:00:00Z", ["spot"])]) == [True]
    later = entry(store, png, "f2", "2025-05-01T11:00:00+00:00", ["crack", "spot"])
    earlier = entry(store, png, "f3", "2025-05-01T09:00:00Z", [])
    assert store.add([later, earlier]) == [True, True]
    assert store.add([entry(store, png, "f1", WHEN, ["scratch"])]) == [False]  # same id
    assert [e["id"] for e in store.history()] == ["f1", "f2", "f3"]
    records = read_records(store.records_path)  # checks the image exists at its size
    assert len(records) == 1 and records[0].labels == ["crack", "spot"]
    sha = hashlib.sha256(png).hexdigest()
    assert records[0].image == (store.root / "images" / f"{sha}.png").absolute()
    assert records[0].provenance.source == "feedback" and records[0].provenance.ref == RID
    # a crash mid-append leaves a torn line: it is skipped, then replaced by the next append
    with open(store.log_path, "ab") as handle:
        handle.write(b'{"id": "torn", "key"')
    assert [e["id"] for e in store.history()] == ["f1", "f2", "f3"]
    store.add([entry(store, png, "f4", "2025-05-02T00:00:00Z", ["scratch"])])
    lines = store.log_path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    assert read_records(store.records_path)[0].labels == ["scratch"]


def test_received_images_are_hard_links_pruned_by_age(tmp_path):
    inbox = tmp_path / "inbox" / "abc.bin"
    inbox.parent.mkdir()
    inbox.write_bytes(b"payload")
    kept = ReceivedImages(tmp_path / "received", keep_days=1)
    kept.keep(inbox)
    inbox.unlink()  # the pipeline drops its copy
    assert (tmp_path / "received" / "abc.bin").read_bytes() == b"payload"
    assert kept.prune(now=time.time() + 3600) == 0
    assert kept.prune(now=time.time() + 2 * 86400) == 1
    off = ReceivedImages(tmp_path / "off", keep_days=0)
    inbox.write_bytes(b"x")
    off.keep(inbox)
    assert not (tmp_path / "off").exists()


def test_import_a_tiny_yolo_folder(tmp_path):
    from train.data.records import read_records

    data = tmp_path / "yolo"
    data.mkdir()
    save_png(make_sample(1, defect="scratch").rgb, data / "a.png")
    save_png(make_sample(2).rgb, data / "b.png")
    (data / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    (data / "classes.txt").write_text("scratch\nrust\n")
    config = write_config(tmp_path, tmp_path / "no-bundle", port=None)
    args = ("review", "import", data, "--format", "yolo", "--who", "bo", "--config", config)
    run = run_cli(*args)
    assert "2 image(s) recorded" in run.stdout
    assert "2 image(s) recorded" not in run_cli(*args).stdout  # idempotent
    records = read_records(tmp_path / "state" / "feedback" / "records.jsonl")
    by_ref = {r.provenance.ref: r for r in records}
    assert set(by_ref) == {"a.png", "b.png"} and by_ref["b.png"].objects == ()
    (scratch,) = by_ref["a.png"].objects
    assert scratch.label == "scratch" and scratch.bbox == (120.0, 60.0, 200.0, 180.0)
    assert by_ref["a.png"].provenance.who == "bo"
    assert by_ref["a.png"].image.parent == tmp_path / "state" / "feedback" / "images"


# -- the command on a real daemon's report -------------------------------------------------------
def first_report(tmp_path, verdict: str, daemon) -> dict:
    assert wait_for(lambda: report_files(tmp_path), 180), daemon.log_text()
    reports = [json.loads(p.read_text()) for p in report_files(tmp_path)]
    found = [r for r in reports if r["verdict"] == verdict]
    assert found, reports
    return found[0]


@pytest.mark.slow
def test_review_command_round_trip_on_a_daemon_report(tmp_path, bundle_dir, daemons):
    from train.data.records import read_records

    config = write_config(tmp_path, bundle_dir, port=None)
    daemon = daemons(config)
    save_png(make_sample(77, defect="crack").rgb, tmp_path / "incoming" / "part.png")
    rep = first_report(tmp_path, "defective", daemon)
    rid = rep["id"]
    listed = json.loads(run_cli("review", "list", "--pending", "--json", "--config", config).stdout)
    assert [row["id"] for row in listed] == [rid]

    bad = run_cli("review", rid, "--set-box", "0", "0,0,9999,10", "--config", config, check=False)
    assert bad.returncode == 2 and "edits[0].bbox" in bad.stderr
    assert not (tmp_path / "state" / "feedback" / "log.jsonl").exists()

    fixed = run_cli(
        "review", rid, "--set-label", "0", "crack", "--add", "spot", "5,5,25,30",
        "--who", "ana", "--note", "one missed", "--config", config,
    )  # fmt: skip
    assert "fix by ana recorded (2 object(s): crack, spot)" in fixed.stdout
    os.unlink(tmp_path / "incoming" / "part.png")  # the line's cleanup: the kept copy remains
    run_cli("review", rid, "--reject", "--config", config, user="bo")
    records = read_records(tmp_path / "state" / "feedback" / "records.jsonl")
    assert len(records) == 1 and records[0].objects == ()
    assert records[0].provenance.who == "bo" and records[0].provenance.ref == rid
    kept = records[0].image.read_bytes()
    assert hashlib.sha256(kept).hexdigest() == rep["image"]["sha256"]
    history = [json.loads(line) for line in (tmp_path / "state/feedback/log.jsonl").open()]
    assert [h["feedback"]["action"] for h in history] == ["fix", "reject"]
    assert history[0]["feedback"]["note"] == "one missed" and history[0]["via"] == "cli"
    assert run_cli("review", "list", "--pending", "--config", config).stdout == ""
    assert "reviewed by bo" in run_cli("review", "list", "--config", config).stdout
    unknown = run_cli("review", "f" * 32, "--accept", "--config", config, check=False)
    assert unknown.returncode == 2 and "report_id: no report" in unknown.stderr


# -- MQTT ----------------------------------------------------------------------------------------
class AckListener:
    def __init__(self, port: int, topic: str):
        self.acks: queue.Queue[dict] = queue.Queue()
        self.ready = False
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"acks-{time.time_ns()}")
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: setattr(self, "ready", True)
        self.client.on_message = lambda c, u, m: self.acks.put(json.loads(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def next(self, timeout: float = 30) -> dict:
        return self.acks.get(timeout=timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.slow
def test_mqtt_feedback_is_recorded_and_acknowledged(tmp_path, broker, bundle_dir, daemons):
    from train.data.records import read_records

    config = write_config(tmp_path, bundle_dir, port=broker.port)
    acks = AckListener(broker.port, "t/feedback/ack")
    daemon = daemons(config)
    assert wait_for(lambda: acks.ready, 30)
    assert wait_for(lambda: "MQTT connected" in daemon.log_text(), 60), daemon.log_text()
    publish(broker.port, "cams/a/image", [make_raw_png(4343)])
    rep = first_report(tmp_path, "ok", daemon)
    assert rep["source"]["kind"] == "mqtt"
    assert wait_for(lambda: not list((tmp_path / "state" / "inbox").iterdir()), 30)

    invalid = {"report_id": rep["id"], "who": "ana", "when": WHEN, "action": "fix"}
    invalid["add"] = [{"label": "rust", "bbox": [1, 1, 9, 9]}]
    publish(broker.port, "t/feedback", [json.dumps(invalid).encode()])
    ack = acks.next()
    assert ack["status"] == "rejected" and ack["report_id"] == rep["id"]
    assert "add[0].label" in ack["reason"]
    assert not (tmp_path / "state" / "feedback" / "log.jsonl").exists()

    valid = {**invalid, "id": "tablet-7", "add": [{"label": "spot", "bbox": [1, 1, 9, 9]}]}
    publish(broker.port, "t/feedback", [json.dumps(valid).encode()] * 2)
    first, second = acks.next(), acks.next()
    assert (first["status"], first["id"], first["duplicate"]) == ("accepted", "tablet-7", False)
    assert (second["status"], second["duplicate"]) == ("accepted", True)
    records = read_records(tmp_path / "state" / "feedback" / "records.jsonl")
    assert [r.labels for r in records] == [["spot"]]
    assert hashlib.sha256(records[0].image.read_bytes()).hexdigest() == rep["image"]["sha256"]
    publish(broker.port, "t/feedback", [b"not json"])
    assert acks.next()["problems"][0].startswith("payload: ")
    acks.close()


def test_feedback_config_defaults_and_refuses_wildcard_topics(tmp_path):
    from appliance.config import ConfigError, load_config

    config = write_config(tmp_path, tmp_path / "no-bundle", port=1883)
    loaded = load_config(config, check_paths=False)
    assert loaded.feedback.topic_for(loaded.mqtt) == "t/feedback"
    assert loaded.feedback.keep_mqtt_images_days == 2.0
    config.write_text(config.read_text() + '\n[feedback]\ntopic = "plant/#"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config, check_paths=False)
    assert caught.value.problems[0].startswith("feedback.topic = 'plant/#': ")
