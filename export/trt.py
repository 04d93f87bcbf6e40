"""TensorRT engines for a ROM: built from its ONNX graphs, cached beside them, tagged by version/precision/GPU.

As in jetson-inference, an engine is only valid for the TensorRT version and the GPU it
was built on, so the file name carries both (``trunk.trt10.13.0.fp16.nvidia-h100.engine``)
and loading a mismatching engine fails with instructions to rebuild.  Buffers are torch
CUDA tensors, which avoids a pycuda dependency.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .manifest import RomError, RomManifest, sha256_file

GRAPHS_FOR_DEVICE = ("trunk", "tail")


class TrtUnavailable(RuntimeError):
    """No GPU, no TensorRT, or an engine built for another TensorRT/GPU."""


def gpu_available() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _require() -> tuple:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TrtUnavailable("the `tensorrt` package is not installed (pip install 'skill-edge[tensorrt]')") from exc
    import torch

    if not torch.cuda.is_available():
        raise TrtUnavailable("no CUDA GPU is visible to this process")
    return trt, torch


def gpu_slug() -> str:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "nogpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class EngineTag:
    graph: str
    trt_version: str
    precision: str  # "fp16" | "fp32"
    gpu: str

    @property
    def filename(self) -> str:
        return f"{self.graph}.trt{self.trt_version}.{self.precision}.{self.gpu}.engine"

    @classmethod
    def parse(cls, name: str) -> "EngineTag":
        m = re.fullmatch(r"(?P<g>[a-z]+)\.trt(?P<v>[0-9.]+?)\.(?P<p>fp16|fp32)\.(?P<gpu>[a-z0-9-]+)\.engine", name)
        if not m:
            raise TrtUnavailable(f"{name} is not a skill-edge engine file name")
        return cls(m["g"], m["v"], m["p"], m["gpu"])


def current_tag(graph: str, fp16: bool) -> EngineTag:
    trt, _ = _require()
    return EngineTag(graph, trt.__version__, "fp16" if fp16 else "fp32", gpu_slug())


def build_engine(onnx_path: Path, out_dir: Path, graph: str, *, fp16: bool, max_batch: int = 32,
                 opt_batch: int = 16, workspace_gb: float = 4.0) -> Path:
    """Parse the ONNX graph and build a serialized engine with a batch optimisation profile."""
    trt, _ = _require()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtUnavailable(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        rest = tuple(t.shape)[1:]
        profile.set_shape(t.name, (1, *rest), (min(opt_batch, max_batch), *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise TrtUnavailable(f"TensorRT failed to build an engine for {onnx_path}")
    path = Path(out_dir) / current_tag(graph, fp16).filename
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(blob))
    tmp.replace(path)
    return path


def build_rom_engines(rom_dir: Path, *, fp16: bool, max_batch: int = 32,
                      progress: Callable[[str], None] = lambda s: None) -> list[Path]:
    """Build trunk and tail engines next to the ONNX files and record them in the manifest."""
    rom_dir = Path(rom_dir)
    m = RomManifest.read(rom_dir)
    paths = []
    for graph in GRAPHS_FOR_DEVICE:
        g = m.graphs[graph]
        progress(f"building TensorRT engine for {graph} ({'fp16' if fp16 else 'fp32'})")
        p = build_engine(rom_dir / g.file, rom_dir, graph, fp16=fp16, max_batch=max_batch)
        m.engines[p.name] = {"graph": graph, "onnx_sha256": g.sha256, "sha256": sha256_file(p),
                             "max_batch": max_batch, **EngineTag.parse(p.name).__dict__}
        paths.append(p)
    m.write(rom_dir)
    return paths


class TrtGraph:
    """One deserialised engine, callable like the ONNX Runtime graphs: ``graph(name=array) -> array``."""

    def __init__(self, path: Path) -> None:
        trt, torch = _require()
        self._torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise TrtUnavailable(f"{path}: TensorRT could not deserialise this engine (built by another version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0])
        self.stream = torch.cuda.Stream()

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        n = next(iter(feeds.values())).shape[0]
        if n > self.max_batch:
            parts = [self(**{k: v[i:i + self.max_batch] for k, v in feeds.items()})
                     for i in range(0, n, self.max_batch)]
            return np.concatenate(parts)
        torch = self._torch
        keep = []
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name], np.float32)).cuda()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        out_name = self.outputs[0]
        out = torch.empty(tuple(self.context.get_tensor_shape(out_name)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(out_name, out.data_ptr())
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return out.cpu().numpy()


def find_engine(rom_dir: Path, graph: str) -> Path | None:
    cands = sorted(Path(rom_dir).glob(f"{graph}.trt*.engine"))
    return cands[0] if cands else None


def load_rom_engines(rom_dir: Path, manifest: RomManifest) -> dict[str, TrtGraph]:
    """Load trunk/tail engines, refusing ones built for another TensorRT version, GPU or ONNX graph."""
    trt, _ = _require()
    graphs = {}
    for graph in GRAPHS_FOR_DEVICE:
        path = find_engine(rom_dir, graph)
        if path is None:
            raise TrtUnavailable(f"no TensorRT engine for {graph} in {rom_dir}; build one with "
                                 f"`skill-edge export --backbone {manifest.backbone} --out {rom_dir} --trt [--fp16]`")
        tag = EngineTag.parse(path.name)
        here = gpu_slug()
        rebuild = (f"rebuild it with `skill-edge export --backbone {manifest.backbone} --out {rom_dir} --trt"
                   f"{' --fp16' if tag.precision == 'fp16' else ''}`")
        if tag.trt_version != trt.__version__ or tag.gpu != here:
            raise TrtUnavailable(f"{path.name} was built for TensorRT {tag.trt_version} on {tag.gpu}; this is "
                                 f"TensorRT {trt.__version__} on {here}: {rebuild}")
        rec = manifest.engines.get(path.name)
        if rec is None or rec.get("onnx_sha256") != manifest.graphs[graph].sha256:
            raise TrtUnavailable(f"{path.name} is not recorded for this ROM's {graph} graph: {rebuild}")
        if sha256_file(path) != rec.get("sha256"):
            raise RomError(f"{path}: engine file was modified (sha256 differs from the manifest): {rebuild}")
        graphs[graph] = TrtGraph(path)
    return graphs
