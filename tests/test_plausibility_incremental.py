"""The plausibility check kept up to date task by task decides exactly as the check it replaced,
which rebuilt everything for every packet (issue 18, section 4: the student at scale)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from skill_edge.runtime.knowledge.identity import TaskKey
from skill_edge.runtime.mapping.mapper import GmmcMapper, MahalanobisMapper, exemplar_scatter
from skill_edge.runtime.mapping.plausibility import PlausibilityCheck, _captured

from test_mapper import knowledge_for, make_task
from test_plausibility import TRANSFORM, hijacks, world  # noqa: F401 - the fixture

LIMIT = 0.2


def rebuilt_capture(check: PlausibilityCheck, k) -> dict[str, dict[str, float]]:
    """The capture test as it was before the incremental check: one GMMC mapper over the stored tasks
    plus the newcomer, and two Mahalanobis mappers (scatter summed afresh), scoring every point."""
    me = TaskKey(k.task, k.meta.agent_id)
    others = [o for o in check.existing if TaskKey(o.task, o.meta.agent_id) != me]
    out = {}
    for kind in ("gmmc", "maha"):
        if getattr(k, kind) is None:
            continue
        held = [o for o in others if getattr(o, kind) is not None]
        moved = {}
        if held:
            index = {TaskKey(o.task, o.meta.agent_id): i for i, o in enumerate(held)}
            if kind == "gmmc":
                mapper = GmmcMapper.from_knowledge(held + [k])
            else:
                base = exemplar_scatter([o.maha for o in held])
                stats = exemplar_scatter([o.maha for o in held] + [k.maha])
                old = MahalanobisMapper.from_knowledge(held, covariance=base.shrunk()[0])
                mapper = MahalanobisMapper.from_knowledge(held + [k], covariance=stats.shrunk()[0])
            for t, x in check.points.items():
                if t == me or t not in index:
                    continue
                s = mapper.task_scores(x)
                before = s[:, :-1].argmax(axis=1) if kind == "gmmc" else old.task_scores(x).argmax(axis=1)
                moved[t.task] = _captured(s, index[t], before)
        out[kind] = moved
    return out


def decision(moved: dict[str, dict[str, float]]) -> bool:
    return all(v <= LIMIT for m in moved.values() for v in m.values())


@pytest.fixture(scope="module")
def stream(world):  # noqa: F811
    """Twelve honest tasks arriving one by one, then the hostile ones, an update and a removal."""
    rng = np.random.default_rng(21)
    extra = [knowledge_for(f"late{i}", *make_task(rng, n_classes=2 + i % 4, n=240, shift=1.5)[:2], TRANSFORM,
                           seed=40 + i) for i in range(7)]
    _, knowledge, existing, own, _ = world
    honest = existing + [knowledge["task5"]] + extra
    return honest, own, hijacks(world)


def test_incremental_check_decides_as_the_rebuilt_one(stream):
    honest, own, bad = stream
    live = PlausibilityCheck(own, [], feature_transform=TRANSFORM)
    checked = 0
    for i, k in enumerate(honest):
        for newcomer in [k, *bad.values()] if i in (3, 8, len(honest) - 1) else [k]:
            fresh = PlausibilityCheck(own, live.existing, feature_transform=TRANSFORM)  # built for this packet
            got, want = live.check(newcomer), fresh.check(newcomer)
            assert got == want, (newcomer.task, got, want)
            moved = {r.kind: r.moved for r in live.capture(newcomer)}
            ref = rebuilt_capture(live, newcomer)
            assert set(moved) == set(ref)
            for kind in ref:
                assert moved[kind].keys() == ref[kind].keys()
                for task, frac in ref[kind].items():
                    assert moved[kind][task] == pytest.approx(frac, abs=1e-9), (newcomer.task, kind, task)
            if live.check(newcomer)[0] and not any(newcomer is b for b in bad.values()):
                assert decision(ref)
            checked += 1
        live.add(k)
    assert checked > len(honest) + 10
    # the hostile anchors are still refused against the full bank, and by the same numbers
    for name, b in bad.items():
        assert not live.check(b)[0], name


def test_update_and_removal_keep_the_check_equal_to_a_fresh_one(stream):
    honest, own, bad = stream
    live = PlausibilityCheck(own, honest)
    # a task re-learned elsewhere replaces its older version: the check must forget the old one
    refit = dataclasses.replace(knowledge_for("task3", *make_task(np.random.default_rng(5), 3, 240, 1.5)[:2],
                                              TRANSFORM, seed=77), meta=honest[3].meta)
    live.add(refit)
    bank = [refit if k.task == "task3" else k for k in honest]
    live.remove(TaskKey("late2", honest[-5].meta.agent_id))
    bank = [k for k in bank if k.task != "late2"]
    fresh = PlausibilityCheck(own, bank)
    assert [k.task for k in live.existing] == [k.task for k in fresh.existing if k.task != "task3"] + ["task3"]
    for k in [*bad.values(), honest[-5], honest[3], *honest[:2]]:
        assert live.check(k) == fresh.check(k), k.task
        got, want = {r.kind: r.moved for r in live.capture(k)}, {r.kind: r.moved for r in fresh.capture(k)}
        assert got.keys() == want.keys()
        for kind in want:
            assert got[kind] == pytest.approx(want[kind], abs=1e-9), (k.task, kind)


def test_a_tasks_synthetic_points_do_not_depend_on_what_was_stored_before(stream):
    honest, _, _ = stream
    a = PlausibilityCheck({}, honest)
    b = PlausibilityCheck({}, honest[::-1])
    for key, x in a.points.items():
        np.testing.assert_array_equal(x, b.points[key])


def test_mahalanobis_capture_scored_against_rivals_only_decides_as_the_full_one(stream, monkeypatch):
    """With few rivals per owner (3, from each point's best 2) the check scores a point against its own
    task, those rivals and the newcomer instead of every class: linear in the stored tasks. It must
    still decide as the full re-scoring, with capture fractions close to it."""
    from skill_edge.runtime.mapping import plausibility

    monkeypatch.setattr(plausibility, "MAHA_MAX_RIVALS", 3)
    monkeypatch.setattr(plausibility, "MAHA_RIVALS_PER_POINT", 2)
    honest, own, bad = stream
    live = PlausibilityCheck(own, [], feature_transform=TRANSFORM)
    worst = 0.0
    for i, k in enumerate(honest):
        for newcomer in [k, *bad.values()] if i >= 6 else [k]:
            ref = rebuilt_capture(live, newcomer)
            got = {r.kind: r.moved for r in live.capture(newcomer)}
            assert decision(got) == decision(ref), (newcomer.task, got, ref)
            for task, frac in ref.get("maha", {}).items():
                worst = max(worst, abs(got["maha"][task] - frac))
            live.check(newcomer)  # leaves the state a stored newcomer continues from
        live.add(k)
    assert len(live.existing) > plausibility.MAHA_MAX_RIVALS + 2  # rivals were really a subset
    assert worst <= 0.02, worst
