"""One simulated device of the fleet lab, run as its own process: boot, learn, share, classify.

``python -m skill_edge.firmware_sim.agent SPEC.json`` (what the process engine runs) or
``run_agent(spec)`` (what a Ray worker runs).  The device is an ordinary ``runtime.Device``
with its own home (key, trust store, bank, receive state) and the shared ROM:

1. boot: the ROM is verified (``RomEngine`` checks its fingerprint), the bank opened with
   its flash quota, ONNX Runtime limited to ``threads`` so N devices on a few cores do not
   oversubscribe them;
2. learn each of its tasks, from an ImageFolder (``Device.learn``) or from features the
   caller already has (``Device.learn_features``, a feature-task file), with the training MACs
   the learning code counts; encode the signed packet (``PacketCodec(budget)``), and
   store in the bank exactly what the packet carries, so teacher and students hold
   identical records;
3. publish through the real transport and take in the others' packets with
   ``SyncService`` + ``PacketReceiver`` (signature, ROM, rollback and plausibility checks),
   charging every transfer to the simulated link (``link.DeviceInterface``), until the bank
   holds every task of the fleet;
4. classify the test set of every task with no task oracle (per mapper), plus task-ID and
   oracle-head accuracy, and write a JSON report.

Crash recovery: everything durable lives in the home.  A task whose bank record was learned
here from the same source, with the seq and content hash of the learn record written just
before it was stored, is not learned again: its stored packet is re-published.  The receive
state and the transport (the shared folder is rescanned; MQTT retained messages are
re-delivered) bring back what the fleet sent; duplicates are recognised by their sha256.
A ``kill`` point in the spec makes the process SIGKILL itself once at that point (a marker
file in the home stops it doing so again after the restart), which is how the lab tests it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np

from skill_edge.runtime.exchange.transport import encode_segment, write_atomically
from skill_edge.runtime.learn.bb import DEFAULT_BB_RECIPE

from .link import DeviceInterface, LinkModel, Transfer
from .metrics import TeacherWork

log = logging.getLogger(__name__)

PROCESS_START = time.time()
KILL_POINTS = ("boot", "after_learn", "after_publish", "mid_receive")
FEATURE_TASK_FORMAT = "skill-edge-feature-task/1"
Progress = Callable[[str, str, int, int], None]  # (stage, device, done, total)


class AgentError(RuntimeError):
    """A device that cannot do its part (bad task source, packet over budget, ...)."""


# ---------------------------------------------------------------------------- task sources
@dataclass(frozen=True)
class TaskSource:
    """A task of the fleet: an ImageFolder directory, or a feature-task file (``*.safetensors``)."""

    name: str
    path: str

    @property
    def kind(self) -> Literal["images", "features"]:
        return "features" if self.path.endswith(".safetensors") else "images"


@dataclass
class FeatureTask:
    """A task given as ROM features instead of images (for callers that extracted them already)."""

    classes: list[str]
    train_features: np.ndarray  # [N, D] float32, raw ROM features (bb = 0)
    train_labels: np.ndarray  # [N] int
    test_features: np.ndarray  # [M, D]
    test_labels: np.ndarray  # [M]
    rom_fingerprint: str  # the ROM the features came from; devices refuse any other
    train_trunk_stats: np.ndarray | None = None  # [N, 2C] Extraction.trunk_stats (the default anchors need them)
    test_trunk_stats: np.ndarray | None = None  # [M, 2C]


def save_feature_task(path: str | Path, task: FeatureTask) -> Path:
    """Write a feature task as one safetensors file (no pickle; metadata in the header)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a feature-task file must end in .safetensors, got {path.name}")
    tensors = {"train_features": np.ascontiguousarray(task.train_features, np.float32),
               "train_labels": np.ascontiguousarray(task.train_labels, np.int64),
               "test_features": np.ascontiguousarray(task.test_features, np.float32),
               "test_labels": np.ascontiguousarray(task.test_labels, np.int64)}
    for split in ("train", "test"):
        stats = getattr(task, f"{split}_trunk_stats")
        if stats is not None:
            tensors[f"{split}_trunk_stats"] = np.ascontiguousarray(stats, np.float32)
    meta = {"format": FEATURE_TASK_FORMAT, "classes": json.dumps(list(task.classes)),
            "rom_fingerprint": task.rom_fingerprint}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_feature_task(path: str | Path) -> FeatureTask:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AgentError(f"feature task {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise AgentError(f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FEATURE_TASK_FORMAT:
        raise AgentError(f"{path} is not a feature task ({FEATURE_TASK_FORMAT}); write it with save_feature_task")
    missing = {"train_features", "train_labels", "test_features", "test_labels"} - set(t)
    if missing:
        raise AgentError(f"feature task {path} lacks {sorted(missing)}")
    classes = json.loads(meta["classes"])
    task = FeatureTask(classes, t["train_features"], t["train_labels"].astype(np.int64), t["test_features"],
                       t["test_labels"].astype(np.int64), meta.get("rom_fingerprint", ""),
                       t.get("train_trunk_stats"), t.get("test_trunk_stats"))
    for split in ("train", "test"):
        x, y = getattr(task, f"{split}_features"), getattr(task, f"{split}_labels")
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise AgentError(f"feature task {path}: {split} features {x.shape} and labels {y.shape} do not match")
        stats = getattr(task, f"{split}_trunk_stats")
        if stats is not None and (stats.ndim != 2 or stats.shape[0] != x.shape[0]):
            raise AgentError(f"feature task {path}: {split} trunk statistics {stats.shape} do not match "
                             f"features {x.shape}")
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise AgentError(f"feature task {path}: {split} labels outside 0..{len(classes) - 1}")
    return task


# ---------------------------------------------------------------------------- the spec
@dataclass
class AgentSpec:
    """Everything one device needs; written as JSON by the fleet, read by the worker."""

    name: str
    home: str
    rom_dir: str
    learn: list[TaskSource]  # tasks this device teaches
    fleet_tasks: list[TaskSource]  # every task of the fleet: convergence target and test sets
    transport: str  # "dir:PATH" or "mqtt://host:port"
    fleet: str
    mqtt_options: dict[str, Any] = field(default_factory=dict)
    quota_bytes: int | None = None
    cache_dir: str | None = None
    threads: int = 1
    providers: list[str] | None = None
    bb: bool = False
    bb_epochs: int = DEFAULT_BB_RECIPE.epochs  # the device default
    mappers: list[str] = field(default_factory=lambda: ["gmmc", "maha"])
    k: int = 25
    m: int = 5
    seed: int = 0
    budget: int | None = None
    anchor_budgets: dict[str, int] | None = None  # mapper kind -> byte cap of its single-anchor packet
    link: dict[str, Any] = field(default_factory=dict)  # LinkModel fields
    plausibility: bool = True
    kill: str | None = None  # one of KILL_POINTS: SIGKILL self there, once
    converge_timeout: float = 300.0
    evaluate: bool = True
    eval_dir: str | None = None  # write each task's test features here (the reference device)
    save_trunk: bool = False  # also write trunk activations there (BB runs; ~37 KB per image)
    report_path: str | None = None
    eval_slots: int | None = None  # at most this many devices of the fleet evaluate at once (None: no limit)
    eval_max_per_task: int | None = None  # classify at most this many test images per task (seeded; None: all)
    eval_slot_dir: str | None = None  # where the slots' lock files live (shared by the fleet)
    learn_slots: int | None = None  # at most this many devices of the fleet learn at once (None: no limit)
    learn_slot_dir: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "AgentSpec":
        d = json.loads(text)
        d["learn"] = [TaskSource(**t) for t in d["learn"]]
        d["fleet_tasks"] = [TaskSource(**t) for t in d["fleet_tasks"]]
        return cls(**d)


@dataclass
class DeviceReport:
    """What one device did and measured; JSON-able (``asdict``)."""

    name: str
    key_id: str
    boots: int
    learned: list[str]  # tasks learned in this boot
    recovered: list[str]  # own tasks found in the bank after a restart, not learned again
    converged: bool
    missing: list[str]
    times: dict[str, float]  # absolute unix times: process_start, ready, learned, published, converged, evaluated
    durations: dict[str, float]  # boot_s, learn_s, publish_s, receive_s, evaluate_s (this boot)
    learn_records: list[dict[str, Any]]  # one per own task (persisted, so they survive a restart)
    link: dict[str, Any]  # DeviceInterface.to_dict()
    received: list[dict[str, Any]]  # every packet that arrived from a peer (all boots): link cost and verdict
    sync: dict[str, int]
    bank: dict[str, str]  # task -> content hash
    bank_digest: str
    bank_bytes: int
    quarantined: list[str]
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # mapper -> task -> no-oracle acc
    task_id_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    unknown_rate: dict[str, dict[str, float]] = field(default_factory=dict)  # open-set rejections
    oracle_accuracy: dict[str, float] = field(default_factory=dict)  # task -> own head on own test set
    n_test: dict[str, int] = field(default_factory=dict)
    predictions: dict[str, dict[str, dict[str, list]]] = field(default_factory=dict)
    test_labels: dict[str, list[int]] = field(default_factory=dict)
    prediction_digest: str = ""
    eval_files: dict[str, str] = field(default_factory=dict)
    peak_rss_mb: float = 0.0  # the device process's peak RSS (its whole life, this boot)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeviceReport":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------- per-mapper packet budgets
_PRECISIONS = ("fp32", "fp16", "int8", "int4", "int3")  # the codec's ladder precisions, least lossy first


def anchor_kinds(knowledge) -> list[str]:
    """The mapper kinds whose anchors ``knowledge`` carries (an attribute per kind of ``metrics.MAPPERS``)."""
    from .metrics import MAPPERS

    return [k for k in MAPPERS if getattr(knowledge, k, None) is not None]


def single_anchor(knowledge, kind: str):
    """``knowledge`` with only the ``kind`` anchor (and its threshold): what a one-mapper fleet sends."""
    others = {o: None for o in anchor_kinds(knowledge) if o != kind}
    return dataclasses.replace(knowledge, **others,
                               thresholds={k: v for k, v in knowledge.thresholds.items() if k == kind})


def _step_parts(step: str) -> tuple[str, dict[str, str]]:
    precision, *rest = step.split("+")
    return precision, {t.split("=", 1)[0]: (t.split("=", 1)[1] if "=" in t else "") for t in rest}


def compose_steps(steps: list[str]) -> str:
    """The codec step at least as lossy as every one of ``steps`` on each of its axes.

    The lowest precision, the fewest GMMC components and exemplars per class, int8 BB and the
    ternary head if any step has them: ``["int4+gmmc_k=20", "int8+exemplars=2"]`` ->
    ``"int4+gmmc_k=20+exemplars=2"``.  Steps follow ``codec.plan_for_step``'s grammar."""
    parts = [_step_parts(s) for s in steps]
    bad = [p for p, _ in parts if p not in _PRECISIONS]
    if bad:
        raise ValueError(f"unknown precision {bad[0]!r} in {steps}")
    out = max((p for p, _ in parts), key=_PRECISIONS.index)
    for token in ("gmmc_k", "bb_int8", "exemplars", "head_int2"):
        values = [t[token] for _, t in parts if token in t]
        if not values:
            continue
        out += f"+{token}" if values[0] == "" else f"+{token}={min(int(v) for v in values)}"
    return out


def step_for(step: str, knowledge) -> str:
    """``step`` without the parts that do not apply to ``knowledge`` (no GMMC: no gmmc_k, ...)."""
    precision, tokens = _step_parts(step)
    drop = {"gmmc_k": knowledge.gmmc is None, "exemplars": knowledge.maha is None, "bb_int8": knowledge.bb is None}
    return "+".join([precision] + [t if v == "" else f"{t}={v}" for t, v in tokens.items() if not drop.get(t)])


# ---------------------------------------------------------------------------- small helpers
def limit_threads(n: int) -> None:
    """One device, ``n`` threads: BLAS/OpenMP (for libraries not loaded yet), and torch if it is loaded.

    A device imports no torch (a simulated one neither, unless it learns BB), which is what lets the
    lab hold a hundred of them on one machine."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


@contextlib.contextmanager
def _evaluation_slot(folder: str | None, slots: int | None) -> Iterator[None]:
    """Hold one of ``slots`` fleet-wide slots (``flock`` on ``folder/slot-<i>``) while inside: the evaluation
    slots, and the learning slots (``learn_slots``, learning being the other memory peak).

    Classifying every task's test set is the memory peak of a simulated device (the fleet's test
    features and both mappers at once); a hundred devices doing it together need more RAM than
    the machine has.  The lock goes with the process, so a killed device frees its slot."""
    if not folder or not slots:
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(slots):
            f = open(Path(folder) / f"slot-{i}", "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(0.5)


def peak_rss_mb() -> float:
    """This process's own peak resident set size so far, in MB.

    Linux's ``VmHWM`` (the high-water mark of this process image) where there is one: ``ru_maxrss``
    survives ``execve``, so a device process started by a fleet driver that holds 750 MB of features
    would report the driver's 750 MB, not its own peak.  Elsewhere ``ru_maxrss`` (KiB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_json(path: Path, obj: Any) -> None:
    write_atomically(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def _digest_arrays(parts: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in parts:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _calibration_count(labels: np.ndarray, fraction: float = 0.2) -> int:
    """How many training samples ``fit_task_anchors`` holds out for its thresholds."""
    _, counts = np.unique(labels, return_counts=True)
    return int(sum(min(int(round(fraction * c)), c - 1) for c in counts))


class _Lifecycle:
    """Boot counter and one-shot kill markers, kept in the home so they survive a SIGKILL."""

    def __init__(self, home: Path) -> None:
        self.dir = home / "fleet"
        self.dir.mkdir(parents=True, exist_ok=True)

    def next_boot(self) -> int:
        path = self.dir / "boots.json"
        n = json.loads(path.read_text())["boots"] + 1 if path.exists() else 1
        _write_json(path, {"boots": n})
        return n

    def maybe_kill(self, wanted: str | None, point: str) -> None:
        if wanted != point:
            return
        marker = self.dir / f"killed-{point}"
        if marker.exists():
            return
        write_atomically(marker, str(time.time()).encode())
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # a power cut: no cleanup, no atexit, no flush

    def learn_record_path(self, task: str) -> Path:
        return self.dir / "learned" / f"{encode_segment('task', task)}.json"


# ---------------------------------------------------------------------------- the worker
class Agent:
    """The device plus its fleet plumbing for one boot."""

    def __init__(self, spec: AgentSpec, progress: Progress | None = None, started: float | None = None,
                 started_cpu: float = 0.0) -> None:
        self.spec = spec
        self.progress = progress
        self.home = Path(spec.home)
        self.life = _Lifecycle(self.home)
        self.started = PROCESS_START if started is None else started
        self.started_cpu = started_cpu  # process CPU seconds already used before this device started
        self.times: dict[str, float] = {"process_start": self.started}
        self.durations: dict[str, float] = {}
        self.iface = DeviceInterface(spec.name, LinkModel(**spec.link))
        self.own_hashes: set[str] = set()
        self.received: list[dict[str, Any]] = []

    def emit(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, self.spec.name, done, total)

    # ------------------------------------------------------------------ 1. boot
    def boot(self) -> None:
        from skill_edge.runtime.device import Device
        from skill_edge.runtime.exchange.keys import load_device_key

        spec = self.spec
        unknown = [s for s in (spec.kill,) if s is not None and s not in KILL_POINTS]
        if unknown:
            raise AgentError(f"unknown kill point {spec.kill!r}; choose from {KILL_POINTS}")
        self.boots = self.life.next_boot()
        self._replay_journal()
        self.emit("boot", 0, 1)
        limit_threads(spec.threads)
        t0 = time.perf_counter()
        self.device = Device(self.home, spec.rom_dir, providers=spec.providers, agent_id=spec.name,
                             quota_bytes=spec.quota_bytes, cache_dir=spec.cache_dir, threads=spec.threads)
        self.key = load_device_key(self.home)
        self.manifest = self.device.engine.manifest
        self.durations["boot_s"] = time.time() - self.started
        self.durations["boot_cpu_s"] = time.process_time() - self.started_cpu
        self.durations["rom_open_s"] = time.perf_counter() - t0
        self.times["ready"] = time.time()
        self.emit("boot", 1, 1)
        self.life.maybe_kill(spec.kill, "boot")

    # ------------------------------------------------------------------ 2. learn
    def learn_all(self) -> tuple[list[dict], list[str], list[str]]:
        records, learned, recovered = [], [], []
        t0 = time.perf_counter()
        for i, src in enumerate(self.spec.learn):
            self.emit("learn", i, len(self.spec.learn))
            rec = self._recovered(src)
            if rec is None:
                rec = self._learn(src)
                learned.append(src.name)
            else:
                recovered.append(src.name)
            records.append(rec)
        self.emit("learn", len(self.spec.learn), len(self.spec.learn))
        self.durations["learn_s"] = time.perf_counter() - t0
        self.times["learned"] = time.time()
        return records, learned, recovered

    def _recovered(self, src: TaskSource) -> dict | None:
        """The learn record of ``src`` if the bank already holds exactly what that learn stored."""
        path = self.life.learn_record_path(src.name)
        if not path.exists():
            return None
        rec = json.loads(path.read_text())
        entry = next((e for e in self.device.bank.entries() if e.task == src.name), None)
        if (entry is None or not entry.has_packet or entry.agent != self.spec.name or entry.source != rec["source"]
                or entry.seq != rec["seq"] or entry.content_hash != rec["content_hash"]):
            return None
        log.info("task %s is already in the bank (seq %d, %s): not learning it again", src.name, entry.seq,
                 entry.source)
        return rec

    def _learn(self, src: TaskSource) -> dict:
        from skill_edge.runtime.learn.head import head_accuracy

        spec = self.spec
        cpu0, wall0 = time.process_time(), time.perf_counter()

        def on_progress(what: str, done: int, total: int) -> None:
            if what.startswith("extract"):
                self.emit("extract", done, total)

        if src.kind == "images":
            from skill_edge.runtime.sources.datasets import load_image_folder

            ds = load_image_folder(src.path, seed=spec.seed)
            report = self.device.learn(src.name, ds, bb=spec.bb, mappers=spec.mappers, k=spec.k, m=spec.m,
                                       seed=spec.seed, bb_epochs=spec.bb_epochs, store=False,
                                       progress=on_progress)
            knowledge, calibration = report.knowledge, report.calibration
            n_train, n_test, test_acc = report.n_train, report.n_test, report.test_acc
            train_labels = np.asarray(ds.train.labels)
            seconds = dict(report.seconds)
            skipped = len(report.skipped)
        else:
            ft = self._feature_task(src)
            if spec.bb:
                raise AgentError(f"task {src.name!r} is given as features, but BB training needs images "
                                 f"(trunk activations); learn it from an ImageFolder or run without BB")
            t_fit = time.perf_counter()
            knowledge, metrics = self.device.learn_features(
                src.name, ft.classes, ft.train_features, ft.train_labels, trunk_stats=ft.train_trunk_stats,
                bb=False, mappers=spec.mappers,
                k=spec.k, m=spec.m, seed=spec.seed, source=f"features:{Path(src.path).resolve()}")
            test_acc = head_accuracy(knowledge.head_weight, knowledge.head_bias, ft.test_features, ft.test_labels)
            knowledge.meta.metrics["test_acc"] = float(test_acc)
            calibration = metrics["threshold_calibration"]
            n_train, n_test = len(ft.train_labels), len(ft.test_labels)
            train_labels = ft.train_labels
            seconds = {"extract": 0.0, "fit": time.perf_counter() - t_fit}
            seconds["total"] = seconds["fit"]
            skipped = 0
        packet, sizes, plan = self._encode(knowledge, calibration)
        decoded = self._codec().decode(packet)
        stored = decoded.knowledge
        stored.meta.source = knowledge.meta.source  # provenance stays local; it is not part of the content hash
        macs = self.manifest.macs_per_image
        work = TeacherWork(
            task=src.name, agent=spec.name, n_train=int(n_train), n_classes=knowledge.num_classes,
            feature_dim=knowledge.feature_dim, anchor_dim=knowledge.anchor_dim or 0,
            backbone_macs_per_image=int(macs["full"]),
            tail_macs_per_image=int(macs.get("tail", 0)),
            # the head's L-BFGS MACs and BB training's, both counted by the learning code itself
            train_macs_measured=int((knowledge.meta.metrics.get("head_train_gmacs", 0.0)
                                     + knowledge.meta.metrics.get("bb_train_gmacs", 0.0)) * 1e9),
            bb=knowledge.bb is not None, bb_epochs=spec.bb_epochs if spec.bb else 0,
            gmmc_k=knowledge.gmmc.k if knowledge.gmmc is not None else 0,
            maha_exemplars=int(knowledge.maha.exemplars.shape[0]) if knowledge.maha is not None else 0,
            n_calibration=_calibration_count(train_labels))
        rec = {"task": src.name, "kind": src.kind, "source": stored.meta.source, "seq": int(stored.meta.seq),
               "content_hash": stored.content_hash(), "work": asdict(work), "n_test": int(n_test),
               "skipped_images": skipped, "test_acc": float(test_acc), "bb_requested": spec.bb,
               "bb_used": knowledge.bb is not None,
               "head_val_acc": float(knowledge.meta.metrics.get("head_val_acc", float("nan"))),
               "packet_bytes": len(packet), "packet_bytes_by_anchor": sizes, "packet_plan": plan,
               "maha_exemplars_sent": int(stored.maha.exemplars.shape[0]) if stored.maha is not None else 0,
               "packet_sha256": hashlib.sha256(packet).hexdigest(),
               "seconds": {k: float(v) for k, v in seconds.items()},
               "learn_wall_s": time.perf_counter() - wall0, "learn_cpu_s": time.process_time() - cpu0,
               "learned_at": time.time(), "boot": self.boots}
        # the record first: a bank entry without its record is simply learned again after a crash
        _write_json(self.life.learn_record_path(src.name), rec)
        self.device.bank.put(stored, packet_bytes=packet, own=True)
        return rec

    def _feature_task(self, src: TaskSource) -> FeatureTask:
        ft = load_feature_task(src.path)
        if ft.rom_fingerprint != self.device.fingerprint:
            raise AgentError(f"feature task {src.path} was extracted with ROM {ft.rom_fingerprint[:16]}..., this "
                             f"device runs {self.device.fingerprint[:16]}...; re-extract its features with this ROM")
        if ft.train_features.shape[1] != self.device.engine.feature_dim:
            raise AgentError(f"feature task {src.path} has {ft.train_features.shape[1]}-D features, the ROM gives "
                             f"{self.device.engine.feature_dim}")
        return ft

    def _codec(self):
        from skill_edge.runtime.exchange.packet import PacketCodec

        return PacketCodec(self.spec.budget)

    def _encode(self, knowledge, calibration=None) -> tuple[bytes, dict[str, int], str]:
        """The packet, plus the size each single-anchor variant would have (for the per-mapper cost rows).
        ``calibration``: the teacher's held-out features, which set a reduced Mahalanobis anchor's threshold.

        With ``anchor_budgets`` the budget is per mapper: each single-anchor packet (head + that anchor,
        what a fleet running only that mapper sends) gets its own cap, and the lab's packet, which
        carries every anchor so that one run measures every mapper, is encoded at the step that
        satisfies all of them (``compose_steps``).  The sizes recorded per mapper are those
        single-anchor packets at that same step, so bytes and accuracy describe the same anchors."""
        from skill_edge.runtime.exchange.packet import BudgetError, PacketCodec

        codec = self._codec()
        kinds = anchor_kinds(knowledge)
        variants = {kind: single_anchor(knowledge, kind) for kind in kinds} if len(kinds) > 1 else {}
        budgets = {k: b for k, b in (self.spec.anchor_budgets or {}).items() if k in kinds}
        aim = dict(budgets)
        for _ in range(8):  # zstd is not monotone: a composed step may leave one packet a little over its cap
            try:
                if budgets:
                    steps = []
                    for kind, b in aim.items():
                        alone = PacketCodec(b).encode(variants.get(kind, knowledge), self.key)
                        steps.append(codec.decode(alone).plan.step)
                    step = compose_steps(steps)
                    packet = codec.encode(knowledge, self.key, plan=step, calibration=calibration)
                else:
                    packet = codec.encode(knowledge, self.key, calibration=calibration)
                    step = None
            except BudgetError as exc:
                raise AgentError(f"task {knowledge.task!r}: {exc}") from None
            sizes = {"as_sent": len(packet)}
            for kind in kinds:
                if kind not in variants:
                    sizes[kind] = len(packet)
                    continue
                v = variants[kind]
                sizes[kind] = len(codec.encode(v, self.key, plan=step_for(step, v)) if step
                                  else codec.encode(v, self.key))
            over = {k: sizes[k] for k, b in budgets.items() if sizes[k] > b}
            if not over:
                return packet, sizes, codec.decode(packet).plan.step
            for k in over:  # aim that mapper's own step lower and compose again
                aim[k] = int(aim[k] * 0.95)
        raise AgentError(f"task {knowledge.task!r}: at step {step} the single-anchor packets outgrow their "
                         f"budgets ({', '.join(f'{k} {n} > {budgets[k]}' for k, n in over.items())})")

    # ------------------------------------------------------------------ link journal
    def _journal(self, direction: str, xfer: Transfer, **extra: Any) -> None:
        """Append one transfer to ``HOME/fleet/link.jsonl`` so its cost survives a crash of this device."""
        line = {"direction": direction, **asdict(xfer), **extra, "boot": self.boots, "at": time.time()}
        with open(self.life.dir / "link.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if direction == "in":
            self.received.append(line)

    def _replay_journal(self) -> None:
        path = self.life.dir / "link.jsonl"
        if not path.exists():
            return
        fields = Transfer.__dataclass_fields__
        for raw in path.read_text().splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # the last line of a device killed while writing it
            self.iface.record(Transfer(**{k: line[k] for k in fields}), line["direction"])
            if line["direction"] == "in":
                self.received.append(line)

    # ------------------------------------------------------------------ 3. share
    def share(self, records: list[dict]) -> tuple[bool, list[str], dict[str, int]]:
        from skill_edge.runtime.exchange.keys import TrustStore
        from skill_edge.runtime.knowledge.records import RomShape
        from skill_edge.runtime.exchange.receive import PacketReceiver
        from skill_edge.runtime.exchange.sync import BankPlausibility, SyncService
        from skill_edge.runtime.exchange.transport import open_transport

        spec, bank = self.spec, self.device.bank
        # no transport state file: the receive state + bank are the durable truth, and a rescan after a
        # crash re-delivers anything that was polled but not yet stored (duplicates are cheap no-ops)
        tx = open_transport(spec.transport, spec.fleet, **spec.mqtt_options)
        try:
            check = BankPlausibility(bank, self._reference_features()) if spec.plausibility else None
            receiver = PacketReceiver(TrustStore(self.home / "trust"), self.device.fingerprint,
                                      self.home / "sync" / "receive", plausibility=check,
                                      rom_shape=RomShape.from_manifest(self.device.engine.manifest))
            service = SyncService(tx, bank, receiver, fleet=spec.fleet)
            t0 = time.perf_counter()
            for rec in records:
                data = bank.packet_bytes(rec["task"])
                if data is None:
                    raise AgentError(f"the bank lost the packet of own task {rec['task']!r}")
                self.own_hashes.add(hashlib.sha256(data).hexdigest())
                xfer = self.iface.send(len(data), rec["task"])
                service.publish(data, origin=f"{spec.name}:{rec['task']}")
                self._journal("out", xfer, status="published", seq=rec["seq"])
            self.durations["publish_s"] = time.perf_counter() - t0
            self.times["published"] = time.time()
            self.life.maybe_kill(spec.kill, "after_publish")
            converged, missing = self._receive(tx, service)
            stats = asdict(service.stats)
        finally:
            tx.close()
        return converged, missing, stats

    def _reference_features(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Own training features (and trunk statistics): what the plausibility check tests newcomers'
        capture against."""
        out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for src in self.spec.learn:
            if src.kind == "features":
                ft = self._feature_task(src)
                out[src.name] = (ft.train_features, ft.train_trunk_stats)
            else:
                from skill_edge.runtime.sources.datasets import load_image_folder

                ds = load_image_folder(src.path, seed=self.spec.seed)
                ex = self.device.extract(ds.train.paths, keep_trunk=self.spec.bb)  # cached
                out[src.name] = (ex.features, ex.trunk_stats)
        return out

    def _receive(self, tx, service) -> tuple[bool, list[str]]:
        expected = {t.name for t in self.spec.fleet_tasks}
        deadline = time.monotonic() + self.spec.converge_timeout
        t0 = time.perf_counter()
        shown = -1
        while True:
            have = {e.task for e in self.device.bank.entries()}
            if len(have & expected) != shown:
                shown = len(have & expected)
                self.emit("receive", shown, len(expected))
            missing = sorted(expected - have)
            if not missing or time.monotonic() > deadline:
                break
            for p in tx.poll(timeout=0.5):
                sha = hashlib.sha256(p.data).hexdigest()
                if sha in self.own_hashes:
                    continue  # our own broadcast echoed back: never crossed our link
                xfer = self.iface.receive(len(p.data), p.task, p.agent_id)
                ev = service.handle(p)
                self._journal("in", xfer, status=ev.kind, reason=ev.reason, seq=ev.seq, sha256=sha)
                if ev.kind == "accepted":
                    self.life.maybe_kill(self.spec.kill, "mid_receive")
            service.recheck_quarantine()  # the bank grew: quarantined siblings may pass now
        self.durations["receive_s"] = time.perf_counter() - t0
        self.times["converged"] = time.time()
        if missing:
            log.warning("%s: not converged after %.0f s; missing %s", self.spec.name, self.spec.converge_timeout,
                        missing)
        return not missing, missing

    # ------------------------------------------------------------------ 4. classify
    def evaluate(self) -> dict[str, Any]:
        from skill_edge.runtime.device import FeatureBatch, LearnError
        from skill_edge.runtime.learn.head import head_accuracy

        spec, dev = self.spec, self.device
        t0 = time.perf_counter()
        names = [t.name for t in spec.fleet_tasks]
        fleet_index = {n: i for i, n in enumerate(names)}
        stored = {k.task: k for k in dev.knowledge()}
        out: dict[str, Any] = {"accuracy": {}, "task_id_accuracy": {}, "unknown_rate": {}, "oracle_accuracy": {},
                               "n_test": {}, "predictions": {}, "test_labels": {}, "eval_files": {}}
        digest_parts: list[np.ndarray] = []
        mappers = [mp for mp in spec.mappers if any(getattr(k, mp) is not None for k in stored.values())]
        for ti, src in enumerate(spec.fleet_tasks):
            self.emit("evaluate", ti, len(names))
            feats, acts, stats, labels, classes, paths = self._test_data(src)
            if spec.eval_max_per_task and len(labels) > spec.eval_max_per_task:  # the same rows on every device
                keep = np.sort(np.random.default_rng(spec.seed + ti).permutation(len(labels))[:spec.eval_max_per_task])
                feats, labels = feats[keep], labels[keep]
                acts = acts[keep] if acts is not None else None
                stats = stats[keep] if stats is not None else None
                paths = paths[keep] if paths is not None else None
            out["n_test"][src.name] = int(len(labels))
            out["test_labels"][src.name] = labels.tolist()
            if spec.eval_dir:
                out["eval_files"][src.name] = str(self._save_eval(ti, src.name, classes, feats, acts, stats, labels))
            k = stored.get(src.name)
            # the task's BB pass the way classify runs it: the tail on the trunk activations, or for a task
            # split before the tail, the whole graph on the test images (decoded again, only for its rows)
            if k is not None and (k.bb is None or acts is not None or paths is not None):
                try:
                    hf = dev.bb_features(k, acts, paths) if k.bb is not None else feats
                    out["oracle_accuracy"][src.name] = head_accuracy(k.head_weight, k.head_bias, hf, labels)
                except LearnError as exc:
                    log.warning("no oracle row for %s: %s", src.name, exc)
            for mp in mappers:
                r = dev.classify_features(FeatureBatch(feats, acts, stats, paths), mapper=mp, open_set=True)
                to_fleet = np.array([fleet_index.get(n, -1) for n in r["task_names"]], np.int64)
                task_pred = to_fleet[r["task_index"]]
                cls_pred = np.asarray(r["class_index"], np.int64)
                unknown = np.asarray(r["unknown"], bool)
                right_task = task_pred == ti
                n = max(len(labels), 1)
                out["accuracy"].setdefault(mp, {})[src.name] = float(np.sum(right_task & (cls_pred == labels)) / n)
                out["task_id_accuracy"].setdefault(mp, {})[src.name] = float(np.sum(right_task) / n)
                out["unknown_rate"].setdefault(mp, {})[src.name] = float(np.sum(unknown) / n)
                out["predictions"].setdefault(mp, {})[src.name] = {"task_index": task_pred.tolist(),
                                                                   "class_index": cls_pred.tolist(),
                                                                   "unknown": unknown.tolist()}
                digest_parts += [task_pred, cls_pred]
        self.emit("evaluate", len(names), len(names))
        out["prediction_digest"] = _digest_arrays(digest_parts)
        self.durations["evaluate_s"] = time.perf_counter() - t0
        self.times["evaluated"] = time.time()
        return out

    def _test_data(self, src: TaskSource) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray,
                                                   list[str], np.ndarray | None]:
        """Test features, trunk activations (BB runs), trunk statistics, labels, classes and image paths
        (for BB tasks that rerun the whole graph; None for a features task) of any fleet task; image
        features come through the feature cache, keyed exactly as the teacher's own test extraction so a
        shared cache is hit."""
        if src.kind == "features":
            ft = self._feature_task(src)
            return ft.test_features, None, ft.test_trunk_stats, ft.test_labels, list(ft.classes), None
        from skill_edge.runtime.sources.datasets import load_image_folder

        ds = load_image_folder(src.path, seed=self.spec.seed)
        ex = self.device.extract(ds.test.paths, keep_trunk=self.spec.bb)
        labels = np.asarray(ds.test.labels, np.int64)[ex.index]
        paths = np.array([str(ds.test.paths[i]) for i in ex.index], dtype=object)
        return ex.features, ex.trunk_acts, ex.trunk_stats, labels, list(ds.classes), paths

    def _save_eval(self, index: int, task: str, classes: list[str], feats: np.ndarray, acts: np.ndarray | None,
                   stats: np.ndarray | None, labels: np.ndarray) -> Path:
        from safetensors.numpy import save_file

        path = Path(self.spec.eval_dir) / f"task{index:03d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": np.ascontiguousarray(feats, np.float32), "labels": labels.astype(np.int64)}
        if stats is not None:
            tensors["trunk_stats"] = np.ascontiguousarray(stats, np.float32)
        if self.spec.save_trunk and acts is not None:
            tensors["trunk_acts"] = np.ascontiguousarray(acts, np.float32)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"task": task, "classes": json.dumps(classes), "index": str(index),
                                               "rom_fingerprint": self.device.fingerprint})
        os.replace(tmp, path)
        return path

    # ------------------------------------------------------------------ all of it
    def run(self) -> DeviceReport:
        self.boot()
        # learning is a device's other memory peak (a 2,560-image task: ~370 MB); on a shared machine the fleet
        # bounds how many learn at once, which costs no time when they share fewer cores than that anyway
        with _evaluation_slot(self.spec.learn_slot_dir, self.spec.learn_slots):
            records, learned, recovered = self.learn_all()
        self.life.maybe_kill(self.spec.kill, "after_learn")
        converged, missing, stats = self.share(records)
        results = {}
        if self.spec.evaluate:
            with _evaluation_slot(self.spec.eval_slot_dir, self.spec.eval_slots):
                results = self.evaluate()
        entries = self.device.bank.entries()
        bank = {e.task: e.content_hash for e in sorted(entries, key=lambda e: e.task)}
        report = DeviceReport(
            name=self.spec.name, key_id=self.key.key_id, boots=self.boots, learned=learned, recovered=recovered,
            converged=converged, missing=missing, times=self.times, durations=self.durations,
            learn_records=records, link=self.iface.to_dict(), received=self.received, sync=stats, bank=bank,
            bank_digest=hashlib.sha256(json.dumps(bank, sort_keys=True).encode()).hexdigest(),
            bank_bytes=int(self.device.bank.used_bytes()),
            quarantined=[f"{q.task}: {q.reason}" for q in self.device.bank.quarantined()],
            peak_rss_mb=round(peak_rss_mb(), 1), **results)
        self.emit("done", 1, 1)
        return report


def run_agent(spec: AgentSpec, progress: Progress | None = None, started: float | None = None,
              started_cpu: float = 0.0) -> DeviceReport:
    """Run one device to the end (boot, learn, share, classify) and return its report.

    ``started``: when this device's process started (default: when this module was imported);
    ``started_cpu``: ``time.process_time()`` then (0 for a fresh process).
    """
    report = Agent(spec, progress, started, started_cpu).run()
    if spec.report_path:
        _write_json(Path(spec.report_path), asdict(report))
    return report


def ray_entry(spec_json: str, queue: Any = None) -> str:
    """What a Ray worker runs: JSON in, JSON out (no pickled objects cross the engine boundary)."""
    started, started_cpu = time.time(), time.process_time()  # a Ray worker may be reused: count from here
    spec = AgentSpec.from_json(spec_json)

    def progress(stage: str, device: str, done: int, total: int) -> None:
        if queue is not None:
            queue.put_nowait((stage, device, done, total))

    return json.dumps(asdict(run_agent(spec, progress, started, started_cpu)))


def main(argv: list[str] | None = None) -> int:
    """Process entry point: progress events go to stdout as JSON lines, logs to stderr."""
    parser = argparse.ArgumentParser(prog="python -m skill_edge.firmware_sim.agent",
                                     description="Run one simulated fleet device from its JSON spec.")
    parser.add_argument("spec", type=Path, help="agent spec JSON written by firmware_sim.fleet")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = AgentSpec.from_json(args.spec.read_text())

    def progress(stage: str, device: str, done: int, total: int) -> None:
        print(json.dumps({"stage": stage, "device": device, "done": done, "total": total}), flush=True)

    try:
        run_agent(spec, progress)
    except Exception:  # noqa: BLE001 - the engine shows this traceback with the device's name
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
