"""The ``anomaly`` section of a memory-bank bundle's manifest, read strictly.

Enrolment writes it and the detector reads it, so the runtime never guesses the working size, the
layers, the scoring parameters or the thresholds. Unknown or missing keys are errors that name the
key and say what to do, rather than defaults that would silently score differently from enrolment.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from appliance.anomaly.memory import PROMPT_WEIGHT, ScoringConfig
from appliance.bundle import BundleError

BUNDLE_KIND = "memory-bank"


@dataclass(frozen=True)
class AnomalySettings:
    backbone: str
    memory: str
    working_size: tuple[int, int]  # (height, width)
    layers: tuple[str, ...]
    image_threshold: float
    pixel_threshold: float
    calibration: dict
    local_radius_px: int = 16
    prompt_weight: float = PROMPT_WEIGHT
    sigma: float = 4.0
    min_region_area: int = 16
    max_regions: int = 5
    max_patches: int | None = None
    shots: tuple[str, ...] = ()
    # layer -> [dy, dx] heatmap offset in working pixels; bundles enrolled before it had none
    cell_offsets: dict[str, tuple[float, float]] = field(default_factory=dict)
    # PatchCore image-score re-weighting neighbours; bundles enrolled before it had none (0: off)
    reweight_neighbors: int = 0
    # layer -> fusion weight of its map; bundles enrolled before it had none (all 1)
    layer_weights: dict[str, float] = field(default_factory=dict)
    # smoothing (px) of the map the image score comes from; before it: none (the heatmap's sigma)
    score_sigma: float | None = None

    def scoring(self) -> ScoringConfig:
        return ScoringConfig(
            working_size=self.working_size,
            local_radius_px=self.local_radius_px,
            prompt_weight=self.prompt_weight,
            sigma=self.sigma,
            cell_offsets=self.cell_offsets,
            reweight_neighbors=self.reweight_neighbors,
            layer_weights=dict(self.layer_weights),
            score_sigma=self.score_sigma,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["working_size"] = list(self.working_size)
        data["layers"] = list(self.layers)
        data["shots"] = list(self.shots)
        data["cell_offsets"] = {k: list(v) for k, v in self.cell_offsets.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AnomalySettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(
                f"anomaly.{unknown[0]}: unknown key; allowed keys are {sorted(known)}"
            )
        required = [
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        ]
        for name in required:
            if name not in data:
                raise BundleError(
                    f"anomaly.{name}: missing; re-enrol the bundle with `appliance enroll`"
                )
        values = dict(data)
        values["working_size"] = _size(values["working_size"])
        values["layers"] = tuple(str(v) for v in values["layers"])
        values["shots"] = tuple(str(v) for v in values.get("shots", ()))
        values["cell_offsets"] = _offsets(values.get("cell_offsets", {}), values["layers"])
        values["layer_weights"] = _weights(values.get("layer_weights", {}), values["layers"])
        settings = cls(**values)
        _check_ranges(settings)
        return settings


def _size(value) -> tuple[int, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and v >= 32 for v in value)
    ):
        raise BundleError(
            f"anomaly.working_size: {value!r}; expected [height, width], integers >= 32"
        )
    return int(value[0]), int(value[1])


def _offsets(value, layers: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    if not isinstance(value, dict) or not set(value) <= set(layers):
        raise BundleError(
            f"anomaly.cell_offsets: {value!r}; expected {{layer: [dy, dx]}} for layers {layers}"
        )
    offsets = {}
    for layer, pair in value.items():
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise BundleError(f"anomaly.cell_offsets.{layer}: {pair!r}; expected [dy, dx] pixels")
        offsets[layer] = (float(pair[0]), float(pair[1]))
    return offsets


def _nonnegative_number(value) -> bool:
    """An int or float >= 0 (not a bool, not NaN)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and value >= 0


def _weights(value, layers: tuple[str, ...]) -> dict[str, float]:
    allowed = f"expected {{layer: weight}}, weights >= 0 and not all 0, for layers {layers}"
    if not isinstance(value, dict) or not set(value) <= set(layers):
        raise BundleError(f"anomaly.layer_weights: {value!r}; {allowed}")
    weights = {}
    for layer, weight in value.items():
        if not _nonnegative_number(weight):
            raise BundleError(f"anomaly.layer_weights.{layer}: {weight!r}; {allowed}")
        weights[layer] = float(weight)
    if weights and not any(weights.get(layer, 1.0) > 0 for layer in layers):
        raise BundleError(f"anomaly.layer_weights: {value!r}; {allowed}")
    return weights


def _check_ranges(settings: AnomalySettings) -> None:
    if not settings.layers:
        raise BundleError("anomaly.layers: empty; expected backbone outputs such as ['s8', 's16']")
    if not 0.0 <= settings.prompt_weight <= 1.0:
        raise BundleError(f"anomaly.prompt_weight: {settings.prompt_weight!r}; expected 0 to 1")
    neighbors = settings.reweight_neighbors
    if isinstance(neighbors, bool) or not isinstance(neighbors, int) or neighbors < 0:
        raise BundleError(
            f"anomaly.reweight_neighbors: {neighbors!r}; expected an integer >= 0 (0: off)"
        )
    sigma = settings.score_sigma
    if sigma is not None and not _nonnegative_number(sigma):
        raise BundleError(
            f"anomaly.score_sigma: {sigma!r}; expected a number >= 0 (pixels), or absent"
        )
    for name in ("image_threshold", "pixel_threshold"):
        if not getattr(settings, name) >= 0:
            raise BundleError(
                f"anomaly.{name}: {getattr(settings, name)!r}; expected a number >= 0"
            )
