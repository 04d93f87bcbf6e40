"""Where the simulated devices run: local processes (default) or Ray.

Each device is one ``firmware_sim.agent`` run.  An engine starts all of them at once (they
must run concurrently: every device waits for the others' packets), relays their progress
events, restarts a device that was SIGKILLed (up to ``max_restarts`` times; the device
recovers from its home and the transport), and returns every device's ``DeviceReport``.

``ProcessEngine``: ``python -m skill_edge.firmware_sim.agent SPEC.json`` per device, each
with ``OMP_NUM_THREADS=1`` (and ONNX Runtime / torch limited to ``threads`` inside), so N
devices on two cores share them instead of oversubscribing them.  Progress arrives as JSON
lines on the agent's stdout; its log goes to ``HOME/agent.log``.

``RayEngine``: every device is a Ray task (``agent.ray_entry``), JSON spec in, JSON report
out, progress through a ``ray.util.queue.Queue``.  Locally it starts
``ray.init(num_cpus=2, include_dashboard=False)`` and gives each device ``num_cpus / N`` CPUs
so all N are scheduled together (whole CPUs per device would leave some waiting for a slot
while the running ones wait for their packets: a deadlock).  A SIGKILLed device shows up
as ``WorkerCrashedError`` and is resubmitted.

Running on a Ray cluster::

    ray start --head                        # on the head node
    ray start --address=HEAD:6379           # on every worker node
    RayEngine(address="auto", cpus_per_device=1)   # from a driver on the head node

Every node must see the same ROM directory and task data at the same paths (an NFS share,
or copy them to the same place on each node: the ROM fingerprint is verified at every boot
anyway), and the transport must be reachable from all nodes: ``mqtt://broker:1883`` (the
natural choice on a cluster), or ``dir:`` on a shared file system.  Device homes (keys,
banks) and the feature cache must also be on shared storage if a device may be restarted on
another node; otherwise leave ``cache_dir`` per node.  Progress comes back through Ray
itself, so the driver needs no shared file system for that.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Protocol

from .agent import AgentSpec, DeviceReport

FleetProgress = Callable[[str, str, int, int], None]  # (stage, device, done, total)


class FleetError(RuntimeError):
    """A device failed (not by the planned kill) or the fleet ran out of time; the message names it."""


class Engine(Protocol):
    name: str

    def run(self, specs: list[AgentSpec], progress: FleetProgress | None = None) -> dict[str, DeviceReport]:
        """Run every device to the end; reports by device name."""
        ...


def _tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-n:].decode("utf-8", errors="replace")


def device_env(threads: int) -> dict[str, str]:
    """Environment for one device process: BLAS/OpenMP pools sized before any library loads."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


# ---------------------------------------------------------------------------- local processes
class ProcessEngine:
    """Every device a local ``python -m skill_edge.firmware_sim.agent`` process."""

    name = "process"

    def __init__(self, *, max_restarts: int = 2, python: str = sys.executable, timeout: float | None = None) -> None:
        self.max_restarts = max_restarts
        self.python = python
        self.timeout = timeout  # whole fleet; default: longest converge_timeout + 10 minutes

    def run(self, specs: list[AgentSpec], progress: FleetProgress | None = None) -> dict[str, DeviceReport]:
        events: queue.Queue = queue.Queue()
        procs: dict[str, subprocess.Popen] = {}
        restarts = {s.name: 0 for s in specs}
        by_name = {s.name: s for s in specs}
        reports: dict[str, DeviceReport] = {}
        timeout = self.timeout or max(s.converge_timeout for s in specs) + 600.0
        deadline = time.monotonic() + timeout
        try:
            for spec in specs:
                procs[spec.name] = self._launch(spec, events)
            while len(reports) < len(specs):
                self._relay(events, progress, wait=0.2)
                for name, proc in list(procs.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    del procs[name]
                    spec = by_name[name]
                    if rc == 0:
                        reports[name] = self._read_report(spec)
                    elif rc == -signal.SIGKILL and restarts[name] < self.max_restarts:
                        restarts[name] += 1
                        if progress:
                            progress("restart", name, restarts[name], self.max_restarts)
                        procs[name] = self._launch(spec, events)
                    else:
                        raise FleetError(f"device {name} exited with status {rc}"
                                         f"{' (killed)' if rc < 0 else ''}; end of its log "
                                         f"({Path(spec.home) / 'agent.log'}):\n{_tail(Path(spec.home) / 'agent.log')}")
                if time.monotonic() > deadline:
                    raise FleetError(f"the fleet did not finish within {timeout:.0f} s; still running: "
                                     f"{sorted(procs)} (logs in each device's home: agent.log)")
            self._relay(events, progress, wait=0.0)
            return reports
        finally:
            for proc in procs.values():  # only on failure: stop the devices we started
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)

    def _launch(self, spec: AgentSpec, events: queue.Queue) -> subprocess.Popen:
        home = Path(spec.home)
        home.mkdir(parents=True, exist_ok=True)
        spec_path = home / "agent-spec.json"
        spec = replace(spec, report_path=str(home / "report.json"))
        spec_path.unlink(missing_ok=True)
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # may hold MQTT credentials
        with os.fdopen(fd, "w") as f:
            f.write(spec.to_json())
        Path(spec.report_path).unlink(missing_ok=True)
        with open(home / "agent.log", "ab") as log:
            proc = subprocess.Popen([self.python, "-m", "skill_edge.firmware_sim.agent", str(spec_path)],
                                    stdout=subprocess.PIPE, stderr=log, env=device_env(spec.threads),
                                    cwd=str(home))
        threading.Thread(target=self._read_events, args=(spec.name, proc, events), daemon=True).start()
        return proc

    @staticmethod
    def _read_events(name: str, proc: subprocess.Popen, events: queue.Queue) -> None:
        for line in proc.stdout:
            try:
                e = json.loads(line)
                events.put((e["stage"], e["device"], int(e["done"]), int(e["total"])))
            except (ValueError, KeyError, TypeError):
                continue  # a stray print from a library: not an event
        proc.stdout.close()

    @staticmethod
    def _relay(events: queue.Queue, progress: FleetProgress | None, wait: float) -> None:
        try:
            item = events.get(timeout=wait) if wait > 0 else events.get_nowait()
        except queue.Empty:
            return
        while True:
            if progress:
                progress(*item)
            try:
                item = events.get_nowait()
            except queue.Empty:
                return

    @staticmethod
    def _read_report(spec: AgentSpec) -> DeviceReport:
        path = Path(spec.home) / "report.json"
        if not path.exists():
            raise FleetError(f"device {spec.name} exited cleanly but wrote no report at {path}")
        return DeviceReport.from_dict(json.loads(path.read_text()))


