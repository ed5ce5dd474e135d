"""Box arithmetic for training data: format conversions, resizing, clipping and IoU.

Every data set stores boxes its own way (COCO ``[x, y, w, h]``, YOLO normalised centre/size, VOC
and the appliance report ``[x1, y1, x2, y2]`` in pixels). Inside ``train/`` a box is always
``(x1, y1, x2, y2)`` in pixels of the original image, with pixel-edge coordinates: a box covering
the whole ``W × H`` image is ``(0, 0, W, H)``. These pure functions are the only place that converts.

Resizing follows seed 001's equations 1–4. An image of size ``(H, W)`` is resized to ``(H', W')``
for the model; a box in original pixels maps to::

    x1' = x1 · W'/W    (1)        y1' = y1 · H'/H    (2)
    x2' = x2 · W'/W    (3)        y2' = y2 · H'/H    (4)

and back with the inverse ratios. ``resize_box`` rounds each coordinate half away from zero
(``rounding=True``, the integer pixels a model is trained to emit) and clamps it into the target
image, so a mapped box never leaves the picture; with ``rounding=False`` it only clamps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Box = tuple[float, float, float, float]

# Annotation tools disagree by a pixel about where an image ends (1-based VOC indices, x2 == W versus
# x2 == W - 1), so coordinates up to this far outside the image are clamped instead of rejected.
EDGE_TOLERANCE_PX = 1.0


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """COCO ``[x, y, width, height]`` → ``(x1, y1, x2, y2)``."""
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def xyxy_to_xywh(box: Sequence[float]) -> Box:
    """``(x1, y1, x2, y2)`` → COCO ``(x, y, width, height)``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1, y1, x2 - x1, y2 - y1)


def normalised_to_pixels(box: Sequence[float], width: int, height: int) -> Box:
    """``(x1, y1, x2, y2)`` as fractions of the image size → pixels."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 * width, y1 * height, x2 * width, y2 * height)


def pixels_to_normalised(box: Sequence[float], width: int, height: int) -> Box:
    """``(x1, y1, x2, y2)`` in pixels → fractions of the image size."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 / width, y1 / height, x2 / width, y2 / height)


def yolo_to_xyxy(cxcywh: Sequence[float], width: int, height: int) -> Box:
    """YOLO normalised ``(cx, cy, w, h)`` → pixel ``(x1, y1, x2, y2)``."""
    cx, cy, w, h = (float(v) for v in cxcywh)
    return normalised_to_pixels((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), width, height)


def xyxy_to_yolo(box: Sequence[float], width: int, height: int) -> Box:
    """Pixel ``(x1, y1, x2, y2)`` → YOLO normalised ``(cx, cy, w, h)``."""
    x1, y1, x2, y2 = pixels_to_normalised(box, width, height)
    return ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)


def points_to_xyxy(points: Sequence[Sequence[float]]) -> Box:
    """The tightest box around polygon / polyline vertices ``[[x, y], ...]``."""
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    return (min(xs), min(ys), max(xs), max(ys))


def clip_box(box: Sequence[float], width: float, height: float) -> Box:
    """Clamp every coordinate into ``[0, width] × [0, height]``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    )


def box_problem(
    box: Sequence[float], width: float, height: float, tolerance: float = EDGE_TOLERANCE_PX
) -> str | None:
    """Why ``box`` is not a usable box in a ``width × height`` image, or None when it is.

    Coordinates may lie up to ``tolerance`` pixels outside the image (callers then ``clip_box``);
    after clipping the box must have positive width and height.
    """
    if len(box) != 4:
        return f"a box needs 4 numbers [x1, y1, x2, y2], got {len(box)}"
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box):
        return f"box coordinates must be numbers, got {list(box)!r}"
    if not all(math.isfinite(v) for v in box):
        return f"box coordinates must be finite, got {list(box)!r}"
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return f"box {list(box)} needs x2 > x1 and y2 > y1"
    lo, hi_x, hi_y = -tolerance, width + tolerance, height + tolerance
    if min(x1, x2) < lo or max(x1, x2) > hi_x or min(y1, y2) < lo or max(y1, y2) > hi_y:
        return (
            f"box {list(box)} lies outside the {width}x{height} image "
            f"(more than {tolerance:g} px beyond its edge)"
        )
    cx1, cy1, cx2, cy2 = clip_box(box, width, height)
    if cx2 <= cx1 or cy2 <= cy1:
        return f"box {list(box)} has no area inside the {width}x{height} image"
    return None


def _round_half_up(value: float) -> float:
    return float(math.floor(value + 0.5))


def resize_box(
    box: Sequence[float],
    src_hw: tuple[int, int],
    dst_hw: tuple[int, int],
    rounding: bool = True,
) -> Box:
    """Map a box from an image of size ``src_hw = (H, W)`` to one of ``dst_hw = (H', W')``.

    Seed 001 equations 1–4: ``x' = x·W'/W``, ``y' = y·H'/H``; then rounded (when ``rounding``) and
    clamped into the destination image. Use the same function with the sizes swapped to map a
    predicted box back to original pixels.
    """
    (src_h, src_w), (dst_h, dst_w) = src_hw, dst_hw
    if min(src_h, src_w, dst_h, dst_w) <= 0:
        raise ValueError(f"image sizes must be positive, got {src_hw} → {dst_hw}")
    sx, sy = dst_w / src_w, dst_h / src_h
    x1, y1, x2, y2 = (float(v) for v in box)
    mapped = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
    if rounding:
        mapped = tuple(_round_half_up(v) for v in mapped)
    return clip_box(mapped, dst_w, dst_h)


def area(box: Sequence[float]) -> float:
    x1, y1, x2, y2 = box
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (0.0 when both are empty)."""
    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0
