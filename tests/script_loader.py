"""Load a command-line script from ``scripts/`` as a module, for tests of its functions (no sys.path edits)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str, module_name: str | None = None) -> ModuleType:
    """``scripts/<name>.py`` as a fresh module registered as ``module_name`` (default ``<name>_under_test``)."""
    module_name = module_name or f"{name}_under_test"
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look classes up through their module
    spec.loader.exec_module(module)
    return module
