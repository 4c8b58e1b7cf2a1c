"""The bench tools' modules, imported as their scripts run (beside their sibling harness.py)."""

import importlib.util
import sys

from tests.support.server import ROOT

BENCH = ROOT / "bench"


def bench_tool(name: str):
    """bench/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    sys.path.insert(0, str(BENCH))  # the tools import their sibling harness.py
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module
