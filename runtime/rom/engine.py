"""RomEngine: the device's read-only backbone, with a small InferenceSession-like surface.

It verifies the ROM fingerprint on load, then runs the trunk once per image and the tail
with per-sample beneficial biases.  Backends, in order of preference: a TensorRT engine
built for this GPU (``export.trt``), ONNX Runtime CUDA, ONNX Runtime CPU; ``providers=``
overrides the order, as in ``onnxruntime.InferenceSession``.

Bias folding (ONNX Runtime CPU only).  A per-sample bias is an ``Add`` of a graph *input* after
every BN, and on CPU that ``Add`` keeps ORT from fusing Conv+BN+activation into its blocked
(NCHWc) kernels.  On the whole network that costs a lot (about +60 % Lite0, +36 % Xception at
batch 16, benchmarks/rom_throughput.py); on the tail alone it is small (Lite0 tail about 0.87
vs 0.68 ms/image, under 2 % of a whole pass).  Most batches carry one bias vector for every row
(feature extraction with zeros, one task's rows after the mapper split them), so for those the
engine binds the vector into the verified tail graph as a constant (``bind_biases``) and ORT
folds each ``Add`` into its conv's bias.  Bound sessions are cached per vector (LRU); batches
that mix vectors use the per-sample graph.  What made the trunk+tail split slow was not the
biases but spinning thread pools (``ort_session_options``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from skill_edge.export.manifest import RomError, RomManifest, verify_rom

from skill_edge.runtime.rom.preprocess import ImageInput, Preprocessing, iter_batches

log = logging.getLogger(__name__)

PROVIDER_NAMES = ("tensorrt", "cuda", "cpu")
_ORT = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
#: What each backend is called in output: ONNX Runtime's provider names, and TensorRT for the
#: engine's own TensorRT path (``export.trt``), which does not go through ONNX Runtime.
BACKEND_NAMES = {"tensorrt": "TensorRT", **_ORT}
#: Spellings ``providers=`` accepts besides the short names: ONNX Runtime's own provider names
#: (so ``--provider CUDAExecutionProvider`` works as in ``onnxruntime.InferenceSession``) and ``trt``.
#: ORT's ``TensorrtExecutionProvider`` selects the engine's TensorRT path.
_PROVIDER_ALIASES = {"tensorrtexecutionprovider": "tensorrt", "trt": "tensorrt",
                     "cudaexecutionprovider": "cuda", "cpuexecutionprovider": "cpu"}


class ProviderError(ValueError):
    """A backend name that is neither a short name (tensorrt, cuda, cpu) nor ONNX Runtime's name for one."""


def normalize_providers(names: Sequence[str]) -> list[str]:
    """Short backend names for ``names`` (``CUDAExecutionProvider`` -> ``cuda``), in order, without repeats.

    Raises ``ProviderError`` naming every unknown entry and the accepted spellings."""
    out, bad = [], []
    for name in names:
        key = str(name).strip().lower()
        short = key if key in PROVIDER_NAMES else _PROVIDER_ALIASES.get(key)
        if short is None:
            bad.append(str(name))
        elif short not in out:
            out.append(short)
    if bad:
        raise ProviderError(f"unknown provider(s) {', '.join(map(repr, bad))}; choose from "
                            f"{', '.join(PROVIDER_NAMES)} or ONNX Runtime's names "
                            f"TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider")
    return out


@dataclass
class Extraction:
    """Features of the images that decoded, in input order, plus what was skipped and why."""

    features: np.ndarray  # [M, D]
    index: np.ndarray  # [M] positions in the input sequence
    failed: list[tuple[int, str]] = field(default_factory=list)
    trunk_acts: np.ndarray | None = None  # [M, C, h, w] when asked for (BB training)
    seconds: float = 0.0
    trunk_stats: np.ndarray | None = None  # [M, 2C] per-channel mean | std of the trunk map (see trunk_stats)
    images: np.ndarray | None = None  # [M, 3, H, W] preprocessed, when asked for (whole-network BB reruns)

    @property
    def images_per_second(self) -> float:
        return len(self.index) / self.seconds if self.seconds > 0 else 0.0


def trunk_stats(acts: np.ndarray) -> np.ndarray:
    """Per-channel spatial mean and standard deviation of trunk activations: ``[N, C, h, w] -> [N, 2C]``.

    The mid-level "style" statistics of an image (as in style transfer), which the task
    mappers add to the pooled features: tasks whose final features overlap (the CIFAR-10 pairs,
    Omniglot alphabets) differ more in them (``runtime.mapping.anchors``, ``sqrt_l2_trunk``).  They
    cost two reductions over a map the engine computes anyway.
    """
    a = np.asarray(acts, dtype=np.float32)
    if a.ndim != 4:
        raise ValueError(f"trunk activations must be [N, C, h, w], got shape {a.shape}")
    return np.concatenate([a.mean(axis=(2, 3)), a.std(axis=(2, 3))], axis=1).astype(np.float32)


