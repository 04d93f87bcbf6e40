"""Crash safety of the knowledge bank against a real writer process killed with SIGKILL.

The writer (tests/bank_writer_proc.py) puts, replaces and removes tasks with fsync'd writes and reports
``begin``/``done`` for every operation.  After each kill the bank must verify clean, every task that the
writer had finished must be exactly as left, and the one interrupted operation may be absent or whole --
never partial.  Every version's content is recomputed from (task, seq) and compared by content hash.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from skill_edge.runtime.knowledge.bank import KnowledgeBank, UnknownTaskError, _Index

HELPER = Path(__file__).with_name("bank_writer_proc.py")
_spec = importlib.util.spec_from_file_location("bank_writer_proc", HELPER)
writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writer)


class Lines:
    """Lines from a pipe, with a deadline, so a writer that dies silently fails the test instead of hanging.

    Lines from the spawner and its forked writer may interleave in any order (a writer can say ``ready``
    before the spawner says ``spawned``), so every line is kept in ``log`` and ``wait_for`` searches it.
    """

    def __init__(self, stream) -> None:
        self.fd = stream.fileno()
        self.buffer = b""
        self.log: list[str] = []

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log:
                if line.startswith(prefix):
                    return line
            while b"\n" not in self.buffer:
                ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise AssertionError(f"no {prefix!r} line from the writer within {timeout}s; "
                                         f"last lines {self.log[-5:]}; processes: {process_states()}")
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise AssertionError("the writer's pipe closed")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.log.append(line.decode())

    def take(self) -> list[str]:
        """Everything read so far; starts a fresh log."""
        log, self.log = self.log, []
        return log


def process_states() -> str:
    """State and kernel wait channel of this test's descendants, to explain a hang."""
    out = []
    pending = [os.getpid()]
    while pending:
        pid = pending.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
            wchan = Path(f"/proc/{pid}/wchan").read_text()
        except OSError:
            continue
        out.append(f"{pid}:{state}:{wchan or '-'}")
        pending += [int(c) for c in children]
    return " ".join(out)


def start_writer(root: Path, seed: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HELPER), "write", str(root), str(seed)],
                            stdout=subprocess.PIPE)


def check_whole(bank: KnowledgeBank, task: str, quiet: bool = True) -> int:
    """The task's seq, after checking its content and packet are exactly that version's."""
    knowledge = bank.get(task)
    seq = knowledge.meta.seq
    assert knowledge.content_hash() == writer.make_knowledge(task, seq).content_hash(), (task, seq)
    packet = bank.packet_bytes(task)  # a separate read: a running writer may have replaced the task since
    packet_seq = int(packet.split(b"|")[2])
    assert packet == writer.make_packet(task, packet_seq), (task, packet_seq)
    if quiet:
        assert packet_seq == seq
    return seq


def crash_leftovers(root: Path) -> int:
    """Staging files plus record dirs no index references: traces of a kill that landed mid-write."""
    if not (root / "records").exists():
        return 0
    referenced: set[str] = set()
    for name in ("index.json", "index.prev.json"):
        if (root / name).exists():
            referenced |= _Index.from_bytes((root / name).read_bytes()).records()
    orphans = [d for d in (root / "records").iterdir() if d.name not in referenced]
    return len(list((root / "staging").iterdir())) + len(orphans)


def kill_delay(rng: random.Random) -> float:
    r = rng.random()
    if r < 0.3:
        return rng.uniform(0.0, 0.003)  # lands in the first put, often mid-file
    if r < 0.75:
        return rng.uniform(0.0, 0.06)  # within the first put or two (one fsync'd put takes ~30 ms)
    return rng.uniform(0.06, 0.6)  # lets the writer get through several operations


