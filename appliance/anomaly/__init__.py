"""Few-shot anomaly detection: the embedded default bundle's detector (numpy + ONNX Runtime only).

Data flows ``preprocess`` -> ``features`` (ONNX backbone, pooled multi-scale patches) -> ``memory``
(nearest-normal distances with a self-prompt, via ``distance``; heatmaps placed where
``geometry`` says the backbone's cells sit) -> ``calibrate`` (thresholds from
normal images) -> ``regions`` (boxes in original pixels). ``enroll`` builds a bundle from normal
images; ``detector`` serves one; ``render`` draws the heatmap PNG for reports.
"""

from appliance.anomaly.detector import AnomalyDetector, AnomalyResult
from appliance.anomaly.enroll import EnrollError, enroll, load_rgb
from appliance.anomaly.memory import MemoryBank, ScoringConfig
from appliance.anomaly.regions import Region
from appliance.anomaly.render import heatmap_png

__all__ = [
    "AnomalyDetector",
    "AnomalyResult",
    "EnrollError",
    "MemoryBank",
    "Region",
    "ScoringConfig",
    "enroll",
    "heatmap_png",
    "load_rgb",
]
