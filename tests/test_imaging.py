"""Untrusted bytes: broken input gets a precise error code; odd but valid images are converted."""

import io

import numpy as np
import pytest
from PIL import Image

from appliance.imaging import ImageRejected, decode_image


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def rgb_image(w=40, h=30) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def bomb_png(width: int, height: int) -> bytes:
    # A tiny 1-bit PNG that declares a huge size: only its header is ever read.
    return encode(Image.new("1", (width, height)), "PNG")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"hello, I am a text file named .jpg\n", "not_an_image"),
        (bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), "not_an_image"),
        (encode(rgb_image(400, 300), "JPEG")[:20000], "truncated_image"),
        (encode(rgb_image(), "PNG")[:120], "truncated_image"),
    ],
    ids=["empty", "text", "random", "truncated-jpeg", "truncated-png"],
)
def test_broken_input_gets_a_specific_code(data, code):
    with pytest.raises(ImageRejected) as info:
        decode_image(data)
    assert info.value.code == code


def test_decompression_bomb_is_rejected_from_the_header():
    data = bomb_png(20000, 5000)
    assert len(data) < 200_000
    with pytest.raises(ImageRejected) as info:
        decode_image(data, max_pixels=80_000_000)
    assert info.value.code == "decompression_bomb" and "20000x5000" in info.value.message


def test_sixteen_bit_grayscale_is_scaled_not_rejected():
    ramp = (np.arange(64, dtype=np.uint16)[None, :] * 1024).repeat(8, axis=0)
    decoded = decode_image(encode(Image.fromarray(ramp), "PNG"))
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.shape == (8, 64, 3)
    assert decoded.mode.startswith("I")
    assert decoded.rgb[0, 0, 0] == 0 and decoded.rgb[0, 63, 0] == round(63 * 1024 / 65535 * 255)


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "LA", "RGBA", "1"])
def test_other_modes_convert_to_rgb(mode):
    image = rgb_image().convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    decoded = decode_image(encode(image, fmt))
    assert decoded.rgb.shape == (30, 40, 3) and decoded.rgb.dtype == np.uint8


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.rgb[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "WEBP"])
def test_tiff_bmp_webp(fmt):
    decoded = decode_image(encode(rgb_image(), fmt))
    assert (decoded.width, decoded.height) == (40, 30) and decoded.format == fmt


def test_exif_orientation_is_applied():
    image = rgb_image(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = decode_image(encode(image, "JPEG", exif=exif))
    assert (decoded.width, decoded.height) == (30, 40)
