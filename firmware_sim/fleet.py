"""The fleet lab: N simulated devices learn their tasks in parallel, share packets, and all end up knowing all.

``run_fleet(FleetConfig(...), progress=callback) -> FleetResult`` is the whole experiment:

1. provision (the "factory"): a home per device under ``workdir/devices/agent-<i>`` with its own
   Ed25519 key (``keys.init_device_key``) and every device's public key in its trust store;
   all devices use the same ROM directory (each verifies it at boot);
2. run every device (``agent.run_agent``) on an engine (``engines``: local processes, or Ray):
   learn its task(s), publish its signed packet through a real transport (a shared folder by
   default, Mosquitto for ``mqtt://``), receive the others' through ``SyncService`` +
   ``PacketReceiver`` with the plausibility check, until every bank holds every task; then
   classify every task's test set with no task oracle;
3. gather: bank convergence (content hashes), whether all devices agree, per-task accuracies,
   the Fig. 9 MAC table (``metrics``), link costs (``link``), wall-clock times.

``progress(stage, device, done, total)`` is called from the driver thread with stages
"provision", "boot", "extract", "learn", "receive", "evaluate", "done", "restart" and, for
the optional measured single-agent baseline, the same stages for device "single".

The lead's CLI (``skill-edge demo`` / ``fleet``) builds a ``FleetConfig`` and calls ``run_fleet``;
nothing here prints.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from skill_edge.runtime.learn.bb import DEFAULT_BB_RECIPE

from .agent import KILL_POINTS, AgentError, AgentSpec, DeviceReport, TaskSource, load_feature_task
from .engines import FleetError, make_engine
from .link import LinkModel
from .metrics import MAPPERS, MacModel, MacRow, TeacherWork, mac_table, rows_to_dicts

FleetProgress = Callable[[str, str, int, int], None]
DEFAULT_QUOTA_BYTES = 64 * 1024 * 1024


class FleetConfigError(ValueError):
    """A fleet configuration that cannot run; the message says what to change."""


@dataclass
class FleetConfig:
    """One fleet experiment.  Only ``rom_dir``, ``tasks`` and ``workdir`` are required."""

    rom_dir: str | Path
    tasks: dict[str, str | Path]  # task name -> ImageFolder dir, or feature-task file (*.safetensors); ordered
    workdir: str | Path  # device homes, transport folder, feature cache, eval features go here
    agents: int | None = None  # default: one per task (the paper's T = N)
    assignment: dict[str, list[str]] | None = None  # device name -> its tasks; default round-robin
    transport: str | None = None  # "dir:PATH" or "mqtt://host:port"; default dir:<workdir>/transport
    fleet: str | None = None  # fleet name; default a fresh "lab-<hex>" so old retained messages never mix in
    mqtt_options: dict[str, Any] = field(default_factory=dict)  # MqttConfig fields (username, chunk_size, ...)
    engine: str = "process"  # "process" | "ray"
    ray_address: str | None = None  # e.g. "auto" on a cluster; None starts a local Ray
    ray_num_cpus: int = 2
    threads: int = 1  # per device (ONNX Runtime, torch, OpenMP)
    providers: list[str] | None = None  # ROM backends, e.g. ["cpu"]; default: best available
    bb: bool = False
    bb_epochs: int = DEFAULT_BB_RECIPE.epochs  # the device default
    mappers: tuple[str, ...] = MAPPERS
    k: int = 25  # GMMC components
    m: int = 5  # Mahalanobis exemplars per class
    seed: int = 0
    budget: str | int | None = None  # packet byte budget ("64KB"); None = lossless
    # per-mapper budgets, e.g. {"gmmc": "48KB"}: each single-anchor packet under its own cap (agent._encode)
    anchor_budgets: dict[str, str | int] = field(default_factory=dict)
    quota_bytes: int | None = DEFAULT_QUOTA_BYTES  # each device's bank quota (flash)
    cache_dir: str | Path | None = None  # feature cache shared by all devices; default <workdir>/feature-cache
    link: LinkModel = field(default_factory=LinkModel)
    plausibility: bool = True
    kill: dict[str, str] = field(default_factory=dict)  # device -> kill point, e.g. {"agent-2": "after_learn"}
    max_restarts: int = 2
    converge_timeout: float = 300.0  # per device, seconds of waiting for the others' packets
    mac_model: MacModel = field(default_factory=MacModel)
    sequential_baseline: bool = False  # also run one agent learning every task in sequence (measured)
    save_eval_features: bool = True  # write each task's test features + labels under <workdir>/eval
    save_trunk: bool = False  # ... and trunk activations (BB curves; ~37 KB per image for Lite0)
    # reuse an existing workdir: the fleet keeps its name, a device that finished (its report is there,
    # from the same spec) is not run again, the others recover from their banks and the transport
    resume: bool = False
    # at most this many devices classify the fleet's test sets at once (None: all).  Each device's own
    # peak memory is what it is; this bounds the sum, so 100+ devices fit one machine's RAM
    max_concurrent_evaluations: int | None = None
    eval_max_per_task: int | None = None  # classify at most this many test images per task (the same on every device)
    max_concurrent_learning: int | None = None  # at most this many devices learn at once (None: all)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with secrets (an MQTT password) redacted: this ends up in result files."""
        d = json.loads(json.dumps(asdict(self), default=str))
        if d["mqtt_options"].get("password"):
            d["mqtt_options"]["password"] = "***"
        return d


