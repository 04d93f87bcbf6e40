"""The byte-budget benchmark's own bookkeeping (benchmarks/packet_budget.py), on sklearn digits.

The benchmark itself needs the ROM and skill-bench; these tests check the parts that turn
packets into numbers: the no-oracle metric, the one-anchor-per-mapper packets, the
over-budget policy and the previous-ladder comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
from bench_modules import load_benchmark
from skill_edge.runtime.mapping.anchors import fit_task_anchors
from skill_edge.runtime.knowledge.records import TaskKnowledge, TaskMeta
from skill_edge.runtime.learn.head import train_head
from skill_edge.runtime.mapping.mapper import build_mapper
from sklearn.datasets import load_digits

pb = load_benchmark("packet_budget")


@pytest.fixture(scope="module")
def fleet():
    """Two digit tasks (0-4 and 5-9) learned the way Device.learn_features does it."""
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    rng = np.random.default_rng(0)
    tasks, knowledge = [], []
    for name, lo in (("low", 0), ("high", 5)):
        idx = rng.permutation(np.flatnonzero((y >= lo) & (y < lo + 5)))
        tr, te = idx[: len(idx) * 3 // 4], idx[len(idx) * 3 // 4:]
        t = pb.TaskData(name, [str(c) for c in range(lo, lo + 5)], x[tr], y[tr] - lo, x[te], y[te] - lo)
        head = train_head(t.x_train, t.y_train, 5, weight_decays=(1e-2,))
        anchors = fit_task_anchors(t.x_train, t.y_train, transform="sqrt_l2", k=4)  # digits: no ROM trunk
        knowledge.append(TaskKnowledge(
            task=name, labels=t.classes, head_weight=head.weight, head_bias=head.bias,
            meta=TaskMeta(agent_id="teacher", seq=1, rom_fingerprint="0" * 64,
                          feature_transform=anchors.feature_transform),
            gmmc=anchors.gmmc, maha=anchors.maha, thresholds=dict(anchors.thresholds)).validate())
        tasks.append(t)
    return tasks, knowledge


def test_no_oracle_accuracy_needs_the_right_task_and_the_right_class(fleet):
    tasks, knowledge = fleet
    ev = pb.evaluate("gmmc", knowledge, tasks)
    mapper = build_mapper("gmmc", knowledge)
    for i, (t, k) in enumerate(zip(tasks, knowledge)):
        picked = mapper.task_scores(mapper.prepare(t.x_test)).argmax(1) == i
        right = (t.x_test @ k.head_weight.T + k.head_bias).argmax(1) == t.y_test
        got = ev["per_task"][t.name]
        assert got["no_oracle"] == pytest.approx(np.mean(picked & right))
        assert got["task_id"] == pytest.approx(np.mean(picked))
        assert got["oracle"] == pytest.approx(np.mean(right))
        assert got["no_oracle"] <= min(got["task_id"], got["oracle"])
    assert ev["mean"]["no_oracle"] == pytest.approx(np.mean([v["no_oracle"] for v in ev["per_task"].values()]))
    assert 0.85 < ev["mean"]["no_oracle"] < 1.0  # digits split in two is easy, but not trivial
    # a task that was not sent scores zero, and the others are mapped among the rest
    missing = pb.evaluate("gmmc", knowledge[:1], tasks)
    assert missing["per_task"]["high"]["no_oracle"] == 0.0
    assert missing["mean"]["no_oracle"] <= ev["mean"]["no_oracle"]


def test_each_packet_carries_only_its_mappers_anchor(fleet, tmp_path):
    _, knowledge = fleet
    radio = pb.Radio(tmp_path)
    g = radio.send(pb.for_mapper(knowledge[0], "gmmc"), None)
    m = radio.send(pb.for_mapper(knowledge[0], "maha"), None)
    assert g.knowledge.gmmc is not None and g.knowledge.maha is None
    assert m.knowledge.maha is not None and m.knowledge.gmmc is None
    assert g.step == m.step == "fp32" and not g.over_budget
    np.testing.assert_array_equal(g.knowledge.head_weight, knowledge[0].head_weight)


def test_a_budget_below_the_smallest_step_sends_the_smallest_and_says_so(fleet, tmp_path):
    tasks, knowledge = fleet
    radio = pb.Radio(tmp_path)
    row = pb.run_config(radio, "gmmc", knowledge, tasks, 500)
    assert row["over_budget"] == ["low", "high"]
    assert row["max_packet_bytes"] > 500
    assert all(p["step"].endswith("+head_int2") for p in row["packets"].values())
    assert row["mean_no_oracle_acc_if_dropped"] == 0.0  # nothing was sent
    fits = pb.run_config(radio, "gmmc", knowledge, tasks, 1_000_000)
    assert fits["over_budget"] == [] and fits["max_packet_bytes"] <= 1_000_000
    assert fits["mean_no_oracle_acc_if_dropped"] == fits["mean_no_oracle_acc"]
    assert {p["step"] for p in fits["packets"].values()} == {"fp32"}


def test_the_previous_ladder_quantises_the_head_per_row(fleet, tmp_path):
    tasks, knowledge = fleet
    k = pb.for_mapper(knowledge[0], "gmmc")
    plans = pb.previous_ladder(k)
    assert k.gmmc.k == 5, "k=4 over 5 classes: per-class GMMC gives each class one component"
    assert [p.step for p in plans[:4]] == ["fp32", "fp16", "int8", "int8+gmmc_k=4"]
    assert plans[2].tensors["head.weight"] == "i8r" and plans[1].tensors["head.weight"] == "f16"
    sent = pb.Radio(tmp_path).send(k, 10_000_000, pb.fixed_step("int4"))
    assert sent.step == "int4" and not sent.over_budget


def test_goal_verdict_reads_mean_bytes_and_points():
    fp32 = {"gmmc": {"mean_no_oracle_acc": 0.80}}
    rows = [{"mapper": "gmmc", "budget_bytes": b, "mean_packet_bytes": mean, "max_packet_bytes": mx,
             "mean_no_oracle_acc": acc, "over_budget": []}
            for b, mean, mx, acc in [(32_000, 30_000, 32_000, 0.790), (48_000, 45_000, 47_000, 0.7960),
                                     (56_000, 50_000, 55_000, 0.7999), (96_000, 70_000, 95_000, 0.80)]]
    ablation = {"gmmc": [{"step": "int4", "mean_packet_bytes": 50_000, "max_packet_bytes": 70_000,
                          "mean_no_oracle_acc": 0.798}]}
    v = pb.goal_verdict(rows, fp32, ablation)["gmmc"]
    assert v["met_on_mean_bytes"] and v["budgets_meeting_goal"] == [48_000, 56_000]
    assert v["budgets_meeting_goal_with_every_packet_under"] == [48_000, 56_000]
    assert v["best"]["budget_bytes"] == 48_000 and v["best"]["mean_no_oracle_acc"] == 0.796
    assert [f["step"] for f in v["fixed_steps_meeting_goal"]] == ["int4"]
