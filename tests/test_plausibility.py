"""Mapper-hijack defence: crafted anchors from a 'trusted' sender must be refused on receipt."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sklearn.cluster import KMeans

from skill_edge.runtime.mapping.anchors import fit_gmmc, fit_mahalanobis, transform_features
from skill_edge.runtime.knowledge.records import GmmcAnchor, MahalanobisAnchor, TaskKnowledge
from skill_edge.runtime.mapping.mapper import build_mapper
from skill_edge.runtime.mapping.plausibility import PlausibilityCheck

from test_mapper import D, knowledge_for, make_task

TRANSFORM = "sqrt_l2"


@pytest.fixture(scope="module")
def world():
    """Five known tasks in the bank, a sixth legitimate newcomer, and the device's own features."""
    rng = np.random.default_rng(11)
    # shift 1.5: tasks overlap a little, like real sibling tasks do
    tasks = {f"task{i}": make_task(rng, n_classes=2 + i % 3, n=300, shift=1.5) for i in range(6)}
    knowledge = {n: knowledge_for(n, x, y, TRANSFORM, seed=i) for i, (n, (x, y, _, _)) in enumerate(tasks.items())}
    existing = [knowledge[f"task{i}"] for i in range(5)]
    own = {"task0": tasks["task0"][0][:150], "task1": tasks["task1"][0][:150]}  # it learned task0, task1
    pooled = np.concatenate([transform_features(tasks[f"task{i}"][0], TRANSFORM) for i in range(5)])
    return tasks, knowledge, existing, own, pooled


def disguised(template: TaskKnowledge, name: str, gmmc=None, maha=None) -> TaskKnowledge:
    return dataclasses.replace(template, task=name, gmmc=gmmc, maha=maha).validate()


def hijacks(world) -> dict[str, TaskKnowledge]:
    """Anchors a trusted-but-hostile sender could craft, each disguised as a new task.

    The sender has received the victim's packet, so it knows the victim's anchors.
    """
    tasks, knowledge, existing, _, pooled = world
    victim = knowledge["task0"]
    centre = pooled.mean(axis=0)
    total_var = pooled.var(axis=0)
    rng = np.random.default_rng(12)
    c, k = victim.num_classes, 3
    g, m = victim.gmmc, victim.maha
    attacker_x = transform_features(tasks["task0"][0][150:], TRANSFORM)  # the device keeps [:150]
    parts = KMeans(40, n_init=1, random_state=0).fit_predict(attacker_x)
    fine_means = TaskKnowledge(
        task="fine", labels=[f"c{i}" for i in range(40)], head_weight=np.zeros((40, D), np.float32),
        head_bias=np.zeros(40, np.float32), meta=dataclasses.replace(victim.meta),
        maha=fit_mahalanobis(attacker_x, parts, m=5, seed=5), thresholds={"maha": -100.0},
    ).validate()
    return {
        # one broad Gaussian over everything, variances far beyond any seen
        "huge_variance": disguised(victim, "huge", gmmc=GmmcAnchor(
            np.tile(centre, (k, 1)), np.full((k, D), 1e3, np.float32), np.full(k, 1 / k, np.float32))),
        # needle-sharp Gaussians at the centre of all data
        "needle_centre": disguised(victim, "needle", gmmc=GmmcAnchor(
            np.tile(centre, (k, 1)), np.tile(total_var * 1e-4, (k, 1)).astype(np.float32),
            np.full(k, 1 / k, np.float32))),
        # the victim's own anchor, re-weighted so every component wins
        "boosted_weights": disguised(victim, "boost", gmmc=dataclasses.replace(g, weights=g.weights * 1e6)),
        # an over-fitted mixture of the victim's kind of data (a public dataset anyone can fetch)
        "overfit_copy": disguised(victim, "copy", gmmc=fit_gmmc(attacker_x, k=60, var_floor=1e-3, seed=5)),
        # Mahalanobis: class means at the data centre, exemplars scattered wildly (poisons the tied covariance)
        "maha_poison": disguised(victim, "poison", maha=MahalanobisAnchor(
            np.tile(centre, (c, 1)).astype(np.float32),
            (centre + rng.normal(0, 3.0, (5 * c, D))).astype(np.float32),
            np.repeat(np.arange(c), 5).astype(np.float32))),
        # Mahalanobis: many fine "class" means over the victim's kind of data
        "maha_fine_means": fine_means,
    }


def test_legitimate_newcomer_is_accepted(world):
    _, knowledge, existing, own, _ = world
    ok, reason = PlausibilityCheck(own, existing).check(knowledge["task5"])
    assert ok, reason
    assert reason.startswith("ok:")


