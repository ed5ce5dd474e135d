"""Serving a trained vision-language inspector (bundle kind ``vlm``), with no torch.

The bundle (written by ``appliance export``) holds the vision graph as ONNX (pixels → projected image
embeddings, ``image_tokens`` per image) and the language model as GGUF. Its manifest's ``vlm`` section
fixes everything that must equal training: the input size and normalisation, the prompt as segments
of token ids (tokenised at export by the training tokenizer) around one image slot, the learned
prompt embeddings of the "prompt" adapter, and the decoding limits.

Per batch: images are resized and normalised exactly as ``train.model.preprocess`` does (PIL bilinear,
``(x/255 - mean) / std``), run through the vision graph in one call, and each image's embeddings are
decoded greedily by llama.cpp under the grammar of the target schema (``appliance.target``). The
answer's boxes (model-input pixels) are mapped back to image pixels; each defect's score is the
geometric mean probability of the tokens the model wrote for it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from appliance.backends.llamacpp_vlm import EmbeddingDecoder, Generation, Segment
from appliance.bundle import Bundle, BundleError
from appliance.grammar import THINK_ANSWER_ROOT, gbnf_from_schema, think_answer_gbnf
from appliance.imaging import DecodedImage
from appliance.report import Inspection
from appliance.target import objects_from_target, parse_target, target_problems, target_schema

log = logging.getLogger(__name__)
KIND = "vlm"


def preprocess(
    rgb: np.ndarray,
    input_size: tuple[int, int],
    mean: float | Sequence[float],
    std: float | Sequence[float],
) -> np.ndarray:
    """H x W x 3 uint8 → 3 x H' x W' float32, as the training code prepares images; ``mean`` and
    ``std`` are one value for all channels or one per RGB channel."""
    image = Image.fromarray(rgb).convert("RGB").resize(input_size, Image.Resampling.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / 255.0
    mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return ((x - mean) / std).transpose(2, 0, 1).copy()


def _channels(section: dict, key: str) -> float | tuple[float, ...]:
    """A manifest's mean or std: a number (older bundles) or a list of three."""
    value = section["preprocess"][key]
    if isinstance(value, list):
        if len(value) != 3:
            raise BundleError(f"vlm.preprocess.{key} must be one number or three, got {value!r}")
        return tuple(float(v) for v in value)
    return float(value)


def segments_from_manifest(bundle: Bundle, section: dict) -> list[Segment]:
    return prompt_segments(bundle, section["prompt"]["segments"])


def prompt_segments(bundle: Bundle, entries: list[dict]) -> list[Segment]:
    """A manifest's prompt segments (token ids, an embeddings file of the bundle, the image slot)."""
    segments = []
    for entry in entries:
        if "tokens" in entry:
            segments.append(Segment(tokens=tuple(int(t) for t in entry["tokens"])))
        elif "embeddings" in entry:
            embeddings = np.load(bundle.file(entry["embeddings"]), allow_pickle=False)
            segments.append(Segment(embeddings=embeddings.astype(np.float32)))
        elif entry.get("image"):
            segments.append(Segment(image=True))
        else:
            raise BundleError(f"{bundle.path}: unknown prompt segment {entry!r}")
    return segments


