"""Describe the machine a result was measured on, for every results file (benchmarks and fleet reports)."""

from __future__ import annotations

import os
import platform
import shlex
from pathlib import Path
from typing import Any, Sequence


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


#: The checkout this module runs from (results name paths in it relative to this root).
REPO = Path(__file__).resolve().parents[1]


def portable_path(path: str | Path, option: str = "path", used: dict[str, int] | None = None) -> str:
    """One absolute path with no trace of this machine: relative to the checkout's root when inside it,
    the shared benchmarks as ``SKILL_BENCH_DIR`` / ``SKILL_BENCH_MORE_DIR``, anything else named after
    its option (``features`` -> ``FEATURES_DIR``; ``used`` numbers repeats: ``FEATURES_DIR_2``)."""
    p = Path(path).resolve()
    if p == REPO or REPO in p.parents:
        return os.path.relpath(p, REPO)
    if "skill-bench-more" in p.parts:
        return "SKILL_BENCH_MORE_DIR"
    if "skill-bench" in p.parts:
        return "SKILL_BENCH_DIR"
    name = option.upper().replace("-", "_") + "_DIR"
    if used is None:
        return name
    used[name] = used.get(name, 0) + 1
    return name if used[name] == 1 else f"{name}_{used[name]}"


def portable_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with no path of this machine in it, for the command a results file records: every absolute
    path through ``portable_path`` after its option (``--features /x /y`` -> ``FEATURES_DIR
    FEATURES_DIR_2``), and an installed program by its name."""
    out, option, used = [], "path", {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            option = a[2:].split("=")[0]
            out.append(a)
            continue
        if os.path.isabs(a) or (i == 0 and os.path.exists(a)):  # the program, however it was named
            p = Path(a).resolve()
            inside = p == REPO or REPO in p.parents
            a = p.name if i == 0 and not inside else portable_path(p, option, used)  # an entry point: skill-edge
        out.append(a)
    return out


def portable_command(argv: Sequence[str]) -> str:
    """``portable_args`` joined for a shell."""
    return " ".join(shlex.quote(a) for a in portable_args(list(argv)))
