"""The feature cache never returns stale features: its key covers ROM, decoder and every file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from skill_edge.runtime.rom import preprocess
from skill_edge.runtime.rom.feature_cache import FeatureCache
from skill_edge.runtime.rom.engine import Extraction


@pytest.fixture()
def files(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        p.write_bytes(bytes([i]) * 64)
        out.append(p)
    return out


def test_round_trip_keeps_features_trunk_stats_index_and_failures(tmp_path: Path, files: list[Path]) -> None:
    cache = FeatureCache(tmp_path / "cache", "ab" * 32)
    ex = Extraction(np.arange(8, dtype=np.float32).reshape(2, 4), np.array([0, 2]), [(1, "corrupt")], seconds=1.5,
                    trunk_stats=np.arange(12, dtype=np.float32).reshape(2, 6))
    key = cache.key(files)
    assert cache.load(key) is None
    cache.save(key, ex)
    got = cache.load(key)
    np.testing.assert_array_equal(got.features, ex.features)
    np.testing.assert_array_equal(got.trunk_stats, ex.trunk_stats)
    assert got.index.tolist() == [0, 2] and got.failed == [(1, "corrupt")] and got.seconds == 1.5


def test_an_entry_without_trunk_stats_is_a_miss(tmp_path: Path, files: list[Path]) -> None:
    """Entries written before trunk statistics existed would leave the default anchors without them."""
    cache = FeatureCache(tmp_path, "ab" * 32)
    key = cache.key(files)
    cache.save(key, Extraction(np.ones((1, 4), np.float32), np.array([0])))
    assert cache.load(key) is None


def test_key_changes_with_rom_decoder_file_content_and_kind(tmp_path: Path, files: list[Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = FeatureCache(tmp_path, "ab" * 32)
    base = cache.key(files)
    assert cache.key(files) == base
    assert FeatureCache(tmp_path, "cd" * 32).key(files) != base, "another ROM"
    assert cache.key(files, with_trunk=True) != base, "trunk activations are a different entry"
    assert cache.key(files[:2]) != base, "another file list"
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache.key(files) != base, "a touched image"
    touched = cache.key(files)
    monkeypatch.setattr(preprocess, "DECODER_VERSION", preprocess.DECODER_VERSION + "-next")
    assert cache.key(files) != touched, "a changed decoder"


def test_a_damaged_entry_is_dropped_and_recomputed(tmp_path: Path, files: list[Path]) -> None:
    cache = FeatureCache(tmp_path, "ab" * 32)
    key = cache.key(files)
    path = cache.save(key, Extraction(np.ones((1, 4), np.float32), np.array([0])))
    path.write_bytes(path.read_bytes()[:20])
    assert cache.load(key) is None and not path.exists()
