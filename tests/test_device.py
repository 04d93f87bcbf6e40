"""The device end to end on the real ROM: learn -> bank -> classify, from folders and from a video file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from skill_edge.cli import app
from skill_edge.runtime.device import Device, FeatureBatch, LearnError
from skill_edge.runtime.knowledge.records import TaskKnowledge

runner = CliRunner()


def _digit_task(root: Path, classes: list[int], n_train: int = 24, n_test: int = 8, seed: int = 0) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    for c in classes:
        idx = rng.permutation(np.flatnonzero(d.target == c))[: n_train + n_test]
        for j, i in enumerate(idx):
            split = "test" if j < n_test else "train"
            p = root / split / f"d{c}"
            p.mkdir(parents=True, exist_ok=True)
            Image.fromarray((d.images[i] * 15.9).astype(np.uint8)).resize((32, 32), Image.NEAREST).save(p / f"{i}.png")
    return root


def _shape_task(root: Path, n_train: int = 24, n_test: int = 8, seed: int = 1) -> Path:
    """Colour photos-ish: red discs vs blue squares on noisy backgrounds (a different domain from digits)."""
    rng = np.random.default_rng(seed)
    for j in range(n_train + n_test):
        split = "test" if j < n_test else "train"
        for label in ("disc", "square"):
            img = (rng.random((64, 64, 3)) * 60 + 100).astype(np.uint8)
            cx, cy, r = rng.integers(20, 44, size=2).tolist() + [int(rng.integers(8, 14))]
            yy, xx = np.mgrid[:64, :64]
            mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if label == "disc" else \
                ((abs(xx - cx) < r) & (abs(yy - cy) < r))
            img[mask] = (220, 30, 30) if label == "disc" else (30, 30, 220)
            p = root / split / label
            p.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(p / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tasks")
    return {"digits-low": _digit_task(base / "digits-low", [0, 1, 2]),
            "shapes": _shape_task(base / "shapes")}


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory, rom_dir: Path, tasks: dict[str, Path]) -> Path:
    """A device home that has learned both tasks through the CLI."""
    home = tmp_path_factory.mktemp("home")
    for name, path in tasks.items():
        res = runner.invoke(app, ["learn", "--task", name, "--data", str(path), "--home", str(home),
                                  "--rom", str(rom_dir), "--json"])
        assert res.exit_code == 0, res.output
    return home


def test_learn_writes_bank_and_signed_packet(learned: Path, rom_dir: Path) -> None:
    dev = Device(learned, rom_dir)
    entries = {e.task: e for e in dev.bank.entries()}
    assert set(entries) == {"digits-low", "shapes"}
    k = dev.bank.get("digits-low")
    assert k.labels == ["d0", "d1", "d2"] and k.gmmc is not None and k.gmmc.k == 25 and k.maha is not None
    assert k.meta.rom_fingerprint == dev.fingerprint and k.meta.seq == 1
    assert k.meta.metrics["test_acc"] >= 0.8
    packets = sorted((learned / "outbox").glob("*.skp"))
    assert [p.name for p in packets] == ["digits-low-1.skp", "shapes-1.skp"]
    res = runner.invoke(app, ["packet", "inspect", str(packets[0]), "--home", str(learned)])
    assert res.exit_code == 0, res.output


def test_classify_without_oracle_from_cli(learned: Path, rom_dir: Path, tasks: dict[str, Path]) -> None:
    files = sorted((tasks["digits-low"] / "test").glob("*/*.png")) + sorted((tasks["shapes"] / "test").glob("*/*.png"))
    res = runner.invoke(app, ["classify", *map(str, files), "--home", str(learned), "--rom", str(rom_dir), "--json",
                              "--no-open-set"])
    assert res.exit_code == 0, res.output
    preds = json.loads(res.stdout)
    assert len(preds) == len(files)
    right_task = right = 0
    for f, p in zip(files, preds):
        task = f.parents[2].name
        right_task += p["task"] == task
        right += p["task"] == task and p["label"] == f.parent.name
    assert right_task / len(files) >= 0.9
    assert right / len(files) >= 0.8


def test_relearning_a_task_needs_replace_and_bumps_sequence(learned: Path, rom_dir: Path, tasks: dict[str, Path],
                                                            tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(learned, home)
    before = Device(home, rom_dir).bank.get("shapes")
    args = ["learn", "--task", "shapes", "--data", str(tasks["shapes"]), "--home", str(home),
            "--rom", str(rom_dir), "--mapper", "gmmc", "--budget", "40KB", "--json"]
    outbox = sorted(p.name for p in (home / "outbox").glob("*.skp"))
    res = runner.invoke(app, args)  # not a terminal: no prompt, a refusal that names the way out
    assert res.exit_code == 2, res.output
    assert "already learned 'shapes' (seq 1" in " ".join(res.output.split()) and "--replace" in res.output
    kept = Device(home, rom_dir).bank.get("shapes")
    assert kept.meta.seq == 1 and kept.content_hash() == before.content_hash()
    assert sorted(p.name for p in (home / "outbox").glob("*.skp")) == outbox
    res = runner.invoke(app, [*args[:5], "--append", *args[5:]])  # --append is a camera capture's
    assert res.exit_code == 2 and "--append adds frames to a camera capture" in " ".join(res.output.split())

    res = runner.invoke(app, [*args, "--replace"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["replaced_seq"] == 1
    k = Device(home, rom_dir).bank.get("shapes")
    assert k.meta.seq == 2 and k.maha is None
    pkt = home / "outbox" / "shapes-2.skp"
    assert pkt.exists() and pkt.stat().st_size <= 40_000


def _device_and_peer(learned: Path, rom_dir: Path, tmp_path: Path):
    """A copy of the learned device home, a peer that trusts its key, and ``sync(home)`` over one shared
    folder (returns the output, whitespace folded)."""
    from skill_edge.runtime.cli.sync import app as sync_app
    from skill_edge.runtime.exchange.keys import DeviceKey, TrustStore

    home, peer = tmp_path / "home", tmp_path / "peer"
    shutil.copytree(learned, home)
    DeviceKey.generate().save(peer / "keys")
    TrustStore(peer / "trust").add("me", DeviceKey.load(home / "keys" / "device.pem").public_key)
    share = f"dir:{tmp_path / 'share'}"

    def sync(h: Path) -> str:
        r = CliRunner().invoke(sync_app, ["--home", str(h), "--transport", share, "--rom", str(rom_dir),
                                          "--idle", "0.2", "--no-plausibility"])
        assert r.exit_code == 0, r.output
        return " ".join(r.output.split())
    return home, peer, sync


def test_a_task_removed_and_learned_again_outdates_the_version_peers_kept(
        learned: Path, rom_dir: Path, tasks: dict[str, Path], tmp_path: Path) -> None:
    """``bank rm`` of an own task, then ``learn`` of the same name: before, seq restarted at 1, and every
    peer that kept seq 1 refused the new packet as equivocation, so the fleet disagreed for good."""
    home, peer, sync = _device_and_peer(learned, rom_dir, tmp_path)
    me = Device(home, rom_dir)
    sync(home)
    assert "accepted 2," in sync(peer)
    res = runner.invoke(app, ["bank", "rm", "shapes", "--home", str(home)])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "(learned here, seq 1)" in out and "publishes seq 2" in out
    assert [(r.task, r.seq, r.own) for r in me.bank.removed()] == [("shapes", 1, True)]

    res = runner.invoke(app, ["learn", "--task", "shapes", "--data", str(tasks["shapes"]), "--home", str(home),
                              "--rom", str(rom_dir), "--mapper", "gmmc", "--json"])  # no --replace: it is gone
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["replaced_seq"] is None
    new = me.bank.get("shapes")
    assert new.meta.seq == 2 and me.bank.removed() == []
    sync(home)
    assert "accepted 1," in sync(peer) and "rejected 0," in sync(peer)
    got = Device(peer, rom_dir).bank.get("shapes")
    assert got.meta.seq == 2 and got.content_hash() == new.content_hash()


def test_a_wiped_bank_relearns_past_the_seq_its_key_signed(
        learned: Path, rom_dir: Path, tasks: dict[str, Path], tmp_path: Path) -> None:
    """The bank wiped (or restored from an old backup) while the key stays: before, ``learn`` began again
    at seq 1, the peer refused it as equivocation, and the device's new work never left it."""
    home, peer, sync = _device_and_peer(learned, rom_dir, tmp_path)
    sync(home)
    assert "accepted 2," in sync(peer)
    shutil.rmtree(home / "bank")
    shutil.rmtree(home / "outbox")
    res = runner.invoke(app, ["learn", "--task", "shapes", "--data", str(tasks["shapes"]), "--home", str(home),
                              "--rom", str(rom_dir), "--mapper", "gmmc", "--seed", "1", "--json"])
    assert res.exit_code == 0, res.output
    new = Device(home, rom_dir).bank.get("shapes")
    assert new.meta.seq == 2
    sync(home)
    out = sync(peer)
    assert "accepted 1," in out and "rejected 0," in out, out
    got = Device(peer, rom_dir).bank.get("shapes")
    assert got.meta.seq == 2 and got.content_hash() == new.content_hash()


