"""The daemon: wires sources, the durable queue, the inspector, the outbox and MQTT together.

Threads: one per watched folder (watchdog + rescan), paho's network thread (MQTT images in, PUBACKs),
the publisher thread (backlog → broker), and the main thread, which inspects queued images in batches
and pings systemd's watchdog. SIGTERM/SIGINT finish the batch in hand, then stop cleanly.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import logging
import signal
import threading
import time
from pathlib import Path

from appliance.backends.onnxrt import resolve_providers
from appliance.bundle import load_bundle
from appliance.config import Config
from appliance.feedback_store import FeedbackService, ReceivedImages
from appliance.inspector import open_inspector
from appliance.mqtt import MqttLink
from appliance.outbox import Inbox, Outbox, Quarantine
from appliance.pipeline import Pipeline
from appliance.registry import BundleRegistry
from appliance.sdnotify import notify, watchdog_interval_s
from appliance.sources.folder import FolderWatcher
from appliance.store import Store

log = logging.getLogger(__name__)
CONTROL_POLL_S = 1.0  # how often the registry (promotions, pause requests) is looked at


def stop_on_signal(*events: threading.Event):
    """A signal handler that sets `events` without ever blocking the thread it interrupts.

    Python runs handlers in the main thread between two bytecodes, possibly while that thread holds
    an Event's internal lock (inside `Event.wait`); `Event.set` takes the same non-reentrant lock,
    so setting it from the handler can deadlock the daemon on SIGTERM. The handler hands the work
    to a short-lived thread, which waits for the lock like any other thread.
    """

    def set_all() -> None:
        for event in events:
            event.set()

    def handler(signum: int, frame: object) -> None:
        threading.Thread(target=set_all, name=f"signal-{signum}", daemon=True).start()

    return handler


def state_paths(config: Config) -> dict[str, Path]:
    root = Path(config.state.dir)
    return {
        "db": root / "appliance.sqlite3",
        "inbox": root / "inbox",
        "quarantine": root / "quarantine",
        "cache": root / "cache",
        "feedback": root / "feedback",
    }


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        paths = state_paths(config)
        self.store = Store(paths["db"])
        self.inbox = Inbox(paths["inbox"])
        self.providers = resolve_providers(config.model.providers, cache_dir=paths["cache"])
        self.registry = BundleRegistry(config.state.dir)
        self.generation = self.registry.generation()
        self.paused = False
        self.inspector = self._open(self.registry.active_path() or config.model.bundle)
        mqtt_source = config.sources.mqtt
        self.pipeline = Pipeline(
            store=self.store,
            inspector=self.inspector,
            taxonomy=config.taxonomy_obj,
            outbox=Outbox(config.outbox.dir),
            quarantine=Quarantine(paths["quarantine"]),
            topic_prefix=config.mqtt.topic_prefix,
            dedupe=config.ingest.dedupe,
            max_file_bytes=config.ingest.max_file_bytes,
            max_image_pixels=config.ingest.max_image_pixels,
            max_payload_bytes=mqtt_source.max_payload_bytes if mqtt_source else 32 << 20,
            on_report=self._report_ready,
        )
        self.watchers = [
            FolderWatcher(f, self.store, on_enqueued=self.wake.set) for f in config.sources.folder
        ]
        self.received = ReceivedImages(
            paths["feedback"] / "received", config.feedback.keep_mqtt_images_days
        )
        self.feedback = None
        self.feedback_topic = config.feedback.topic_for(config.mqtt)
        if config.mqtt.enabled and config.feedback.mqtt:
            self.feedback = FeedbackService.open(
                paths["feedback"], paths["db"], config.outbox.dir, config.taxonomy_obj
            )
        self.link = None
        if config.mqtt.enabled:
            self.link = MqttLink(
                config.mqtt,
                self.store,
                image_topics=(mqtt_source.topics if mqtt_source else [])
                + ([self.feedback_topic] if self.feedback else []),
                on_image=self._on_mqtt_message,
            )

    def _open(self, bundle_dir: Path):
        bundle = load_bundle(bundle_dir)
        log.info("serving bundle %s (%s) from %s", bundle.id, bundle.kind, bundle.path)
        return open_inspector(
            bundle,
            taxonomy=self.config.taxonomy_obj,
            providers=self.providers,
            narrative=self.config.model.narrative,
            narrative_gguf=self.config.model.narrative_gguf,
            n_threads=self.config.model.n_threads,
            n_gpu_layers=self.config.model.n_gpu_layers,
            heatmaps=self.config.outbox.heatmaps,
        )

    def _maybe_pause(self) -> bool:
        """Unload the models while retraining asks for the GPU; reload when it is done (or dead).
        Images keep queueing meanwhile. Returns True while paused."""
        request = self.registry.pause_requested()
        if request and not self.paused:
            log.info("pausing inspection for %s (pid %s)", request["reason"], request["pid"])
            self.inspector.close()
            self.paused = True
            notify("STATUS=paused: " + str(request["reason"]))
        elif not request and self.paused:
            log.info("resuming inspection")
            self.generation = self.registry.generation()
            self.inspector = self._open(self.registry.active_path() or self.config.model.bundle)
            self.pipeline.inspector = self.inspector
            self.paused = False
            notify("STATUS=inspecting")
        return self.paused

    def _maybe_switch(self) -> None:
        """Serve the registry's active bundle once it changes (promotion or rollback)."""
        generation = self.registry.generation()
        if generation == self.generation:
            return
        self.generation = generation
        path = self.registry.active_path()
        if path is None:
            return
        try:
            fresh = self._open(path)
        except Exception:  # noqa: BLE001 - a bad bundle must not stop inspection with the old one
            log.exception("cannot serve the promoted bundle %s; keeping the current one", path)
            return
        old, self.inspector = self.inspector, fresh
        self.pipeline.inspector = fresh
        old.close()
        log.info("switched to bundle %s", fresh.bundle_ref["id"])

    def _report_ready(self) -> None:
        if self.link is not None:
            self.link.wake()

    def _on_mqtt_message(self, topic: str, payload: bytes) -> None:
        if self.feedback is not None and topic == self.feedback_topic:
            self._on_feedback(payload)
        else:
            self._on_mqtt_image(topic, payload)

    def _on_feedback(self, payload: bytes) -> None:
        """Record, then answer on ``{topic}/ack``; the caller acknowledges the broker after."""
        try:
            ack = self.feedback.handle_message(payload)
        except OSError:
            raise  # not acknowledged: the broker redelivers it
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the MQTT thread
            log.exception("feedback message could not be handled")
            ack = {"status": "rejected", "reason": f"internal error: {exc}", "problems": []}
        self.link.client.publish(f"{self.feedback_topic}/ack", json.dumps(ack), qos=1)

    def _on_mqtt_image(self, topic: str, payload: bytes) -> None:
        """Persist first, then queue; the caller acknowledges the broker after we return."""
        sha = hashlib.sha256(payload).hexdigest()
        fingerprint = f"mqtt:{sha}" if self.config.ingest.dedupe else f"mqtt:{sha}:{time.time_ns()}"
        if self.store.known(fingerprint):
            return
        path = self.inbox.store(fingerprint.replace(":", "-")[5:], payload)
        self.received.keep(path)  # for `appliance review`: the pipeline drops the inbox copy
        source = self.config.sources.mqtt
        self.store.enqueue(
            fingerprint=fingerprint,
            source_kind="mqtt",
            line=source.line,
            camera=source.camera,
            topic=topic,
            path=str(path),
        )
        self.wake.set()

    def start(self) -> None:
        if self.link:
            self.link.start()
        for watcher in self.watchers:
            watcher.start()
        notify("READY=1\nSTATUS=inspecting")
        log.info(
            "appliance ready: %d folder source(s), MQTT %s",
            len(self.watchers),
            "on" if self.link else "off",
        )

    def stop(self) -> None:
        notify("STOPPING=1")
        for watcher in self.watchers:
            watcher.stop()
        if self.link:
            self.link.stop()
        if not self.paused:
            self.inspector.close()
        self.store.close()

    def run_forever(self) -> None:
        # `kill -USR1 <pid>` writes every thread's stack to stderr (the journal): for hangs.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop_on_signal(self.stop_event, self.wake))
        self.start()
        ping_every = watchdog_interval_s()
        last_ping = last_control = 0.0
        batch = self.config.ingest.batch_size
        try:
            while not self.stop_event.is_set():
                if ping_every and time.monotonic() - last_ping >= ping_every:
                    notify("WATCHDOG=1")
                    last_ping = time.monotonic()
                if time.monotonic() - last_control >= CONTROL_POLL_S:
                    last_control = time.monotonic()
                    if not self._maybe_pause():
                        self._maybe_switch()
                if self.paused:  # images keep queueing; nothing is inspected
                    self.stop_event.wait(CONTROL_POLL_S)
                    continue
                if self.pipeline.run_once(batch) == 0:
                    self.wake.wait(0.5)
                    self.wake.clear()
        finally:
            self.stop()
