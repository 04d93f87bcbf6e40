"""The newest seq this device's key has signed for each task, kept beside the key.

Peers accept a task's new version only when its seq is higher than the one they hold, and refuse
the same seq with other bytes as equivocation.  The bank remembers the seqs of tasks it holds or
removed, but a bank that is wiped (or restored from an old backup) while the key stays would make
``learn`` start again at seq 1, and every peer would refuse the device's new work for good.  The
ledger lives in ``home/keys/`` with the key whose signatures it counts, is written before a newly
signed packet is stored, and is only ever a floor: a lost or unreadable ledger makes ``learn`` fall
back to the bank alone, as before it existed.

It sits beside ``keys`` but imports nothing from it, so a ``Device`` that only classifies never loads
``cryptography``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

from skill_edge.runtime.atomic import write_atomically

log = logging.getLogger(__name__)

LEDGER_FILE = "signed_seqs.json"  # in the folder ``keys.key_dir`` names, beside ``device.pem``
FORMAT = "skill-edge-signed-seqs/1"


class SeqLedger:
    """``get(task)``: the newest seq ``agent_id`` signed for ``task`` (0 if none); ``record`` raises it."""

    def __init__(self, path: str | Path, agent_id: str) -> None:
        self.path, self.agent_id = Path(path), agent_id

    def _read(self) -> dict[str, int]:
        try:
            doc = json.loads(self.path.read_bytes())
            if doc.get("format") != FORMAT or doc.get("agent") != self.agent_id:
                return {}  # another key's ledger (the key was replaced): none of its seqs are ours
            return {str(t): int(s) for t, s in dict(doc["seqs"]).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring the unreadable seq ledger %s (%s); seqs come from the bank alone", self.path, exc)
            return {}

    def get(self, task: str) -> int:
        return self._read().get(task, 0)

    def seqs(self) -> dict[str, int]:
        """Every task's newest signed seq, from one read of the file."""
        return self._read()

    def record(self, task: str, seq: int) -> None:
        """Raise ``task``'s seq to ``seq`` (never lower it), atomically; raises ``OSError`` (a full disk).
        Two processes learning in one home take turns on a lock file, so neither loses the other's task."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seqs = self._read()
            if seqs.get(task, 0) >= seq:
                return
            seqs[task] = int(seq)
            doc = {"format": FORMAT, "agent": self.agent_id, "seqs": dict(sorted(seqs.items()))}
            write_atomically(self.path, (json.dumps(doc, indent=1) + "\n").encode())
        finally:
            os.close(fd)  # releases the lock
