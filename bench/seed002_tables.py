"""Seed 002's Table I (zero-shot, MVTec-AD <-> VisA) and Table III (1/2/4-shot) protocols.

Cannot run on the appliance's build machines: it needs local CLIP weights (``--clip-weights``, an
open_clip state dict for ``--clip-model``) and the two datasets. The protocol, as the SPGDD-GPT /
AnomalyCLIP line of work reports it:

* **Table I, zero-shot.** The trainable parts (TDDF focuser: per-block projections and text
  offsets) are fitted on the *test* split of the auxiliary dataset (all categories, masks used:
  β (L_TDDF + λ L_Sep) + γ L_I) and evaluated text-only on every category of the target dataset:
  MVTec-AD -> VisA and VisA -> MVTec-AD.
* **Table III, few-shot.** Same focuser (trained on the other dataset); per target category ``k``
  normal shots (k = 1, 2, 4) drawn from the train split with ``--seeds`` seeds become the MSSPMM
  memory; the score map is eq. 11 (A ⊙ D).

Reported per category and averaged: image AUROC and pixel AUROC. Layouts read:

* MVTec-AD: ``<root>/<category>/{train/good, test/<defect>}/*.png`` and
  ``<root>/<category>/ground_truth/<defect>/<name>_mask.png``.
* VisA: ``<root>/split_csv/1cls.csv`` (columns object, split, label, image, mask; paths relative to
  the root), as the VisA release ships it.

``--clip-model tiny`` runs the whole protocol on a tiny random CLIP (the tests do this on a fake
layout); the numbers are then meaningless.

    python -m bench.seed002_tables --clip-model ViT-B-16 --clip-weights vitb16.bin \\
        --mvtec /data/mvtec --visa /data/visa --blocks 3 8 12 --out seed002.json
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.taxonomy import Taxonomy

DATASETS = ("mvtec", "visa")
SHOT_CHOICES = (1, 2, 4)


@dataclass(frozen=True)
class Item:
    category: str
    split: str  # train | test
    image: Path
    mask: Path | None
    anomalous: bool


def mvtec_items(root: Path) -> list[Item]:
    """Every MVTec-AD image of ``root`` (train/good and test/*), masks where the defect has one."""
    root = Path(root)
    items = []
    for category in sorted(p for p in root.iterdir() if (p / "train" / "good").is_dir()):
        for image in sorted((category / "train" / "good").glob("*.png")):
            items.append(Item(category.name, "train", image, None, False))
        for defect in sorted(p for p in (category / "test").iterdir() if p.is_dir()):
            for image in sorted(defect.glob("*.png")):
                mask = category / "ground_truth" / defect.name / f"{image.stem}_mask.png"
                bad = defect.name != "good"
                items.append(Item(category.name, "test", image, mask if bad else None, bad))
    if not items:
        raise SystemExit(f"{root}: no <category>/train/good/*.png; is this an MVTec-AD root?")
    return items


def visa_items(root: Path, split_csv: str = "split_csv/1cls.csv") -> list[Item]:
    """Every VisA image listed in the 1-class split CSV."""
    root = Path(root)
    table = root / split_csv
    if not table.is_file():
        raise SystemExit(f"{table} is missing; VisA ships split_csv/1cls.csv at its root")
    items = []
    with open(table, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["label"] not in ("normal", "anomaly"):
                raise SystemExit(f"{table}: label {row['label']!r}; expected normal or anomaly")
            mask = root / row["mask"] if row.get("mask") else None
            bad = row["label"] == "anomaly"
            items.append(Item(row["object"], row["split"], root / row["image"], mask, bad))
    return items


def load_items(name: str, root: Path) -> list[Item]:
    return mvtec_items(root) if name == "mvtec" else visa_items(root)


def categories(items: list[Item]) -> list[str]:
    return sorted({i.category for i in items})


def object_name(category: str) -> str:
    return category.replace("_", " ")


def read_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def read_mask(path: Path | None, size: int) -> np.ndarray:
    from PIL import Image

    if path is None or not path.is_file():
        return np.zeros((size, size), bool)
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((size, size), Image.Resampling.NEAREST)) > 0


class Runner:
    """Builds the CLIP branch once and runs both protocols."""

    def __init__(self, args) -> None:
        import functools

        import open_clip

        from train.clip_anomaly.vvclip import load_clip, preprocess_stats, tiny_clip

        if args.clip_model == "tiny":
            self.clip = tiny_clip(image_size=args.image_size)
            self.tokenizer = functools.partial(open_clip.tokenize, context_length=32)
        else:
            self.clip = load_clip(args.clip_model, args.clip_weights)
            self.tokenizer = open_clip.get_tokenizer(args.clip_model)
        self.mean, self.std = preprocess_stats(self.clip)
        self.args = args
        self.texts: dict[str, tuple] = {}

    def pixels(self, items: list[Item]):
        from train.clip_anomaly.vvclip import clip_pixels

        rgb = np.stack([read_image(i.image, self.args.image_size) for i in items])
        return clip_pixels(rgb, self.mean, self.std)

    def focuser(self, items: list[Item], category: str):
        """The focuser for ``category``'s prompts, fitted on the auxiliary dataset's test split."""
        import torch

        from train.clip_anomaly.tddf import TextFocuser, text_embeddings
        from train.clip_anomaly.train import fit_focuser
        from train.clip_anomaly.vvclip import VVClipVision

        blocks = tuple(self.args.blocks)
        if category not in self.texts:  # the text tower runs once per category
            self.texts[category] = text_embeddings(
                self.clip, self.tokenizer, Taxonomy(labels=()), object_name(category)
            )
        focuser = TextFocuser(*self.texts[category], len(blocks))
        test = [i for i in items if i.split == "test"][: self.args.train_images]
        if test and self.args.steps > 0:
            masks = np.stack([read_mask(i.mask, self.args.image_size) for i in test])
            batch = {
                "pixels": self.pixels(test),
                "normal": torch.tensor([not i.anomalous for i in test]),
                "masks": torch.from_numpy(masks),
            }
            fit_focuser(VVClipVision(self.clip.visual, blocks), focuser, batch, self.args.steps)
        return focuser

    def category_scores(self, net, test: list[Item], shots: list[Item] | None):
        import torch

        from train.clip_anomaly.evaluate import auroc, pixel_auroc

        memory = net.enroll(self.pixels(shots)) if shots else None
        scores, maps = [], []
        with torch.no_grad():
            for start in range(0, len(test), 16):
                chunk = self.pixels(test[start : start + 16])
                out = net(chunk, *memory) if memory else net(chunk)
                scores.append(out[5].numpy())
                size = (self.args.image_size,) * 2
                up = torch.nn.functional.interpolate(
                    out[4].unsqueeze(1), size=size, mode="bilinear"
                )
                maps.extend(up.squeeze(1).numpy())
        labels = [i.anomalous for i in test]
        masks = [read_mask(i.mask, self.args.image_size) for i in test]
        pixel = pixel_auroc(masks, maps) if any(m.any() for m in masks) else float("nan")
        return auroc(labels, np.concatenate(scores)), pixel  # nan: no mask pixels to rank

    def table(self, source: list[Item], target: list[Item], shots: int) -> dict:
        from train.clip_anomaly.net import ClipAnomalyNet
        from train.clip_anomaly.vvclip import VVClipVision

        rows = {}
        for category in categories(target):
            net = ClipAnomalyNet(
                VVClipVision(self.clip.visual, self.args.blocks), self.focuser(source, category)
            )
            test = [i for i in target if i.category == category and i.split == "test"]
            train = [i for i in target if i.category == category and i.split == "train"]
            seeds = range(self.args.seeds) if shots else range(1)
            results = []
            for seed in seeds:
                chosen = None
                if shots:
                    pick = np.random.default_rng(seed).choice(len(train), shots, replace=False)
                    chosen = [train[j] for j in sorted(pick)]
                results.append(self.category_scores(net, test, chosen))
            rows[category] = [
                float(np.mean([r[0] for r in results])),
                float(np.mean([r[1] for r in results])),
            ]
        rows["mean"] = [_mean([v[i] for v in rows.values()]) for i in (0, 1)]
        return rows


def _mean(values: list[float]) -> float:
    """Mean over the finite values (nan when there is none)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def run(args) -> dict:
    data = {name: load_items(name, getattr(args, name)) for name in DATASETS if getattr(args, name)}
    runner = Runner(args)
    out: dict = {"zero_shot": {}, "few_shot": {}}
    for target in data:
        source = next((d for d in DATASETS if d != target and d in data), None)
        aux = data[source] if source else []
        if 0 in args.shots:
            out["zero_shot"][f"{source}->{target}"] = runner.table(aux, data[target], 0)
        for k in [s for s in args.shots if s > 0]:
            out["few_shot"][f"{target} k={k}"] = runner.table(aux, data[target], k)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip-model", required=True, help="open_clip config name, or 'tiny'")
    parser.add_argument("--clip-weights", type=Path, help="local open_clip state dict")
    parser.add_argument("--mvtec", type=Path, help="MVTec-AD root")
    parser.add_argument("--visa", type=Path, help="VisA root (with split_csv/1cls.csv)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[3, 8, 12])
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 4], help="0: zero-shot")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=200, help="focuser training steps")
    parser.add_argument("--train-images", type=int, default=256, help="auxiliary images used")
    parser.add_argument("--out", type=Path, help="write the tables as JSON here")
    args = parser.parse_args(argv)
    if args.clip_model != "tiny" and args.clip_weights is None:
        parser.error("--clip-weights is required (no download happens); or --clip-model tiny")
    if not args.mvtec and not args.visa:
        parser.error("give --mvtec and/or --visa (both for the cross-dataset Table I)")
    bad = [s for s in args.shots if s not in (0, *SHOT_CHOICES)]
    if bad:
        parser.error(f"--shots {bad}: choose among 0 (zero-shot) and {SHOT_CHOICES}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tables = run(args)
    text = json.dumps(tables, indent=2).replace("NaN", "null")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