@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_partial_task(tmp_path: Path) -> None:
    kills = int(os.environ.get("BANK_KILLS", "200"))
    root = tmp_path / "bank"
    root.mkdir()
    rng = random.Random(7)
    state: dict[str, int] = {}  # task -> seq, as verified after the previous kill
    stats: Counter[str] = Counter()
    started = time.monotonic()
    spawner = subprocess.Popen([sys.executable, str(HELPER), "spawner", str(root)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    lines = Lines(spawner.stdout)
    pid = None
    try:
        for cycle in range(kills):
            stats_before_kill = crash_leftovers(root)
            spawner.stdin.write(f"spawn {cycle}\n".encode())
            pid = int(lines.wait_for("spawned ").split()[1])
            if rng.random() < 0.1:
                time.sleep(rng.uniform(0.0, 0.01))  # may land in the writer's own start-up recovery
            else:
                assert lines.wait_for("ready") == f"ready {pid}"
                time.sleep(kill_delay(rng))
            os.kill(pid, signal.SIGKILL)
            spawner.stdin.write(f"reap {pid}\n".encode())
            assert lines.wait_for("reaped ") == f"reaped {pid} -{int(signal.SIGKILL)}"
            pid = None
            reported = [line for line in lines.take() if line.split()[0] in ("begin", "done")]

            # replay what the writer reported; at most one operation was in flight
            finished = dict(state)
            in_flight: tuple[str, str, int] | None = None
            for line in reported:
                phase, op, task, seq = line.split()
                if phase == "begin":
                    in_flight = (op, task, int(seq))
                else:
                    assert in_flight == (op, task, int(seq)), line
                    in_flight = None
                    if op == "put":
                        finished[task] = int(seq)
                    else:
                        finished.pop(task)
                    stats["ops_done"] += 1
            stats["killed_mid_op"] += in_flight is not None
            stats["left_crash_traces"] += stats_before_kill == 0 and crash_leftovers(root) > 0

            # in a third of the cycles read through a reader that cannot clean up first (we hold the lock),
            # so the next writer starts on -- and may be killed during -- the recovery of a dirty bank
            dirty_read = cycle % 3 == 2
            blocker = os.open(root / "lock", os.O_RDWR | os.O_CREAT) if dirty_read else None
            try:
                if blocker is not None:
                    fcntl.flock(blocker, fcntl.LOCK_EX | fcntl.LOCK_NB)
                bank = KnowledgeBank(root, lock_timeout=0)
                actual = {e.task: check_whole(bank, e.task) for e in bank.entries()}
            finally:
                if blocker is not None:
                    os.close(blocker)
            if not dirty_read:
                report = bank.verify()
                assert report.ok and not report.orphans and not report.staging_leftovers, report
                assert sorted(report.tasks_checked) == sorted(actual)

            for task in writer.TASKS:
                allowed = {finished.get(task)}
                if in_flight is not None and in_flight[1] == task:
                    allowed.add(in_flight[2] if in_flight[0] == "put" else None)
                    stats["in_flight_took_effect"] += actual.get(task) != finished.get(task)
                assert actual.get(task) in allowed, (cycle, task, actual.get(task), allowed, in_flight)
            state = actual
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        spawner.kill()
        spawner.wait()
    elapsed = time.monotonic() - started
    print(f"\nbank kill test: {kills} SIGKILLs in {elapsed:.1f}s; {dict(stats)}")
    final = KnowledgeBank(root).verify()
    assert final.ok and not final.orphans and not final.staging_leftovers
    # the kills really did land inside writes, and the writer made progress between them
    assert stats["killed_mid_op"] >= kills // 3, stats
    assert stats["left_crash_traces"] >= kills // 10, stats
    assert stats["ops_done"] >= kills // 2, stats


def index_generation(root: Path) -> int:
    """The bank's index generation (one per committed write), read the way any reader may: without a lock."""
    try:
        return int(json.loads((root / "index.json").read_bytes())["generation"])
    except (OSError, ValueError, KeyError):
        return 0


def test_readers_see_whole_tasks_while_a_writer_runs(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    proc = start_writer(root, seed=1)
    reads = vanished = 0
    try:
        Lines(proc.stdout).wait_for("ready")
        reader = KnowledgeBank(root)
        # at least 2 s; on a loaded machine, on until enough happened (>= 50 reads, >= 10 index generations)
        start, first = time.monotonic(), index_generation(root)
        while time.monotonic() < start + 2.0 or (
                (reads < 50 or index_generation(root) - first < 10) and time.monotonic() < start + 60.0):
            for entry in reader.entries():
                try:
                    assert check_whole(reader, entry.task, quiet=False) >= 1
                    reads += 1
                except UnknownTaskError:
                    vanished += 1  # removed between listing and reading: allowed
            for knowledge in reader.load_all():  # one consistent generation, every task whole
                expected = writer.make_knowledge(knowledge.task, knowledge.meta.seq)
                assert knowledge.content_hash() == expected.content_hash()
                reads += 1
    finally:
        proc.kill()
        proc.wait()
    writes = sum(1 for line in proc.stdout.read().splitlines() if line.startswith(b"done"))
    proc.stdout.close()
    assert reads >= 50 and writes >= 10, (reads, writes)
    assert KnowledgeBank(root).verify().ok
