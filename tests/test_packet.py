"""Knowledge packet format v1: layout, round trips, encodings, tampering, hostile lengths, budgets."""

from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
import zstandard
from bench_modules import load_benchmark
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from skill_edge.runtime.exchange.codec import (
    I8_BLOCK,
    KNOWN_TENSORS,
    QUANTIZERS,
    EncodingPlan,
    PlanError,
    decode_tensor,
    encode_tensor,
    class_merge_path,
    merge_class_means,
    merge_gmmc,
    merge_path,
    parse_size,
    plan_ladder,
    thin_exemplars,
)
from skill_edge.runtime.exchange.keys import DeviceKey
from skill_edge.runtime.knowledge.records import GmmcAnchor, MahalanobisAnchor, TaskKnowledge
from skill_edge.runtime.exchange.packet import (
    HEADER,
    MAX_META_BYTES,
    MAX_PACKET_BYTES,
    MAX_PAYLOAD_BYTES,
    BudgetError,
    PacketCodec,
    PacketError,
    parse_frame,
)

random_knowledge = load_benchmark("fuzz_packets").random_knowledge


@pytest.fixture(scope="module")
def task() -> TaskKnowledge:
    """The reference task of the brief: D=1280, 10 classes, 25 GMMC components, 5 exemplars/class, BB."""
    return random_knowledge(np.random.default_rng(1))


def build(metadata: dict | bytes, raw_payload: bytes, key: DeviceKey | None, compress: bool | None = None,
          raw_len: int | None = None) -> bytes:
    """Assemble a packet by hand from the documented layout (independent of the encoder).
    ``compress`` defaults to what the metadata's plan says."""
    if compress is None:
        try:
            compress = metadata["meta"]["encoding"]["compression"] == "zstd"
        except (TypeError, KeyError, IndexError):
            compress = False
    meta = metadata if isinstance(metadata, bytes) else json.dumps(metadata).encode()
    payload = zstandard.ZstdCompressor().compress(raw_payload) if compress else raw_payload
    flags = (1 if compress else 0) | (2 if key else 0)
    body = HEADER.pack(b"SKPK", 1, flags, 0, len(meta), len(payload),
                       len(raw_payload) if raw_len is None else raw_len) + meta + payload
    if key is None:
        return body
    body += bytes.fromhex(key.key_id)
    return body + key.sign(body)


def sections(data: bytes) -> tuple[dict, bytes]:
    f = parse_frame(data)
    raw = zstandard.ZstdDecompressor().decompress(f.payload) if f.compressed else f.payload
    return json.loads(f.metadata), raw


