"""Fig. 9 cost accounting (firmware_sim.metrics) and the simulated link (firmware_sim.link); no ROM needed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from skill_edge.firmware_sim.link import DeviceInterface, LinkError, LinkModel, serial_receive_seconds
from skill_edge.firmware_sim.metrics import (
    MacModel,
    TeacherWork,
    bb_training_macs,
    gmmc_fit_macs,
    head_training_macs,
    mac_table,
    maha_student_macs,
    speedup_xn,
    teacher_macs,
)

# ---------------------------------------------------------------------------- the paper's own numbers


@pytest.mark.parametrize("single_total, skill_total, expected", [
    (2.2232e15, 2.1877e13, 0.9963),  # SKILL w/o BB, GMMC
    (2.5075e15, 2.4684e13, 0.9959),  # w/ BB, GMMC
    (2.2220e15 + 5.9813e9, 2.8183e13, 0.7730),  # w/o BB, Mahalanobis
    (2.5050e15 + 5.9813e9, 3.0977e13, 0.7928),  # w/ BB, Mahalanobis
])
def test_speedup_reproduces_fig9(single_total: float, skill_total: float, expected: float) -> None:
    assert speedup_xn(single_total, skill_total, 102) == pytest.approx(expected, abs=6e-4)


def test_fig9_rows_add_up_like_the_paper() -> None:
    # SKILL w/o BB, GMMC: teacher per agent is the single agent's teacher / N, comm is bytes x 1000
    assert 2.2232e15 / 102 == pytest.approx(2.1797e13, rel=1e-4)
    assert 2.1797e13 + 8.0203e10 + 0 == pytest.approx(2.1877e13, rel=1e-4)


# ---------------------------------------------------------------------------- formulas


def test_formulas() -> None:
    assert head_training_macs(n=100, d=1280, c=3, evaluations=10) == 10 * 2 * 100 * 1280 * 3
    assert bb_training_macs(tail_macs_per_image=1000, n_images=50, epochs=8) == 3 * 1000 * 50 * 8
    assert gmmc_fit_macs(n=10, d=4, k=2, iterations=9, fits=2) == 2 * 10 * 4 * 10 * 2 * 4
    assert maha_student_macs(n_exemplars=30, n_class_means=6, d=8) == 36 * 64 + 512


def _work(task: str, agent: str, n: int, c: int, *, measured: int | None = 5_000_000, bb: bool = False) -> TeacherWork:
    return TeacherWork(task=task, agent=agent, n_train=n, n_classes=c, feature_dim=1280,
                       backbone_macs_per_image=383_907_552, tail_macs_per_image=49_479_808,
                       train_macs_measured=measured, bb=bb, bb_epochs=8 if bb else 0, gmmc_k=25,
                       maha_exemplars=5 * c, n_calibration=n // 5)


def test_teacher_macs_parts() -> None:
    w = _work("a", "agent-0", 100, 4)
    g = teacher_macs(w, "gmmc")
    assert g.backbone == 100 * 383_907_552
    assert g.training == 5_000_000 and g.training_source == "measured"
    assert g.anchor == gmmc_fit_macs(100, 1280, 25)
    m = teacher_macs(w, "maha")
    assert m.anchor == 100 * 1280 + 20 * 20 * 1280
    assert m.backbone == g.backbone and m.training == g.training
    f = teacher_macs(_work("a", "agent-0", 100, 4, measured=None, bb=True), "gmmc")
    assert f.training_source == "formula"
    assert f.training == head_training_macs(100, 1280, 4, 4 * 125) + bb_training_macs(49_479_808, 100, 8)
    with pytest.raises(ValueError, match="mapper"):
        teacher_macs(w, "knn")


def test_mac_table_is_internally_consistent() -> None:
    works = [_work("a", "agent-0", 60, 2), _work("b", "agent-1", 90, 3), _work("c", "agent-2", 30, 2)]
    comm = {"gmmc": [2000.0, 3000.0, 4000.0], "maha": [500.0, 700.0, 900.0]}
    model = MacModel(alpha=1000.0)
    rows = mac_table(works, n_agents=3, student_comm_bytes=comm, n_exemplars=35, n_class_means=7, feature_dim=1280,
                     bb=False, accuracy={"gmmc": 0.8, "maha": 0.9}, model=model)
    assert [(r.setting, r.mapper) for r in rows] == [("single", "gmmc"), ("skill", "gmmc"), ("single", "maha"),
                                                     ("skill", "maha")]
    for mapper in ("gmmc", "maha"):
        single = next(r for r in rows if r.setting == "single" and r.mapper == mapper)
        skill = next(r for r in rows if r.setting == "skill" and r.mapper == mapper)
        teacher_sum = sum(teacher_macs(w, mapper, model).total for w in works)
        assert single.teacher_macs == teacher_sum
        assert single.comm_macs == 0 and single.speedup_xN is None
        assert skill.teacher_macs == pytest.approx(teacher_sum / 3)
        assert skill.comm_bytes == pytest.approx(np.mean(comm[mapper]))
        assert skill.comm_macs == pytest.approx(1000.0 * skill.comm_bytes)
        assert skill.total_macs == pytest.approx(skill.teacher_macs + skill.comm_macs + skill.student_macs)
        assert single.total_macs == pytest.approx(single.teacher_macs + single.student_macs)
        assert skill.speedup_xN == pytest.approx(single.total_macs / (skill.total_macs * 3))
        assert 0 < skill.speedup_xN < 1
        assert skill.student_macs == single.student_macs
    assert rows[1].student_macs == 0  # GMMC students only store
    assert rows[3].student_macs == maha_student_macs(35, 7, 1280)
    assert rows[1].accuracy == 0.8 and rows[3].accuracy == 0.9
    # more communication, lower speedup
    rows2 = mac_table(works, n_agents=3, student_comm_bytes={"gmmc": [2e6] * 3, "maha": [2e6] * 3}, n_exemplars=35,
                      n_class_means=7, feature_dim=1280, bb=False, model=model)
    assert rows2[1].speedup_xN < rows[1].speedup_xN


# ---------------------------------------------------------------------------- the link


def test_lossless_link_costs_latency_plus_size_over_bandwidth() -> None:
    link = LinkModel(bandwidth_bps=1000.0, latency_s=0.5)
    t = link.transfer(2500, receiver="b", sender="a", task="t")
    assert (t.attempts, t.wire_bytes) == (1, 2500)
    assert t.seconds == pytest.approx(0.5 + 2.5)


def test_lossy_link_is_seeded_and_charges_every_attempt() -> None:
    link = LinkModel(bandwidth_bps=1e6, latency_s=0.01, loss=0.5, seed=3)
    a = [link.transfer(10_000, receiver="r", sender="s", task=f"t{i}") for i in range(2000)]
    b = [link.transfer(10_000, receiver="r", sender="s", task=f"t{i}") for i in range(2000)]
    assert [x.attempts for x in a] == [x.attempts for x in b]  # same arguments, same draws
    other_seed = LinkModel(bandwidth_bps=1e6, latency_s=0.01, loss=0.5, seed=4)
    assert [other_seed.transfer(10_000, receiver="r", sender="s", task=f"t{i}").attempts
            for i in range(2000)] != [x.attempts for x in a]
    attempts = np.array([x.attempts for x in a])
    assert attempts.mean() == pytest.approx(2.0, abs=0.15)  # geometric: 1 / (1 - loss)
    for x in a:
        assert x.wire_bytes == 10_000 * x.attempts
        lost = x.attempts - 1
        assert x.seconds == pytest.approx(x.attempts * (0.01 + 0.01) + lost * 0.01)


def test_interface_receives_serially_and_replays_its_journal() -> None:
    model = LinkModel(bandwidth_bps=1000.0, latency_s=0.1, loss=0.4, seed=9)
    dev = DeviceInterface("agent-0", model)
    sizes = [300, 1200, 700]
    got = [dev.receive(s, task=f"t{i}", sender=f"agent-{i + 1}") for i, s in enumerate(sizes)]
    assert dev.received.packets == 3
    assert dev.received.packet_bytes == sum(sizes)
    assert dev.received.wire_bytes == sum(t.wire_bytes for t in got)
    assert dev.received.seconds == pytest.approx(sum(t.seconds for t in got))  # one interface: a sum
    assert dev.received.seconds >= serial_receive_seconds(model, sizes)
    dev.send(500, task="own")
    assert dev.sent.packet_bytes == 500 and dev.sent.packets == 1
    # a restarted device replays its journal: same totals, and a second delivery gets fresh draws
    again = DeviceInterface("agent-0", model)
    for t in dev.transfers_in:
        again.record(t, "in")
    assert again.received == dev.received
    second = again.receive(300, task="t0", sender="agent-1")
    assert second == model.transfer(300, receiver="agent-0", sender="agent-1", task="t0", delivery=1)


def test_throttle_really_waits() -> None:
    dev = DeviceInterface("x", LinkModel(bandwidth_bps=10_000.0, latency_s=0.0, throttle=1.0))
    t0 = time.perf_counter()
    t = dev.receive(2000, task="t", sender="y")
    assert t.seconds == pytest.approx(0.2)
    assert time.perf_counter() - t0 >= 0.19


@pytest.mark.parametrize("kwargs, match", [
    ({"bandwidth_bps": 0}, "bandwidth"),
    ({"latency_s": -1}, "latency"),
    ({"loss": 1.0}, "loss"),
    ({"loss": -0.1}, "loss"),
    ({"throttle": -1}, "throttle"),
])
def test_link_rejects_impossible_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(LinkError, match=match):
        LinkModel(**kwargs)
