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


def test_a_single_path_is_recorded_the_same_way():
    from skill_edge.runtime.machine import portable_path

    assert portable_path("/work/cache/features", "features") == "FEATURES_DIR"
    assert portable_path("/srv/shared/data/skill-bench-more/x", "data") == "SKILL_BENCH_MORE_DIR"
    assert portable_path(REPO / "models/rom", "rom") == "models/rom"


def test_no_committed_result_names_a_path_of_this_machine():
    """Every file under benchmarks/results is free of the absolute paths a run on some machine would leak."""
    import re

    leak = re.compile(r"(?<![\w.])/(work|root|home|tmp|srv)/")
    bad = [str(p.relative_to(REPO)) for p in sorted((REPO / "benchmarks/results").rglob("*"))
           if p.suffix in (".json", ".md", ".csv") and leak.search(p.read_text(errors="replace"))]
    assert not bad, bad