def test_update_of_an_existing_task_is_not_counted_as_capture(world):
    tasks, knowledge, existing, own, _ = world
    x, y, _, _ = tasks["task0"]
    refit = knowledge_for("task0", x, y, TRANSFORM, seed=99)  # same task, re-learned elsewhere
    ok, reason = PlausibilityCheck(own, existing).check(refit)
    assert ok, reason


@pytest.mark.parametrize("name", ["huge_variance", "needle_centre", "boosted_weights", "overfit_copy",
                                  "maha_poison", "maha_fine_means"])
def test_hijack_is_refused(world, name):
    _, _, existing, own, _ = world
    bad = hijacks(world)[name]
    ok, reason = PlausibilityCheck(own, existing).check(bad)
    assert not ok, f"{name} slipped through: {reason}"
    assert reason and not reason.startswith("ok")


def test_capturing_hijacks_would_really_capture_without_the_check(world):
    """The capture test refuses what would otherwise steal the victim's test inputs."""
    tasks, _, existing, own, _ = world
    victim_test = tasks["task0"][2]
    h = hijacks(world)
    for name, kind in (("boosted_weights", "gmmc"), ("overfit_copy", "gmmc"), ("maha_fine_means", "maha")):
        mapper = build_mapper(kind, existing + [h[name]])
        captured = np.mean(mapper.predict(victim_test).task_index == len(existing))
        assert captured > 0.5, (name, captured)
        assert not PlausibilityCheck(own, existing).check(h[name])[0]


def test_capture_report_numbers(world):
    _, knowledge, existing, own, _ = world
    check = PlausibilityCheck(own, existing)
    legit = {r.kind: r for r in check.capture(knowledge["task5"])}
    bad = {r.kind: r for r in check.capture(hijacks(world)["overfit_copy"])}
    assert set(legit) == {"gmmc", "maha"}
    assert legit["gmmc"].worst[1] < 0.2
    assert bad["gmmc"].worst[0] == "task0" and bad["gmmc"].worst[1] > 0.5


def test_device_without_own_features_uses_stored_anchors(world):
    """No raw features: exemplars and component means of the bank still expose a copy attack."""
    _, knowledge, existing, _, _ = world
    check = PlausibilityCheck({}, existing)
    assert check.check(knowledge["task5"])[0]
    ok, reason = check.check(hijacks(world)["maha_fine_means"])
    assert not ok and "would take" in reason


def test_gmmc_capture_limit_is_what_refuses_an_in_scale_duplicate(world):
    """A well-fitted duplicate of the victim's data passes the scale test; only capture can tell.

    Such a duplicate takes roughly a third of the victim's inputs, like an honest re-learned
    copy under a new name would; the default limit refuses it, the legitimate newcomer
    (which takes ~0 %) still passes, and a lenient limit would let the duplicate in.
    """
    tasks, knowledge, existing, own, _ = world
    dup = disguised(knowledge["task0"], "dup", gmmc=fit_gmmc(
        transform_features(tasks["task0"][0][150:], TRANSFORM), k=60, var_floor=0.05, seed=5))
    check = PlausibilityCheck(own, existing)
    ok, reason = check.check(dup)
    assert not ok and "gmmc anchor would take" in reason and "'task0'" in reason
    assert check.check(knowledge["task5"])[0]
    assert PlausibilityCheck(own, existing, max_capture=0.6).check(dup)[0]


def test_wrong_space_and_size_are_refused(world):
    tasks, knowledge, existing, own, _ = world
    x, y, _, _ = tasks["task5"]
    raw = knowledge_for("task5", x, y, "raw")
    ok, reason = PlausibilityCheck(own, existing).check(raw)
    assert not ok and "feature transform" in reason
    with pytest.raises(ValueError, match="feature size"):
        PlausibilityCheck({"task0": np.zeros((3, D + 1))}, existing)


def test_anchor_width_must_match_the_banks(world):
    """Trunk-statistics anchors from a ROM whose trunk is wider are refused, though heads match."""
    tasks, _, _, _, _ = world
    rng = np.random.default_rng(5)
    stats = {n: np.abs(rng.normal(1, 0.3, (len(v[0]), 8))).astype(np.float32) for n, v in tasks.items()}
    bank = [knowledge_for(f"task{i}", tasks[f"task{i}"][0], tasks[f"task{i}"][1], "sqrt_l2_trunk", seed=i,
                          trunk_stats=stats[f"task{i}"]) for i in range(3)]
    own = {"task0": (tasks["task0"][0][:150], stats["task0"][:150])}
    check = PlausibilityCheck(own, bank)
    assert check.anchor_dim == D + 8
    x, y = tasks["task5"][:2]
    ok, reason = check.check(knowledge_for("task5", x, y, "sqrt_l2_trunk", trunk_stats=stats["task5"]))
    assert ok, reason
    wide = np.concatenate([stats["task5"], stats["task5"]], axis=1)
    ok, reason = check.check(knowledge_for("task5", x, y, "sqrt_l2_trunk", trunk_stats=wide))
    assert not ok and "anchor width" in reason
    with pytest.raises(ValueError, match="anchor width"):
        PlausibilityCheck({"task0": (tasks["task0"][0][:20], np.zeros((20, 4), np.float32))}, bank)


