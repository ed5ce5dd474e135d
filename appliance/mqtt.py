"""The MQTT link: report publishing with PUBACK bookkeeping, image subscriptions, status and stats.

One paho client (v2 callback API, MQTT 3.1.1 persistent session) does all broker traffic. Reports
are published from the SQLite backlog and marked done only on their PUBACK, so a broker outage or a
restart loses nothing: the backlog drains at a bounded rate when the broker is back. Image messages
are acknowledged manually, only after the payload is on disk and queued.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from appliance.config import MqttConfig
from appliance.store import Store

log = logging.getLogger(__name__)
_TOPIC_UNSAFE = str.maketrans({"+": "_", "#": "_", "/": "_", "\0": "_"})


def topic_level(text: str) -> str:
    return (text.translate(_TOPIC_UNSAFE) or "_")[:64]


def report_topic(prefix: str, line: str, camera: str) -> str:
    return f"{prefix}/reports/{topic_level(line)}/{topic_level(camera)}"


MessageHandler = Callable[[str, bytes], None]
# Sentinels on the ack queue (real message ids are 1..65535).
_FORGET_INFLIGHT = -1  # the connection dropped: in-flight reports go back to the backlog
_WAKE = -2  # a report was added to the backlog


class MqttLink:
    """Owns the paho client and the publisher thread."""

    def __init__(
        self,
        config: MqttConfig,
        store: Store,
        *,
        image_topics: list[str] | None = None,
        on_image: MessageHandler | None = None,
        stats: Callable[[], dict] | None = None,
    ):
        self.config = config
        self.store = store
        self.image_topics = list(image_topics or [])
        self.on_image = on_image
        self.stats = stats or store.stats
        self.status_topic = f"{config.topic_prefix}/status"
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._acks: queue.Queue[int] = queue.Queue()
        self._inflight: dict[int, int] = {}  # mid -> report seq
        self._generation = 0
        self._thread: threading.Thread | None = None
        self.client = self._make_client()

    # -- set-up -------------------------------------------------------------------------------
    def _make_client(self) -> paho.Client:
        cfg = self.config
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
            manual_ack=True,
        )
        if cfg.username:
            password = cfg.password_file.read_text().strip() if cfg.password_file else None
            client.username_pw_set(cfg.username, password)
        if cfg.tls:
            client.tls_set(
                ca_certs=_opt(cfg.tls.ca_file),
                certfile=_opt(cfg.tls.cert_file),
                keyfile=_opt(cfg.tls.key_file),
            )
            client.tls_insecure_set(cfg.tls.insecure)
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=15)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        self.client.connect_async(self.config.host, self.config.port, self.config.keepalive_s)
        self.client.loop_start()
        self._thread = threading.Thread(
            target=self._publish_loop, name="mqtt-publisher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        if self._connected.is_set():
            info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
            info.wait_for_publish(timeout=3)
        self.client.disconnect()
        self.client.loop_stop()

    def wake(self) -> None:
        """A new report is in the backlog: publish it now rather than at the next poll."""
        self._acks.put(_WAKE)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- paho callbacks (network thread: keep them short, no locks shared with publish()) -----
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error(
                "MQTT broker %s:%s refused the connection: %s",
                self.config.host,
                self.config.port,
                reason_code,
            )
            return
        log.info("MQTT connected to %s:%s", self.config.host, self.config.port)
        client.publish(self.status_topic, "online", qos=1, retain=True)
        for topic in self.image_topics:
            client.subscribe(topic, qos=1)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set():
            log.warning("MQTT disconnected (%s); reports wait in the backlog", reason_code)
        self._connected.clear()
        self._acks.put(_FORGET_INFLIGHT)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acks.put(mid)

    def _on_message(self, client, userdata, message) -> None:
        if self.on_image is None:
            client.ack(message.mid, message.qos)
            return
        try:
            self.on_image(message.topic, message.payload)
        except OSError:
            # Not acknowledged: the broker redelivers it after we reconnect.
            log.exception(
                "could not persist the image from %s; leaving it unacknowledged", message.topic
            )
            return
        client.ack(message.mid, message.qos)

    # -- publisher thread ---------------------------------------------------------------------
    def _publish_loop(self) -> None:
        interval = 1.0 / self.config.publish_rate_per_s
        next_stats = time.monotonic() + self.config.stats_interval_s
        while not self._stop.is_set():
            self._drain_acks()
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + self.config.stats_interval_s
                self._publish_stats()
            if not self._connected.is_set():
                self._stop.wait(0.2)
                continue
            room = self.config.max_inflight - len(self._inflight)
            batch = (
                self.store.unpublished(room, exclude=set(self._inflight.values())) if room else []
            )
            if not batch:
                self._wait_for_ack(0.2)
                continue
            for pending in batch:
                if self._stop.is_set() or not self._connected.is_set():
                    break
                self._publish_report(pending)
                self._drain_acks()
                self._stop.wait(interval)

    def _publish_report(self, pending) -> None:
        try:
            payload = Path(pending.file).read_bytes()
        except OSError as exc:
            log.error("report file %s is gone (%s); it cannot be published", pending.file, exc)
            self.store.bump("report_file_missing")
            self.store.mark_published(pending.seq)
            return
        info = self.client.publish(pending.topic, payload, qos=self.config.qos)
        if info.rc == paho.MQTT_ERR_SUCCESS:
            self._inflight[info.mid] = pending.seq

    def _wait_for_ack(self, timeout: float) -> None:
        try:
            mid = self._acks.get(timeout=timeout)
        except queue.Empty:
            return
        self._handle_ack(mid)

    def _drain_acks(self) -> None:
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                return
            self._handle_ack(mid)

    def _handle_ack(self, mid: int) -> None:
        if mid == _WAKE:
            return
        if mid == _FORGET_INFLIGHT:
            self._inflight.clear()
            return
        seq = self._inflight.pop(mid, None)
        if seq is not None:
            self.store.mark_published(seq)

    def _publish_stats(self) -> None:
        if not self._connected.is_set():
            return
        try:
            body = json.dumps({"at": time.time(), **self.stats()}, default=str)
        except Exception:  # noqa: BLE001 - stats must never stop publishing
            log.exception("could not collect stats")
            return
        self.client.publish(f"{self.config.topic_prefix}/stats", body, qos=0)


def _opt(path: Path | None) -> str | None:
    return str(path) if path else None
