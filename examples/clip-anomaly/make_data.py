"""Write the tiny CLIP-branch example's images: textured tiles, some with a crack or a spot.

    python examples/clip-anomaly/make_data.py [OUT]    (default: examples/clip-anomaly/data)

Writes OUT/normal/*.png (good tiles for the memory), OUT/images/*.png and OUT/train.jsonl
(inspection records with boxes and descriptions), all generated, nothing downloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64


def tile(rng: np.random.Generator) -> np.ndarray:
    base = rng.normal(128, 12, (SIZE, SIZE, 1)).clip(0, 255)
    return np.repeat(base, 3, axis=2).astype(np.uint8)


def make(out: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (out / "normal").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i in range(6):
        Image.fromarray(tile(rng)).save(out / "normal" / f"good_{i}.png")
    lines = []
    for i in range(12):
        rgb, objects, text = tile(rng), [], None
        kind = ("none", "crack", "spot")[i % 3]
        if kind == "crack":
            y = int(rng.integers(12, 48))
            rgb[y : y + 3, 8:56] = 20
            objects = [{"label": "crack", "bbox": [8, y, 56, y + 3]}]
            text = "a dark crack across the tile"
        elif kind == "spot":
            x, y = (int(v) for v in rng.integers(12, 44, 2))
            rgb[y : y + 10, x : x + 10] = 250
            objects = [{"label": "spot", "bbox": [x, y, x + 10, y + 10]}]
            text = "a bright spot on the tile"
        name = f"images/tile_{i:02d}.png"
        Image.fromarray(rgb).save(out / name)
        record = {"image": name, "width": SIZE, "height": SIZE, "objects": objects}
        record["provenance"] = {"source": "dataset"}
        if text:
            record["description"] = text
        lines.append(json.dumps(record))
    (out / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "data"
    print(make(target))
