"""Order-free merging (issue 17): devices that received the same packets in different orders
classify identically, bit for bit.

Three devices learn three tasks on the real ROM and sign their packets; two fresh devices
receive all three packets through the real ``PacketReceiver`` and bank, in different orders.
Both mappers' scores, the chosen tasks, labels and confidences must then be identical: the
student merges received statistics in the tasks' identity order, never in arrival order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from skill_edge.runtime.device import Device
from skill_edge.runtime.exchange.keys import TrustStore, init_device_key, load_device_key
from skill_edge.runtime.exchange.receive import PacketReceiver
from test_device import _digit_task, _shape_task


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, rom_dir: Path) -> dict:
    base = tmp_path_factory.mktemp("merge")
    data = {"digits-low": _digit_task(base / "d-low", [0, 1, 2]),
            "digits-high": _digit_task(base / "d-high", [7, 8, 9], seed=3),
            "shapes": _shape_task(base / "shapes")}
    packets = {}
    for name, path in data.items():
        init_device_key(base / f"teacher-{name}")
        dev = Device(base / f"teacher-{name}", rom_dir)
        rep = dev.learn(name, path)
        assert rep.packet, "learn signs and stores a packet"
        packets[name] = (rep.packet, load_device_key(base / f"teacher-{name}"))
    return {"base": base, "data": data, "packets": packets}


def _receive_in_order(home: Path, rom_dir: Path, fleet: dict, order: list[str]) -> Device:
    dev = Device(home, rom_dir)
    trust = TrustStore.at_home(home)
    for name, (_, key) in fleet["packets"].items():
        trust.add(name, key.public_key)
    rx = PacketReceiver(trust, dev.engine.manifest.fingerprint, home / "rx-state", bank=dev.bank)
    for name in order:
        raw = fleet["packets"][name][0]
        r = rx.receive(raw, on_accept=lambda p, data: dev.bank.put(p.knowledge, packet_bytes=data))
        assert r.status == "accepted", r
    return dev


def test_two_arrival_orders_classify_identically(fleet: dict, rom_dir: Path, tmp_path: Path) -> None:
    first = _receive_in_order(tmp_path / "one", rom_dir, fleet, ["digits-low", "digits-high", "shapes"])
    second = _receive_in_order(tmp_path / "two", rom_dir, fleet, ["shapes", "digits-high", "digits-low"])
    images = sorted(p for root in fleet["data"].values() for p in (root / "test").rglob("*.png"))
    assert len(images) >= 24
    batch, failed, _ = first.featurize(images)
    assert not failed
    for kind in ("gmmc", "maha"):
        m1, t1 = first.mapper(kind)
        m2, t2 = second.mapper(kind)
        assert [k.task for k in t1] == [k.task for k in t2] == sorted(fleet["data"])
        r1, r2 = m1.predict(batch.features, batch.trunk_stats), m2.predict(batch.features, batch.trunk_stats)
        np.testing.assert_array_equal(r1.scores, r2.scores)  # bit-identical, not merely close
        np.testing.assert_array_equal(r1.confidence, r2.confidence)
        p1 = first.classify(images, mapper=kind)
        p2 = second.classify(images, mapper=kind)
        assert [p.to_dict() for p in p1] == [p.to_dict() for p in p2]
        # and the mapper is a real one: most images go to the task they were drawn from
        truth = [next(n for n, root in fleet["data"].items() if root in img.parents) for img in images]
        chosen = [p.task or p.nearest_task for p in p1]
        assert np.mean([c == t for c, t in zip(chosen, truth)]) >= 0.8
