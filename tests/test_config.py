"""Strict configuration: every problem names the dotted key, the value and what is allowed."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def minimal(tmp_path: Path, **overrides) -> dict:
    (tmp_path / "in").mkdir(exist_ok=True)
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text("{}")
    data = {
        "state": {"dir": str(tmp_path / "state")},
        "sources": {"folder": [{"path": str(tmp_path / "in")}]},
        "outbox": {"dir": str(tmp_path / "out")},
        "taxonomy": {"labels": ["scratch"], "attributes": {"severity": ["minor", "major"]}},
        "model": {"bundle": str(bundle)},
    }
    for dotted, value in overrides.items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_minimal_config_is_valid_and_adds_anomaly_label(tmp_path):
    config = parse_config(minimal(tmp_path))
    assert config.taxonomy_obj.labels == ("scratch", "anomaly")
    assert config.mqtt.qos == 1 and config.ingest.dedupe is True


def test_unknown_key_names_dotted_path_and_allowed_keys(tmp_path):
    data = minimal(tmp_path)
    data["sources"]["folder"][0]["recursiv"] = True
    [line] = problems(data)
    assert line.startswith("sources.folder[0].recursiv: unknown key")
    assert "recursive" in line and "polling" in line


def test_wrong_types_and_ranges_name_key_and_value(tmp_path):
    found = problems(
        minimal(tmp_path, **{"mqtt.port": 70000, "mqtt.qos": 0, "model.providers": ["gpu"]})
    )
    assert any(p.startswith("mqtt.port = 70000:") and "65535" in p for p in found)
    assert any(p.startswith("mqtt.qos = 0:") and "1 or 2" in p for p in found)
    assert any(p.startswith("model.providers[0] = 'gpu':") and "'cuda'" in p for p in found)


def test_bad_taxonomy_names(tmp_path):
    found = problems(minimal(tmp_path, **{"taxonomy.labels": ["Scratch", "dent", "dent"]}))
    assert len(found) == 1 and found[0].startswith("taxonomy.labels")
    assert "'Scratch'" in found[0] and "twice" in found[0]


def test_missing_required_section(tmp_path):
    data = minimal(tmp_path)
    del data["outbox"]
    assert problems(data) == ["outbox: required key is missing"]


def test_missing_paths_are_reported(tmp_path):
    data = minimal(tmp_path)
    data["sources"]["folder"][0]["path"] = str(tmp_path / "nope")
    data["model"]["bundle"] = str(tmp_path / "nobundle")
    found = problems(data)
    assert any(
        p.startswith("sources.folder[0].path:") and "not an existing directory" in p for p in found
    )
    assert any(p.startswith("model.bundle:") and "appliance enroll" in p for p in found)


def test_impossible_combinations(tmp_path):
    data = minimal(tmp_path, **{"mqtt.enabled": False, "sources.mqtt": {"topics": ["cam/+"]}})
    assert any("sources.mqtt.topics" in p and "mqtt.enabled" in p for p in problems(data))
    data = minimal(tmp_path, **{"mqtt.tls": {"cert_file": str(tmp_path / "c.pem")}})
    assert any("cert_file and key_file" in p for p in problems(data))
    data = minimal(tmp_path)
    data["sources"] = {"folder": []}
    assert any(p.startswith("sources: no image source") for p in problems(data))


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text("{}")
    (tmp_path / "c.toml").write_text(
        '[state]\ndir = "s"\n[[sources.folder]]\npath = "in"\n[outbox]\ndir = "o"\n'
        '[taxonomy]\nlabels = ["dent"]\n[model]\nbundle = "b"\n'
    )
    config = load_config(tmp_path / "c.toml")
    assert config.state.dir == tmp_path / "s"
    assert config.sources.folder[0].path == tmp_path / "in"


def test_repository_example_config_is_complete_and_valid(tmp_path):
    data = tomllib.loads((REPO / "config.toml").read_text())
    config = parse_config(data, check_paths=False)
    assert config.sources.mqtt.topics and config.mqtt.enabled
    assert "dent" in config.taxonomy_obj.labels
    # With its paths pointed at real directories, it passes the full check too.
    (tmp_path / "cam").mkdir()
    data["sources"]["folder"][0]["path"] = str(tmp_path / "cam")
    data["model"]["bundle"] = minimal(tmp_path)["model"]["bundle"]
    parse_config(data)


def test_check_config_command_prints_problems_and_fails(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[state]\ndir = "s"\nextra = 1\n')
    run = subprocess.run(
        [sys.executable, "-m", "appliance", "check-config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "state.extra: unknown key; allowed here: dir" in run.stderr
    assert "taxonomy: required key is missing" in run.stderr
    bad.write_text("[state\n")
    run = subprocess.run(
        [sys.executable, "-m", "appliance", "check-config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "not valid TOML" in run.stderr
