"""The runtime stays lean: importing every appliance module pulls in no torch, train or export."""

import pkgutil
import subprocess
import sys

import appliance

from .conftest import REPO


def test_appliance_imports_no_torch_and_no_trainer():
    modules = [
        m.name
        for m in pkgutil.walk_packages(appliance.__path__, "appliance.")
        if not m.name.endswith("__main__")
    ]
    assert "appliance.daemon" in modules and "appliance.backends.llamacpp" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'peft', 'trl', 'timm', 'open_clip', 'train', 'export'))\n"
        "print(','.join(bad))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert run.stdout.strip() == ""