@dataclass
class FleetResult:
    """Everything a fleet run measured; ``to_dict`` is JSON-serialisable, ``from_dict`` its inverse."""

    agents: list[str]
    tasks: list[str]
    assignment: dict[str, list[str]]
    engine: str
    engine_version: str  # "ray 2.60.0" or "python 3.x"
    transport: str
    fleet: str
    rom_fingerprint: str
    macs_per_image: dict[str, int]
    bb: bool
    mappers: list[str]
    link: dict[str, Any]
    converged: bool  # every device holds every task, and all banks are identical
    problems: list[str]
    bank_digests: dict[str, str]  # device -> sha256 over its (task, content hash) pairs
    bank_hashes: dict[str, dict[str, str]]  # device -> task -> content hash
    devices_agree: bool  # identical predictions on every test set
    disagreements: list[str]
    restarts: dict[str, int]
    timings: dict[str, dict[str, Any]]  # device -> {"durations": ..., "times": ...}
    bytes: dict[str, dict[str, float]]  # device -> sent/received packet and wire bytes, simulated link seconds
    learn: dict[str, dict[str, Any]]  # task -> the teacher's learn record (work counts, seconds, packet sizes)
    comm_bytes_per_task: dict[str, dict[str, int]]  # task -> {"as_sent", "gmmc", "maha"} packet bytes
    student_comm_bytes: dict[str, dict[str, int]]  # mapper -> device -> bytes that student received
    mac_rows: list[MacRow]
    mac_model: dict[str, Any]
    mean_no_oracle_acc: dict[str, float]  # mapper -> mean over tasks (and devices)
    mean_task_id_acc: dict[str, float]
    mean_unknown_rate: dict[str, float]
    mean_oracle_acc: float
    per_task_accuracy: dict[str, dict[str, dict[str, float]]]  # device -> mapper -> task -> no-oracle acc
    per_task_task_id_accuracy: dict[str, dict[str, dict[str, float]]]
    per_task_oracle_accuracy: dict[str, dict[str, float]]  # device -> task -> acc
    reference_device: str
    predictions: dict[str, dict[str, dict[str, list]]]  # reference device: mapper -> task -> arrays
    test_labels: dict[str, list[int]]  # task -> test labels (class index), aligned with predictions
    eval_features: dict[str, str]  # task -> safetensors with "features", "labels", "trunk_stats" (+ "trunk_acts")
    bank_dirs: dict[str, str]
    sync: dict[str, dict[str, int]]
    quarantined: dict[str, list[str]]
    wall: dict[str, Any]
    workdir: str
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mac_rows"] = rows_to_dicts(self.mac_rows)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FleetResult":
        d = dict(d)
        d["mac_rows"] = [MacRow.from_dict(r) for r in d["mac_rows"]]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FleetResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def row(self, setting: str, mapper: str) -> MacRow:
        for r in self.mac_rows:
            if r.setting == setting and r.mapper == mapper:
                return r
        raise KeyError(f"no {setting} row for mapper {mapper!r}")


