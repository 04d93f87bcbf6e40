"""`skill-edge sync` SIGKILLed while it consumes a folder of packets loses none of them.

The folder transport records a packet as delivered only when SyncService acks it, after the
bank stored, rejected or quarantined it.  Before, ``poll`` recorded every file it had read as
delivered at once, so a kill while the batch was being stored lost the rest of the batch for good.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from skill_edge.runtime.exchange.packet import PacketCodec
from skill_edge.runtime.exchange.transport import DirectoryTransport
from test_sync import make_fleet, random_knowledge

PACKETS = 40
SKILL_EDGE = Path(sys.executable).parent / "skill-edge"


def test_sync_killed_at_random_moments_loses_no_packet(tmp_path: Path) -> None:
    a, b = make_fleet(tmp_path, ["dev-a", "dev-b"])
    share = tmp_path / "share"
    expected = {}
    pub = DirectoryTransport(share, "lab")
    for i in range(PACKETS):
        k = random_knowledge(f"t{i:02d}", "dev-a", 1, seed=1000 + i)
        pub.publish(PacketCodec().encode(k, a.key), fleet="lab", task=k.task, agent_id="dev-a", seq=1)
        expected[k.task] = k.content_hash()
    cmd = [str(SKILL_EDGE), "sync", *b.cli_args(f"dir:{share}", "lab"), "--no-plausibility", "--idle", "0.3"]

    rng = random.Random(15)
    kills, stored_when_killed = 0, []
    records = b.bank_dir / "records"
    for _ in range(40):
        if len(b.tasks()) == PACKETS:
            break
        # kill once the run has stored 1-3 more records, plus 0-40 ms: mid-batch, at a random step
        # (between a bank write and its ack, inside a write, between two packets)
        target = _count(records) + rng.randint(1, 3)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and _count(records) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.04))
        if proc.poll() is not None:
            break  # the run finished on its own: nothing was left to take in
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        stored_when_killed.append(len(b.tasks()))

    final = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stdout + final.stderr
    got = b.tasks()
    lost = sorted(set(expected) - set(got))
    assert not lost, f"{len(lost)} of {PACKETS} packets lost after {kills} kills ({stored_when_killed}): {lost}"
    assert got == expected, "every task is stored bit for bit"
    assert kills >= 10, f"only {kills} runs were still going when the kill came ({stored_when_killed})"
    report = b.bank().verify()
    assert report.ok, report.problems


def _count(folder: Path) -> int:
    try:
        return sum(1 for _ in folder.iterdir())
    except FileNotFoundError:
        return 0
