"""The Device: one edge box with a ROM, a knowledge bank and a key — learn, classify, share.

This is the Python API behind ``skill-edge learn|classify`` and behind every simulated
device in ``firmware_sim``.  Flow for one image at classify time (no task oracle):

    image -> trunk (once) -> tail with bb=0 -> raw features -> mapper -> task t
          -> [if t has BB: tail again with t's biases, batched per task] -> head_t -> class
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from skill_edge.runtime.mapping.anchors import (
    DEFAULT_TRANSFORM,
    AnchorError,
    MIN_CALIBRATION_ROWS,
    ThresholdCalibration,
    fit_task_anchors,
    needs_trunk_stats,
)
from skill_edge.runtime.knowledge.bank import KnowledgeBank
from skill_edge.runtime.knowledge.identity import TaskKey, display_names
from skill_edge.runtime.sources.datasets import ImageFolderTask, load_image_folder
from skill_edge.runtime.rom.feature_cache import FeatureCache
from skill_edge.runtime.knowledge.records import KnowledgeError, RomShape, TaskKnowledge, TaskMeta, validate_name
from skill_edge.runtime.exchange.seq_ledger import LEDGER_FILE, SeqLedger
from skill_edge.runtime.learn.head import head_accuracy, train_head
from skill_edge.runtime.mapping.mapper import TaskMapper, build_mapper
from skill_edge.runtime.rom.preprocess import ImageInput, iter_batches
from skill_edge.runtime.rom.engine import Extraction, RomEngine

log = logging.getLogger(__name__)

MapperKind = Literal["gmmc", "maha"]
MAPPER_ALIASES = {"gmmc": "gmmc", "maha": "maha", "mahalanobis": "maha"}
MAPPER_NAMES: dict[str, str] = {"gmmc": "gmmc", "maha": "mahalanobis"}  # a kind as the CLI names it
#: The mapper ``classify`` and ``eval`` use when none is named: Mahalanobis where every stored task
#: carries its anchor (``learn`` fits both by default), else GMMC (``Device.resolve_mapper``).
#: Mahalanobis wins routing, open set and speed on Lite0 (benchmarks/results/mapper_peers*.json):
#: 0.935x / 0.863x the oracle at 21 / 71 tasks against GMMC's 0.893x / 0.761x, 0.923x / 0.832x
#: with 56 KB packets (0.890x / 0.739x), open-set AUROC 0.881 / 0.798 (0.871 / 0.776), and a
#: third of GMMC's scoring time at 1,000 tasks.  GMMC keeps half the anchor bytes, no student
#: work, and the paper's MAC accounting, so the fleet lab's Fig. 9 row stays GMMC's.
DEFAULT_MAPPER = "auto"
UNKNOWN = "unknown"


def _state_digest(state: dict[str, np.ndarray]) -> np.ndarray:
    """sha256 over a saved mapper state's arrays (names, shapes, dtypes and bytes), as uint8[32]: a
    flipped bit in the file would otherwise change answers silently, where the bank's records are
    hash-checked on every load."""
    h = hashlib.sha256()
    for name in sorted(state):
        a = np.ascontiguousarray(state[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


class LearnError(ValueError):
    """A task that cannot be learned from what was given (no images decoded, one class...)."""


@dataclass
class LearnReport:
    task: str
    classes: list[str]
    n_train: int
    n_test: int
    skipped: list[tuple[str, str]]  # (path, reason) of images that could not be decoded
    head_val_acc: float
    test_acc: float  # oracle head accuracy on the task's own test split (nan without one)
    bb_val_acc: float | None = None
    bb_test_acc: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    knowledge: TaskKnowledge | None = None
    packet: bytes | None = None  # the signed packet stored with the task (None when stored without a key)
    #: the anchors' held-out calibration, for a caller that encodes the packet itself (store=False); never stored
    calibration: ThresholdCalibration | None = field(default=None, repr=False)

    @property
    def open_set_calibration_images(self) -> int:
        """Held-out images the Mahalanobis open-set threshold rests on (0: none could be held out)."""
        return sum(len(f.held_out) for f in self.calibration.folds) if self.calibration is not None else 0

    @property
    def open_set_calibration_thin(self) -> bool:
        """Fewer held-out images than the calibration aims for (``MIN_CALIBRATION_ROWS``): the task's 1 %
        open-set test is then a rough one, and "unknown" noisy for it."""
        return (self.knowledge is not None and self.knowledge.maha is not None
                and self.open_set_calibration_images < MIN_CALIBRATION_ROWS)


@dataclass
class Prediction:
    source: str
    task: str | None  # None when unknown or unreadable
    label: str | None
    task_confidence: float
    class_confidence: float
    unknown: bool = False
    error: str | None = None
    agent: str | None = None  # the chosen task's origin agent: with ``task``, its fleet-wide identity
    task_label: str | None = None  # ``task``, or ``task@agent`` when several stored tasks share the name
    # The stored task (as ``task_label``) and class that came closest, also when the answer is
    # ``unknown``: the user sees what the input resembled, and ``task_confidence`` (a calibrated
    # posterior over stored tasks) says how sure the mapper was among them.
    nearest_task: str | None = None
    nearest_label: str | None = None

    def to_dict(self) -> dict:
        return {"source": self.source, "task": self.task, "agent": self.agent, "task_label": self.task_label,
                "label": self.label,
                "task_confidence": round(self.task_confidence, 4), "class_confidence": round(self.class_confidence, 4),
                "unknown": self.unknown, "nearest_task": self.nearest_task, "nearest_label": self.nearest_label,
                "error": self.error}


@dataclass
class FeatureBatch:
    """Raw features (bb = 0), the trunk statistics the mapper reads, and the trunk activations
    needed to rerun BB tails (None when no stored task uses BB)."""

    features: np.ndarray
    trunk_acts: np.ndarray | None
    trunk_stats: np.ndarray | None = None
    #: preprocessed images [N,3,H,W], or their paths (an object array, decoded again only for the rows
    #: routed to such a task), kept only when a stored task reruns the whole graph
    images: np.ndarray | None = None


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _require_bb() -> None:
    """A ``LearnError`` naming the install command when this install cannot learn beneficial biases."""
    from skill_edge.runtime.learn.bb import BBUnavailable, require_bb

    try:
        require_bb()
    except BBUnavailable as exc:
        raise LearnError(str(exc)) from None


def _check_fit_options(k: int, m: int, seed: int) -> None:
    if k < 1 or m < 1 or seed < 0:
        raise LearnError(f"k (GMMC components) and m (exemplars per class) must be >= 1 and seed >= 0, "
                         f"got k={k}, m={m}, seed={seed}")


def _check_task_name(task: str) -> None:
    """``LearnError`` for a name ``knowledge.validate_name`` refuses: the one rule, before any training."""
    try:
        validate_name(task)
    except KnowledgeError as exc:
        raise LearnError(str(exc)) from None


def default_agent_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Device:
    """A SKILL agent: teacher for the tasks it learns, student for the packets it receives."""

    def __init__(self, home: str | Path, rom_dir: str | Path, *, providers: Sequence[str] | None = None,
                 agent_id: str | None = None, quota_bytes: int | None = None, cache_dir: str | Path | None = None,
                 threads: int | None = None, engine: RomEngine | None = None) -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.engine = engine or RomEngine(rom_dir, providers=providers, threads=threads)
        self.bank = KnowledgeBank(self.home / "bank", quota_bytes=quota_bytes)
        cache_root = Path(cache_dir or os.environ.get("SKILL_EDGE_CACHE") or self.home / "cache")
        self.cache = FeatureCache(cache_root, self.engine.fingerprint)
        self.agent_id = agent_id or self._key_id() or default_agent_id()
        self.signed_seqs = SeqLedger(self.home / "keys" / LEDGER_FILE, self.agent_id)
        self._mappers: dict[str, tuple[str, TaskMapper, list[TaskKnowledge]]] = {}
        self._held_cache: tuple[str, list[TaskKnowledge]] | None = None

    # ------------------------------------------------------------------ identity
    def _key_id(self) -> str | None:
        key = self._device_key()
        return key.key_id if key is not None else None

    def _device_key(self):
        """The device's signing key from ``home/keys``, or None when it has none yet."""
        try:
            from skill_edge.runtime.exchange.keys import load_device_key

            return load_device_key(self.home)
        except Exception:  # noqa: BLE001 - no key yet is normal
            return None

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint

    # ------------------------------------------------------------------ features
    def extract(self, paths: Sequence[Path], *, keep_trunk: bool = False,
                progress: Callable[[int], None] | None = None) -> Extraction:
        """ROM features for files, through the per-ROM feature cache."""
        key = self.cache.key(paths, with_trunk=keep_trunk)
        hit = self.cache.load(key)
        if hit is not None:
            if progress:
                progress(len(paths))
            return hit
        ex = self.engine.extract(paths, keep_trunk=keep_trunk, progress=progress)
        self.cache.save(key, ex)
        return ex

    # ------------------------------------------------------------------ learn (teacher)
    def learn(self, task: str, data: str | Path | ImageFolderTask, *, bb: bool = False,
              mappers: Sequence[str] = ("gmmc", "maha"), transform: str = DEFAULT_TRANSFORM, k: int = 25, m: int = 5,
              seed: int = 0, bb_epochs: int | None = None, bb_split: str | int = "auto", store: bool = True,
              key=None, budget: int | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> LearnReport:
        """Learn a task from an ImageFolder directory and (by default) store it in the bank as this
        device's own task, together with its signed packet.

        ``key`` (a ``DeviceKey``; default: the device's key in ``home/keys``, if it has one) signs the
        packet and ``budget`` bounds its bytes.  Task and packet go into the bank in one atomic write,
        so a crash can never leave a stored version whose packet is lost: publishing reads the bank.
        The packet is encoded before anything is stored, so a ``BudgetError`` stores nothing."""
        _check_task_name(task)
        _check_fit_options(k, m, seed)  # before any image is read
        if bb:
            _require_bb()  # before any image is read: this install may lack the [bb] extra
            self.bb_split_points(bb_split)  # a bad --bb-split fails before any work, too
        ds = data if isinstance(data, ImageFolderTask) else load_image_folder(data, seed=seed)
        t0 = time.perf_counter()
        done = [0]

        def tick(n: int, total: int, what: str) -> None:
            done[0] += n
            if progress:
                progress(what, done[0], total)

        n_train = len(ds.train)
        ex = self.extract(ds.train.paths, keep_trunk=bb, progress=lambda n: tick(n, n_train, "extract train"))
        skipped = [(str(ds.train.paths[i]), why) for i, why in ex.failed]
        if len(ex.index) == 0:
            raise LearnError(f"none of the {n_train} training images of {task!r} could be decoded")
        y = np.asarray(ds.train.labels)[ex.index]
        present = np.unique(y)
        if len(present) < 2:
            raise LearnError(f"after skipping {len(skipped)} unreadable images, task {task!r} has training images "
                             f"of only {len(present)} class; a task needs at least 2")
        t_extract = time.perf_counter() - t0
        knowledge, metrics = self.learn_features(task, ds.classes, ex.features, y, trunk_stats=ex.trunk_stats,
                                                 trunk_acts=ex.trunk_acts, bb=bb, bb_split=bb_split,
                                                 images=[ds.train.paths[i] for i in ex.index],
                                                 mappers=mappers, transform=transform, k=k, m=m, seed=seed,
                                                 bb_epochs=bb_epochs, source=f"learned:{Path(ds.root).resolve()}",
                                                 progress=progress)
        t_fit = time.perf_counter() - t0 - t_extract
        test_acc, bb_test = float("nan"), None
        if len(ds.test):
            n_test = len(ds.test)
            done[0] = 0
            tex = self.extract(ds.test.paths, keep_trunk=bb, progress=lambda n: tick(n, n_test, "extract test"))
            skipped += [(str(ds.test.paths[i]), why) for i, why in tex.failed]
            ty = np.asarray(ds.test.labels)[tex.index]
            if bb and knowledge.bb is not None:
                feats = self.bb_features(knowledge, tex.trunk_acts, [ds.test.paths[i] for i in tex.index])
                bb_test = head_accuracy(knowledge.head_weight, knowledge.head_bias, feats, ty)
                plain_head = metrics["plain_head"]
                test_acc = head_accuracy(plain_head.weight, plain_head.bias, tex.features, ty)
            else:
                test_acc = head_accuracy(knowledge.head_weight, knowledge.head_bias, tex.features, ty)
            knowledge.meta.metrics["test_acc"] = float(test_acc)
            if bb_test is not None:
                knowledge.meta.metrics["bb_test_acc"] = float(bb_test)
        packet = (self.store_own(knowledge, key=key, budget=budget, calibration=metrics["threshold_calibration"])
                  if store else None)
        return LearnReport(task, list(ds.classes), int(len(ex.index)), int(len(ds.test)), skipped,
                           float(metrics["head_val_acc"]), float(test_acc), metrics.get("bb_val_acc"), bb_test,
                           {"extract": t_extract, "fit": t_fit, "total": time.perf_counter() - t0}, knowledge,
                           packet, metrics["threshold_calibration"])

    def store_own(self, knowledge: TaskKnowledge, *, key=None, budget: int | None = None,
                  calibration: ThresholdCalibration | None = None) -> bytes | None:
        """Encode ``knowledge``'s signed packet, then store both as this device's own task in one bank write.

        ``key`` defaults to the device key in ``home/keys``; without any key the task is stored
        without a packet (and cannot be published until it is learned again with one).
        ``calibration`` (``learn_features``' ``metrics["threshold_calibration"]``) lets a budget packet
        set its Mahalanobis threshold on the held-out images (``PacketCodec.encode``).  The signed seq
        goes into the key's ledger (``SeqLedger``) first.  Returns the packet bytes.  Raises
        ``BudgetError`` (nothing stored), ``OSError`` from the ledger or ``BankError`` (bank unchanged)."""
        key = key if key is not None else self._device_key()
        packet = None
        if key is not None:
            from skill_edge.runtime.exchange.packet import PacketCodec

            packet = PacketCodec(budget).encode(knowledge, key, calibration=calibration)
            self.signed_seqs.record(knowledge.task, knowledge.meta.seq)  # before it can leave the device
        self.bank.put(knowledge, packet_bytes=packet, own=True)
        self._mappers.clear()
        self._held_cache = None
        return packet

    def learn_features(self, task: str, classes: Sequence[str], features: np.ndarray, labels: np.ndarray, *,
                       trunk_stats: np.ndarray | None = None, trunk_acts: np.ndarray | None = None,
                       bb: bool = False, mappers: Sequence[str] = ("gmmc", "maha"),
                       transform: str = DEFAULT_TRANSFORM, k: int = 25, m: int = 5, seed: int = 0,
                       bb_epochs: int | None = None, bb_split: str | int = "auto",
                       images: Sequence[ImageInput] | None = None, source: str = "",
                       progress: Callable[[str, int, int], None] | None = None) -> tuple[TaskKnowledge, dict]:
        """Fit head (+BB) and anchors from features already extracted with this ROM.

        ``trunk_stats`` (``Extraction.trunk_stats``) are what the default anchor transform adds
        to the features; features alone need ``transform="sqrt_l2"``.  With ``bb``, ``bb_split`` is
        ``"auto"`` (each split of ``bb_train.DEFAULT_BB_SPLITS`` is trained, the best on validation
        kept), ``"tail"``, ``"full"`` (the whole network) or a stage index; splits before the tail need
        ``images`` (the training images, one per feature row) to cache their activations."""
        _check_task_name(task)
        _check_fit_options(k, m, seed)  # before the head trains, not after
        if np.ndim(features) != 2 or np.shape(features)[1] != self.engine.feature_dim:
            raise LearnError(f"features of shape {np.shape(features)} do not fit this device's ROM, whose features "
                             f"are {self.engine.feature_dim} wide")
        labels = np.asarray(labels, np.int64)
        if needs_trunk_stats(transform) and trunk_stats is None:
            raise LearnError(f"anchor transform {transform!r} needs trunk statistics beside the features "
                             "(Extraction.trunk_stats); pass them, or transform='sqrt_l2'")
        held = self._bank_transform(besides=task)
        if held is not None and held != transform:
            raise LearnError(f"the bank's tasks have anchors in the {held!r} space and {task!r} would get "
                             f"{transform!r}; a mapper cannot compare the two. Learn it with transform={held!r} "
                             f"(skill-edge learn --anchor-space {held}), or relearn the bank's tasks")
        kinds = tuple(dict.fromkeys(MAPPER_ALIASES[x] for x in mappers))
        if progress:
            progress("train head", 0, 1)
        head = train_head(features, labels, len(classes), seed=seed)
        metrics: dict = {"head_val_acc": head.val_accuracy, "plain_head": head}
        bb_vec, bb_hash, bb_at = None, "", -1
        if bb:
            _require_bb()
            fit = self._train_bb(bb_split, features, labels, len(classes), head, trunk_acts=trunk_acts,
                                 images=images, epochs=bb_epochs, seed=seed, progress=progress)
            # kept: the kept fit's validation accuracy; not kept: the best any split reached (the plain head ships)
            metrics["bb_val_acc"] = fit.val_accuracy if fit.kept else max(fit.tried.values(), default=fit.val_accuracy)
            metrics["bb_val_acc_without"] = fit.val_accuracy_without_bb
            metrics["bb_kept"] = fit.kept
            metrics["bb_split"] = fit.split
            metrics["bb_tried"] = fit.tried
            metrics["bb_train_macs"] = fit.train_macs
            if fit.kept:
                head, bb_vec, bb_at = fit.head, fit.bb, fit.split
                bb_hash = self.engine.manifest.bias_layout_hash(fit.split)
            else:
                log.info("BB did not beat the plain head on validation for %s; shipping without BB", task)
        if progress:
            progress("fit anchors", 0, 1)
        try:
            anchors = fit_task_anchors(features, labels, trunk_stats=trunk_stats, transform=transform, kinds=kinds,
                                       k=k, m=m, seed=seed)
        except AnchorError as exc:
            raise LearnError(f"cannot fit the task anchors: {exc}") from exc
        prev = self._previous_seq(task)
        meta = TaskMeta(agent_id=self.agent_id, seq=prev + 1, rom_fingerprint=self.fingerprint,
                        bb_layout_hash=bb_hash, bb_split=bb_at, feature_transform=anchors.feature_transform,
                        n_train=int(len(labels)), source=source,
                        metrics={"head_val_acc": float(head.val_accuracy), "weight_decay": float(head.weight_decay),
                                 "head_train_gmacs": metrics["plain_head"].train_macs / 1e9,
                                 **({"bb_val_acc": float(metrics["bb_val_acc"]),
                                     "bb_train_gmacs": float(metrics["bb_train_macs"]) / 1e9,
                                     "bb_val_acc_without": float(metrics["bb_val_acc_without"]),
                                     "bb_best_split": float(metrics["bb_split"])} if bb else {})})
        knowledge = TaskKnowledge(task=task, labels=[str(c) for c in classes], head_weight=head.weight,
                                  head_bias=head.bias, meta=meta, bb=bb_vec, gmmc=anchors.gmmc, maha=anchors.maha,
                                  thresholds=dict(anchors.thresholds)).validate()
        metrics["threshold_calibration"] = anchors.calibration  # for store_own's encoder; never stored or sent
        return knowledge, metrics

    # ------------------------------------------------------------------ beneficial biases
    def bb_split_points(self, spec: str | int) -> list[int]:
        """The split points ``learn --bb-split`` names: ``auto`` (``bb_train.DEFAULT_BB_SPLITS``),
        ``tail``, ``full`` (stage 0, the whole network) or a stage index this ROM can rerun."""
        from skill_edge.runtime.learn.bb import DEFAULT_BB_SPLITS

        man = self.engine.manifest
        valid = man.bb_splits()

        def one(x: str | int) -> int:
            if x == "tail":
                return man.tail_split
            if x == "full":
                return 0
            try:
                s = int(x)
            except (TypeError, ValueError):
                s = -1
            if s not in valid:
                raise LearnError(f"BB split {x!r} is not one this ROM can rerun: give auto, tail, full or a stage "
                                 f"index in {min(valid)}..{max(valid)} (tail = {man.tail_split})")
            return s

        if spec == "auto":
            return list(dict.fromkeys(one(x) for x in DEFAULT_BB_SPLITS if x in ("tail", "full") or int(x) in valid))
        return [one(spec)]

    def _bb_splits_for(self, spec: str | int, have_images: bool) -> list[int]:
        """``bb_split_points``; without the training images ``auto`` keeps to the tail (whose inputs, the
        trunk activations, come with the features), while a named earlier split is an error."""
        splits = self.bb_split_points(spec)
        if spec == "auto" and not have_images:
            tail = self.engine.manifest.tail_split
            if any(s != tail for s in splits):
                log.info("BB split auto without the training images: the tail only")
            return [tail]
        return splits

    def _train_bb(self, spec: str | int, features: np.ndarray, labels: np.ndarray, num_classes: int, head, *,
                  trunk_acts: np.ndarray | None, images: Sequence[ImageInput] | None, epochs: int | None, seed: int,
                  progress: Callable[[str, int, int], None] | None):
        """Train BB from each split point of ``spec``; the fit with the best validation accuracy among those
        that beat the plain head (on a tie, the later, cheaper split), else the last fit (not kept)."""
        from skill_edge.runtime.learn.bb import DEFAULT_BB_RECIPE, prefix_activations, train_bb

        man = self.engine.manifest
        fits = []
        for split in self._bb_splits_for(spec, images is not None):
            if split == man.tail_split:
                if trunk_acts is None:
                    raise LearnError("BB training needs trunk activations (extract with keep_trunk=True)")
                acts = trunk_acts
            else:
                if images is None or len(images) != len(labels):
                    raise LearnError(f"BB from split point {split} needs the training images (one per feature row) "
                                     "to cache its activations")
                if progress:
                    progress(f"cache activations at stage {split}", 0, 1)
                batches = (b.x for b in iter_batches(list(images), self.engine.preprocessing, 32, workers=1)
                           if len(b.index))
                acts = prefix_activations(self.engine.rom_dir, batches, [split])[split]
                if len(acts) != len(labels):
                    raise LearnError("an image that decoded for the features failed for the BB cache")
            fits.append(train_bb(self.engine.rom_dir, acts, labels, num_classes, head, split=split,
                                 recipe=DEFAULT_BB_RECIPE, epochs=epochs, seed=seed, plain_features=features,
                                 progress=(lambda e, n, a, s=split: progress(f"train BB from stage {s}", e, n))
                                 if progress else None))
            log.info("BB from stage %d: val %.4f (plain %.4f), kept=%s, %.1f s", split, fits[-1].val_accuracy,
                     fits[-1].val_accuracy_without_bb, fits[-1].kept, fits[-1].seconds)
        kept = [f for f in fits if f.kept]
        best = max(kept, key=lambda f: (f.val_accuracy, f.split)) if kept else fits[-1]
        best.tried = {int(f.split): float(max(f.history, default=f.val_accuracy)) for f in fits}
        best.train_macs = sum(f.train_macs for f in fits)  # what learning cost: every split tried
        return best

    def bb_features(self, k: TaskKnowledge, trunk_acts: np.ndarray | None,
                    images: Sequence[ImageInput] | np.ndarray | None) -> np.ndarray:
        """Features of ``k``'s BB pass: the tail rerun on trunk activations, or for a task split before the
        tail, the whole graph on the images (preprocessed ``[N,3,H,W]`` or paths) with its biases bound."""
        if not self._reruns_full(k):
            if trunk_acts is None:
                raise LearnError(f"task {k.task!r} uses BB but no trunk activations were kept")
            return self.engine.tail(trunk_acts, k.bb)
        if images is None:
            raise LearnError(f"task {k.task!r} reruns the whole network with its biases (split point "
                             f"{k.meta.bb_split}) but the images were not kept")
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            return self.engine.full(images, k.bb)
        out = []
        for b in iter_batches(list(images), self.engine.preprocessing, 16, workers=1):
            if len(b.failed):
                raise LearnError(f"an image failed to decode for the BB pass: {b.failed[0][1]}")
            out.append(self.engine.full(b.x, k.bb))
        return np.concatenate(out) if out else np.zeros((0, self.engine.feature_dim), np.float32)

    def reruns_full_graph(self, mapper: str, *also: TaskKnowledge) -> bool:
        """Whether classifying with this bank (and ``also``) may rerun the whole graph, so that
        ``featurize`` must keep the preprocessed images."""
        try:
            tasks = [*self.mapper(mapper)[1], *also]
        except LearnError:
            tasks = list(also)  # no task to map to: classify_features says so
        return any(self._reruns_full(k) for k in tasks)

    def _reruns_full(self, k: TaskKnowledge) -> bool:
        """Whether ``k``'s biases start before the ROM tail (its BB pass is the full graph)."""
        return k.bb is not None and 0 <= int(k.meta.bb_split) != self.engine.manifest.tail_split

    def _bank_transform(self, besides: str) -> str | None:
        """The anchor space of the bank's tasks other than this device's own ``besides`` (one record
        read), None if none."""
        for e in self.bank.entries():
            if not self._is_mine(e, besides) and e.anchors:
                return self.bank.get(e.key).meta.feature_transform
        return None

    def own_entry(self, task: str):
        """This device's stored ``task`` (learned here, or its own packet come back), None if none.

        ``learn`` asks before it relearns a task this device already holds: the new version
        outdates the old one at every peer, and the old one is not kept."""
        mine = [e for e in self.bank.entries() if self._is_mine(e, task)]
        return max(mine, key=lambda e: int(e.seq), default=None)

    def _previous_seq(self, task: str) -> int:
        """The newest seq this device used for ``task``, stored, removed or signed: a relearn must
        outdate it at every peer, and peers keep a version the device removed (``KnowledgeBank.removed``)
        or lost with a wiped bank (``SeqLedger``, beside the key)."""
        entry = self.own_entry(task)
        seqs = [self.signed_seqs.get(task)] + ([int(entry.seq)] if entry is not None else [])
        seqs += [r.seq for r in self.bank.removed() if self._is_mine(r, task)]
        return max(seqs, default=0)

    def _is_mine(self, entry, task: str) -> bool:
        """Whether ``entry`` is this device's ``task``: learned here, or its own packet come back."""
        return entry.task == task and (entry.own or entry.agent == self.agent_id)

    # ------------------------------------------------------------------ classify (student)
    def knowledge(self) -> list[TaskKnowledge]:
        return self.bank.load_all()

    def _bank_stamp(self) -> str:
        return ",".join(sorted(f"{e.task}@{e.agent}:{e.record}" for e in self.bank.entries()))

    def _held(self, stamp: str) -> list[TaskKnowledge]:
        """The bank's tasks that fit this ROM, loaded once per bank state."""
        if self._held_cache is None or self._held_cache[0] != stamp:
            self._held_cache = (stamp, [k for k in self.knowledge() if self._fits_rom(k)])
        return self._held_cache[1]

    def resolve_mapper(self, kind: str = DEFAULT_MAPPER, stamp: str | None = None) -> MapperKind:
        """The mapper kind a name means for this bank: ``auto`` (``DEFAULT_MAPPER``) is Mahalanobis when
        every stored task carries a Mahalanobis anchor, else the kind that covers more of them."""
        if kind != "auto":
            return MAPPER_ALIASES[kind]
        held = self._held(stamp if stamp is not None else self._bank_stamp())
        n_maha = sum(k.maha is not None for k in held)
        n_gmmc = sum(k.gmmc is not None for k in held)
        return "maha" if n_maha == len(held) or n_maha >= n_gmmc else "gmmc"

    def mapper(self, kind: str = DEFAULT_MAPPER) -> tuple[TaskMapper, list[TaskKnowledge]]:
        """The task mapper over every task in the bank, rebuilt only when the bank changes.

        The bank's index (one small file) says whether it changed; the records themselves, every
        task's tensors read and hash-checked, are loaded only then.  Before, every call loaded them
        all: with 119 tasks that was 180 MB of reads per call, and most of a fleet device's time."""
        stamp = self._bank_stamp()
        kind = self.resolve_mapper(kind, stamp)
        cached = self._mappers.get(kind)
        if cached is None or cached[0] != stamp:
            tasks = [k for k in self._held(stamp) if (k.gmmc if kind == "gmmc" else k.maha) is not None]
            if not tasks:
                if not self._held(stamp):
                    raise LearnError(f"the bank at {self.bank.root} holds no task for this ROM; learn or sync "
                                     "some tasks first")
                raise LearnError(f"the bank holds no task with a {kind} anchor; learn or sync some tasks first")
            # Merge order is the tasks' fleet-wide identity, never arrival order: the mapper's sums
            # (tied scatter, centres) then come out bit-identical on every device holding the same
            # packets, so two devices that received them in different orders classify identically.
            tasks.sort(key=lambda k: (k.task, k.meta.agent_id or ""))
            self._mappers[kind] = (stamp, self._build_mapper(kind, tasks, stamp), tasks)
        return self._mappers[kind][1], self._mappers[kind][2]

    def _build_mapper(self, kind: MapperKind, tasks: list[TaskKnowledge], stamp: str) -> TaskMapper:
        """``build_mapper``, reusing the Mahalanobis student's derived arrays from the last process that
        built them for this bank state (``mapper/maha-<bank digest>.safetensors`` in the home).  A
        missing, stale or unreadable file only means they are computed again and written back; a
        failed write only costs the next cold start the same work."""
        if kind != "maha":
            return build_mapper(kind, tasks)
        from safetensors import SafetensorError
        from safetensors.numpy import load, save

        from skill_edge.runtime.atomic import write_atomically
        from skill_edge.runtime.mapping.mapper import MahalanobisMapper, MapperError

        # the ROM too: the same bank read through another ROM of the same widths holds other tasks
        digest = hashlib.sha256(f"{MahalanobisMapper.STATE_VERSION}|{self.fingerprint}|{stamp}".encode()).hexdigest()[:32]
        folder = self.home / "mapper"
        path = folder / f"maha-{digest}.safetensors"
        if path.is_file():
            try:
                state = load(path.read_bytes())
                if not np.array_equal(state.pop("sha256", None), _state_digest(state)):
                    raise ValueError("its arrays do not match their checksum")
                return build_mapper(kind, tasks, state=state)
            except (OSError, ValueError, SafetensorError, MapperError) as exc:
                log.warning("rebuilding the Mahalanobis mapper: its saved state %s is unusable (%s)", path.name, exc)
        mapper = build_mapper(kind, tasks)
        try:
            state = mapper.state()
            write_atomically(path, save({**state, "sha256": _state_digest(state)}))
            for old in folder.glob("maha-*.safetensors"):
                if old != path:
                    old.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not save the Mahalanobis mapper's state (%s); the next cold start rebuilds it", exc)
        return mapper

    def _fits_rom(self, k: TaskKnowledge) -> bool:
        """Whether a bank task has this ROM's widths.  One that does not (stored before receivers
        checked them, issue 15) is left out of the mapper with a warning: it must not crash classify."""
        if getattr(self, "_rom_shape", None) is None:  # read once: the ROM cannot change under a device
            self._rom_shape = RomShape.from_manifest(self.engine.manifest)
        try:
            k.check_rom_shape(self._rom_shape)
        except KnowledgeError as exc:
            log.warning("left out of the task mapper: %s", exc)
            return False
        return True

    def featurize(self, images: Sequence[ImageInput], *,
                  keep_images: bool = False) -> tuple[FeatureBatch, list[tuple[int, str]], np.ndarray]:
        """``keep_images`` keeps the preprocessed images too, for tasks whose BB reruns the whole graph."""
        ex = self.engine.extract(images, keep_trunk=True, keep_images=keep_images)
        return FeatureBatch(ex.features, ex.trunk_acts, ex.trunk_stats, ex.images), ex.failed, ex.index

    def classify_features(self, batch: FeatureBatch, *, mapper: str = DEFAULT_MAPPER,
                          open_set: bool = True) -> dict[str, np.ndarray | list[str]]:
        """Mapper picks the task, that task's head (with its BB tail pass) picks the class."""
        mp, tasks = self.mapper(mapper)
        res = mp.predict(batch.features, batch.trunk_stats, open_set=open_set)
        n = len(batch.features)
        cls = np.zeros(n, np.int64)
        cls_conf = np.zeros(n, np.float64)
        for t in np.unique(res.task_index):
            rows = np.flatnonzero(res.task_index == t)
            k = tasks[t]
            feats = batch.features[rows]
            if k.bb is not None:  # one BB pass per task: the tail, or the whole graph from the image
                feats = self.bb_features(k, None if batch.trunk_acts is None else batch.trunk_acts[rows],
                                         None if batch.images is None else batch.images[rows])
            p = _softmax(feats @ k.head_weight.T + k.head_bias)
            cls[rows] = p.argmax(1)
            cls_conf[rows] = p.max(1)
        keys = [TaskKey(k.task, k.meta.agent_id) for k in tasks]
        return {"task_index": res.task_index, "task_names": [k.task for k in tasks],
                "task_agents": [k.agent for k in keys], "task_labels": display_names(keys), "class_index": cls,
                "task_confidence": res.confidence, "class_confidence": cls_conf,
                "unknown": res.unknown, "labels": [k.labels for k in tasks]}

    def classify(self, images: Sequence[ImageInput], *, mapper: str = DEFAULT_MAPPER, open_set: bool = True,
                 names: Sequence[str] | None = None) -> list[Prediction]:
        """Classify images of any known task, with no task oracle; unreadable inputs get ``error``."""
        items = list(images)
        names = list(names) if names is not None else [str(x) if isinstance(x, (str, Path)) else f"#{i}"
                                                         for i, x in enumerate(items)]
        batch, failed, index = self.featurize(items, keep_images=self.reruns_full_graph(mapper))
        out: list[Prediction | None] = [None] * len(items)
        for i, why in failed:
            out[i] = Prediction(names[i], None, None, 0.0, 0.0, error=why)
        if len(index):
            r = self.classify_features(batch, mapper=mapper, open_set=open_set)
            for row, i in enumerate(index):
                t = int(r["task_index"][row])
                unknown = bool(r["unknown"][row])
                label = r["labels"][t][int(r["class_index"][row])]
                out[i] = Prediction(names[i], None if unknown else r["task_names"][t], None if unknown else label,
                                    float(r["task_confidence"][row]), float(r["class_confidence"][row]), unknown,
                                    agent=None if unknown else r["task_agents"][t],
                                    task_label=None if unknown else r["task_labels"][t],
                                    nearest_task=r["task_labels"][t], nearest_label=label)
        return [p for p in out if p is not None]