# ---------------------------------------------------------------------------- Ray
class RayEngine:
    """Every device a Ray task; locally on ``num_cpus`` CPUs, or on a cluster with ``address``."""

    name = "ray"

    def __init__(self, *, address: str | None = None, num_cpus: int = 2, cpus_per_device: float | None = None,
                 max_restarts: int = 2, timeout: float | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_device = cpus_per_device
        self.max_restarts = max_restarts
        self.timeout = timeout

    @staticmethod
    def version() -> str:
        import ray

        return ray.__version__

    def run(self, specs: list[AgentSpec], progress: FleetProgress | None = None) -> dict[str, DeviceReport]:
        try:
            import ray
            from ray.util.queue import Queue
        except ImportError as exc:
            raise FleetError('the Ray engine needs Ray: pip install "ray[default]" (or skill-edge[ray])') from exc
        from .agent import ray_entry

        threads = max(s.threads for s in specs)
        started_here = not ray.is_initialized()
        if started_here:
            env = {k: v for k, v in device_env(threads).items()
                   if k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE")}
            kwargs = dict(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(num_cpus=self.num_cpus, **kwargs)
        try:
            cpus = self.cpus_per_device or (1.0 if self.address else self.num_cpus / len(specs))
            remote = ray.remote(ray_entry).options(num_cpus=cpus, max_retries=0, name="skill-edge-device")
            events = Queue()
            by_name = {s.name: s for s in specs}
            restarts = {s.name: 0 for s in specs}
            pending = {remote.remote(s.to_json(), events): s.name for s in specs}
            reports: dict[str, DeviceReport] = {}
            timeout = self.timeout or max(s.converge_timeout for s in specs) + 600.0
            deadline = time.monotonic() + timeout
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                self._relay(events, progress)
                for ref in done:
                    name = pending.pop(ref)
                    try:
                        reports[name] = DeviceReport.from_dict(json.loads(ray.get(ref)))
                    except ray.exceptions.WorkerCrashedError:
                        if restarts[name] >= self.max_restarts:
                            raise FleetError(f"device {name} crashed {restarts[name] + 1} times under Ray") from None
                        restarts[name] += 1
                        if progress:
                            progress("restart", name, restarts[name], self.max_restarts)
                        pending[remote.remote(by_name[name].to_json(), events)] = name
                    except ray.exceptions.RayTaskError as exc:
                        for other in pending:
                            ray.cancel(other, force=True)
                        raise FleetError(f"device {name} failed under Ray: {exc}") from None
                if time.monotonic() > deadline:
                    for other in pending:
                        ray.cancel(other, force=True)
                    raise FleetError(f"the fleet did not finish within {timeout:.0f} s under Ray; still running: "
                                     f"{sorted(pending.values())}")
            self._relay(events, progress)
            return reports
        finally:
            if started_here:
                ray.shutdown()

    @staticmethod
    def _relay(events, progress: FleetProgress | None) -> None:
        while not events.empty():
            try:
                item = events.get_nowait()
            except Exception:  # noqa: BLE001 - ray's queue raises its own Empty
                return
            if progress:
                progress(*item)


def make_engine(name: str, **options) -> Engine:
    """``"process"`` (default) or ``"ray"``; ``options`` go to the engine's constructor."""
    if name == "process":
        return ProcessEngine(**options)
    if name == "ray":
        return RayEngine(**options)
    raise ValueError(f"unknown engine {name!r}; use 'process' or 'ray'")


__all__ = ["Engine", "FleetError", "ProcessEngine", "RayEngine", "device_env", "make_engine"]