def test_a_bank_restored_from_a_backup_learns_of_its_newer_seq_and_can_republish_over_it(
        learned: Path, rom_dir: Path, tasks: dict[str, Path], tmp_path: Path) -> None:
    """The whole home restored from a backup (bank and seq ledger at seq 1) after the device had published
    seq 2: peers keep seq 2 and refuse the restored seq 1 as a rollback.  Before, sync only said "would
    replace the task this device learned itself", and the next learn signed seq 2 again (equivocation)."""
    from skill_edge.runtime.cli.sync import app as sync_app

    home, peer, sync = _device_and_peer(learned, rom_dir, tmp_path)
    sync(home)
    assert "accepted 2," in sync(peer)
    backup = tmp_path / "backup"
    shutil.copytree(home, backup)
    res = runner.invoke(app, ["learn", "--task", "shapes", "--data", str(tasks["shapes"]), "--home", str(home),
                              "--rom", str(rom_dir), "--mapper", "gmmc", "--seed", "1", "--replace", "--json"])
    assert res.exit_code == 0, res.output
    assert Device(home, rom_dir).bank.get("shapes").meta.seq == 2
    sync(home)
    assert "accepted 1," in sync(peer)
    shutil.rmtree(home)
    shutil.copytree(backup, home)  # the restore
    restored = Device(home, rom_dir).bank.get("shapes")
    assert restored.meta.seq == 1

    def run(*extra: str) -> tuple[int, str]:
        r = CliRunner().invoke(sync_app, ["--home", str(home), "--transport", f"dir:{tmp_path / 'share'}", "--rom",
                                          str(rom_dir), "--idle", "0.2", "--no-plausibility", *extra])
        return r.exit_code, " ".join(r.output.split())

    code, out = run()
    assert code == 3, out  # refused: the fleet's seq 2 may not replace the bank's own version
    assert "the fleet holds seq 2 of this device's own task 'shapes', signed by its key" in out
    assert "--republish-own" in out
    me = Device(home, rom_dir)
    assert me.bank.get("shapes").meta.seq == 1  # own work is never replaced
    assert me._previous_seq("shapes") == 2  # a learn now signs seq 3, past what peers hold
    peer_dev = Device(peer, rom_dir)
    assert peer_dev.bank.get("shapes").meta.seq == 2  # the peer refused the restored seq 1

    code, out = run("--republish-own")
    assert code == 0, out
    assert "resigned" in out and "seq 1 signed again as seq 3" in out and "signed again 1," in out
    mine = Device(home, rom_dir).bank.get("shapes")
    assert mine.meta.seq == 3 and mine.meta.created == restored.meta.created  # the same version, a new seq
    np.testing.assert_array_equal(mine.head_weight, restored.head_weight)
    out = sync(peer)
    assert "accepted 1," in out and "rejected 0," in out, out
    got = Device(peer, rom_dir).bank.get("shapes")
    assert got.meta.seq == 3 and got.content_hash() == mine.content_hash()
    code, out = run("--republish-own")  # nothing outdated any more: nothing signed again
    assert code == 0 and "resigned" not in out, out


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path, rom_dir: Path) -> None:
    task = _digit_task(tmp_path / "t", [3, 4], n_train=10, n_test=4)
    (task / "train" / "d3" / "garbage.png").write_bytes(b"this is not a png")
    good = next((task / "train" / "d4").glob("*.png")).read_bytes()
    (task / "train" / "d4" / "truncated.png").write_bytes(good[: len(good) // 2])
    (task / "train" / "d4" / "empty.jpg").write_bytes(b"")
    res = runner.invoke(app, ["learn", "--task", "t", "--data", str(task), "--home", str(tmp_path / "h"),
                              "--rom", str(rom_dir), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["skipped_images"] == 3 and summary["train_images"] == 20
    # 2 of 10 a class held out, in 5 disjoint folds (every image once): the threshold rests on all 20
    assert summary["open_set_calibration_images"] == 20


def test_learn_warns_when_the_open_set_threshold_rests_on_few_images(tmp_path: Path, rom_dir: Path) -> None:
    task = _digit_task(tmp_path / "t", [3, 4], n_train=10, n_test=2)
    res = runner.invoke(app, ["learn", "--task", "t", "--data", str(task), "--home", str(tmp_path / "h"),
                              "--rom", str(rom_dir)])
    assert res.exit_code == 0, res.output
    assert "open-set threshold rests on 20 held-out images" in " ".join(res.output.split())


def test_single_class_and_empty_class_are_clear_errors(tmp_path: Path, rom_dir: Path) -> None:
    one = _digit_task(tmp_path / "one", [5], n_train=5, n_test=2)
    res = runner.invoke(app, ["learn", "--task", "one", "--data", str(one), "--home", str(tmp_path / "h"),
                              "--rom", str(rom_dir)])
    assert res.exit_code == 2 and "at least 2" in " ".join(res.output.split())
    empty = _digit_task(tmp_path / "empty", [5, 6], n_train=5, n_test=2)
    (empty / "train" / "d7").mkdir()
    res = runner.invoke(app, ["learn", "--task", "empty", "--data", str(empty), "--home", str(tmp_path / "h"),
                              "--rom", str(rom_dir)])
    assert res.exit_code == 2 and "d7" in res.output and "hold no images" in " ".join(res.output.split())
    garbage_only = _digit_task(tmp_path / "g", [1, 2], n_train=3, n_test=1)
    for p in (garbage_only / "train").glob("d2/*.png"):
        p.write_bytes(b"broken")
    res = runner.invoke(app, ["learn", "--task", "g", "--data", str(garbage_only), "--home", str(tmp_path / "h"),
                              "--rom", str(rom_dir)])
    assert res.exit_code == 2 and "only 1 class" in " ".join(res.output.split())


def test_classify_reports_unreadable_inputs(learned: Path, rom_dir: Path, tmp_path: Path, tasks) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = next((tasks["shapes"] / "test" / "disc").glob("*.png"))
    preds = Device(learned, rom_dir).classify([bad, good])
    assert preds[0].error and "not a readable image" in preds[0].error and preds[0].task is None
    assert preds[1].error is None and preds[1].task == "shapes"


def test_bb_tail_is_rerun_per_task(learned: Path, rom_dir: Path, tasks: dict[str, Path]) -> None:
    """A task carrying BB gets its images' tail rerun with its biases before its head."""
    dev = Device(learned, rom_dir)
    k: TaskKnowledge = dev.bank.get("shapes")
    bb = (0.3 * np.random.default_rng(0).standard_normal(dev.engine.tail_bias_total)).astype(np.float32)
    k.bb, k.meta.bb_layout_hash = bb, dev.engine.manifest.tail_layout_hash()
    dev.bank.put(k.validate(), own=True)  # the device's own task: only an own write may replace it
    files = sorted((tasks["shapes"] / "test").glob("*/*.png"))
    batch, failed, _ = dev.featurize(files)
    assert not failed and batch.trunk_acts is not None
    r = dev.classify_features(batch, mapper="gmmc", open_set=False)
    rows = np.flatnonzero(np.asarray(r["task_names"])[r["task_index"]] == "shapes")
    assert len(rows) >= len(files) - 1
    want = (dev.engine.tail(batch.trunk_acts[rows], bb) @ k.head_weight.T + k.head_bias).argmax(1)
    plain = (batch.features[rows] @ k.head_weight.T + k.head_bias).argmax(1)
    assert np.array_equal(r["class_index"][rows], want)
    assert not np.allclose(dev.engine.tail(batch.trunk_acts[rows], bb), batch.features[rows])
    assert plain.shape == want.shape


def test_open_set_flags_out_of_distribution_inputs(learned: Path, rom_dir: Path) -> None:
    from sklearn.datasets import load_sample_images

    dev = Device(learned, rom_dir)
    preds = dev.classify(list(load_sample_images().images))  # two natural photos: neither digits nor shapes
    assert all(p.unknown and p.task is None for p in preds), [p.to_dict() for p in preds]
    # "unknown" still says which stored task and class came closest, for the user to see
    labels = {k.task: k.labels for k in dev.knowledge()}
    for p in preds:
        assert p.nearest_task in labels and p.nearest_label in labels[p.nearest_task], p.to_dict()
        d = p.to_dict()
        assert d["nearest_task"] == p.nearest_task and d["nearest_label"] == p.nearest_label and d["label"] is None
        assert 0.0 < p.task_confidence <= 1.0


def test_task_confidence_is_a_tempered_posterior(learned: Path, rom_dir: Path, tasks: dict[str, Path]) -> None:
    """``task_confidence`` is the softmax of the per-task scores divided by the mapper's temperature,
    so raising the temperature lowers every confidence, and known inputs keep their task."""
    dev = Device(learned, rom_dir)
    images = sorted((tasks["shapes"] / "test").rglob("*.png"))[:6]
    for kind in ("gmmc", "maha"):
        mp, _ = dev.mapper(kind)
        batch, _, _ = dev.featurize(images)
        r = mp.predict(batch.features, batch.trunk_stats)
        s = r.scores.astype(np.float64) / mp.temperature
        p = np.exp(s - s.max(1, keepdims=True))
        np.testing.assert_allclose(r.confidence, (p / p.sum(1, keepdims=True)).max(1), rtol=1e-5)
        before = mp.temperature
        try:
            mp.temperature = before * 1e12  # effectively uniform over the 2 stored tasks
            hot = mp.predict(batch.features, batch.trunk_stats)
        finally:
            mp.temperature = before
        np.testing.assert_allclose(hot.confidence, 0.5, atol=1e-3)
        assert list(hot.task_index) == list(r.task_index)


def test_learn_and_classify_from_a_video_file(tmp_path: Path, rom_dir: Path) -> None:
    """`learn --camera file://clip` captures labelled frames into an ImageFolder, then learns from it."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 96))
    assert writer.isOpened()
    frames_per_label = 20
    for label in ("red", "blue"):
        for _ in range(frames_per_label):
            img = (rng.random((96, 96, 3)) * 50 + 90).astype(np.uint8)
            cx, cy = rng.integers(30, 66, size=2)
            color = (40, 40, 230) if label == "red" else (230, 40, 40)  # BGR
            cv2.circle(img, (int(cx), int(cy)), int(rng.integers(14, 24)), color, -1)
            writer.write(img)
    writer.release()
    home = tmp_path / "home"
    res = runner.invoke(app, ["learn", "--task", "colours", "--camera", f"file://{clip}", "--labels", "red,blue",
                              "--frames", str(frames_per_label), "--countdown", "0", "--home", str(home),
                              "--rom", str(rom_dir), "--json"])
    assert res.exit_code == 0, res.output
    cap = home / "captures" / "colours" / "train"
    assert sorted(p.name for p in cap.iterdir()) == ["blue", "red"]
    assert all(len(list((cap / c).glob("*.jpg"))) == frames_per_label for c in ("red", "blue"))
    res = runner.invoke(app, ["classify", "--camera", f"file://{clip}", "--frames", "40", "--home", str(home),
                              "--rom", str(rom_dir), "--json", "--no-open-set"])
    assert res.exit_code == 0, res.output
    preds = json.loads(res.stdout)
    labels = [p["label"] for p in preds]
    assert len(labels) == 40
    acc = np.mean([lab == ("red" if i < frames_per_label else "blue") for i, lab in enumerate(labels)])
    assert acc >= 0.9


def test_tampered_rom_refuses_to_boot(tmp_path: Path, rom_dir: Path) -> None:
    from skill_edge.export.manifest import RomError

    copy = tmp_path / "rom"
    shutil.copytree(rom_dir, copy)
    data = bytearray((copy / "tail.onnx").read_bytes())
    data[-100] ^= 0xFF
    (copy / "tail.onnx").write_bytes(bytes(data))
    with pytest.raises(RomError, match="tail.onnx"):
        Device(tmp_path / "h", copy)


def test_mapper_needs_tasks(tmp_path: Path, rom_dir: Path) -> None:
    dev = Device(tmp_path / "empty", rom_dir)
    with pytest.raises(LearnError, match="no task"):
        dev.classify_features(FeatureBatch(np.zeros((1, 1280), np.float32), None))


def test_anchors_read_the_trunk_statistics_the_engine_computes(learned: Path, rom_dir: Path,
                                                                tasks: dict[str, Path]) -> None:
    from skill_edge.runtime.mapping.mapper import MapperError

    dev = Device(learned, rom_dir)
    k = dev.bank.get("digits-low")
    assert k.meta.feature_transform == "sqrt_l2_trunk"
    assert dev.engine.trunk_stats_dim == 2 * 192  # Lite0's trunk ends in 192 channels at 7 x 7
    assert k.anchor_dim == dev.engine.feature_dim + dev.engine.trunk_stats_dim and k.feature_dim == 1280
    files = sorted((tasks["digits-low"] / "test").glob("*/*.png"))[:4]
    ex = dev.engine.extract(files, keep_trunk=True)
    acts = ex.trunk_acts.astype(np.float64)
    np.testing.assert_allclose(ex.trunk_stats, np.concatenate([acts.mean((2, 3)), acts.std((2, 3))], axis=1),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(MapperError, match="trunk statistics"):
        dev.classify_features(FeatureBatch(ex.features, None), mapper="maha")
    got = dev.classify_features(FeatureBatch(ex.features, None, ex.trunk_stats), mapper="maha", open_set=False)
    assert [got["task_names"][t] for t in got["task_index"]] == ["digits-low"] * 4
    with pytest.raises(LearnError, match="needs trunk statistics"):
        dev.learn_features("again", ["a", "b"], ex.features, np.array([0, 1, 0, 1]))


def test_learning_into_a_bank_of_another_anchor_space_says_how_to_fix_it(tmp_path: Path, rom_dir: Path,
                                                                          tasks: dict[str, Path]) -> None:
    """A bank learned before trunk statistics (sqrt_l2) cannot be mixed with new trunk anchors in one mapper."""
    home = tmp_path / "old"
    res = runner.invoke(app, ["learn", "--task", "shapes", "--data", str(tasks["shapes"]), "--home", str(home),
                              "--rom", str(rom_dir), "--anchor-space", "sqrt_l2", "--json"])
    assert res.exit_code == 0, res.output
    assert Device(home, rom_dir).bank.get("shapes").meta.feature_transform == "sqrt_l2"
    args = ["learn", "--task", "digits-low", "--data", str(tasks["digits-low"]), "--home", str(home),
            "--rom", str(rom_dir)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--anchor-space sqrt_l2" in res.output, res.output
    assert [e.task for e in Device(home, rom_dir).bank.entries()] == ["shapes"]  # nothing half-learned
    res = runner.invoke(app, [*args, "--anchor-space", "sqrt_l2"])
    assert res.exit_code == 0, res.output
    dev = Device(home, rom_dir)
    files = sorted((tasks["digits-low"] / "test").glob("*/*.png"))
    preds = dev.classify(files, mapper="maha", open_set=False)  # features alone: no trunk statistics needed
    assert np.mean([p.task == "digits-low" for p in preds]) >= 0.9
    res = runner.invoke(app, [*args, "--anchor-space", "pca"])
    assert res.exit_code == 2 and "--anchor-space must be one of" in res.output


def test_default_mapper_is_mahalanobis_where_every_task_carries_it(learned: Path, rom_dir: Path,
                                                                   tasks: dict[str, Path], tmp_path: Path) -> None:
    """``auto`` (classify's and eval's default) is Mahalanobis on a bank learned with both anchors,
    the same answers as naming it, and GMMC once a stored task carries no Mahalanobis anchor."""
    home = tmp_path / "home"
    shutil.copytree(learned, home)
    dev = Device(home, rom_dir)
    assert dev.resolve_mapper() == "maha" and dev.resolve_mapper("gmmc") == "gmmc"
    files = sorted((tasks["shapes"] / "test").glob("*/*.png"))[:6]
    auto = [p.to_dict() for p in dev.classify(files)]
    assert auto == [p.to_dict() for p in dev.classify(files, mapper="mahalanobis")]
    res = runner.invoke(app, ["classify", *map(str, files), "--home", str(home), "--rom", str(rom_dir)])
    assert res.exit_code == 0 and "mapper mahalanobis" in res.stdout, res.output
    res = runner.invoke(app, ["learn", "--task", "digits-gmmc", "--data", str(tasks["digits-low"]), "--home", str(home),
                              "--rom", str(rom_dir), "--mapper", "gmmc", "--json"])
    assert res.exit_code == 0, res.output
    assert dev.resolve_mapper() == "gmmc"  # a Mahalanobis mapper would leave digits-gmmc out
    assert {p.task for p in dev.classify(files)} <= {"shapes", None}
    assert "digits-gmmc" in dev.mapper()[0].task_names
    res = runner.invoke(app, ["classify", *map(str, files), "--home", str(home), "--rom", str(rom_dir),
                              "--mapper", "bogus"])
    assert res.exit_code == 2 and "auto, gmmc or mahalanobis" in res.output


def test_a_cold_device_reuses_its_banks_mahalanobis_state(learned: Path, rom_dir: Path, tasks: dict[str, Path],
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Mahalanobis student's whitening is saved per bank state: a cold process holding the same
    tasks loads it instead of redoing the covariance (same answers), an unreadable file is rebuilt
    and written back, and a bank change replaces it."""
    import skill_edge.runtime.mapping.mapper as mapper_module

    home = tmp_path / "home"
    shutil.copytree(learned, home)
    shutil.rmtree(home / "mapper", ignore_errors=True)
    files = sorted((tasks["shapes"] / "test").glob("*/*.png"))[:4] + sorted((tasks["digits-low"] / "test").glob("*/*.png"))[:4]
    first = Device(home, rom_dir)
    want = [p.to_dict() for p in first.classify(files, mapper="maha")]
    built = first.mapper("maha")[0]
    saved = list((home / "mapper").glob("maha-*.safetensors"))
    assert len(saved) == 1

    real_scatter = mapper_module.exemplar_scatter

    def no_scatter(*a, **k):
        raise AssertionError("the cold device recomputed the tied covariance")

    monkeypatch.setattr(mapper_module, "exemplar_scatter", no_scatter)
    cold = Device(home, rom_dir)
    assert [p.to_dict() for p in cold.classify(files, mapper="maha")] == want
    np.testing.assert_array_equal(cold.mapper("maha")[0].whiten_t, built.whiten_t)
    np.testing.assert_array_equal(cold.mapper("maha")[0].means_w, built.means_w)
    monkeypatch.setattr(mapper_module, "exemplar_scatter", real_scatter)

    saved[0].write_bytes(b"not a safetensors file")
    assert [p.to_dict() for p in Device(home, rom_dir).classify(files, mapper="maha")] == want
    assert saved[0].read_bytes() != b"not a safetensors file"  # rebuilt and written back

    from safetensors.numpy import load, save

    tampered = load(saved[0].read_bytes())
    tampered["whiten_t"] = tampered["whiten_t"] * 2  # valid shapes, wrong values: the checksum catches it
    saved[0].write_bytes(save(tampered))
    monkeypatch.setattr(mapper_module, "exemplar_scatter", no_scatter)
    with pytest.raises(AssertionError, match="recomputed"):  # it is not used: the device rebuilds
        Device(home, rom_dir).classify(files, mapper="maha")
    monkeypatch.setattr(mapper_module, "exemplar_scatter", real_scatter)
    assert [p.to_dict() for p in Device(home, rom_dir).classify(files, mapper="maha")] == want

    res = runner.invoke(app, ["learn", "--task", "digits-again", "--data", str(tasks["digits-low"]), "--home", str(home),
                              "--rom", str(rom_dir), "--json"])
    assert res.exit_code == 0, res.output
    grown = Device(home, rom_dir)
    assert "digits-again" in grown.mapper("maha")[0].task_names
    now = list((home / "mapper").glob("maha-*.safetensors"))
    assert len(now) == 1 and now[0] != saved[0]


def test_a_full_disk_only_costs_the_saved_mapper_state(learned: Path, rom_dir: Path, tasks: dict[str, Path],
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing the Mahalanobis state fails (ENOSPC): classify still answers, as without the state, and
    leaves no file behind; the next process builds the mapper again."""
    import errno

    import skill_edge.runtime.atomic as atomic

    home = tmp_path / "home"
    shutil.copytree(learned, home)
    shutil.rmtree(home / "mapper", ignore_errors=True)
    files = sorted((tasks["shapes"] / "test").glob("*/*.png"))[:4]
    want = [p.to_dict() for p in Device(learned, rom_dir).classify(files, mapper="maha")]

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_atomically", full)
    assert [p.to_dict() for p in Device(home, rom_dir).classify(files, mapper="maha")] == want
    assert not any((home / "mapper").glob("*"))