# ---------------------------------------------------------------------------- configuration
@dataclass
class _Plan:
    rom_dir: Path
    workdir: Path
    tasks: list[TaskSource]
    assignment: dict[str, list[str]]
    transport: str
    fleet: str
    cache_dir: Path
    budget: int | None
    anchor_budgets: dict[str, int]


def _check_feature_task(name: str, path: Path) -> None:
    """Refuse, before any device starts, a feature task the default anchors cannot be fitted from."""
    from skill_edge.runtime.mapping.anchors import DEFAULT_TRANSFORM, needs_trunk_stats

    try:
        ft = load_feature_task(path)
    except AgentError as exc:
        raise FleetConfigError(f"task {name!r}: {exc}") from exc
    if needs_trunk_stats(DEFAULT_TRANSFORM) and (ft.train_trunk_stats is None or ft.test_trunk_stats is None):
        raise FleetConfigError(f"task {name!r}: {path} has no trunk statistics, which the anchors "
                               f"({DEFAULT_TRANSFORM}) need; save it with FeatureTask(train_trunk_stats="
                               "Extraction.trunk_stats, test_trunk_stats=...)")


def _plan(cfg: FleetConfig) -> _Plan:
    from skill_edge.runtime.exchange.codec import parse_size

    if not cfg.tasks:
        raise FleetConfigError("a fleet needs at least one task (FleetConfig.tasks = {name: folder})")
    tasks = []
    for name, path in cfg.tasks.items():
        p = Path(path).expanduser().resolve()
        if not p.exists():
            raise FleetConfigError(f"task {name!r}: {p} does not exist (an ImageFolder dir or a feature-task file)")
        tasks.append(TaskSource(str(name), str(p)))
        if cfg.bb and tasks[-1].kind == "features":
            raise FleetConfigError(f"task {name!r} is given as features; BB training needs images (bb=False)")
        if tasks[-1].kind == "features":
            _check_feature_task(name, p)
    bad = [m for m in cfg.mappers if m not in MAPPERS] + [m for m in cfg.anchor_budgets if m not in cfg.mappers]
    if bad or not cfg.mappers:
        raise FleetConfigError(f"mappers must be a non-empty subset of {MAPPERS} and anchor_budgets may only name "
                               f"them; got mappers {list(cfg.mappers)}, anchor_budgets {sorted(cfg.anchor_budgets)}")
    if cfg.assignment is not None:
        assignment = {str(d): list(ts) for d, ts in cfg.assignment.items()}
        given = [t for ts in assignment.values() for t in ts]
        if sorted(given) != sorted(cfg.tasks):
            raise FleetConfigError(f"assignment must give every task to exactly one device; tasks "
                                   f"{sorted(cfg.tasks)}, assigned {sorted(given)}")
    else:
        n = cfg.agents or len(tasks)
        if not 1 <= n <= len(tasks):
            raise FleetConfigError(f"agents must be between 1 and the number of tasks ({len(tasks)}), got {n}")
        assignment = {f"agent-{i}": [t.name for t in tasks[i::n]] for i in range(n)}
    for device, point in cfg.kill.items():
        if device not in assignment:
            raise FleetConfigError(f"kill names device {device!r}; devices are {sorted(assignment)}")
        if point not in KILL_POINTS:
            raise FleetConfigError(f"kill point {point!r} for {device}; choose from {KILL_POINTS}")
    workdir = Path(cfg.workdir).expanduser().resolve()
    if (workdir / "devices").exists() and not cfg.resume:
        raise FleetConfigError(f"{workdir} already holds a fleet run; pick an empty workdir, delete it, "
                               f"or pass resume=True to let the devices recover from their banks")
    rom_dir = Path(cfg.rom_dir).expanduser().resolve()
    transport = cfg.transport or f"dir:{workdir / 'transport'}"
    fleet = cfg.fleet or (_stored_fleet_name(workdir) if cfg.resume else None) or f"lab-{uuid.uuid4().hex[:8]}"
    budget = parse_size(cfg.budget) if cfg.budget is not None else None
    anchor_budgets = {k: parse_size(v) for k, v in cfg.anchor_budgets.items()}
    cache = Path(cfg.cache_dir).expanduser().resolve() if cfg.cache_dir else workdir / "feature-cache"
    return _Plan(rom_dir, workdir, tasks, assignment, transport, fleet, cache, budget, anchor_budgets)


