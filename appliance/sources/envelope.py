"""MQTT image payloads: raw JPEG/PNG bytes, or a JSON envelope ``{image_b64, line, camera, ...}``.

Pure parsing, so every malformed payload maps to a precise report error code without a broker.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from appliance.imaging import ImageRejected

ENVELOPE_KEYS = {"image_b64", "line", "camera", "captured_at", "id"}


@dataclass(frozen=True)
class MqttImage:
    data: bytes
    line: str | None = None
    camera: str | None = None
    captured_at: str | None = None
    message_id: str | None = None


def parse_payload(payload: bytes, *, max_bytes: int) -> MqttImage:
    """Split a payload into image bytes and metadata, or raise ImageRejected with the reason."""
    if len(payload) > max_bytes:
        raise ImageRejected(
            "payload_too_large",
            f"payload of {len(payload)} bytes exceeds sources.mqtt.max_payload_bytes = {max_bytes}",
        )
    if payload.lstrip()[:1] != b"{":
        return MqttImage(data=payload)
    try:
        envelope = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageRejected(
            "bad_envelope", f"payload starts like JSON but is not JSON: {exc}"
        ) from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("image_b64"), str):
        raise ImageRejected("bad_envelope", "JSON envelope needs a string field 'image_b64'")
    unknown = sorted(set(envelope) - ENVELOPE_KEYS)
    if unknown:
        raise ImageRejected(
            "bad_envelope", f"unknown envelope keys {unknown}; allowed: {sorted(ENVELOPE_KEYS)}"
        )
    for key in ("line", "camera", "captured_at", "id"):
        if envelope.get(key) is not None and not isinstance(envelope[key], str | int):
            raise ImageRejected("bad_envelope", f"envelope field {key!r} must be a string")
    try:
        data = base64.b64decode(envelope["image_b64"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageRejected("bad_base64", f"image_b64 is not valid base64: {exc}") from None
    text = lambda key: None if envelope.get(key) is None else str(envelope[key])  # noqa: E731
    return MqttImage(
        data=data,
        line=text("line"),
        camera=text("camera"),
        captured_at=text("captured_at"),
        message_id=text("id"),
    )