def st_parts(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", raw, 0)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_join(header: dict, buffer: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + buffer


# ---------------------------------------------------------------------------- layout and round trip


def test_byte_layout_matches_the_documentation(task, key):
    data = PacketCodec(compression="none").encode(task, key)
    magic, version, flags, reserved, m, p, r = HEADER.unpack_from(data, 0)
    assert (magic, version, flags, reserved) == (b"SKPK", 1, 0b10, 0)
    assert p == r and len(data) == 20 + m + p + 8 + 64
    md = json.loads(data[20:20 + m])
    assert md["task"] == task.task and md["meta"]["rom_fingerprint"] == task.meta.rom_fingerprint
    assert md["meta"]["encoding"]["step"] == "fp32"
    header, _ = st_parts(data[20 + m:20 + m + p])
    assert header["head.weight"] == {"dtype": "F32", "shape": [10, 1280],
                                     "data_offsets": header["head.weight"]["data_offsets"]}
    assert data[20 + m + p:20 + m + p + 8] == bytes.fromhex(key.key_id)
    Ed25519PublicKey.from_public_bytes(key.public_key.public_bytes_raw()).verify(data[-64:], data[:-64])


def test_fp32_round_trip_is_exact(task, key, trust):
    data = PacketCodec().encode(task, key)
    p = PacketCodec().decode(data, trust=trust)
    assert p.plan.step == "fp32" and p.plan.lossless
    assert p.knowledge.content_hash() == task.content_hash()
    for name, arr in task.tensors().items():
        np.testing.assert_array_equal(p.knowledge.tensors()[name], arr)
    assert (p.task, p.labels, p.agent_id, p.seq, p.created) == \
           (task.task, task.labels, task.meta.agent_id, task.meta.seq, task.meta.created)
    assert p.signer == key.key_id and p.verified_by == "peer" and p.raw_size == len(data)
    assert p.sha256 == hashlib.sha256(data).hexdigest()
    assert p.knowledge.meta.source == f"packet:{p.sha256}"
    assert p.knowledge.meta.encoding == p.plan.to_dict()
    assert p.knowledge.thresholds == task.thresholds and p.knowledge.meta.metrics == task.meta.metrics


def test_decode_without_trust_parses_but_does_not_verify(task, key):
    p = PacketCodec().decode(PacketCodec().encode(task, key))
    assert p.verified_by is None and p.signer == key.key_id


def test_known_tensor_names_match_task_knowledge(task):
    assert set(task.tensors()) == KNOWN_TENSORS


def test_encoding_is_deterministic(task, key):
    assert PacketCodec().encode(task, key, plan="int8") == PacketCodec().encode(task, key, plan="int8")


# ---------------------------------------------------------------------------- encodings and their error bounds


def _row_bound(x: np.ndarray) -> np.ndarray:
    rows = x if x.ndim == 2 else np.concatenate([x, np.zeros((-len(x)) % I8_BLOCK, x.dtype)]).reshape(-1, I8_BLOCK)
    b = np.abs(rows).max(axis=1, keepdims=True) / 254.0
    return np.broadcast_to(b, rows.shape).reshape(-1)[: x.size].reshape(x.shape)


@pytest.mark.parametrize("shape", [(7, 300), (1000,), (65,), (3, 1)])
def test_int8_rows_within_half_a_step(shape):
    x = np.random.default_rng(2).normal(0, 3, shape).astype(np.float32)
    if len(shape) == 2:
        x[1] = 0.0  # an all-zero row has scale 0 and must come back as zeros
    parts = encode_tensor(x, "i8r")
    assert parts[""].dtype == np.int8 and parts[""].shape == x.shape
    y = decode_tensor(parts, "i8r")
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.all(np.abs(y - x) <= _row_bound(x) * (1 + 1e-5) + 1e-7)
    if len(shape) == 2:
        assert np.all(y[1] == 0)


def test_fp16_within_relative_bound():
    x = np.random.default_rng(3).normal(0, 10, (50, 50)).astype(np.float32)
    x[0, :5] = [1e-9, -3e-7, 0.0, 65000.0, -1e-5]
    y = decode_tensor(encode_tensor(x, "f16"), "f16")
    assert np.all(np.abs(y - x) <= np.maximum(2.0**-11 * np.abs(x), 2.0**-25))
    with pytest.raises(PlanError, match="float16 range"):
        encode_tensor(np.array([1e6], np.float32), "f16")


def test_log_variance_encodings_keep_relative_precision():
    v = np.exp(np.random.default_rng(4).normal(-6, 2, (25, 400))).astype(np.float32)  # spans ~1e-6 .. 1
    lv = np.log(v.astype(np.float64))
    y16 = decode_tensor(encode_tensor(v, "f16_log"), "f16_log")
    assert np.all(np.abs(np.log(y16) - lv) <= 2.0**-11 * np.abs(lv) + 1e-6)
    y8 = decode_tensor(encode_tensor(v, "i8r_log"), "i8r_log")
    span = (lv.max(axis=1) - lv.min(axis=1))[:, None]
    assert np.all(np.abs(np.log(y8) - lv) <= span / 508 * (1 + 1e-4) + 1e-6)
    assert np.all(y8 > 0) and np.all(y16 > 0)
    with pytest.raises(PlanError, match="strictly positive"):
        encode_tensor(np.array([[1.0, 0.0]], np.float32), "i8r_log")


def _within_quant_bound(x: np.ndarray, y: np.ndarray, enc: str) -> bool:
    """The documented bound of an integer code: half a step of its row's or column's scale."""
    quant = QUANTIZERS[enc]
    v, w = (np.log(x.astype(np.float64)), np.log(y.astype(np.float64))) if quant.log else (x, y)
    axis = 1 if quant.axis == "row" else 0
    if quant.log:
        half_range = (v.max(axis=axis, keepdims=True) - v.min(axis=axis, keepdims=True)) / 2
    else:
        half_range = np.abs(v).max(axis=axis, keepdims=True)
    step = half_range / quant.levels
    if quant.side_dtype == "F16":  # scales are rounded up to float16, so a step may be 2**-10 larger
        step = step * (1 + 2.0**-10) + 2.0**-24
    return bool(np.all(np.abs(w - v) <= step / 2 * (1 + 1e-4) + 1e-6))


def test_every_ladder_step_round_trips_within_its_bounds(task, key, trust):
    codec = PacketCodec()
    for plan in codec.plans(task):
        p = codec.decode(codec.encode(task, key, plan=plan), trust=trust)
        got = p.knowledge.tensors()
        assert p.plan.step == plan.step
        assert p.plan.tensors == plan.tensors
        for name, enc in plan.tensors.items():
            x = task.tensors()[name]
            if name.startswith("gmmc.") and plan.gmmc_k != task.gmmc.k:
                x = merge_gmmc(task.gmmc, plan.gmmc_k).__dict__[name.split(".")[1]]
            maha = task.maha
            if plan.maha_means is not None:
                maha = merge_class_means(maha, class_merge_path(maha.class_means)[plan.maha_means])
            if plan.exemplars_per_class != 5:
                maha = thin_exemplars(maha, plan.exemplars_per_class)
            if name.startswith("maha."):
                x = {"maha.class_means": maha.class_means, "maha.exemplars": maha.exemplars,
                     "maha.exemplar_labels": maha.exemplar_labels}[name]
            y = got[name]
            assert y.shape == x.shape and y.dtype == np.float32, (plan.step, name)
            if enc == "f32":
                np.testing.assert_array_equal(y, x)
            elif enc == "f16":
                assert np.all(np.abs(y - x) <= np.maximum(2.0**-11 * np.abs(x), 2.0**-25)), (plan.step, name)
            elif enc == "i8r":
                assert np.all(np.abs(y - x) <= _row_bound(x) * (1 + 1e-5) + 1e-7), (plan.step, name)
            elif enc == "f16_log":
                assert np.all(np.abs(np.log(y) - np.log(x)) <= 2.0**-11 * np.abs(np.log(x)) + 1e-6)
            elif enc == "i8r_log":
                lx = np.log(x.astype(np.float64))
                span = (lx.max(axis=1) - lx.min(axis=1))[:, None]
                assert np.all(np.abs(np.log(y) - lx) <= span / 508 * (1 + 1e-4) + 1e-6), (plan.step, name)
            else:
                assert _within_quant_bound(x, y, enc), (plan.step, name)


def test_ladder_order_and_sizes_shrink(task, key):
    codec = PacketCodec()
    steps = [p.step for p in codec.plans(task)]
    assert steps[:6] == ["fp32", "fp16", "int8", "int4", "int3", "int3+gmmc_k=24"]
    assert steps[steps.index("int3+gmmc_k=1") + 1] == "int3+gmmc_k=1+bb_int8"
    base = "int3+gmmc_k=1+bb_int8+exemplars=1"
    assert steps[steps.index(base):] == [base] + [f"{base}+means={k}" for k in range(9, 0, -1)] + \
        [f"{base}+means=1+head_int2"]  # 10 classes: every merged count
    sizes = [len(codec.encode(task, key, plan=s)) for s in steps]
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[0] > 3.8 * sizes[2]  # int8 is about a quarter of fp32


def test_ladder_skips_parts_the_task_does_not_have():
    k = random_knowledge(np.random.default_rng(5), d=32, c=3, k=None, m=None, bb=None)
    assert [p.step for p in plan_ladder(k)] == ["fp32", "fp16", "int8", "int4", "int3", "int3+head_int2"]
    k2 = random_knowledge(np.random.default_rng(5), d=32, c=3, k=3, m=None, bb=None)
    assert [p.step for p in plan_ladder(k2)] == ["fp32", "fp16", "int8", "int4", "int3", "int3+gmmc_k=2",
                                                 "int3+gmmc_k=1", "int3+gmmc_k=1+head_int2"]


# ---------------------------------------------------------------------------- reductions


def test_gmmc_merge_preserves_mass_mean_and_second_moment(task):
    g = task.gmmc
    w, mu, var = (a.astype(np.float64) for a in (g.weights, g.means, g.variances))
    mean0 = (w[:, None] * mu).sum(0)
    ex2_0 = (w[:, None] * (var + mu**2)).sum(0)
    for k in (24, 10, 3, 1):
        m = merge_gmmc(g, k)
        assert m.k == k and m.means.shape == (k, 1280) and np.all(m.variances > 0)
        w2, mu2, var2 = (a.astype(np.float64) for a in (m.weights, m.means, m.variances))
        assert w2.sum() == pytest.approx(w.sum(), rel=1e-6)
        np.testing.assert_allclose((w2[:, None] * mu2).sum(0), mean0, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose((w2[:, None] * (var2 + mu2**2)).sum(0), ex2_0, rtol=1e-4, atol=1e-5)


def test_gmmc_merge_joins_the_closest_pair_and_keeps_distinct_ones():
    d = 8
    means = np.array([np.zeros(d), np.full(d, 0.01), np.full(d, 10.0), np.full(d, -10.0)], np.float32)
    g = GmmcAnchor(means, np.ones((4, d), np.float32), np.array([0.25] * 4, np.float32))
    m = merge_gmmc(g, 3)
    order = np.argsort(m.means[:, 0])
    np.testing.assert_allclose(m.means[order, 0], [-10.0, 0.005, 10.0], atol=1e-6)
    np.testing.assert_allclose(m.weights[order], [0.25, 0.5, 0.25])
    np.testing.assert_allclose(m.variances[order][1], 1 + 0.005**2, rtol=1e-5)  # E[x^2] - mean^2
    assert set(merge_path(g)) == {4, 3, 2, 1}
    with pytest.raises(PlanError):
        merge_gmmc(g, 5)


def test_thin_exemplars_keeps_first_m_per_class():
    ex = np.arange(12, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1, 2, 2, 2, 2, 0, 1], np.float32)
    t = thin_exemplars(MahalanobisAnchor(np.zeros((3, 4), np.float32), ex, labels), 2)
    np.testing.assert_array_equal(t.exemplar_labels, [0, 1, 0, 1, 2, 2])
    np.testing.assert_array_equal(t.exemplars[:, 0], [0, 1, 2, 3, 6, 7])


# ---------------------------------------------------------------------------- tampering


@pytest.mark.parametrize("where", ["signature", "key_id", "payload", "metadata", "header"])
def test_tampering_anywhere_breaks_the_signature(task, key, trust, where):
    data = bytearray(PacketCodec(compression="none").encode(task, key, plan="int8"))
    m = struct.unpack_from("<I", data, 8)[0]
    pos = {"signature": len(data) - 10, "key_id": len(data) - 70, "payload": 20 + m + 500,
           "metadata": 20 + 5, "header": 7}[where]
    data[pos] ^= 0x01
    with pytest.raises(PacketError) as e:
        PacketCodec().decode(bytes(data), trust=trust)
    expected = {"key_id": "unknown-signer", "header": "malformed"}.get(where, "bad-signature")
    assert e.value.code == expected
    if expected == "bad-signature":
        assert "modified after signing" in str(e.value)


def test_valid_looking_metadata_edit_is_caught_by_the_signature(task, key, trust):
    data = PacketCodec().encode(task, key)
    forged = data.replace(b'"seq":1', b'"seq":9', 1)
    assert forged != data
    PacketCodec().decode(forged)  # still a well-formed packet ...
    with pytest.raises(PacketError, match="modified after signing"):  # ... that does not verify
        PacketCodec().decode(forged, trust=trust)


def test_signature_by_an_untrusted_key_is_rejected(task, trust):
    with pytest.raises(PacketError, match="unknown signer") as e:
        PacketCodec().decode(PacketCodec().encode(task, DeviceKey.generate()), trust=trust)
    assert e.value.code == "unknown-signer"


def test_unsigned_packet_parses_but_is_rejected_with_trust(task, trust):
    data = PacketCodec().encode(task, None)
    assert PacketCodec().decode(data).signer is None
    with pytest.raises(PacketError, match="unsigned") as e:
        PacketCodec().decode(data, trust=trust)
    assert e.value.code == "unsigned"


# ---------------------------------------------------------------------------- hostile lengths


@pytest.fixture(scope="module")
def small_packet(key) -> bytes:
    return PacketCodec(compression="zstd").encode(
        random_knowledge(np.random.default_rng(6), d=32, c=3, k=4, m=2, bb=70), key, plan="int8")


def test_truncation_at_every_cut_point(small_packet):
    for cut in range(len(small_packet)):
        with pytest.raises(PacketError) as e:
            PacketCodec().decode(small_packet[:cut])
        assert e.value.code == "truncated", (cut, str(e.value))


def test_truncation_message_names_the_section():
    data = HEADER.pack(b"SKPK", 1, 0, 0, 812, 0, 0) + b"x" * 40
    with pytest.raises(PacketError, match="truncated: header says 812 bytes of metadata, 40 remain"):
        parse_frame(data)


def test_trailing_bytes_are_rejected(small_packet):
    with pytest.raises(PacketError, match="trailing bytes"):
        parse_frame(small_packet + b"\x00")


@pytest.mark.parametrize("field,value,match", [
    (8, 2**32 - 1, "declares 4294967295 bytes of metadata"),
    (8, MAX_META_BYTES + 1, "metadata, the limit"),
    (12, MAX_PACKET_BYTES + 1, "bytes of payload, the limit"),
    (16, MAX_PAYLOAD_BYTES + 1, "decompressed payload, the limit"),
])
def test_absurd_declared_lengths_fail_before_allocating(field, value, match):
    data = bytearray(HEADER.pack(b"SKPK", 1, 1, 0, 10, 10, 10) + b"\x00" * 100)
    struct.pack_into("<I", data, field, value)
    tracemalloc.start()
    with pytest.raises(PacketError, match=match) as e:
        PacketCodec().decode(bytes(data))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert e.value.code == "oversized" and peak < 1_000_000


def test_oversized_packet():
    with pytest.raises(PacketError, match="oversized") as e:
        parse_frame(b"SKPK" + bytes(MAX_PACKET_BYTES))
    assert e.value.code == "oversized"


def test_header_fields(small_packet):
    for pos, val, match in [(0, b"XKPK", "magic"), (4, b"\x02", "version 2"), (5, b"\x83", "unknown header flags"),
                            (6, b"\x01\x00", "reserved")]:
        d = bytearray(small_packet)
        d[pos:pos + len(val)] = val
        with pytest.raises(PacketError, match=match):
            parse_frame(bytes(d))


def test_zstd_bomb_and_lying_frames_are_refused(task, key):
    md, raw = sections(PacketCodec().encode(task, key))
    md["meta"]["encoding"]["compression"] = "zstd"
    # a frame that declares 100 MB while the header declares the true size
    sink = zstandard.ZstdCompressor().compressobj(size=100_000_000)
    bomb = b"".join(sink.compress(bytes(1_000_000)) for _ in range(100)) + sink.flush()
    meta = json.dumps(md).encode()
    body = HEADER.pack(b"SKPK", 1, 0b11, 0, len(meta), len(bomb), len(raw)) + meta + bomb
    body += bytes.fromhex(key.key_id)
    with pytest.raises(PacketError, match="zstd frame declares 100000000 decompressed bytes"):
        PacketCodec().decode(body + key.sign(body))
    # a frame without a content size cannot be bounded up front: refused
    nosize = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    body = HEADER.pack(b"SKPK", 1, 0b11, 0, len(meta), len(nosize), len(raw)) + meta + nosize
    body += bytes.fromhex(key.key_id)
    with pytest.raises(PacketError, match="zstd frame declares"):
        PacketCodec().decode(body + key.sign(body))
    # two frames back to back
    two = zstandard.ZstdCompressor().compress(raw) + zstandard.ZstdCompressor().compress(b"x")
    with pytest.raises(PacketError, match="after it"):
        PacketCodec().decode(_with_payload(md, two, len(raw), key))


def _with_payload(md: dict, payload: bytes, raw_len: int, key: DeviceKey) -> bytes:
    meta = json.dumps(md).encode()
    body = HEADER.pack(b"SKPK", 1, 0b11, 0, len(meta), len(payload), raw_len) + meta + payload
    body += bytes.fromhex(key.key_id)
    return body + key.sign(body)


# ---------------------------------------------------------------------------- hostile safetensors (validly signed)


def _mutated_payload(packet: bytes, key: DeviceKey, edit) -> bytes:
    md, raw = sections(packet)
    header, buf = st_parts(raw)
    new = edit(header, buf)
    return build(md, new if isinstance(new, bytes) else st_join(*new), key)


@pytest.mark.parametrize("name,edit,match", [
    ("bad json", lambda h, b: struct.pack("<Q", 5) + b"{nope" + b, "not valid JSON"),
    ("header length beyond payload", lambda h, b: struct.pack("<Q", 10**6) + b"{}", "safetensors header claims"),
    ("header length past end", lambda h, b: struct.pack("<Q", 60000) + b"{}", "truncated: safetensors header"),
    ("offsets out of range", lambda h, b: (
        {**h, "head.bias": {**h["head.bias"], "data_offsets": [len(b), len(b) + 12]}}, b), "outside"),
    ("wrong dtype", lambda h, b: ({**h, "head.bias": {**h["head.bias"], "dtype": "F64"}}, b), "dtype 'F64'"),
    ("int dtype", lambda h, b: ({**h, "head.bias": {**h["head.bias"], "dtype": "I8"}}, b), "dtype 'I8'"),
    ("overlapping", lambda h, b: _overlap(h, b), "overlaps|gap|span"),
    ("unexpected tensor", lambda h, b: ({**h, "evil": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, b),
     r"unexpected \['evil'\]"),
    ("missing tensor", lambda h, b: ({k: v for k, v in h.items() if k != "bb"}, b), r"missing \['bb'\]"),
    ("metadata block", lambda h, b: ({**h, "__metadata__": {"a": "b"}}, b), "__metadata__"),
    ("shape vs bytes", lambda h, b: ({**h, "head.bias": {**h["head.bias"], "shape": [4]}}, b), "span"),
    ("negative shape", lambda h, b: ({**h, "head.bias": {**h["head.bias"], "shape": [-3]}}, b), "invalid shape"),
    ("bool shape", lambda h, b: ({**h, "head.bias": {**h["head.bias"], "shape": [True]}}, b), "invalid shape"),
    ("trailing data", lambda h, b: (h, b + b"\x00" * 4), "unaccounted"),
    ("duplicate key", lambda h, b: _dup_key(h, b), "duplicate key"),
])
def test_malformed_safetensors_headers(task, key, trust, name, edit, match):
    data = _mutated_payload(PacketCodec().encode(random_knowledge(np.random.default_rng(7), d=8, c=3, k=2, m=2,
                                                                  bb=5), key), key, edit)
    with pytest.raises(PacketError, match=match) as e:
        PacketCodec().decode(data, trust=trust)  # validly signed: only the payload checks stand in the way
    assert e.value.code == "bad-payload"


def _overlap(h: dict, b: bytes):
    h = json.loads(json.dumps(h))
    off = h["head.bias"]["data_offsets"]
    h["head.bias"]["data_offsets"] = [off[0] - 4, off[1] - 4] if off[0] >= 4 else [off[0] + 4, off[1] + 4]
    return h, b


def _dup_key(h: dict, b: bytes) -> bytes:
    text = json.dumps(h)
    dup = text[:-1] + ', "head.bias": ' + json.dumps(h["head.bias"]) + "}"
    return struct.pack("<Q", len(dup)) + dup.encode() + b


def test_rank_and_scale_shapes_are_checked(key, trust):
    k = random_knowledge(np.random.default_rng(8), d=8, c=3, k=2, m=2, bb=5)
    packet = PacketCodec().encode(k, key, plan="int8")

    def flat_head(h, b):
        h = json.loads(json.dumps(h))
        h["head.weight"]["shape"] = [24]
        return h, b

    def short_scale(h, b):  # same number of bytes, but not one scale per column (a 1-D vector)
        h = json.loads(json.dumps(h))
        h["head.weight.scale"]["shape"] = [1, *h["head.weight.scale"]["shape"]]
        return h, b

    with pytest.raises(PacketError, match="rank 1"):
        PacketCodec().decode(_mutated_payload(packet, key, flat_head), trust=trust)
    with pytest.raises(PacketError, match="head.weight.scale has shape"):
        PacketCodec().decode(_mutated_payload(packet, key, short_scale), trust=trust)


# ---------------------------------------------------------------------------- hostile metadata (validly signed)


def _with_meta(packet: bytes, key: DeviceKey, edit) -> bytes:
    md, raw = sections(packet)
    return build(edit(md), raw, key)  # build() JSON-encodes anything that is not already bytes


@pytest.mark.parametrize("edit,match,code", [
    (lambda md: b"[" * 200_000, "RecursionError", "bad-metadata"),
    (lambda md: b"\xff\xfe", "UnicodeDecodeError", "bad-metadata"),
    (lambda md: json.dumps(md).replace('"seq": 1', '"seq": NaN').encode(), "NaN", "bad-metadata"),
    (lambda md: json.dumps(md)[:-1].encode() + b', "task": "x"}', "duplicate key 'task'", "bad-metadata"),
    (lambda md: [md], "must be a JSON object", "bad-metadata"),
    (lambda md: {**md, "extra": 1}, "expected", "bad-metadata"),
    (lambda md: {**md, "meta": {**md["meta"], "seq": -1}}, "meta.seq", "bad-metadata"),
    (lambda md: {**md, "meta": {**md["meta"], "seq": True}}, "meta.seq", "bad-metadata"),
    (lambda md: json.dumps(md).replace('"created": 1700000001.0', '"created": 1e400').encode(), "meta.created",
     "bad-metadata"),  # Python reads 1e400 as inf
    (lambda md: {**md, "meta": {**md["meta"], "rom_fingerprint": "abc"}}, "rom_fingerprint", "bad-metadata"),
    (lambda md: {**md, "meta": {**md["meta"], "agent_id": ""}}, "agent_id", "bad-metadata"),
    (lambda md: {**md, "meta": {**md["meta"], "evil": 1}}, "unknown", "bad-metadata"),
    (lambda md: {**md, "labels": "abc"}, "labels", "bad-metadata"),
    (lambda md: {**md, "thresholds": {"gmmc": "1"}}, "thresholds", "bad-metadata"),
    (lambda md: {**md, "meta": {**md["meta"], "encoding": {**md["meta"]["encoding"], "format": 2}}},
     "format 2", "bad-metadata"),
    (lambda md: json.dumps({**md, "meta": {**md["meta"], "encoding": {**md["meta"]["encoding"],
                                                                      "compression": "zstd"}}}).encode(),
     "header flag", "bad-metadata"),  # bytes: build() does not compress, so flag and plan disagree
    (lambda md: {**md, "meta": {**md["meta"], "encoding": {**md["meta"]["encoding"], "tensors": {
        **md["meta"]["encoding"]["tensors"], "gmmc.weights": "i8r"}}}}, "not allowed", "bad-metadata"),
    (lambda md: {**md, "meta": {**md["meta"], "encoding": {**md["meta"]["encoding"], "gmmc_k": 1}}},
     "GMMC components", "bad-knowledge"),
    # KnowledgeError from TaskKnowledge.from_parts surfaces as PacketError
    (lambda md: {**md, "labels": ["a", "a", "b"]}, "duplicate labels", "bad-knowledge"),
    (lambda md: {**md, "labels": ["a", "b"]}, "do not fit 2 classes", "bad-knowledge"),
    (lambda md: {**md, "meta": {**md["meta"], "bb_layout_hash": ""}}, "bb_layout_hash", "bad-knowledge"),
])
def test_malformed_metadata(key, trust, edit, match, code):
    packet = PacketCodec().encode(random_knowledge(np.random.default_rng(9), d=8, c=3, k=2, m=2, bb=5), key)
    data = _with_meta(packet, key, edit)
    with pytest.raises(PacketError, match=match) as e:
        PacketCodec().decode(data, trust=trust)
    assert e.value.code == code


def test_non_finite_tensor_values_are_refused(key, trust):
    k = random_knowledge(np.random.default_rng(10), d=8, c=3, k=2, m=2, bb=5)
    md, raw = sections(PacketCodec().encode(k, key))
    header, buf = st_parts(raw)
    b = bytearray(buf)
    off = header["head.bias"]["data_offsets"][0]
    b[off:off + 4] = np.array([np.inf], np.float32).tobytes()
    with pytest.raises(PacketError, match="non-finite") as e:
        PacketCodec().decode(build(md, st_join(header, bytes(b)), key), trust=trust)
    assert e.value.code == "bad-knowledge"


# ---------------------------------------------------------------------------- encoder refusals


def test_encoder_refuses_records_that_are_not_ready_to_send(task, key):
    with pytest.raises(PacketError, match="rom_fingerprint"):
        PacketCodec().encode(replace(task, meta=replace(task.meta, rom_fingerprint="")), key)
    with pytest.raises(PacketError, match="agent_id"):
        PacketCodec().encode(replace(task, meta=replace(task.meta, agent_id="")), key)
    with pytest.raises(PacketError, match="bb_layout_hash"):
        PacketCodec().encode(replace(task, meta=replace(task.meta, bb_layout_hash="")), key)
    with pytest.raises(PacketError, match="finite"):
        PacketCodec().encode(replace(task, meta=replace(task.meta, metrics={"acc": float("nan")})), key)
    with pytest.raises(ValueError, match="no step 'int5'"):
        PacketCodec().encode(task, key, plan="int5")
    with pytest.raises(ValueError, match="gmmc_k must be below its 25"):
        PacketCodec().encode(task, key, plan="int8+gmmc_k=25")


def test_plan_from_dict_rejects_garbage():
    good = plan_ladder(random_knowledge(np.random.default_rng(11), d=8, c=3, k=2, m=2, bb=5))[2].to_dict()
    assert EncodingPlan.from_dict(good).to_dict() == good
    for bad in ([], {**good, "x": 1}, {**good, "gmmc_k": 0}, {**good, "gmmc_k": 3},
                {**good, "exemplars_per_class": None}, {**good, "tensors": {"evil": "f32"}}, {**good, "step": ""}):
        with pytest.raises(PlanError):
            EncodingPlan.from_dict(bad)


# ---------------------------------------------------------------------------- budgets


def test_budget_is_never_exceeded_and_the_least_lossy_fitting_step_wins(key, trust):
    rng = np.random.default_rng(12)
    for i in range(25):
        k = random_knowledge(rng, d=int(rng.integers(8, 400)), c=int(rng.integers(2, 20)),
                             k=int(rng.integers(1, 8)) if rng.random() < 0.8 else None,
                             m=int(rng.integers(1, 6)) if rng.random() < 0.7 else None,
                             bb=int(rng.integers(1, 3000)) if rng.random() < 0.5 else None)
        ladder_sizes = [len(PacketCodec().encode(k, key, plan=p)) for p in plan_ladder(k)]
        smallest = min(ladder_sizes)
        budget = int(rng.integers(smallest, ladder_sizes[0] + 2))
        data = PacketCodec(budget_bytes=budget).encode(k, key)
        assert len(data) <= budget
        p = PacketCodec().decode(data, trust=trust)
        idx = [q.step for q in plan_ladder(k)].index(p.plan.step)
        assert all(s > budget for s in ladder_sizes[:idx]), (i, budget, ladder_sizes, p.plan.step)
        with pytest.raises(BudgetError) as e:
            PacketCodec(budget_bytes=smallest - 1).encode(k, key)
        assert e.value.smallest_bytes == smallest and str(smallest) in str(e.value)


def test_budget_for_the_reference_task(task, key, trust):
    for budget, step in [("600KB", "fp32"), ("300KB", "fp16"), ("150KB", "int8")]:
        data = PacketCodec(budget_bytes=budget).encode(task, key)
        assert len(data) <= parse_size(budget)
        assert PacketCodec().decode(data, trust=trust).plan.step == step
    with pytest.raises(BudgetError, match="raise the budget to at least") as e:
        PacketCodec(budget_bytes="10KB").encode(task, key)
    assert isinstance(e.value, PacketError) and 10_000 < e.value.smallest_bytes < 25_000
    assert e.value.smallest_step.endswith("+means=1+head_int2")  # its 10 class means merged into one row


@pytest.mark.parametrize("text,n", [("64KB", 64_000), ("64kb", 64_000), ("1.5MB", 1_500_000), ("64KiB", 65_536),
                                    ("2MiB", 2 * 1024**2), ("1GB", 10**9), ("900", 900), ("900 B", 900), (512, 512)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "KB", "12 parsecs", "-5KB", "0", "1.5.5MB", 0])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_resign_changes_only_the_seq_and_keeps_the_payload_bytes(task, key, trust):
    codec = PacketCodec("56KB")  # a budget rung: signing again must not re-encode (or grow) it
    data = codec.encode(replace(task, meta=replace(task.meta, seq=4)), key)
    again = codec.resign(data, key, 9)
    old, new = parse_frame(data), parse_frame(again)
    assert new.payload == old.payload and new.flags == old.flags
    md_old, md_new = json.loads(old.metadata), json.loads(new.metadata)
    assert md_new["meta"].pop("seq") == 9 and md_old["meta"].pop("seq") == 4
    assert md_new == md_old
    a, b = codec.decode(data, trust=trust), codec.decode(again, trust=trust)  # verifies the new signature
    assert b.seq == 9 and b.knowledge.meta.created == a.knowledge.meta.created
    np.testing.assert_array_equal(b.knowledge.head_weight, a.knowledge.head_weight)


def test_resign_refuses_other_keys_tampering_and_a_lower_seq(task, key):
    codec = PacketCodec()
    data = codec.encode(replace(task, meta=replace(task.meta, seq=4)), key)
    with pytest.raises(PacketError, match="only this device's own packets"):
        codec.resign(data, DeviceKey.generate(), 5)
    with pytest.raises(PacketError, match="only this device's own packets"):
        codec.resign(codec.encode(task, None), key, 5)
    f = parse_frame(data)
    tampered = bytearray(data)
    tampered[len(f.signed_part) - 20] ^= 1  # a payload byte after signing
    with pytest.raises(PacketError, match="bad signature"):
        codec.resign(bytes(tampered), key, 5)
    for seq in (3, 4):
        with pytest.raises(ValueError, match="higher seq than 4"):
            codec.resign(data, key, seq)