def _stored_fleet_name(workdir: Path) -> str | None:
    """The fleet name an earlier run in ``workdir`` used: a resumed run must publish under the same one."""
    path = workdir / "fleet-name.txt"
    return (path.read_text().strip() or None) if path.exists() else None


def _finished_reports(specs: list[AgentSpec]) -> dict[str, DeviceReport]:
    """Devices of an interrupted run that finished: their report is in their home, written by a run of the
    same spec (the process engine writes both).  They are not run again; their packets are in the transport."""
    out = {}
    for spec in specs:
        home = Path(spec.home)
        report, written = home / "report.json", home / "agent-spec.json"
        if not (report.exists() and written.exists()):
            continue
        same = dataclasses.replace(spec, report_path=str(report)).to_json()
        if written.read_text() == same:
            out[spec.name] = DeviceReport.from_dict(json.loads(report.read_text()))
    return out


def provision(homes: dict[str, Path]) -> dict[str, str]:
    """Give every device a key (kept if it has one) and trust every device's public key; key ids by device."""
    from skill_edge.runtime.exchange.keys import KeyStoreError, TrustStore, init_device_key, load_device_key

    keys = {}
    for name, home in homes.items():
        try:
            keys[name] = load_device_key(home)
        except KeyStoreError:
            keys[name] = init_device_key(home)
    for home in homes.values():
        trust = TrustStore(home / "trust")
        for name, key in keys.items():
            if trust.get(key.key_id) is None:
                trust.add(name, key.public_key, overwrite=True)
    return {name: k.key_id for name, k in keys.items()}


def _spec(cfg: FleetConfig, plan: _Plan, name: str, home: Path, learn: list[str], *, evaluate: bool = True,
          eval_dir: Path | None = None, transport: str | None = None, fleet: str | None = None,
          cache_dir: Path | None = None) -> AgentSpec:
    by_name = {t.name: t for t in plan.tasks}
    return AgentSpec(
        name=name, home=str(home), rom_dir=str(plan.rom_dir), learn=[by_name[t] for t in learn],
        fleet_tasks=list(plan.tasks), transport=transport or plan.transport, fleet=fleet or plan.fleet,
        mqtt_options=dict(cfg.mqtt_options), quota_bytes=cfg.quota_bytes, cache_dir=str(cache_dir or plan.cache_dir),
        threads=cfg.threads, providers=list(cfg.providers) if cfg.providers else None, bb=cfg.bb,
        bb_epochs=cfg.bb_epochs, mappers=list(cfg.mappers), k=cfg.k, m=cfg.m, seed=cfg.seed, budget=plan.budget,
        anchor_budgets=dict(plan.anchor_budgets) or None, link=asdict(cfg.link), plausibility=cfg.plausibility,
        kill=cfg.kill.get(name),
        converge_timeout=cfg.converge_timeout, evaluate=evaluate, eval_dir=str(eval_dir) if eval_dir else None,
        save_trunk=cfg.save_trunk, eval_slots=cfg.max_concurrent_evaluations, eval_max_per_task=cfg.eval_max_per_task,
        eval_slot_dir=str(Path(cfg.workdir) / "eval-slots") if cfg.max_concurrent_evaluations else None,
        learn_slots=cfg.max_concurrent_learning,
        learn_slot_dir=str(Path(cfg.workdir) / "learn-slots") if cfg.max_concurrent_learning else None)


def _check_transport(cfg: FleetConfig, plan: _Plan) -> None:
    """Open the fleet's transport once before any device starts: a mistyped spec or an unreachable
    broker is one clear error, not every device failing after its connect timeout."""
    from skill_edge.runtime.exchange.transport import TransportError, is_mqtt, open_transport

    spec = plan.transport
    options = {**cfg.mqtt_options, "connect_timeout": min(float(cfg.mqtt_options.get("connect_timeout", 15.0)), 5.0)}
    try:
        open_transport(spec, plan.fleet, **options).close()  # a folder transport ignores the MQTT options
    except (ValueError, TransportError, OSError) as exc:
        hint = (" (start a broker, e.g. `mosquitto -d`, or leave --transport out for the directory transport)"
                if is_mqtt(spec) else "")
        raise FleetConfigError(f"transport {spec!r}: {exc}{hint}") from exc


