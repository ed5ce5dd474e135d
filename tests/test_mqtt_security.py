"""MQTT over TLS with a password: the daemon's broker options against a real Mosquitto."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.localbroker import LocalBroker, find_mosquitto
from appliance.samples import make_sample

from .conftest import REPO, save_png, wait_for, write_config

pytestmark = pytest.mark.skipif(
    find_mosquitto() is None
    or shutil.which("openssl") is None
    or shutil.which("mosquitto_passwd") is None,
    reason="needs mosquitto, mosquitto_passwd and openssl",
)


def make_certs(folder):
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    )
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
    )


@pytest.fixture
def secure_broker(tmp_path):
    folder = tmp_path / "broker"
    folder.mkdir()
    make_certs(folder)
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(folder / "passwd"), "inspector", "s3cret"],
        check=True,
        capture_output=True,
    )
    broker = LocalBroker(
        folder,
        extra=[
            "allow_anonymous false",
            f"password_file {folder / 'passwd'}",
            f"cafile {folder / 'ca.pem'}",
            f"certfile {folder / 'server.pem'}",
            f"keyfile {folder / 'server.key'}",
        ],
    ).start()
    yield broker, folder
    broker.stop()


def listen(port, ca, received):
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="secure-listener")
    client.username_pw_set("inspector", "s3cret")
    client.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
    client.on_connect = lambda c, *a: c.subscribe("t/reports/#", qos=1)
    client.on_message = lambda c, u, m: received.append(json.loads(m.payload))
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def test_daemon_publishes_over_tls_with_password(tmp_path, secure_broker, bundle_dir, daemons):
    broker, folder = secure_broker
    received: list[dict] = []
    listener = listen(broker.port, folder / "ca.pem", received)
    config = write_config(tmp_path, bundle_dir, port=broker.port)
    (tmp_path / "password").write_text("s3cret\n")
    text = config.read_text().replace(
        'client_id = "appliance-test"',
        f'client_id = "appliance-test"\nusername = "inspector"\n'
        f'password_file = "{tmp_path / "password"}"\n'
        f'tls = {{ ca_file = "{folder / "ca.pem"}" }}',
    )
    config.write_text(text)
    check = subprocess.run(
        [sys.executable, "-m", "appliance", "check-config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert check.returncode == 0, check.stderr
    daemon = daemons(config)
    save_png(make_sample(61, defect="spot").rgb, tmp_path / "incoming" / "a.png")
    try:
        assert wait_for(lambda: len(received) == 1, 120), daemon.log_text()
        assert received[0]["verdict"] == "defective"
    finally:
        listener.loop_stop()
        listener.disconnect()


def test_wrong_password_keeps_reports_in_the_backlog(tmp_path, secure_broker, bundle_dir, daemons):
    broker, folder = secure_broker
    config = write_config(tmp_path, bundle_dir, port=broker.port)
    (tmp_path / "password").write_text("wrong\n")
    config.write_text(
        config.read_text().replace(
            'client_id = "appliance-test"',
            f'client_id = "appliance-test"\nusername = "inspector"\n'
            f'password_file = "{tmp_path / "password"}"\n'
            f'tls = {{ ca_file = "{folder / "ca.pem"}" }}',
        )
    )
    daemon = daemons(config)
    save_png(make_sample(62).rgb, tmp_path / "incoming" / "b.png")
    assert wait_for(lambda: list((tmp_path / "reports").rglob("*.json")), 120), daemon.log_text()
    assert wait_for(lambda: "refused the connection" in daemon.log_text(), 30)
    status = subprocess.run(
        [sys.executable, "-m", "appliance", "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert json.loads(status.stdout)["publish_backlog"] == 1
    assert daemon.alive()
