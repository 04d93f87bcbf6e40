"""Results record their command with no path of the machine that made them (the guide's rule)."""
from __future__ import annotations

from skill_edge.runtime.machine import REPO, portable_args


def test_machine_paths_become_placeholders():
    argv = ["benchmarks/mapper_peers.py", "--features", "/work/cache/features", "/work/cache/features-more",
            "--cache", "/tmp/x/knowledge", "--data", "/srv/shared/data/skill-bench",
            "--data", "/srv/shared/data/skill-bench-more", "--rom", str(REPO / "models/rom/efficientnet_lite0"),
            "--epochs", "5"]
    assert portable_args(argv) == ["benchmarks/mapper_peers.py", "--features", "FEATURES_DIR", "FEATURES_DIR_2",
                                   "--cache", "CACHE_DIR", "--data", "SKILL_BENCH_DIR",
                                   "--data", "SKILL_BENCH_MORE_DIR", "--rom", "models/rom/efficientnet_lite0",
                                   "--epochs", "5"]


def test_an_installed_program_is_named_not_located():
    assert portable_args(["/opt/venv/bin/skill-edge", "demo", "--out", "/tmp/demo"]) == [
        "skill-edge", "demo", "--out", "OUT_DIR"]
