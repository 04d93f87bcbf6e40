"""`skill-edge sync --rom` checks every packet's widths against the ROM's manifest (issue 15, finding 3).

End to end, with real processes and a real directory transport: a trusted packet whose head is
7 wide reaches a fresh device with an empty bank.  Before, it was accepted, and afterwards every
honest packet was quarantined ("feature size 1280 differs from the device's 7").  Now it is
rejected with the reason, and the honest packet published beside it is accepted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from skill_edge.export.manifest import RomManifest
from skill_edge.runtime.knowledge.bank import KnowledgeBank
from skill_edge.runtime.exchange.keys import DeviceKey, TrustStore
from skill_edge.runtime.knowledge.records import RomShape
from skill_edge.runtime.exchange.packet import PacketCodec
from skill_edge.runtime.exchange.transport import open_transport
from test_packet_validation import honest

SKILL_EDGE = Path(sys.executable).parent / "skill-edge"


@pytest.mark.parametrize("rom_from", ["--rom", "SKILL_EDGE_ROM"])
def test_sync_rejects_a_wrong_width_packet_and_accepts_the_honest_one(rom_dir: Path, tmp_path: Path, rom_from: str):
    """The ROM comes from ``--rom`` or, as for ``learn`` and ``classify``, from ``SKILL_EDGE_ROM``."""
    shape = RomShape.from_manifest(RomManifest.read(rom_dir))
    key = DeviceKey.generate()
    home = tmp_path / "home"
    TrustStore(home / "trust").add("peer", key.public_key)
    packets = []
    for name, widths in (("narrow", dict(d=7, trunk=192, bb=None)),
                         ("cifar", dict(d=shape.feature_dim, trunk=shape.trunk_channels, bb=shape.tail_bias_total))):
        k = honest(name, 1, **widths)
        k.meta.rom_fingerprint = shape.fingerprint
        k.meta.bb_layout_hash = shape.tail_layout_hash if k.bb is not None else ""
        packets.append((k, PacketCodec().encode(k, key)))
    shared = tmp_path / "fleet"
    with open_transport(f"dir:{shared}", "default", state_dir=tmp_path / "peer-state") as tx:
        for k, data in packets:  # the wrong one first: the bank is empty when it arrives
            tx.publish(data, fleet="default", task=k.task, agent_id=k.meta.agent_id, seq=k.meta.seq)
    env = {**os.environ, "SKILL_EDGE_HOME": str(home), "COLUMNS": "300"}
    rom_args = ["--rom", str(rom_dir)] if rom_from == "--rom" else []
    if rom_from == "SKILL_EDGE_ROM":
        env["SKILL_EDGE_ROM"] = str(rom_dir)
    p = subprocess.run([str(SKILL_EDGE), "sync", "--transport", f"dir:{shared}", *rom_args,
                        "--idle", "1", "--timeout", "60"], capture_output=True, text=True, env=env, timeout=300)
    out = p.stdout + p.stderr
    assert "Traceback" not in out
    assert "its head reads 7 features, this device's ROM gives 1280" in out, out
    assert [e.task for e in KnowledgeBank(home / "bank").entries()] == ["cifar"], out


def test_a_fresh_device_without_a_rom_is_told_how_to_name_one(tmp_path: Path, monkeypatch) -> None:
    """Empty bank, no --rom, no SKILL_EDGE_ROM and no default ROM folder: a usage error (exit 2), no traceback."""
    import skill_edge.models
    from typer.testing import CliRunner

    from skill_edge.runtime.cli.sync import app

    monkeypatch.setattr(skill_edge.models, "default_rom_dir", lambda: tmp_path / "no-rom")
    monkeypatch.delenv("SKILL_EDGE_ROM", raising=False)
    r = CliRunner().invoke(app, ["--home", str(tmp_path / "home"), "--transport", f"dir:{tmp_path / 'fleet'}",
                                 "--idle", "0.2"])
    assert r.exit_code == 2, r.output
    assert "the bank is empty and there is no ROM at" in r.output and "--rom ROM_DIR" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
