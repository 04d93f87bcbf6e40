"""Helper process for tests/test_bank*.py: a real writer the tests SIGKILL, or a process holding the lock.

    python tests/bank_writer_proc.py write ROOT SEED       put/replace/remove tasks forever
    python tests/bank_writer_proc.py spawner ROOT          fork a writer per "spawn SEED" line on stdin
    python tests/bank_writer_proc.py hold-lock ROOT SECS   hold the writer lock for SECS seconds

The writer prints ``ready <pid>`` once the bank is open, then ``begin <op> <task> <seq>`` before and
``done <op> <task> <seq>`` after every operation, so the test knows which operation a kill interrupted.
Every version's content is a pure function of (task, seq), so the test can recompute what is allowed.

The spawner exists for speed: the kill test needs hundreds of fresh writer processes, and forking one
from a process that has already imported numpy takes milliseconds instead of a ~0.3 s interpreter start.
It answers ``spawned <pid>`` to ``spawn SEED`` and ``reaped <pid> <exit code>`` to ``reap PID``; the
forked writers share its stdout, so all of a writer's lines arrive before the ``reaped`` line.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

from skill_edge.runtime.knowledge.bank import KnowledgeBank
from skill_edge.runtime.knowledge.records import GmmcAnchor, MahalanobisAnchor, TaskKnowledge, TaskMeta

TASKS = ("birds", "cars", "flowers", "x-rays")
FEATURE_DIM = 256


def _rng(task: str, seq: int) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{task}/{seq}".encode()).digest()[:8], "little"))


def make_knowledge(task: str, seq: int, dim: int = FEATURE_DIM, agent: str = "agent-1") -> TaskKnowledge:
    """Version ``seq`` of ``task`` from ``agent``: recognisable, ~100 kB, with BB/anchors varying by version.

    Versions of one task share their origin agent: the bank keys tasks by (task, agent)."""
    rng = _rng(task, seq)
    c = 3 + seq % 4
    k = TaskKnowledge(
        task=task,
        labels=[f"{task}-class{i}" for i in range(c)],
        head_weight=rng.standard_normal((c, dim)).astype(np.float32),
        head_bias=rng.standard_normal(c).astype(np.float32),
        meta=TaskMeta(agent_id=agent, seq=seq, created=1_700_000_000.0 + seq, n_train=10 * c,
                      source=f"learned:/data/{task}", metrics={"val_acc": float(rng.uniform(0.5, 1.0))}),
        thresholds={"gmmc": float(rng.uniform(-50, 0))},
    )
    if seq % 2:
        k.bb = rng.standard_normal(1280).astype(np.float32)
    k.gmmc = GmmcAnchor(rng.standard_normal((25, dim)).astype(np.float32),
                        rng.uniform(0.1, 2.0, (25, dim)).astype(np.float32),
                        np.full(25, 1 / 25, dtype=np.float32))
    if seq % 3 != 1:
        k.maha = MahalanobisAnchor(rng.standard_normal((c, dim)).astype(np.float32),
                                   rng.standard_normal((5 * c, dim)).astype(np.float32),
                                   np.repeat(np.arange(c), 5).astype(np.float32))
    return k


def make_packet(task: str, seq: int) -> bytes:
    return b"PKT|" + f"{task}|{seq}|".encode() + _rng(task, seq).bytes(4096)


def say(line: str) -> None:
    """One os.write per line: atomic on a pipe, so lines of the spawner and its writers never interleave."""
    os.write(1, f"{line}\n".encode())


def write_forever(root: Path, seed: int) -> None:
    bank = KnowledgeBank(root, lock_timeout=30)
    rng = random.Random(seed)
    seq = max((e.seq for e in bank.entries()), default=0)
    present = {e.task for e in bank.entries()}
    say(f"ready {os.getpid()}")
    while True:
        task = rng.choice(TASKS)
        if task in present and rng.random() < 0.25:
            say(f"begin remove {task} 0")
            bank.remove(task)
            present.discard(task)
            say(f"done remove {task} 0")
        else:
            seq += 1
            say(f"begin put {task} {seq}")
            bank.put(make_knowledge(task, seq), packet_bytes=make_packet(task, seq))
            present.add(task)
            say(f"done put {task} {seq}")


def serve_spawns(root: Path) -> None:
    for line in sys.stdin:
        command, arg = line.split()
        if command == "spawn":
            pid = os.fork()
            if pid == 0:  # the writer: runs until the test kills it
                try:
                    write_forever(root, int(arg))
                finally:
                    os._exit(1)
            say(f"spawned {pid}")
        elif command == "reap":
            _, status = os.waitpid(int(arg), 0)
            say(f"reaped {arg} {os.waitstatus_to_exitcode(status)}")


def hold_lock(root: Path, seconds: float) -> None:
    bank = KnowledgeBank(root)
    with bank._locked():
        say("locked")
        time.sleep(seconds)


if __name__ == "__main__":
    mode, root = sys.argv[1], Path(sys.argv[2])
    if mode == "write":
        write_forever(root, int(sys.argv[3]))
    elif mode == "spawner":
        serve_spawns(root)
    elif mode == "hold-lock":
        hold_lock(root, float(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
