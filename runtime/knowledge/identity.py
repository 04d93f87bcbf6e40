"""Fleet-wide task identity: a task is its origin agent plus its name, never its name alone.

Two devices may teach the same name (two ``cifar``\\s from two classrooms); a device's own ``mnist``
must survive a peer's ``mnist``.  So the bank, the mapper and every listing key tasks by
``TaskKey(task, agent)``, and show them as ``task@agent`` whenever a name alone would be
ambiguous.  The agent part shown is a short prefix of the agent id (key ids are 64 hex digits);
users may type any unique prefix back (``bank show cifar@3fa2``).

This module is pure string handling so that the bank, the mapper and the CLIs can share it
without importing each other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Characters of the agent id shown after ``@``; enough to tell a fleet's keys apart by eye.
SHORT_AGENT = 8


@dataclass(frozen=True, order=True)
class TaskKey:
    """One task's fleet-wide identity.  Ordered by name first, so listings group same-name tasks."""

    task: str
    agent: str

    @property
    def short(self) -> str:
        """``task@agentprefix``: how listings show the task when its name alone is ambiguous."""
        return f"{self.task}@{short_agent(self.agent)}"

    @property
    def full(self) -> str:
        return f"{self.task}@{self.agent}"


def short_agent(agent: str) -> str:
    """The first ``SHORT_AGENT`` characters of an agent id ("-" for an empty one)."""
    return agent[:SHORT_AGENT] if agent else "-"


def display_names(keys: Sequence[TaskKey]) -> list[str]:
    """A unique label per key: the bare name where it is unique in ``keys``, else ``task@agent``.

    The agent part is the short prefix unless two same-name tasks share it, then the whole id.
    Keys that are equal stay equal (the caller decides whether duplicates are an error).
    """
    by_name = Counter(k.task for k in keys)
    shorts = Counter(k.short for k in keys)
    return [k.task if by_name[k.task] == 1 else (k.short if shorts[k.short] == 1 else k.full) for k in keys]


def match(ref: str, keys: Iterable[TaskKey]) -> list[TaskKey]:
    """The keys a user's ``TASK`` or ``TASK@AGENT`` (agent id or a prefix of it) may mean.

    A ref that is exactly some task's name matches every task of that name (even when the
    name itself contains ``@``); otherwise the part after the last ``@`` selects agents by
    prefix, and an agent id given in full wins over longer ids it prefixes.
    """
    keys = list(keys)
    named = [k for k in keys if k.task == ref]
    if named or "@" not in ref:
        return named
    task, agent = ref.rsplit("@", 1)
    hits = [k for k in keys if k.task == task and k.agent.startswith(agent)]
    exact = [k for k in hits if k.agent == agent]
    return exact or hits
