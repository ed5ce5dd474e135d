"""The inspector: a served bundle turned into ``Inspection`` results for decoded images.

Bundle kinds are chosen by name (``KINDS``, ``open_inspector``): the embedded default is
``memory-bank`` (few-shot anomaly detection on an ONNX backbone, plus an optional narrative from a
small language model on llama.cpp); ``vlm`` is a trained vision-language inspector exported by
``appliance export`` (``appliance.vlm``). Both answer ``inspect_batch(images, contexts)``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from appliance.bundle import Bundle, BundleError
from appliance.imaging import DecodedImage
from appliance.report import Inspection
from appliance.taxonomy import ANOMALY_LABEL, Taxonomy

log = logging.getLogger(__name__)
NARRATIVE_MODES = ("defective", "always", "never")


def open_inspector(
    bundle: Bundle,
    *,
    taxonomy: Taxonomy,
    providers: list | None = None,
    narrative: str = "defective",
    narrative_gguf: Path | None = None,
    n_threads: int | None = None,
    n_gpu_layers: int = 0,
    heatmaps: bool = True,
):
    """The inspector for ``bundle``'s kind; refuses a bundle whose taxonomy the config lacks."""
    if bundle.kind not in KINDS:
        raise BundleError(f"{bundle.path}: bundle kind {bundle.kind!r} is not one of {KINDS}")
    if not taxonomy.covers(bundle.taxonomy):
        raise BundleError(
            f"{bundle.path}: the bundle's taxonomy {bundle.taxonomy.to_dict()} is not covered "
            f"by the configured [taxonomy] {taxonomy.to_dict()}"
        )
    if bundle.kind == "vlm":
        from appliance.vlm import open_vlm

        return open_vlm(bundle, providers=providers, n_threads=n_threads, n_gpu_layers=n_gpu_layers)
    return Inspector(
        bundle,
        taxonomy=taxonomy,
        providers=providers,
        narrative=narrative,
        narrative_gguf=narrative_gguf,
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers,
        heatmaps=heatmaps,
    )


class Inspector:
    """Runs a memory-bank bundle: anomaly detection, boxes, and the narrative."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        taxonomy: Taxonomy,
        providers: list | None = None,
        narrative: str = "defective",
        narrative_gguf: Path | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        heatmaps: bool = True,
    ):
        if bundle.kind not in ("memory-bank", "clip-anomaly"):
            raise BundleError(f"{bundle.path}: bundle kind {bundle.kind!r} is not memory-bank")
        from appliance.anomaly.detector import AnomalyDetector

        self.bundle = bundle
        if bundle.kind == "clip-anomaly":  # seed 002's CLIP branch (appliance.anomaly.clip_branch)
            from appliance.anomaly.clip_branch import ClipAnomalyDetector

            self.detector = ClipAnomalyDetector(
                bundle, providers=providers, n_threads=n_threads, n_gpu_layers=n_gpu_layers
            )
        else:
            self.detector = AnomalyDetector(bundle, providers=providers)
        self.narrative_mode = narrative
        self.heatmaps = heatmaps
        self.writer = None
        if narrative != "never":
            from appliance.backends.llamacpp import NarrativeWriter
            from appliance.models import default_narrative_gguf

            gguf = narrative_gguf or _bundle_gguf(bundle) or default_narrative_gguf()
            self.writer = NarrativeWriter(gguf, n_threads=n_threads, n_gpu_layers=n_gpu_layers)

    @property
    def bundle_ref(self) -> dict:
        return {"id": self.bundle.id, "kind": self.bundle.kind}

    def inspect_batch(
        self, images: list[DecodedImage], contexts: list[dict], *, narrative: bool = True
    ) -> list[Inspection]:
        """One vision batch for all images, then the per-image narrative where it is wanted."""
        if not images:
            return []
        started = time.perf_counter()
        results = self.detector.detect_batch([image.rgb for image in images])
        share = (time.perf_counter() - started) * 1000.0 / len(images)
        out = []
        for image, result, context in zip(images, results, contexts, strict=True):
            inspection = self._inspection(image, result)
            inspection.timings_ms["total_vision_share"] = share
            if narrative and self._wants_narrative(inspection):
                self._add_narrative(inspection, image, context)
            inspection.timings_ms.pop("total_vision_share")
            out.append(inspection)
        return out

    def _inspection(self, image: DecodedImage, result) -> Inspection:
        defects = []
        if result.is_anomalous:
            regions = result.regions or [_whole_image(image, result)]
            defects = [
                {
                    # the CLIP branch names the taxonomy label its text side reads
                    "label": getattr(result, "label", ANOMALY_LABEL),
                    "bbox": [round(float(v), 1) for v in region.bbox],
                    "score": round(float(region.score), 4),
                    "attributes": {},
                }
                for region in regions
            ]
        anomaly = {
            "score": round(max(float(result.score), 0.0), 6),
            "threshold": round(float(result.threshold), 6),
            "heatmap": None,
            "nearest_normal": result.nearest_normal,
        }
        if getattr(result, "description", None):  # the CLIP branch's description of the defect
            anomaly["description"] = result.description
        timings = {k: float(v) for k, v in result.timings_ms.items()}
        heatmap = None
        if self.heatmaps and defects:
            from appliance.anomaly.render import heatmap_png

            heatmap = heatmap_png(result, (image.height, image.width))
        return Inspection(defects=defects, anomaly=anomaly, timings_ms=timings, heatmap_png=heatmap)

    def _wants_narrative(self, inspection: Inspection) -> bool:
        if self.writer is None:
            return False
        return self.narrative_mode == "always" or bool(inspection.defects)

    def _add_narrative(self, inspection: Inspection, image: DecodedImage, context: dict) -> None:
        from appliance.backends.llamacpp import NarrativeError

        facts = {
            "line": context.get("line"),
            "camera": context.get("camera"),
            "image": {"width": image.width, "height": image.height},
            "defects": inspection.defects,
            "anomaly": inspection.anomaly,
        }
        try:
            narrative, stats = self.writer.write(facts)
        except NarrativeError as exc:
            log.error("narrative failed, report goes out without one: %s", exc)
            return
        inspection.narrative = narrative
        inspection.timings_ms["narrative"] = float(stats["ms"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if hasattr(self.detector, "close"):
            self.detector.close()


def _whole_image(image: DecodedImage, result):
    from appliance.anomaly.regions import Region

    return Region(
        bbox=(0.0, 0.0, float(image.width), float(image.height)),
        score=min(1.0, float(result.score) / max(float(result.threshold), 1e-9) / 2),
    )


def _bundle_gguf(bundle: Bundle) -> Path | None:
    name = bundle.manifest.get("narrative", {}).get("gguf")
    return bundle.file(name) if name else None


KINDS = ("memory-bank", "vlm", "clip-anomaly")