def test_non_finite_threshold_is_refused(world):
    _, knowledge, existing, own, _ = world
    k = dataclasses.replace(knowledge["task5"], thresholds={"gmmc": float("-inf")})
    ok, reason = PlausibilityCheck(own, existing)(k)
    assert not ok and "threshold" in reason


@pytest.mark.parametrize("kind", ["gmmc", "maha"])
@pytest.mark.parametrize("own_features", [True, False], ids=["own-features", "anchors-only"])
def test_exact_copy_of_a_known_anchor_under_a_new_name_is_refused(world, kind, own_features):
    """A copy scores exactly what the original scores: a mapper breaks such ties by task order, so
    a copy named to sort first ("aaa" < "task0") takes every input of the original.  Ties count
    as captures; with strict wins only, the copy's capture was 0 % and it was accepted."""
    _, knowledge, existing, own, _ = world
    victim = knowledge["task0"]
    copy = disguised(victim, "aaa", **{kind: getattr(victim, kind)})
    check = PlausibilityCheck(own if own_features else {}, existing)
    (report,) = check.capture(copy)
    assert report.kind == kind and report.worst[0] == "task0" and report.worst[1] > 0.9
    ok, reason = check.check(copy)
    assert not ok and f"{kind} anchor would take" in reason and "'task0'" in reason
    mapper = build_mapper(kind, sorted(existing + [copy], key=lambda k: k.task))  # as a device's bank orders them
    assert mapper.task_names[0] == "aaa"


def test_honest_mahalanobis_newcomer_is_accepted_beside_a_gmmc_only_task(world):
    """A GMMC-only task is never chosen by the Mahalanobis mapper, so its points are not "correct"
    there and cannot be captured; they were counted as correct, and an honest Mahalanobis
    newcomer near them was quarantined."""
    tasks, knowledge, existing, own, _ = world
    x, y = tasks["task5"][:2]
    gmmc_only = dataclasses.replace(knowledge_for("gm5", x, y, TRANSFORM, seed=7), maha=None).validate()
    newcomer = dataclasses.replace(knowledge["task5"], gmmc=None).validate()  # Mahalanobis anchor only
    check = PlausibilityCheck(own, existing + [gmmc_only])
    (report,) = check.capture(newcomer)
    assert report.kind == "maha" and "gm5" not in report.moved
    assert set(report.moved) == {f"task{i}" for i in range(5)} and report.worst[1] < 0.2
    ok, reason = check.check(newcomer)
    assert ok, reason
    # the GMMC mapper still guards gm5's points: a GMMC copy of task5 would take them
    (gm_report,) = check.capture(dataclasses.replace(knowledge["task5"], maha=None).validate())
    assert gm_report.moved["gm5"] > 0.2


def test_a_peers_copy_under_the_same_name_is_judged_like_any_other_task(world):
    """Tasks are (name, origin agent) now (runtime.knowledge.identity), and a bank keeps two agents' same-name
    tasks side by side; so another agent's "task0" carrying the victim's anchor ties with it
    everywhere and must be refused.  Only the same agent's newer version replaces, and is not
    judged against the version it replaces."""
    _, knowledge, existing, own, _ = world
    mine = [dataclasses.replace(k, meta=dataclasses.replace(k.meta, agent_id="me")) for k in existing]
    victim = mine[0]
    peer_copy = dataclasses.replace(victim, meta=dataclasses.replace(victim.meta, agent_id="peer"))
    check = PlausibilityCheck(own, mine)
    ok, reason = check.check(peer_copy)
    assert not ok and "would take 100% of known task 'task0'" in reason
    assert check.check(victim)[0]  # the same (task, agent): an update
    # with the peer's task0 already stored, both are shown by identity
    both = PlausibilityCheck({}, mine + [dataclasses.replace(knowledge["task5"], task="task0",
                                                            meta=dataclasses.replace(victim.meta, agent_id="peer"))])
    ok, reason = both.check(dataclasses.replace(victim, task="aaa"))
    assert not ok and "'task0@me'" in reason
