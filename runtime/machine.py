"""Describe the machine a result was measured on, for every results file (benchmarks and fleet reports)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine() -> dict[str, Any]:
    """CPU, cores, memory, load average now, Python, OS, and the torch / ONNX Runtime / GPU in use."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": round(mem, 1),
                            "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    info |= {"onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"), "torch": _version("torch"),
             "gpu": _gpu_name()}
    return info


def _version(dist: str) -> str | None:
    """An installed distribution's version, read from its metadata (nothing is imported)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gpu_name() -> str | None:
    """The first GPU's name, from torch only when the process already imported it (a device has no torch)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None
