"""A budget packet's GMMC open-set threshold follows the mixture the receiver restores.

A task learned with both anchors and sent under a byte budget has its GMMC merged (often down to
one component) and coded in a few bits.  The teacher's threshold is a log-likelihood under the
original mixture; under the sent one it means something else.  On skill-bench at 56 KB the
uncarried thresholds called 9.7 % of the tasks' own images unknown, and since a task now rejects
an input when either anchor's test does, the receiver called 7.7 % of known images unknown
(benchmarks/results/mapper_peers.json, the 56 KB rows).  Real images: scikit-learn's digits.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from skill_edge.runtime.exchange.codec import carry_gmmc_threshold, gmmc_threshold_reference
from skill_edge.runtime.exchange.packet import PacketCodec
from skill_edge.runtime.knowledge.records import TaskKnowledge, TaskMeta
from skill_edge.runtime.mapping.anchors import fit_task_anchors
from skill_edge.runtime.mapping.mapper import AnchorTests
from sklearn.datasets import load_digits


@pytest.fixture(scope="module")
def digits_task():
    """Both anchors and a least-squares head on 70 % of the digits; the rest held out.  The pixels
    go through a fixed random ReLU layer to 768 dimensions: a mixture's log-likelihood moves with
    the dimension, and a ROM's features have 1,664."""
    d = load_digits()
    proj = np.random.default_rng(1).normal(size=(64, 768)) / 8.0
    x, y = np.maximum(d.data / 16.0 @ proj, 0).astype(np.float32), d.target
    order = np.random.default_rng(0).permutation(len(y))
    fit, held = order[: int(0.7 * len(y))], order[int(0.7 * len(y)):]
    anchors = fit_task_anchors(x[fit], y[fit], transform="raw", kinds=("gmmc", "maha"), k=20)
    w, *_ = np.linalg.lstsq(np.c_[x[fit], np.ones(len(fit))], np.eye(10)[y[fit]], rcond=None)
    k = TaskKnowledge(task="digits", labels=[str(c) for c in range(10)],
                      head_weight=w[:-1].T.astype(np.float32), head_bias=w[-1].astype(np.float32),
                      meta=TaskMeta(agent_id="teacher", rom_fingerprint="f" * 64, feature_transform="raw",
                                    n_train=len(fit)),
                      gmmc=anchors.gmmc, maha=anchors.maha, thresholds=dict(anchors.thresholds)).validate()
    return k, x[held]


def gmmc_unknown_rate(k: TaskKnowledge, x: np.ndarray) -> float:
    """Share of the task's own held-out images its GMMC test rejects."""
    tests = AnchorTests("gmmc", [k.gmmc], np.array([k.thresholds["gmmc"]]))
    return float(np.mean(tests.margins(x, np.zeros(len(x), dtype=np.int64)) < 0))


@pytest.mark.parametrize("step", ["int3+gmmc_k=1", "int3+gmmc_k=4", "int4"])
def test_a_merged_or_coarse_mixture_keeps_the_teachers_unknown_rate(digits_task, key, trust, step):
    k, held = digits_task
    assert k.gmmc.k == 20
    teacher = gmmc_unknown_rate(k, held)
    assert teacher <= 0.05
    codec = PacketCodec()
    got = codec.decode(codec.encode(k, key, plan=step), trust=trust).knowledge
    assert got.thresholds["gmmc"] != k.thresholds["gmmc"]
    carried = gmmc_unknown_rate(got, held)
    uncarried = gmmc_unknown_rate(replace(got, thresholds=dict(k.thresholds)), held)
    assert abs(carried - teacher) <= 0.015, (step, carried, teacher)
    if step != "int4":  # a merged mixture's own images fall below the old number
        assert uncarried >= teacher + 0.015, (step, uncarried, teacher)


def test_a_lossless_packet_keeps_the_thresholds_exactly(digits_task, key, trust):
    k, _ = digits_task
    codec = PacketCodec()
    got = codec.decode(codec.encode(k, key, plan="fp32"), trust=trust).knowledge
    assert got.thresholds == k.thresholds


def test_the_carry_is_a_pure_function_of_the_anchors(digits_task):
    """Seeded draws: two senders of one record send the same threshold (a packet is a pure
    function of its plan), and the identity mixture moves nothing."""
    k, _ = digits_task
    ref = gmmc_threshold_reference(k.gmmc)
    again = gmmc_threshold_reference(k.gmmc)
    np.testing.assert_array_equal(ref[0], again[0])
    th = k.thresholds["gmmc"]
    assert carry_gmmc_threshold(k.gmmc, th, ref) == pytest.approx(th, abs=1e-6)
    assert carry_gmmc_threshold(k.gmmc, float("-inf"), ref) == float("-inf")


def test_a_budget_walk_carries_thresholds_for_the_rung_it_sends_only(digits_task, key, trust, monkeypatch):
    """Rungs are sized with the teacher's thresholds; the carried ones are computed for a rung that
    fits (scoring the reference draws under every rung made a walk 14x slower under qemu).  The
    packet is byte for byte the one that rung's plan gives with its carried thresholds."""
    import skill_edge.runtime.exchange.packet as packet_module

    k, _ = digits_task
    codec = PacketCodec()
    budget = len(codec.encode(k, key, plan="int3+gmmc_k=2"))
    calls = []
    real = packet_module.carry_thresholds
    monkeypatch.setattr(packet_module, "carry_thresholds", lambda *a: calls.append(a[1].step) or real(*a))
    walked = PacketCodec(budget_bytes=budget).encode(k, key)
    got = codec.decode(walked, trust=trust)
    assert len(walked) <= budget and len(calls) <= 2 and calls[-1] == got.plan.step
    assert walked == codec.encode(k, key, plan=got.plan.step)
    assert got.knowledge.thresholds["gmmc"] != k.thresholds["gmmc"]
