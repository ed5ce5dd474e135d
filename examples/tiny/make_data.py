"""Write the tiny example data set: procedural part images, defect boxes and QA pairs.

    python examples/tiny/make_data.py [--out examples/tiny/data] [--per-kind 4]

Images come from ``appliance.samples`` (seeded, so every machine gets the same pixels); each
defect image gets its true box and a few stage-2 question-answer pairs whose answers are short
templates per defect kind, standing in for teacher answers from ``appliance distill``. The
records file is what ``examples/tiny/recipe.toml`` trains on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from appliance.samples import DEFECT_KINDS, make_sample
from train.data import QA, Obj, Provenance, Record, write_records
from train.prompts import sample_questions

WIDTH, HEIGHT = 160, 120
QUESTIONS_PER_IMAGE = 2
ANSWERS = {
    "what_where": "A {kind} near pixels {box}; the surface is darker along it.",
    "causes": "The {kind} most likely comes from {cause}.",
    "urgency": "{urgency}",
    "repair": "{repair}",
    "prevention": "Monitor {cause} on the line to prevent the {kind}.",
}
KIND_FACTS = {
    "scratch": ("handling contact", "Low urgency: cosmetic.", "Polish the surface."),
    "crack": ("fatigue stress", "High urgency: stop the part.", "Scrap the part."),
    "spot": ("contamination", "Medium urgency: check coating.", "Clean and recoat."),
    None: ("nothing", "No action needed.", "No repair needed."),
}


def answer(perspective: str, kind: str | None, box: tuple[int, ...] | None) -> str:
    cause, urgency, repair = KIND_FACTS[kind]
    if kind is None:
        return "No defect is visible; the part is good."
    return ANSWERS[perspective].format(
        kind=kind, box=list(box or ()), cause=cause, urgency=urgency, repair=repair
    )


def make_record(out: Path, seed: int, kind: str | None) -> Record:
    sample = make_sample(seed, defect=kind, height=HEIGHT, width=WIDTH)
    image = out / "images" / f"{kind or 'good'}_{seed:03d}.png"
    Image.fromarray(sample.rgb).save(image)
    objects = (Obj(kind, tuple(float(v) for v in sample.box)),) if kind else ()
    labels = [kind] if kind else []
    questions = sample_questions(labels, QUESTIONS_PER_IMAGE, seed=image.name)
    qa = tuple(
        QA(q.text, answer(q.perspective, kind, sample.box), q.perspective) for q in questions
    )
    return Record(
        image=image.absolute(),
        width=WIDTH,
        height=HEIGHT,
        objects=objects,
        qa=qa,
        provenance=Provenance("dataset", ref="appliance.samples"),
    )


def make_dataset(out: Path, per_kind: int = 4) -> Path:
    """Write ``per_kind`` images of each defect kind and of good parts; returns the records file."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    kinds = [*DEFECT_KINDS, None]
    records = [
        make_record(out, 1000 + 10 * i + j, kind)
        for i, kind in enumerate(kinds)
        for j in range(per_kind)
    ]
    return write_records(out / "records.jsonl", records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--per-kind", type=int, default=4)
    args = parser.parse_args()
    print(make_dataset(args.out, args.per_kind))


if __name__ == "__main__":
    main()
