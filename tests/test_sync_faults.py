"""The fast share of the chaos benchmark (benchmarks/sync_faults.py --quick): issue 15's findings
against real `skill-edge` processes, a real Mosquitto and real SIGKILLs.

The full run (200+ kills, every finding) is recorded in benchmarks/results/sync_faults.json; here
a handful of scenarios run on the session's ROM, with ~10 kills and a short manifest flood.  Each
assertion names the scenario and what was observed, so a failure says which fix has not landed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_modules import load_benchmark
from mqtt_broker import needs_mosquitto

bench = load_benchmark("sync_faults")


@pytest.fixture(scope="module")
def quick(rom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return bench.run(bench.Plan.make(quick=True), tmp_path_factory.mktemp("sync-faults"), rom_dir,
                     say=lambda s: print(s, flush=True))


@needs_mosquitto
@pytest.mark.slow  # ~1 min on 2 busy cores, plus the session's ROM
@pytest.mark.mqtt
def test_quick_share_of_the_chaos_benchmark(quick: dict) -> None:
    names = [s["name"] for s in quick["scenarios"]]
    for wanted in ("high-1", "high-2", "high-3", "high-4", "medium-5", "medium-7", "medium-8", "medium-9d",
                   "medium-10"):
        assert any(n.startswith(wanted) for n in names), f"the quick share lost its {wanted} scenario: {names}"
    assert quick["kills"] >= 10, quick["summary"]
    failed = [f"{s['name']}: {s['detail']}" for s in quick["scenarios"] if not s["passed"]]
    assert not failed, "\n".join(failed)
    assert quick["lost_packets"] == 0 and quick["inconsistent_banks"] == 0
    assert 0 < quick["idle_rss_mb"] and quick["peak_rss_mb_under_flood"] <= bench.RSS_GOAL * quick["idle_rss_mb"]