def _engine(cfg: FleetConfig):
    if cfg.engine == "ray":
        return make_engine("ray", address=cfg.ray_address, num_cpus=cfg.ray_num_cpus, max_restarts=cfg.max_restarts)
    if cfg.engine == "process":
        return make_engine("process", max_restarts=cfg.max_restarts)
    raise FleetConfigError(f"engine must be 'process' or 'ray', got {cfg.engine!r}")


def _engine_version(name: str) -> str:
    if name == "ray":
        import ray

        return f"ray {ray.__version__}"
    return f"python {platform.python_version()}"


# ---------------------------------------------------------------------------- the run
def run_fleet(config: FleetConfig, progress: FleetProgress | None = None) -> FleetResult:
    """Provision, run and measure one fleet; raises ``FleetConfigError`` / ``FleetError`` with the reason."""
    from skill_edge.export.manifest import RomError, verify_rom

    plan = _plan(config)
    try:
        manifest = verify_rom(plan.rom_dir)
    except RomError as exc:
        raise FleetConfigError(f"the fleet's ROM is unusable: {exc}") from exc
    engine = _engine(config)
    _check_transport(config, plan)
    homes = {name: plan.workdir / "devices" / name for name in plan.assignment}
    for i, (name, home) in enumerate(homes.items()):
        if progress:
            progress("provision", name, i, len(homes))
        home.mkdir(parents=True, exist_ok=True)
    provision(homes)
    (plan.workdir / "fleet-name.txt").write_text(plan.fleet + "\n")
    reference = next(iter(plan.assignment))
    eval_dir = plan.workdir / "eval" if config.save_eval_features else None
    specs = [_spec(config, plan, name, homes[name], tasks, eval_dir=eval_dir if name == reference else None)
             for name, tasks in plan.assignment.items()]
    t0 = time.time()
    reports = _finished_reports(specs) if config.resume else {}
    for name in reports:
        if progress:
            progress("done", name, 1, 1)
    todo = [s for s in specs if s.name not in reports]
    if todo:
        reports.update(engine.run(todo, progress))
    if config.resume:  # the clock starts at the first launch of the run, which the devices' reports remember
        t0 = min([t0] + [r.times.get("process_start", t0) for r in reports.values()])
    t_end = time.time()
    sequential = _sequential_baseline(config, plan, progress) if config.sequential_baseline else None
    return _result(config, plan, manifest, reports, reference, t0, t_end, sequential)


def _sequential_baseline(cfg: FleetConfig, plan: _Plan, progress: FleetProgress | None) -> dict[str, Any]:
    """One agent learning every task in sequence, with a cold feature cache of its own: the measured baseline."""
    root = plan.workdir / "single"
    if root.exists():
        shutil.rmtree(root)
    home = root / "home"
    home.mkdir(parents=True)
    provision({"single": home})
    spec = _spec(cfg, plan, "single", home, [t.name for t in plan.tasks], evaluate=False,
                 transport=f"dir:{root / 'transport'}", fleet="single", cache_dir=root / "feature-cache")
    spec.kill = None
    t0 = time.time()
    report = make_engine("process", max_restarts=0).run([spec], progress)["single"]
    return {"launched_at": t0, "learned_at": report.times["learned"],
            "wall_s": report.times["learned"] - t0,
            "learn_s": report.durations.get("learn_s"), "boot_s": report.durations.get("boot_s"),
            "learn_cpu_s": sum(r["learn_cpu_s"] for r in report.learn_records)}


def _mean(values: list[float]) -> float:
    return float(statistics.fmean(values)) if values else float("nan")