#: Nice increment for decode threads while the ROM runs on the CPU.  Decoding shares the cores
#: with ORT's intra-op threads; at equal priority the scheduler can preempt one of them mid-op
#: while the other waits at the op's barrier (our reading of the figures below, not a trace).
#: At nice 19 the decoder runs in the gaps ORT leaves (it sleeps between ops, spinning is off)
#: and still gets a share when the ROM waits on it.  On 2 cores (Lite0, flowers102 JPEGs,
#: benchmarks/rom_throughput.py) the pipeline reached 1.01x the raw trunk+tail throughput against
#: 0.86x at normal priority in the same rounds; with a busy-loop process competing it costs:
#: 0.86x against 0.91x.
DECODE_NICE_ON_CPU = 19


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, e.g. in a container)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: Bias-bound tail sessions kept per engine (a Lite0 tail is ~4 MB of weights each).
DEFAULT_BOUND_SESSIONS = 8
#: Rows a batch needs before a not-yet-bound bias vector, zeros included, gets its own session.
#: Building one imports onnx, rewrites the graph and opens a session: 0.5-0.6 s in all for Lite0's
#: tail on 2 cores, where one image costs about 0.03 s on the per-sample graph.  Zeros used to be
#: bound at any size, and a cold one-image ``classify`` with ``onnx`` installed paid that for nothing.
BIND_MIN_ROWS = 8


def ort_session_options(threads: int | None = None, *, spinning: bool = False):
    """The ``SessionOptions`` every ROM graph runs with.

    Intra-op spinning is off (``spinning=True`` restores onnxruntime's default, for comparison):
    the engine alternates trunk, tail and bound-tail sessions, each with its own thread pool,
    and a pool that spins after its run steals the cores the next session needs.  On 2 cores,
    with spinning on, trunk+tail at batch 1 took 1.5-1.8x the plain graph's time (Lite0); without
    it the split costs nothing measurable (benchmarks/rom_throughput.py times both).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


#: ONNX Runtime CUDA options for ROM graphs, chosen on an H100 (benchmarks/gpu_check.py, docs/GPU.md).
#: TF32 off: onnxruntime's default TF32 convolutions put Lite0 features 2.6e-3 (relative) away from
#: the CPU's, and a fleet mixes CPU and GPU devices that must agree on the same ROM; in fp32 they
#: agree to 2e-6, for 0-16 % more time at batch 16-64 (it varies by run).  Heuristic cuDNN algorithm choice: its first
#: run at a shape takes about half the time of the default exhaustive search, and runs as fast after.
CUDA_PROVIDER_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}

#: Batch sizes CUDA graphs run at.  onnxruntime's CUDA convolutions redo their cuDNN set-up
#: whenever a session's input shape differs from its previous run (H100: ~5 s per change for an
#: Xception trunk, ~0.3 s for Lite0), and a device's batch sizes vary all the time: the last batch,
#: each task's rows in the tail pass.  So each bucket gets its own session, which only ever sees
#: one shape; a batch is zero-padded up to the next bucket (rows are independent) and larger
#: ones are split.
CUDA_BATCH_BUCKETS = (1, 16, 64)


class _OrtGraph:
    """One ROM graph on one onnxruntime provider; on CUDA, one session per batch bucket."""

    def __init__(self, model: Path | bytes, provider: str, threads: int | None,
                 batch_buckets: Sequence[int] | None = None, cuda_options: Mapping[str, str] | None = None) -> None:
        self.model = model if isinstance(model, bytes) else str(model)
        self.provider, self.threads = provider, threads
        self.cuda_options = dict(CUDA_PROVIDER_OPTIONS if cuda_options is None else cuda_options)
        self.batch_buckets = tuple(sorted(batch_buckets if batch_buckets is not None
                                          else (CUDA_BATCH_BUCKETS if provider == "cuda" else ())))
        if any(int(b) != b or b < 1 for b in self.batch_buckets):
            raise ValueError(f"batch buckets must be positive integers, got {self.batch_buckets}")
        self.session = self._new_session()
        self.inputs = [i.name for i in self.session.get_inputs()]
        self._by_batch: dict[int, object] = {}

    def _new_session(self):
        import onnxruntime as ort

        so = ort_session_options(self.threads)
        options = self.cuda_options if self.provider == "cuda" else {}
        with warnings.catch_warnings():
            # "Specified provider ... is not in available provider names": the check below says it
            # in the product's words, and names what to install
            warnings.filterwarnings("ignore", message="Specified provider", category=UserWarning)
            session = ort.InferenceSession(self.model, so, providers=[(_ORT[self.provider], options)])
        # onnxruntime falls back to the CPU with only a log line when the CUDA provider cannot load
        # (missing libcudnn, say); refuse instead, so RomEngine tries the next backend and says why.
        got = session.get_providers()
        if not got or got[0] != _ORT[self.provider]:
            if _ORT[self.provider] not in ort.get_available_providers():
                raise RuntimeError(f"this onnxruntime build has no {_ORT[self.provider]} (it has "
                                   f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu in place "
                                   "of onnxruntime (README: 'swap the runtimes')")
            raise RuntimeError(f"onnxruntime could not start {_ORT[self.provider]} (session runs on {got}); "
                               "check the CUDA and cuDNN libraries onnxruntime-gpu needs")
        return session

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        n = len(next(iter(feeds.values())))
        if not self.batch_buckets or n == 0:
            return self.session.run(None, feeds)[0]
        top = self.batch_buckets[-1]
        if n > top:
            return np.concatenate([self(**{k: v[i:i + top] for k, v in feeds.items()}) for i in range(0, n, top)])
        b = next(b for b in self.batch_buckets if b >= n)
        session = self._by_batch.get(b)
        if session is None:
            session = self.session if not self._by_batch else self._new_session()
            self._by_batch[b] = session
        if b > n:
            feeds = {k: np.concatenate([v, np.zeros((b - n, *v.shape[1:]), np.float32)]) for k, v in feeds.items()}
        return session.run(None, feeds)[0][:n]


def bind_biases(model: bytes, bb: np.ndarray, input_name: str = "bb") -> bytes:
    """A serialised ONNX graph with its ``[N, B]`` bias input replaced by the constant ``bb[None]``.

    The result computes exactly what the graph computes when every row's biases are ``bb``
    (to float32 rounding); it is returned serialised, for ``InferenceSession(bytes)``.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model)
    graph = proto.graph
    match = [i for i in graph.input if i.name == input_name]
    if not match:
        raise RomError(f"the graph has no {input_name!r} input to bind")
    graph.input.remove(match[0])
    graph.initializer.append(numpy_helper.from_array(np.asarray(bb, np.float32)[None], input_name))
    return proto.SerializeToString()


