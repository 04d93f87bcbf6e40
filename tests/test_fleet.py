"""The fleet lab end to end: real ROM, real images, real transports, real processes (and Ray).

Three tiny tasks (sklearn digits, 2 classes each, 24 train / 8 test images per class, upscaled
to 32x32 PNGs) are learned by three devices in parallel; every run SIGKILLs one device at some
point and checks that the fleet still converges.  All runs share one feature cache (the ROM is
the same), so only the first one pays for feature extraction.
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mqtt_broker import MosquittoBroker, mosquitto  # noqa: F401
from skill_edge.firmware_sim.agent import (
    AgentError,
    FeatureTask,
    TaskSource,
    load_feature_task,
    save_feature_task,
)
from skill_edge.firmware_sim.fleet import FleetConfig, FleetConfigError, FleetResult, run_fleet
from skill_edge.firmware_sim.link import LinkModel
from skill_edge.firmware_sim.metrics import MAPPERS, maha_student_macs

TASKS = {"digits-a": (0, 1), "digits-b": (2, 3), "digits-c": (4, 5)}
N_TRAIN, N_TEST = 24, 8
ACC_FLOOR_MEAN = 0.6  # chance is 1/6 (pick the right one of 3 tasks, then of 2 classes)
ACC_FLOOR_TASK = 0.3


@pytest.fixture(scope="module")
def digit_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ImageFolder tasks DIR/{train,test}/d<k>/*.png from sklearn's 8x8 digits."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    x, y = load_digits(return_X_y=True)
    out = {}
    for task, digits in TASKS.items():
        for d in digits:
            idx = np.flatnonzero(y == d)
            for split, sel in (("train", idx[:N_TRAIN]), ("test", idx[N_TRAIN:N_TRAIN + N_TEST])):
                folder = root / task / split / f"d{d}"
                folder.mkdir(parents=True)
                for i in sel:
                    a = np.repeat((x[i].reshape(8, 8) / 16.0 * 255).astype(np.uint8)[..., None], 3, axis=2)
                    Image.fromarray(a).resize((32, 32), Image.BILINEAR).save(folder / f"{i}.png")
        out[task] = root / task
    return out


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


def fleet_config(rom_dir: Path, tasks: dict[str, Path], workdir: Path, cache: Path, **kw) -> FleetConfig:
    return FleetConfig(rom_dir=rom_dir, tasks=tasks, workdir=workdir, cache_dir=cache, providers=["cpu"],
                       converge_timeout=150, **kw)


def check_fleet(r: FleetResult, killed: dict[str, str]) -> None:
    """What every run must show: convergence, agreement, accuracy, and books that balance."""
    assert r.problems == [] and r.converged, r.problems
    n = len(r.agents)
    assert n == 3 and r.tasks == list(TASKS)
    # every bank holds every task, with the same content hashes everywhere
    assert len(set(r.bank_digests.values())) == 1
    for hashes in r.bank_hashes.values():
        assert hashes == r.bank_hashes[r.reference_device] and sorted(hashes) == sorted(TASKS)
    for device in r.agents:
        assert r.restarts[device] == (1 if device in killed else 0)
    # every device classified every task's test set, with no oracle, and all agree
    assert r.devices_agree, r.disagreements
    for mapper in MAPPERS:
        assert r.mean_no_oracle_acc[mapper] >= ACC_FLOOR_MEAN, r.per_task_accuracy
        assert r.mean_task_id_acc[mapper] >= r.mean_no_oracle_acc[mapper]
        for device in r.agents:
            per_task = r.per_task_accuracy[device][mapper]
            assert per_task == r.per_task_accuracy[r.reference_device][mapper]
            assert min(per_task.values()) >= ACC_FLOOR_TASK, per_task
    assert r.mean_oracle_acc >= 0.8
    # the raw predictions reproduce the reported accuracies (what the report builds curves from)
    for mapper in MAPPERS:
        for ti, task in enumerate(r.tasks):
            p = r.predictions[mapper][task]
            labels = np.array(r.test_labels[task])
            assert len(labels) == 2 * N_TEST == len(p["task_index"]) == len(p["class_index"])
            acc = np.mean((np.array(p["task_index"]) == ti) & (np.array(p["class_index"]) == labels))
            assert acc == pytest.approx(r.per_task_accuracy[r.reference_device][mapper][task])
    # per-task test features for the report
    from safetensors.numpy import load_file

    for task in r.tasks:
        t = load_file(r.eval_features[task])
        assert t["features"].shape == (2 * N_TEST, 1280)
        assert t["labels"].tolist() == r.test_labels[task]
    # bytes: each student got exactly the others' packets (plus re-deliveries after a crash)
    packet = {t: r.comm_bytes_per_task[t]["as_sent"] for t in r.tasks}
    for device in r.agents:
        learned = r.assignment[device]
        others = [t for t in r.tasks if t not in learned]
        got = r.bytes[device]
        expected = sum(packet[t] for t in others)
        if device in killed:
            assert got["packet_bytes_received"] >= expected
        else:
            assert got["packet_bytes_received"] == expected
            assert got["packets_received"] == len(others)
        assert got["packet_bytes_sent"] >= sum(packet[t] for t in learned)
        assert got["wire_bytes_received"] >= got["packet_bytes_received"]
        if r.link["loss"] == 0:
            assert got["wire_bytes_received"] == got["packet_bytes_received"]
    budget = r.config["budget"]
    for t in r.tasks:
        sizes = r.comm_bytes_per_task[t]
        if budget is None:  # lossless: one anchor alone is a smaller packet than both
            assert sizes["as_sent"] >= max(sizes["gmmc"], sizes["maha"])
        else:  # each variant gets its own plan under the budget (one anchor alone may keep more precision)
            assert max(sizes.values()) <= budget
    # the Fig. 9 table adds up
    alpha = r.mac_model["alpha"]
    macs = r.macs_per_image["full"]
    for mapper in MAPPERS:
        single, skill = r.row("single", mapper), r.row("skill", mapper)
        assert skill.teacher_macs * n == pytest.approx(single.teacher_macs)
        assert skill.comm_macs == pytest.approx(alpha * skill.comm_bytes)
        assert skill.comm_bytes == pytest.approx(np.mean(list(r.student_comm_bytes[mapper].values())))
        assert skill.total_macs == pytest.approx(skill.teacher_macs + skill.comm_macs + skill.student_macs)
        assert skill.speedup_xN == pytest.approx(single.total_macs / (skill.total_macs * n))
        assert 0.5 < skill.speedup_xN < 1.0
        assert single.teacher_macs > sum(r.learn[t]["work"]["n_train"] for t in r.tasks) * macs
        assert skill.accuracy == r.mean_no_oracle_acc[mapper]
    for device in r.agents:  # a student pays for each packet once (its first delivery), at the link's attempts
        want = {mp: sum(r.comm_bytes_per_task[t][mp] * _attempts(r, device, t)
                        for t in r.tasks if t not in r.assignment[device]) for mp in MAPPERS}
        assert {mp: r.student_comm_bytes[mp][device] for mp in MAPPERS} == want
    assert r.row("skill", "gmmc").student_macs == 0
    n_ex = sum(r.learn[t]["maha_exemplars_sent"] for t in r.tasks)
    assert r.row("skill", "maha").student_macs == maha_student_macs(n_ex, 6, 1280 + 2 * 192)  # features + trunk stats
    for t in r.tasks:
        w = r.learn[t]["work"]
        assert w["n_train"] == 2 * N_TRAIN and w["backbone_macs_per_image"] == macs
        assert 0 < w["train_macs_measured"]  # the head's L-BFGS evaluations, counted by the fit
    # wall clock
    wall = r.wall
    assert wall["fleet_learn_share_wall_s"] > 0
    assert wall["wallclock_speedup"] == pytest.approx(wall["sequential_estimate_s"] / wall["fleet_learn_share_wall_s"])
    # the result is plain JSON and loads back unchanged
    again = FleetResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again.to_dict() == json.loads(json.dumps(r.to_dict()))


def _attempts(r: FleetResult, device: str, task: str) -> int:
    """Attempts of the first delivery of ``task`` to ``device`` on the seeded link model."""
    link = LinkModel(**r.link)
    sender = next(d for d, ts in r.assignment.items() if task in ts)
    return link.transfer(r.comm_bytes_per_task[task]["as_sent"], receiver=device, sender=sender, task=task).attempts


# ---------------------------------------------------------------------------- fleets


@pytest.mark.slow
def test_fleet_over_a_folder_with_a_lossy_link_and_a_crash(rom_dir: Path, digit_tasks: dict[str, Path],
                                                             feature_cache: Path, tmp_path: Path) -> None:
    events: list[tuple[str, str, int, int]] = []
    killed = {"agent-2": "mid_receive"}
    cfg = fleet_config(rom_dir, digit_tasks, tmp_path / "fleet", feature_cache,
                       link=LinkModel(bandwidth_bps=250_000, latency_s=0.02, loss=0.3, seed=1), kill=killed)
    r = run_fleet(cfg, progress=lambda *e: events.append(e))
    check_fleet(r, killed)
    assert r.engine == "process" and r.transport.startswith("dir:")
    # the lossy link: retransmissions cost wire bytes and time, exactly as the seeded model says
    total_retx = sum(b["retransmissions_received"] for b in r.bytes.values())
    assert total_retx > 0
    for device, b in r.bytes.items():
        assert b["sim_receive_s"] >= b["packet_bytes_received"] / 250_000
    # the killed device died after its first accept and recovered: a re-delivered packet is a duplicate
    sync = r.sync["agent-2"]
    assert sync["duplicate"] + sync["accepted"] >= 1
    assert r.learn["digits-c"]["boot"] == 1  # learned once, before the crash
    stages = {e[0] for e in events}
    assert {"provision", "boot", "learn", "receive", "evaluate", "done", "restart"} <= stages
    assert ("restart", "agent-2", 1, 2) in events
    for stage, device, done, total in events:
        assert 0 <= done <= total


@pytest.mark.slow
def test_fleet_over_mqtt_with_a_feature_task_a_budget_and_a_crash(
        rom_dir: Path, digit_tasks: dict[str, Path], feature_cache: Path, mosquitto: MosquittoBroker,  # noqa: F811
        tmp_path: Path) -> None:
    from skill_edge.runtime.sources.datasets import load_image_folder
    from skill_edge.runtime.device import Device

    # digits-c is handed to its device as features (the caller extracted them already)
    dev = Device(tmp_path / "extractor", rom_dir, providers=["cpu"], cache_dir=feature_cache, threads=1)
    ds = load_image_folder(digit_tasks["digits-c"])
    tr, te = dev.extract(ds.train.paths), dev.extract(ds.test.paths)
    ftask = save_feature_task(tmp_path / "digits-c.safetensors", FeatureTask(
        ds.classes, tr.features, np.asarray(ds.train.labels)[tr.index], te.features,
        np.asarray(ds.test.labels)[te.index], dev.fingerprint, tr.trunk_stats, te.trunk_stats))
    tasks = {**digit_tasks, "digits-c": ftask}
    killed = {"agent-1": "after_learn"}
    cfg = fleet_config(rom_dir, tasks, tmp_path / "fleet", feature_cache, transport=mosquitto.url, budget="60KB",
                       kill=killed)
    r = run_fleet(cfg)
    check_fleet(r, killed)
    assert r.transport == mosquitto.url and r.fleet.startswith("lab-")
    assert r.learn["digits-c"]["kind"] == "features"
    for t in r.tasks:  # every packet fits the budget, so the codec had to drop to a lossy plan
        assert r.learn[t]["packet_bytes"] <= 60_000 and r.learn[t]["packet_plan"] != "fp32"
    # the killed device did not learn again after the restart: its task came back from its bank
    assert r.learn["digits-b"]["boot"] == 1
    rep = json.loads((tmp_path / "fleet" / "devices" / "agent-1" / "report.json").read_text())
    assert rep["recovered"] == ["digits-b"] and rep["learned"] == [] and rep["boots"] == 2


@pytest.mark.slow
@pytest.mark.ray
def test_fleet_on_ray_with_a_crash(rom_dir: Path, digit_tasks: dict[str, Path], feature_cache: Path,
                                   tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "ray[default]")')
    killed = {"agent-0": "after_publish"}
    cfg = fleet_config(rom_dir, digit_tasks, tmp_path / "fleet", feature_cache, engine="ray", kill=killed)
    r = run_fleet(cfg)
    check_fleet(r, killed)
    assert r.engine_version == f"ray {ray.__version__}"
    assert not ray.is_initialized()  # the engine shut down the Ray it started


@pytest.mark.slow
def test_an_interrupted_fleet_resumes_without_relearning_under_per_mapper_budgets(
        rom_dir: Path, digit_tasks: dict[str, Path], feature_cache: Path, tmp_path: Path) -> None:
    cfg = fleet_config(rom_dir, digit_tasks, tmp_path / "fleet", feature_cache, anchor_budgets={"gmmc": "20KB"})
    first = run_fleet(cfg)
    check_fleet(first, {})
    for t in first.tasks:  # the GMMC packet (head + GMMC) fits its cap; the lab packet carries both anchors
        sizes = first.comm_bytes_per_task[t]
        assert sizes["gmmc"] <= 20_000 < sizes["as_sent"] and sizes["maha"] < sizes["as_sent"]
        assert first.learn[t]["packet_plan"] != "fp32"
    homes = tmp_path / "fleet" / "devices"
    # the run is interrupted: agent-1 never got to write its report (the others finished)
    (homes / "agent-1" / "report.json").unlink()
    with pytest.raises(FleetConfigError, match="resume=True"):
        run_fleet(cfg)
    again = run_fleet(dataclasses.replace(cfg, resume=True))
    check_fleet(again, {"agent-1": "interrupted"})
    assert again.fleet == first.fleet  # the same fleet name, so the packets in the transport count
    boots = {d: json.loads((homes / d / "fleet" / "boots.json").read_text())["boots"] for d in again.agents}
    assert boots == {"agent-0": 1, "agent-1": 2, "agent-2": 1}  # finished devices were not run again
    rep = json.loads((homes / "agent-1" / "report.json").read_text())
    assert rep["recovered"] == ["digits-b"] and rep["learned"] == []  # its task came back from its bank
    assert again.bank_digests == first.bank_digests and again.learn == first.learn
    assert again.per_task_accuracy == first.per_task_accuracy


# ---------------------------------------------------------------------------- configuration and inputs


def test_config_errors_say_what_to_fix(tmp_path: Path, digit_tasks: dict[str, Path]) -> None:
    def cfg(**kw) -> FleetConfig:
        base = dict(rom_dir=tmp_path / "no-rom", tasks=digit_tasks, workdir=tmp_path / "w")
        return FleetConfig(**{**base, **kw})

    with pytest.raises(FleetConfigError, match="kill names device 'agent-9'"):
        run_fleet(cfg(kill={"agent-9": "after_learn"}))
    with pytest.raises(FleetConfigError, match="kill point 'lunch'"):
        run_fleet(cfg(kill={"agent-0": "lunch"}))
    with pytest.raises(FleetConfigError, match="between 1 and the number of tasks"):
        run_fleet(cfg(agents=4))
    with pytest.raises(FleetConfigError, match="does not exist"):
        run_fleet(cfg(tasks={"x": tmp_path / "missing"}))
    with pytest.raises(FleetConfigError, match="every task to exactly one device"):
        run_fleet(cfg(assignment={"a": ["digits-a"], "b": ["digits-b"]}))
    with pytest.raises(FleetConfigError, match="mappers"):
        run_fleet(cfg(mappers=("knn",)))
    with pytest.raises(FleetConfigError, match="ROM is unusable"):
        run_fleet(cfg())
    (tmp_path / "used" / "devices").mkdir(parents=True)
    with pytest.raises(FleetConfigError, match="resume=True"):
        run_fleet(cfg(workdir=tmp_path / "used"))
    f = save_feature_task(tmp_path / "f.safetensors", FeatureTask(["a", "b"], np.zeros((4, 8), np.float32),
                                                                  np.array([0, 1, 0, 1]), np.zeros((2, 8), np.float32),
                                                                  np.array([0, 1]), "ab" * 32))
    with pytest.raises(FleetConfigError, match="BB training needs images"):
        run_fleet(cfg(tasks={"f": f}, bb=True))
    with pytest.raises(FleetConfigError, match="no trunk statistics"):  # the anchors need them
        run_fleet(cfg(tasks={"f": f}))


def test_feature_task_files_round_trip_and_refuse_bad_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    task = FeatureTask(["cat", "dog", "eel"], rng.normal(size=(9, 16)).astype(np.float32), np.arange(9) % 3,
                       rng.normal(size=(3, 16)).astype(np.float32), np.array([2, 1, 0]), "cd" * 32)
    path = save_feature_task(tmp_path / "t.safetensors", task)
    back = load_feature_task(path)
    assert back.classes == task.classes and back.rom_fingerprint == task.rom_fingerprint
    np.testing.assert_array_equal(back.train_features, task.train_features)
    np.testing.assert_array_equal(back.test_labels, task.test_labels)
    assert back.train_trunk_stats is None and back.test_trunk_stats is None
    with_stats = dataclasses.replace(task, train_trunk_stats=rng.random((9, 6), np.float32),
                                     test_trunk_stats=rng.random((3, 6), np.float32))
    back = load_feature_task(save_feature_task(tmp_path / "s.safetensors", with_stats))
    np.testing.assert_array_equal(back.train_trunk_stats, with_stats.train_trunk_stats)
    np.testing.assert_array_equal(back.test_trunk_stats, with_stats.test_trunk_stats)
    short = dataclasses.replace(with_stats, test_trunk_stats=with_stats.test_trunk_stats[:2])
    with pytest.raises(AgentError, match="trunk statistics"):
        load_feature_task(save_feature_task(tmp_path / "short.safetensors", short))
    assert TaskSource("t", str(path)).kind == "features" and TaskSource("t", str(tmp_path)).kind == "images"
    with pytest.raises(ValueError, match=".safetensors"):
        save_feature_task(tmp_path / "t.npz", task)
    bad = FeatureTask(task.classes, task.train_features, np.arange(9), task.test_features, task.test_labels, "")
    with pytest.raises(AgentError, match="labels outside"):
        load_feature_task(save_feature_task(tmp_path / "bad.safetensors", bad))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AgentError, match="not a readable safetensors"):
        load_feature_task(tmp_path / "junk.safetensors")
    with pytest.raises(AgentError, match="does not exist"):
        load_feature_task(tmp_path / "none.safetensors")


def test_evaluation_slots_let_only_so_many_devices_evaluate_at_once(tmp_path):
    """The fleet-wide evaluation slots (flock files) admit at most ``slots`` holders at a time."""
    import threading
    import time as _time

    from skill_edge.firmware_sim.agent import _evaluation_slot

    inside, peak, lock = [0], [0], threading.Lock()

    def device() -> None:
        with _evaluation_slot(str(tmp_path / "slots"), 2):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            _time.sleep(0.3)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=device) for _ in range(5)]
    t0 = _time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2
    assert _time.monotonic() - t0 >= 0.8  # 5 holders, 2 at a time, 0.3 s each: three rounds