def defect_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of each element of the ``defects`` array in compact target JSON."""
    decoder = json.JSONDecoder()
    start = text.find('"defects":[')
    if start < 0:
        return []
    pos, spans = start + len('"defects":['), []
    while pos < len(text) and text[pos] not in "]":
        if text[pos] in ", ":
            pos += 1
            continue
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        spans.append((pos, end))
        pos = end
    return spans


def span_scores(generation: Generation, spans: list[tuple[int, int]], detokenize) -> list[float]:
    """Geometric-mean probability of the tokens overlapping each character span."""
    ends, offset = [], 0
    for token in generation.tokens:
        offset += len(detokenize([token]).decode("utf-8", errors="replace"))
        ends.append(offset)
    scores = []
    for lo, hi in spans:
        picked = [
            lp
            for lp, end, start in zip(generation.logprobs, ends, [0, *ends[:-1]], strict=True)
            if start < hi and end > lo
        ]
        scores.append(float(np.exp(np.mean(picked))) if picked else 0.0)
    return scores


class VisionLanguageInspector:
    """Runs a ``vlm`` bundle: ONNX vision → llama.cpp report under the target grammar."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        providers: list | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        constrained: bool = True,
    ):
        from appliance.backends.onnxrt import create_session

        self.bundle = bundle
        section = bundle.section(KIND)
        self.section = section
        self.taxonomy = bundle.taxonomy
        self.input_size = tuple(section["preprocess"]["input_size"])
        self.mean = _channels(section, "mean")
        self.std = _channels(section, "std")
        self.max_tokens = int(section["max_tokens"])
        self.vision = create_session(
            bundle.file(section["vision"]), providers or ["CPUExecutionProvider"]
        )
        self.gbnf = gbnf_from_schema(target_schema(self.taxonomy))
        envelope = section["prompt"].get("envelope")
        if envelope not in (None, "think-answer"):
            raise BundleError(f"{bundle.path}: unknown answer envelope {envelope!r}")
        root = "root"
        if envelope == "think-answer":
            self.gbnf, root = think_answer_gbnf(self.gbnf), THINK_ANSWER_ROOT
        self.decoder = EmbeddingDecoder(
            bundle.file(section["language_model"]),
            segments_from_manifest(bundle, section),
            image_tokens=int(section["image_tokens"]),
            gbnf=self.gbnf if constrained else None,
            grammar_root=root,
            n_ctx=int(section.get("n_ctx", 4096)),
            kv_cache_type=section.get("kv_cache_type", "f16"),
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
        )
        self.writer = None  # the model writes its own narrative (the report's ``narrative``)

    @property
    def bundle_ref(self) -> dict:
        return {"id": self.bundle.id, "kind": self.bundle.kind}

    def embed(self, images: list[np.ndarray]) -> tuple[np.ndarray, float, float]:
        """Image embeddings (N x image_tokens x n_embd) and ms spent in preprocess and vision."""
        started = time.perf_counter()
        pixels = np.stack([preprocess(rgb, self.input_size, self.mean, self.std) for rgb in images])
        prepared = time.perf_counter()
        (embeddings,) = self.vision.run(None, {"pixels": pixels})
        done = time.perf_counter()
        return embeddings, (prepared - started) * 1e3, (done - prepared) * 1e3

    def answer(self, embeddings: np.ndarray) -> Generation:
        return self.decoder.generate(embeddings, self.max_tokens)

    def inspect_batch(
        self, images: list[DecodedImage], contexts: list[dict], *, narrative: bool = True
    ) -> list[Inspection]:
        if not images:
            return []
        embeddings, prep_ms, vision_ms = self.embed([image.rgb for image in images])
        out = []
        for image, embedded in zip(images, embeddings, strict=True):
            generation = self.answer(embedded)
            try:
                inspection = self._inspection(image, generation)
            except ValueError as exc:
                out.append(Inspection(error=("inference_failed", str(exc))))
                continue
            inspection.timings_ms.update(
                preprocess=prep_ms / len(images),
                vision=vision_ms / len(images),
                prefill=generation.timings_ms["prefill"],
                generation=generation.timings_ms["decode"],
            )
            if not narrative:
                inspection.narrative = None
            out.append(inspection)
        return out

    def _inspection(self, image: DecodedImage, generation: Generation) -> Inspection:
        target = parse_target(generation.text)
        problems = (
            ["the answer is not one JSON object"]
            if target is None
            else target_problems(target, self.taxonomy)
        )
        if generation.finish_reason == "length":
            problems.insert(0, f"the answer was cut off at max_tokens={self.max_tokens}")
        if problems:
            raise ValueError(
                "the model's answer is not a valid report target: "
                + "; ".join(problems[:5])
                + f"; raw answer: {generation.text[:300]!r}"
            )
        size = (image.width, image.height)
        objects = objects_from_target(target, size, self.input_size)
        scores = span_scores(
            generation, defect_spans(generation.text), self.decoder._llm.detokenize
        )
        defects = [
            {
                "label": obj["label"],
                "bbox": [
                    round(min(max(v, 0.0), lim), 1)
                    for v, lim in zip(obj["bbox"], size * 2, strict=True)
                ],
                "score": round(scores[i] if i < len(scores) else 0.0, 4),
                "attributes": obj["attributes"],
            }
            for i, obj in enumerate(objects)
        ]
        return Inspection(defects=defects, anomaly=None, narrative=target.get("narrative"))

    def close(self) -> None:
        self.decoder.close()


def open_vlm(bundle: Bundle, **options) -> VisionLanguageInspector:
    for key in ("vision", "language_model"):
        if key not in bundle.section(KIND):
            raise BundleError(f"{Path(bundle.path)}: manifest section {KIND!r} lacks {key!r}")
    return VisionLanguageInspector(bundle, **options)
