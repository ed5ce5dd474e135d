"""MQTT payload parsing: raw bytes, JSON envelopes and every malformed variant."""

import base64
import json

import pytest

from appliance.imaging import ImageRejected
from appliance.sources.envelope import parse_payload


def test_raw_bytes_pass_through():
    assert parse_payload(b"\x89PNG....", max_bytes=100).data == b"\x89PNG...."


def test_envelope_fields():
    payload = json.dumps(
        {
            "image_b64": base64.b64encode(b"abc").decode(),
            "line": "l2",
            "camera": 7,
            "captured_at": "2026-01-01T00:00:00Z",
            "id": "m-1",
        }
    )
    message = parse_payload(payload.encode(), max_bytes=10_000)
    assert (message.data, message.line, message.camera, message.message_id) == (
        b"abc",
        "l2",
        "7",
        "m-1",
    )


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"x" * 101, "payload_too_large"),
        (b'{"image_b64": ', "bad_envelope"),
        (b'{"line": "l1"}', "bad_envelope"),
        (b'{"image_b64": "abc", "colour": "red"}', "bad_envelope"),
        (b'{"image_b64": "!!!not base64!!!"}', "bad_base64"),
        (b'{"image_b64": "QUJD", "line": {"a": 1}}', "bad_envelope"),
        (b"{\xff\xfe}", "bad_envelope"),
    ],
)
def test_malformed_payloads(payload, code):
    with pytest.raises(ImageRejected) as info:
        parse_payload(payload, max_bytes=100)
    assert info.value.code == code