def _result(cfg: FleetConfig, plan: _Plan, manifest, reports: dict[str, DeviceReport], reference: str,
            t0: float, t_end: float, sequential: dict[str, Any] | None) -> FleetResult:
    agents = list(plan.assignment)
    task_names = [t.name for t in plan.tasks]
    problems: list[str] = []
    # ----- who learned what
    records: dict[str, dict] = {}
    for name in agents:
        for rec in reports[name].learn_records:
            records[rec["task"]] = rec
    missing_records = [t for t in task_names if t not in records]
    if missing_records:
        problems.append(f"no learn record for {missing_records}")
    # ----- convergence and agreement
    bank_hashes = {n: reports[n].bank for n in agents}
    for n in agents:
        if not reports[n].converged:
            problems.append(f"{n} did not converge: missing {reports[n].missing}")
        if reports[n].quarantined:
            problems.append(f"{n} quarantined {reports[n].quarantined}")
    digests = {n: reports[n].bank_digest for n in agents}
    if len(set(digests.values())) > 1:
        problems.append("banks differ between devices: " + ", ".join(f"{n}={d[:12]}" for n, d in digests.items()))
    converged = all(reports[n].converged for n in agents) and len(set(digests.values())) == 1
    disagreements = []
    ref = reports[reference]
    for n in agents:
        if reports[n].prediction_digest != ref.prediction_digest:
            for mp, per_task in reports[n].accuracy.items():
                for t, acc in per_task.items():
                    if ref.accuracy.get(mp, {}).get(t) != acc:
                        disagreements.append(f"{n} {mp} {t}: {acc:.4f} vs {reference} "
                                             f"{ref.accuracy.get(mp, {}).get(t)}")
            if not disagreements:
                disagreements.append(f"{n}: predictions differ from {reference} (same accuracies)")
    # ----- bytes and link
    by_device: dict[str, dict[str, float]] = {}
    for n in agents:
        link = reports[n].link
        by_device[n] = {"packet_bytes_sent": link["sent"]["packet_bytes"],
                        "wire_bytes_sent": link["sent"]["wire_bytes"], "sim_send_s": link["sent"]["seconds"],
                        "packets_received": link["received"]["packets"],
                        "packet_bytes_received": link["received"]["packet_bytes"],
                        "wire_bytes_received": link["received"]["wire_bytes"],
                        "sim_receive_s": link["received"]["seconds"],
                        "retransmissions_received": link["received"]["retransmissions"],
                        "bank_bytes": reports[n].bank_bytes, "peak_rss_mb": reports[n].peak_rss_mb}
    comm_per_task = {t: dict(records[t]["packet_bytes_by_anchor"]) for t in task_names if t in records}
    student_bytes: dict[str, dict[str, int]] = {}
    for mp in cfg.mappers:
        student_bytes[mp] = {}
        for n in agents:
            attempts: dict[str, int] = {}  # the first delivery of each task that got through the receiver
            for x in reports[n].received:
                if x["status"] in ("accepted", "duplicate"):
                    attempts.setdefault(x["task"], x["attempts"])
            total = 0
            for t in task_names:
                if t in plan.assignment[n] or t not in comm_per_task or t not in attempts:
                    continue
                total += comm_per_task[t].get(mp, comm_per_task[t]["as_sent"]) * attempts[t]
            student_bytes[mp][n] = total
    # ----- accuracy
    mappers = [mp for mp in cfg.mappers if mp in ref.accuracy]
    mean_acc = {mp: _mean([a for n in agents for a in reports[n].accuracy.get(mp, {}).values()]) for mp in mappers}
    mean_tid = {mp: _mean([a for n in agents for a in reports[n].task_id_accuracy.get(mp, {}).values()])
                for mp in mappers}
    mean_unk = {mp: _mean([a for n in agents for a in reports[n].unknown_rate.get(mp, {}).values()])
                for mp in mappers}
    mean_oracle = _mean([a for n in agents for a in reports[n].oracle_accuracy.values()])
    # ----- MACs
    works = [TeacherWork.from_dict(records[t]["work"]) for t in task_names if t in records]
    sent_exemplars = sum(int(records[t].get("maha_exemplars_sent", records[t]["work"]["maha_exemplars"]))
                         for t in records)
    rows = mac_table(works, n_agents=len(agents), student_comm_bytes={mp: list(v.values())
                                                                      for mp, v in student_bytes.items()},
                     n_exemplars=sent_exemplars, n_class_means=sum(w.n_classes for w in works),
                     feature_dim=max((w.anchor_width for w in works), default=manifest.feature_dim), bb=cfg.bb,
                     accuracy=mean_acc, mappers=cfg.mappers,
                     model=cfg.mac_model)
    for r in rows:
        r.notes["tasks_with_bb"] = sum(1 for t in records.values() if t.get("bb_used"))
    # ----- wall clock
    converged_at = max(reports[n].times.get("converged", t_end) for n in agents)
    learn_wall = sum(r["learn_wall_s"] for r in records.values())
    learn_cpu = sum(r["learn_cpu_s"] for r in records.values())
    boot = _mean([reports[n].durations.get("boot_s", 0.0) for n in agents])
    boot_cpu = _mean([reports[n].durations.get("boot_cpu_s", 0.0) for n in agents])
    fleet_wall = converged_at - t0
    wall: dict[str, Any] = {
        "fleet_learn_share_wall_s": fleet_wall,
        "fleet_end_to_end_s": t_end - t0,
        "sum_learn_wall_s": learn_wall,
        "sum_learn_cpu_s": learn_cpu,
        "mean_boot_s": boot,
        "mean_boot_cpu_s": boot_cpu,
        "sequential_estimate_s": boot + learn_wall,
        "sequential_estimate_cpu_s": boot_cpu + learn_cpu,
        "wallclock_speedup": (boot + learn_wall) / fleet_wall if fleet_wall > 0 else float("nan"),
        "wallclock_speedup_cpu": (boot_cpu + learn_cpu) / fleet_wall if fleet_wall > 0 else float("nan"),
        "method": ("fleet: from launching the devices to the last device holding every task (process start, "
                   "ROM boot, learning, sharing). Sequential single agent, estimated from this run: one boot "
                   "plus the sum of the devices' learn times (wall: inflated when devices share cores; cpu: "
                   "process CPU seconds of one boot and of every learn, close to the uncontended time with "
                   "1 thread per device). sequential_measured_s, when present, is a real single agent run "
                   "after the fleet, with its own cold feature cache."),
    }
    if sequential is not None:
        wall["sequential_measured_s"] = sequential["wall_s"]
        wall["sequential_measured"] = sequential
        wall["wallclock_speedup_measured"] = sequential["wall_s"] / fleet_wall if fleet_wall > 0 else float("nan")
    return FleetResult(
        agents=agents, tasks=task_names, assignment=plan.assignment, engine=cfg.engine,
        engine_version=_engine_version(cfg.engine), transport=plan.transport, fleet=plan.fleet,
        rom_fingerprint=manifest.fingerprint, macs_per_image=dict(manifest.macs_per_image), bb=cfg.bb,
        mappers=list(cfg.mappers), link=asdict(cfg.link), converged=converged and not missing_records,
        problems=problems, bank_digests=digests, bank_hashes=bank_hashes, devices_agree=not disagreements,
        disagreements=disagreements, restarts={n: reports[n].boots - 1 for n in agents},
        timings={n: {"durations": reports[n].durations, "times": reports[n].times} for n in agents},
        bytes=by_device, learn=records, comm_bytes_per_task=comm_per_task, student_comm_bytes=student_bytes,
        mac_rows=rows, mac_model=asdict(cfg.mac_model), mean_no_oracle_acc=mean_acc, mean_task_id_acc=mean_tid,
        mean_unknown_rate=mean_unk, mean_oracle_acc=mean_oracle,
        per_task_accuracy={n: reports[n].accuracy for n in agents},
        per_task_task_id_accuracy={n: reports[n].task_id_accuracy for n in agents},
        per_task_oracle_accuracy={n: reports[n].oracle_accuracy for n in agents},
        reference_device=reference, predictions=ref.predictions, test_labels=ref.test_labels,
        eval_features=ref.eval_files, bank_dirs={n: str(plan.workdir / "devices" / n / "bank") for n in agents},
        sync={n: reports[n].sync for n in agents}, quarantined={n: reports[n].quarantined for n in agents},
        wall=wall, workdir=str(plan.workdir), config=_resolved_config(cfg, plan))


def _resolved_config(cfg: FleetConfig, plan: _Plan) -> dict[str, Any]:
    """The config as run: absolute task paths, the cache, transport and fleet name actually used."""
    d = cfg.to_dict()
    d.update(rom_dir=str(plan.rom_dir), workdir=str(plan.workdir), tasks={t.name: t.path for t in plan.tasks},
             cache_dir=str(plan.cache_dir), transport=plan.transport, fleet=plan.fleet, assignment=plan.assignment,
             budget=plan.budget, anchor_budgets=plan.anchor_budgets)
    return d


__all__ = ["FleetConfig", "FleetConfigError", "FleetError", "FleetResult", "provision", "run_fleet"]
