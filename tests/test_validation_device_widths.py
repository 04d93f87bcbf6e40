"""A device whose bank already holds a task of the wrong width still classifies (issue 15, finding 3).

Receivers now refuse such packets (tests/test_packet_validation.py); a bank written before that
may still hold one.  ``Device.mapper`` leaves it out with a warning instead of crashing every
``classify``, and ``learn_features`` refuses features that are not the ROM's width.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from skill_edge.runtime.device import Device, FeatureBatch, LearnError
from test_packet_validation import honest


def test_a_stored_wrong_width_task_is_left_out_of_the_mapper(rom_dir: Path, tmp_path: Path, caplog):
    dev = Device(tmp_path / "home", rom_dir, providers=["cpu"], agent_id="me")
    d, c2 = dev.engine.feature_dim, dev.engine.trunk_stats_dim
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    x = (np.abs(rng.normal(0, 1, (60, d))) + 2.0 * y[:, None] * (np.arange(d) % 2)).astype(np.float32)
    stats = np.abs(rng.normal(1, 0.2, (60, c2))).astype(np.float32)
    own, _ = dev.learn_features("own", ["a", "b"], x, y, trunk_stats=stats, mappers=("gmmc",))
    dev.bank.put(own)
    narrow = honest("narrow", 1, d=7, trunk=c2 // 2, bb=None)  # as an older receiver let it in
    narrow.meta.rom_fingerprint = dev.fingerprint
    dev.bank.put(narrow)
    with caplog.at_level(logging.WARNING, logger="skill_edge.runtime.device"):
        r = dev.classify_features(FeatureBatch(x[:6], None, stats[:6]), mapper="gmmc", open_set=False)
    assert r["task_names"] == ["own"] and list(r["task_index"]) == [0] * 6
    assert "left out of the task mapper" in caplog.text and "its head reads 7 features" in caplog.text
    with pytest.raises(LearnError, match="do not fit this device's ROM, whose features are 1280 wide"):
        dev.learn_features("wide", ["a", "b"], x[:, :7], y, trunk_stats=stats)
