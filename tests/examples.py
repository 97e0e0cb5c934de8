"""The example scripts under ``examples/``, loaded as modules so tests can call their functions.

Imports nothing beyond the standard library: a test module imports it before (or without) skipping on
the script's own dependencies.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(filename: str) -> ModuleType:
    """A fresh module from ``examples/<filename>``, registered in ``sys.modules`` as ``<stem>_example``."""
    path = EXAMPLES / filename
    spec = importlib.util.spec_from_file_location(f"{path.stem}_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
