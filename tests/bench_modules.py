"""Load a script from ``benchmarks/`` as a module, once per session.

Some test factories live in the benchmarks because both use them (the random-task factory
and mutation harness in ``fuzz_packets.py``, the budget ladder in ``packet_budget.py``);
``benchmarks/`` is not a package, so it is loaded by path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(script: str) -> ModuleType:
    """``load_benchmark("fuzz_packets")`` -> the module in ``benchmarks/fuzz_packets.py``."""
    name = f"skill_edge_bench_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