@functools.lru_cache(maxsize=1)
def _can_bind() -> bool:
    """Whether ``bind_biases`` can rewrite graphs here: it needs the ``onnx`` package, which the light
    device install leaves out.  Without it the tail takes its biases through the ``bb`` input, which
    costs about 2 % of a whole pass on Lite0 (benchmarks/results/rom_throughput.json)."""
    return importlib.util.find_spec("onnx") is not None


def optimized_op_counts(model: Path | bytes, threads: int | None = None) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime (CPU) actually runs after its optimizations, with the
    engine's session options: shows whether biases were folded away or still cost an ``Add``."""
    import collections
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort_session_options(threads)
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                             providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return dict(sorted(ops.items()))


def available_providers() -> list[str]:
    """Backends usable on this machine, best first."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    out = []
    try:
        from skill_edge.export import trt

        if trt.gpu_available():
            out.append("tensorrt")
    except ImportError:
        pass
    if "CUDAExecutionProvider" in have and _cuda_device_present():
        out.append("cuda")
    out.append("cpu")
    return out


def _cuda_device_present() -> bool:
    """Whether the CUDA driver sees a GPU, asked through ``libcuda`` itself (no torch on a device)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


class RomEngine:
    """Load a ROM directory, verify it, and run its trunk/tail graphs."""

    def __init__(self, rom_dir: str | Path, providers: Sequence[str] | None = None, *, threads: int | None = None,
                 verify: bool = True, bound_sessions: int = DEFAULT_BOUND_SESSIONS,
                 cuda_options: Mapping[str, str] | None = None, batch_buckets: Sequence[int] | None = None) -> None:
        """``cuda_options`` replaces ``CUDA_PROVIDER_OPTIONS`` on ORT CUDA; ``batch_buckets`` replaces the
        batch sizes ORT graphs run at (default ``CUDA_BATCH_BUCKETS`` on CUDA, none on the CPU).  ``{}`` and
        ``()`` give onnxruntime's own behaviour, which benchmarks/gpu_check.py compares against."""
        self.rom_dir = Path(rom_dir)
        self._cuda_options, self._batch_buckets = cuda_options, batch_buckets
        self.manifest: RomManifest = verify_rom(self.rom_dir) if verify else RomManifest.read(self.rom_dir)
        self.preprocessing = Preprocessing.from_manifest(self.manifest.preprocessing)
        self.threads = threads or int(os.environ.get("SKILL_EDGE_THREADS", "0")) or None
        wanted = normalize_providers(providers or available_providers())
        self.provider, self._graphs = self._open(wanted)
        self.bound_sessions = max(0, int(bound_sessions))
        self._bound: OrderedDict[bytes, _OrtGraph] = OrderedDict()

    # ------------------------------------------------------------------ setup
    def _open(self, wanted: list[str]) -> tuple[str, dict[str, Callable[..., np.ndarray]]]:
        errors = []
        for p in wanted:
            try:
                if p == "tensorrt":
                    from skill_edge.export import trt

                    return p, trt.load_rom_engines(self.rom_dir, self.manifest)
                graphs = {name: _OrtGraph(self.rom_dir / g.file, p, self.threads, self._batch_buckets,
                                          self._cuda_options)
                          for name, g in self.manifest.graphs.items() if name in ("trunk", "tail")}
                return p, graphs
            except (ImportError, RuntimeError, OSError) as exc:
                errors.append(f"{p}: {exc}")
                log.info("provider %s unavailable: %s", p, exc)
        raise RomError("no usable backend for this ROM: " + "; ".join(errors))

    @property
    def backend(self) -> str:
        """The backend that runs, as users know it: ``CPUExecutionProvider``, ``CUDAExecutionProvider``
        or ``TensorRT``."""
        return BACKEND_NAMES[self.provider]

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def feature_dim(self) -> int:
        return self.manifest.feature_dim

    @property
    def trunk_stats_dim(self) -> int:
        """Width of ``trunk_stats`` for this ROM: twice the trunk's channels."""
        return 2 * int(self.manifest.trunk_output_shape[1])

    @property
    def tail_bias_total(self) -> int:
        return self.manifest.tail_bias_total

    # ------------------------------------------------------------------ compute
    def trunk(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed ``[N,3,H,W]`` -> trunk activations ``[N,C,h,w]`` (task independent)."""
        return self._graphs["trunk"](image=images)

    def tail(self, acts: np.ndarray, bb: np.ndarray | None = None) -> np.ndarray:
        """Trunk activations + per-sample tail biases (``[N,B]``, ``[B]`` or None for zeros) -> features."""
        n = acts.shape[0]
        bb = self._bias_rows(bb, n, self.manifest.tail_bias_total, "tail")
        bound = self._bound_graph("tail", bb)
        if bound is not None:
            return bound(trunk_act=acts)
        return self._graphs["tail"](trunk_act=acts, bb=bb)

    def full(self, images: np.ndarray, bb: np.ndarray | None = None) -> np.ndarray:
        """Preprocessed images + biases for every BN slot (``[N,B]``, ``[B]``, or a suffix of the layout:
        the biases of the stages from a BB split point on, the rest zero) -> features, through
        ``full.onnx``.  A BB task split before the tail reruns this (issue 16); the session opens on
        first use, so a device without such tasks never loads the full graph."""
        n = images.shape[0]
        total = self.manifest.bias_total
        if bb is not None:
            bb = np.asarray(bb, np.float32)
            if bb.shape[-1] < total:  # a suffix: the stages before the split point keep zero biases
                pad = np.zeros((*bb.shape[:-1], total - bb.shape[-1]), np.float32)
                bb = np.concatenate([pad, bb], axis=-1)
        bb = self._bias_rows(bb, n, total, "full graph")
        bound = self._bound_graph("full", bb)
        if bound is not None:
            return bound(image=images)
        if "full" not in self._graphs:
            self._graphs["full"] = _OrtGraph(self.rom_dir / self.manifest.graphs["full"].file, self.provider,
                                             self.threads, self._batch_buckets, self._cuda_options) \
                if self.provider != "tensorrt" else self._tensorrt_full()
        return self._graphs["full"](image=images, bb=bb)

    def _tensorrt_full(self):
        raise RomError("whole-network BB reruns need the full graph, which this ROM has no TensorRT engine for; "
                       "run this device on ORT (--providers cuda or cpu)")

    @staticmethod
    def _bias_rows(bb: np.ndarray | None, n: int, b: int, what: str) -> np.ndarray:
        if bb is None:
            return np.zeros((n, b), np.float32)
        bb = np.asarray(bb, np.float32)
        if bb.ndim == 1:
            bb = np.broadcast_to(bb, (n, b)) if bb.shape[0] == b else bb[None]
        if bb.shape != (n, b):
            raise ValueError(f"{what} biases must have shape [{n}, {b}] for this ROM, got {list(bb.shape)}")
        return bb

    def _verified_graph_bytes(self, name: str) -> bytes:
        """A graph file, checked against the manifest again (it is read after load)."""
        info = self.manifest.graphs[name]
        data = (self.rom_dir / info.file).read_bytes()
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise RomError(f"{self.rom_dir / info.file}: file changed since the ROM was verified (sha256 differs)")
        return data

    def _verified_tail_bytes(self) -> bytes:
        return self._verified_graph_bytes("tail")

    def _bound_tail(self, bb: np.ndarray) -> _OrtGraph | None:
        return self._bound_graph("tail", bb)

    def _bound_graph(self, name: str, bb: np.ndarray) -> _OrtGraph | None:
        """The cached session of graph ``name`` with ``bb``'s one vector bound in, or None (mixed rows, a
        GPU, cache off)."""
        if self.provider != "cpu" or not self.bound_sessions or not len(bb) or not _can_bind():
            return None  # the fold pays off on ORT CPU; on a GPU each bound session is one more warm-up
        row = bb[0]
        if bb.strides[0] != 0 and not np.array_equal(bb, np.broadcast_to(row, bb.shape)):
            return None
        key = name.encode() + hashlib.sha256(np.ascontiguousarray(row).tobytes()).digest()
        graph = self._bound.get(key)
        if graph is not None:
            self._bound.move_to_end(key)
            return graph
        if len(bb) < BIND_MIN_ROWS:
            return None
        graph = _OrtGraph(bind_biases(self._verified_graph_bytes(name), row), self.provider, self.threads)
        self._bound[key] = graph
        while len(self._bound) > self.bound_sessions:
            self._bound.popitem(last=False)
        return graph

    def features(self, images: np.ndarray, bb: np.ndarray | None = None) -> np.ndarray:
        return self.tail(self.trunk(images), bb)

    def preprocess(self, image: ImageInput) -> np.ndarray:
        return self.preprocessing(image)

    def decode_plan(self) -> tuple[int, int]:
        """(decode threads, their nice increment) that ``extract`` uses by default.

        ORT CPU: the ROM already uses the cores, so a few low-priority decoders fill its idle
        gaps (``DECODE_NICE_ON_CPU``; one on 2 cores, where one keeps ahead of a Lite0 ROM).
        A GPU backend leaves the CPU to decoding, which is then the limit: every core but one
        (the one feeding the GPU), at normal priority.
        """
        cores = usable_cores()
        if self.provider == "cpu":
            return max(1, cores // 4), DECODE_NICE_ON_CPU
        return max(1, cores - 1), 0

    def extract(self, images: Sequence[ImageInput] | Iterable[ImageInput], *, batch_size: int = 16,
                keep_trunk: bool = False, workers: int | None = None, decode_nice: int | None = None,
                progress: Callable[[int], None] | None = None, keep_images: bool = False) -> Extraction:
        """Decode (in parallel) and run every image; corrupt ones are skipped and listed.

        ``workers`` / ``decode_nice`` override ``decode_plan()``."""
        plan_workers, plan_nice = self.decode_plan()
        workers = plan_workers if workers is None else int(workers)
        nice = plan_nice if decode_nice is None else int(decode_nice)
        feats, stats, index, failed, acts, xs = [], [], [], [], [], []
        t0 = time.perf_counter()
        for batch in iter_batches(images, self.preprocessing, batch_size, workers=workers, nice=nice):
            failed.extend(batch.failed)
            if len(batch.index):
                a = self.trunk(batch.x)
                feats.append(self.tail(a))
                stats.append(trunk_stats(a))
                index.append(batch.index)
                if keep_trunk:
                    acts.append(a)
                if keep_images:
                    xs.append(batch.x)
            if progress:
                progress(len(batch.index) + len(batch.failed))
        d = self.manifest.feature_dim
        return Extraction(
            features=np.concatenate(feats) if feats else np.zeros((0, d), np.float32),
            index=np.concatenate(index) if index else np.zeros(0, np.int64),
            failed=failed,
            trunk_acts=(np.concatenate(acts) if acts else None) if keep_trunk else None,
            seconds=time.perf_counter() - t0,
            trunk_stats=np.concatenate(stats) if stats else np.zeros((0, self.trunk_stats_dim), np.float32),
            images=(np.concatenate(xs) if xs else None) if keep_images else None,
        )
