"""Fuzz the knowledge-packet parser: mutate valid packets and check that nothing gets through.

Two kinds of cases, drawn by hypothesis:

* ``raw``: a valid signed packet is mutated as bytes (bit flips, byte sets, truncation,
  insertion, deletion, splices with another packet, rewrites of the header's or the
  safetensors header's length fields, digit swaps inside the metadata JSON).  Decoding
  must raise ``PacketError`` and nothing else, both without a trust store (parser only)
  and with one; a mutant that decodes *and verifies* is an accepted mutant, a failure,
  unless its bytes equal the original's.
* ``resigned``: the metadata JSON or the decompressed safetensors bytes are mutated and
  the packet is re-framed and re-signed with the trusted key (a buggy or hostile trusted
  sender).  This reaches the JSON, plan, safetensors and knowledge checks behind the
  signature; decoding must return a valid ``Packet`` or raise ``PacketError``.

Usage (full run; the CI test runs a few thousand of the same cases)::

    nice -n 19 python benchmarks/fuzz_packets.py --cases 100000

writes benchmarks/results/fuzz.json: {cases, crashes, accepted_mutants, seconds, machine, command, ...}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from skill_edge.runtime.exchange.keys import DeviceKey, TrustStore
from skill_edge.runtime.machine import cpu_model, portable_command
from skill_edge.runtime.knowledge.records import GmmcAnchor, MahalanobisAnchor, TaskKnowledge, TaskMeta
from skill_edge.runtime.exchange.packet import (
    FLAG_SIGNED,
    FLAG_ZSTD,
    HEADER,
    HEADER_BYTES,
    MAX_META_BYTES,
    MAX_PACKET_BYTES,
    MAX_PAYLOAD_BYTES,
    Packet,
    PacketCodec,
    PacketError,
    parse_frame,
)

ROM_FINGERPRINT = hashlib.sha256(b"fuzz-rom").hexdigest()


def random_knowledge(rng: np.random.Generator, d: int = 1280, c: int = 10, k: int | None = 25,
                     m: int | None = 5, bb: int | None = 2048, task: str = "task-a", agent: str = "agent-a",
                     seq: int = 1) -> TaskKnowledge:
    """A task record with random but realistic-looking parts (non-negative exemplar features,
    log-normal variances, Dirichlet weights)."""
    gmmc = maha = None
    if k:
        gmmc = GmmcAnchor(rng.normal(0, 1, (k, d)).astype(np.float32),
                          np.exp(rng.normal(-2, 0.7, (k, d))).astype(np.float32),
                          rng.dirichlet(np.ones(k)).astype(np.float32))
    if m:
        maha = MahalanobisAnchor(rng.normal(0, 1, (c, d)).astype(np.float32),
                                 np.abs(rng.normal(0, 1, (c * m, d))).astype(np.float32),
                                 np.repeat(np.arange(c), m).astype(np.float32))
    return TaskKnowledge(
        task=task, labels=[f"class-{i}" for i in range(c)],
        head_weight=rng.normal(0, 0.05, (c, d)).astype(np.float32),
        head_bias=rng.normal(0, 0.1, c).astype(np.float32),
        meta=TaskMeta(agent_id=agent, seq=seq, created=1_700_000_000.0 + seq, rom_fingerprint=ROM_FINGERPRINT,
                      bb_layout_hash=hashlib.sha256(b"layout").hexdigest() if bb else "", n_train=100,
                      metrics={"val_acc": 0.9}),
        bb=rng.normal(0, 0.02, bb).astype(np.float32) if bb else None,
        gmmc=gmmc, maha=maha, thresholds={"gmmc": -12.5},
    )


@dataclass
class Corpus:
    """Valid packets to mutate, the key that signed them and a trust store holding it."""

    key: DeviceKey
    trust: TrustStore
    packets: list[bytes]
    codec: PacketCodec = field(default_factory=PacketCodec)


def build_corpus(trust_dir: str | Path, seed: int = 0) -> Corpus:
    """Small packets (fast to decode) covering every section: fp32/uncompressed, int8/zstd,
    merged GMMC, thinned exemplars, no BB, and one unsigned packet."""
    rng = np.random.default_rng(seed)
    key = DeviceKey.generate()
    trust = TrustStore(trust_dir)
    trust.add("fuzz-peer", key.public_key)
    full = random_knowledge(rng, d=24, c=3, k=4, m=3, bb=100)
    no_bb = random_knowledge(rng, d=16, c=2, k=3, m=None, bb=None, task="task-b")
    packets = [
        PacketCodec(compression="none").encode(full, key),
        PacketCodec(compression="zstd").encode(full, key, plan="int8"),
        PacketCodec(compression="zstd").encode(full, key, plan="fp16"),
        PacketCodec(compression="none").encode(full, key, plan="int8+gmmc_k=2"),
        PacketCodec(compression="none").encode(full, key, plan="int8+gmmc_k=1+bb_int8+exemplars=1"),
        PacketCodec(compression="zstd").encode(no_bb, key),
        PacketCodec(compression="none").encode(no_bb, None),
    ]
    return Corpus(key, trust, packets)


# ---------------------------------------------------------------------------- mutations

RAW_OPS = ("bitflip", "setbyte", "truncate", "insert", "delete", "splice", "header_length",
           "tensor_header_length", "digit", "duplicate_range")
INTERESTING_U32 = (0, 1, 7, 8, 19, 20, 71, 72, 73, 255, 256, 65535, 65536, MAX_META_BYTES, MAX_META_BYTES + 1,
                   MAX_PACKET_BYTES, MAX_PACKET_BYTES + 1, MAX_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES + 1,
                   2**31 - 1, 2**31, 2**32 - 1)


@st.composite
def raw_mutation(draw: st.DrawFn, original: bytes, other: bytes) -> bytes:
    """One to three stacked byte-level mutations of ``original`` (``other`` supplies splice material)."""
    b = original
    for _ in range(draw(st.integers(1, 3))):
        if b:
            b = draw(_one_raw_mutation(b, other))
    return b


@st.composite
def _one_raw_mutation(draw: st.DrawFn, original: bytes, other: bytes) -> bytes:
    b = bytearray(original)
    n = len(b)
    op = draw(st.sampled_from(RAW_OPS))
    pos = draw(st.integers(0, n - 1))
    if op == "bitflip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, n - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
    elif op == "setbyte":
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, n - 1))] = draw(st.sampled_from((0, 1, 0x7F, 0x80, 0xFF)) | st.integers(0, 255))
    elif op == "truncate":
        b = b[:pos]
    elif op == "insert":
        b[pos:pos] = draw(st.binary(min_size=1, max_size=64))
    elif op == "delete":
        del b[pos:pos + draw(st.integers(1, 64))]
    elif op == "splice":
        j = draw(st.integers(0, len(other) - 1))
        if draw(st.booleans()):
            b = b[:pos] + other[j:]
        else:
            span = draw(st.integers(1, 256))
            b[pos:pos + span] = other[j:j + span]
    elif op == "header_length" and n >= HEADER_BYTES:
        off = draw(st.sampled_from((8, 12, 16)))
        old = struct.unpack_from("<I", b, off)[0]
        new = draw(st.sampled_from(INTERESTING_U32) | st.integers(-16, 16).map(lambda d: (old + d) % 2**32))
        struct.pack_into("<I", b, off, new)
    elif op == "tensor_header_length" and n >= HEADER_BYTES:
        m_len = struct.unpack_from("<I", b, 8)[0]
        off = HEADER_BYTES + m_len
        if off + 8 <= n:
            old = struct.unpack_from("<Q", b, off)[0]
            new = draw(st.sampled_from((0, 1, 2, 2**32, 2**63, 2**64 - 1)) |
                       st.integers(-16, 16).map(lambda d: (old + d) % 2**64))
            struct.pack_into("<Q", b, off, new)
    elif op == "digit" and n >= HEADER_BYTES:
        digits = [i for i, c in enumerate(b[:HEADER_BYTES + struct.unpack_from("<I", b, 8)[0]])
                  if 0x30 <= c <= 0x39 and i >= HEADER_BYTES]
        if digits:
            b[draw(st.sampled_from(digits))] = draw(st.integers(0x30, 0x39))
    elif op == "duplicate_range":
        span = draw(st.integers(1, 128))
        b[pos:pos] = b[pos:pos + span]
    return bytes(b)


INNER_OPS = ("bitflip", "setbyte", "truncate", "insert", "delete", "json_value")
JSON_VALUES = (b"null", b"true", b"-1", b"0", b"1e400", b"[]", b"{}", b'""', b'"F16"', b'"I8"', b'"F64"',
               b"[0,0]", b"[99999999,0]", b"[1,2,3,4,5]", b"18446744073709551615", b"[[[[[[[[[]]]]]]]]]", b"1.5")


@st.composite
def inner_mutation(draw: st.DrawFn, section: bytes) -> bytes:
    """A mutation of a metadata JSON or safetensors section (before re-signing)."""
    b = bytearray(section)
    n = len(b)
    op = draw(st.sampled_from(INNER_OPS))
    pos = draw(st.integers(0, max(n - 1, 0)))
    if op == "bitflip":
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, n - 1))] ^= 1 << draw(st.integers(0, 7))
    elif op == "setbyte":
        b[pos] = draw(st.sampled_from(b'{}[]",:0-9eE. \x00\xff'))
    elif op == "truncate":
        b = b[:pos]
    elif op == "insert":
        b[pos:pos] = draw(st.sampled_from(JSON_VALUES) | st.binary(min_size=1, max_size=16))
    elif op == "delete":
        del b[pos:pos + draw(st.integers(1, 16))]
    elif op == "json_value":
        # replace the token after a ':' with a hostile JSON value, keeping the document parseable-ish
        colons = [i for i, c in enumerate(b) if c == ord(":")]
        if colons:
            i = draw(st.sampled_from(colons)) + 1
            j = i
            while j < n and b[j] not in b",}":
                j += 1
            b[i:j] = draw(st.sampled_from(JSON_VALUES))
    return bytes(b)


def reframe(original: bytes, key: DeviceKey, metadata: bytes | None = None, raw_payload: bytes | None = None,
            wire_payload: bytes | None = None) -> bytes:
    """Rebuild a packet around replaced sections with correct lengths and a fresh signature
    (``wire_payload`` replaces the payload as sent, e.g. a corrupted zstd frame, keeping the declared raw size)."""
    f = parse_frame(original)
    meta = f.metadata if metadata is None else metadata
    if wire_payload is not None:
        payload, raw_len = wire_payload, f.payload_raw_len
    elif raw_payload is None:
        payload, raw_len = f.payload, f.payload_raw_len
    else:
        raw_len = len(raw_payload)
        payload = zstandard.ZstdCompressor().compress(raw_payload) if f.compressed else raw_payload
    body = HEADER.pack(b"SKPK", f.version, f.flags | FLAG_SIGNED, 0, len(meta), len(payload), raw_len) + meta + payload
    body += bytes.fromhex(key.key_id)
    return body + key.sign(body)


def raw_payload_of(packet: bytes) -> bytes:
    f = parse_frame(packet)
    return zstandard.ZstdDecompressor().decompress(f.payload) if f.flags & FLAG_ZSTD else f.payload


# ---------------------------------------------------------------------------- outcomes


@dataclass
class Outcomes:
    cases: int = 0
    crashes: int = 0
    accepted_mutants: int = 0
    identical: int = 0
    by_kind: Counter = field(default_factory=Counter)  # "raw:rejected", "resigned:decoded", ...
    rejection_codes: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)  # first few failures, for debugging

    def failure(self, kind: str, mutant: bytes, exc: BaseException | None) -> None:
        if len(self.examples) < 5:
            self.examples.append({"kind": kind, "mutant_hex": mutant[:65536].hex(),
                                  "error": "".join(traceback.format_exception(exc)) if exc else "accepted"})


def check_raw(corpus: Corpus, original: bytes, mutant: bytes, out: Outcomes) -> None:
    """A byte-level mutant must fail with PacketError against the trust store (and may only raise
    PacketError when parsed alone), unless it is byte-identical to a valid corpus packet."""
    out.cases += 1
    if mutant == original or mutant in corpus.packets:  # e.g. a splice that rebuilt another valid packet
        out.identical += 1
        return
    try:
        corpus.codec.decode(mutant)  # parser only: may succeed (e.g. a flipped signature bit)
    except PacketError as exc:
        out.rejection_codes[exc.code] += 1
    except Exception as exc:  # noqa: BLE001 - anything else is the bug we are hunting
        out.crashes += 1
        out.failure("raw-parse", mutant, exc)
    try:
        corpus.codec.decode(mutant, trust=corpus.trust)
    except PacketError:
        out.by_kind["raw:rejected"] += 1
        return
    except Exception as exc:  # noqa: BLE001
        out.crashes += 1
        out.failure("raw-trusted", mutant, exc)
        return
    out.accepted_mutants += 1
    out.failure("raw-accepted", mutant, None)


def check_resigned(corpus: Corpus, mutant: bytes, out: Outcomes) -> None:
    """A re-signed inner mutant may decode (it is validly signed) but only into a valid record."""
    out.cases += 1
    try:
        p = corpus.codec.decode(mutant, trust=corpus.trust)
    except PacketError as exc:
        out.by_kind["resigned:rejected"] += 1
        out.rejection_codes[exc.code] += 1
        return
    except Exception as exc:  # noqa: BLE001
        out.crashes += 1
        out.failure("resigned", mutant, exc)
        return
    assert isinstance(p, Packet)
    p.knowledge.validate()
    out.by_kind["resigned:decoded"] += 1


@st.composite
def resigned_mutation(draw: st.DrawFn, corpus: Corpus) -> bytes:
    """A corpus packet with its metadata, its safetensors bytes or its wire payload mutated, then re-signed."""
    original = draw(st.sampled_from(corpus.packets))
    section = draw(st.sampled_from(("metadata", "safetensors", "wire_payload")))
    if section == "metadata":
        return reframe(original, corpus.key, metadata=draw(inner_mutation(parse_frame(original).metadata)))
    if section == "safetensors":
        return reframe(original, corpus.key, raw_payload=draw(inner_mutation(raw_payload_of(original))))
    return reframe(original, corpus.key, wire_payload=draw(inner_mutation(parse_frame(original).payload)))


def case_strategy(corpus: Corpus) -> st.SearchStrategy:
    """(kind, original, mutant) triples: 3 raw cases for every re-signed one."""

    @st.composite
    def case(draw: st.DrawFn) -> tuple[str, bytes, bytes]:
        if draw(st.integers(0, 3)) > 0:
            original = draw(st.sampled_from(corpus.packets))
            other = draw(st.sampled_from(corpus.packets))
            return "raw", original, draw(raw_mutation(original, other))
        return "resigned", b"", draw(resigned_mutation(corpus))

    return case()


def run(cases: int, seed: int | None = None) -> Outcomes:
    """Run ``cases`` fuzz cases; returns counts rather than stopping at the first failure."""
    out = Outcomes()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_corpus(tmp)

        @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=seed is not None)
        @given(case_strategy(corpus))
        def fuzz(case: tuple[str, bytes, bytes]) -> None:
            kind, original, mutant = case
            if kind == "raw":
                check_raw(corpus, original, mutant, out)
            else:
                check_resigned(corpus, mutant, out)

        fuzz()
    return out


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=None, help="derandomize hypothesis (same cases every run)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fuzz.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = run(args.cases, args.seed)
    seconds = time.perf_counter() - t0
    result = {
        "cases": out.cases, "crashes": out.crashes, "accepted_mutants": out.accepted_mutants,
        "seconds": round(seconds, 1), "machine": machine(),
        "command": (f"nice -n {os.nice(0)} " if os.nice(0) else "") + "python " + portable_command(sys.argv),
        "identical_mutants_skipped": out.identical, "by_kind": dict(out.by_kind),
        "rejection_codes": dict(out.rejection_codes.most_common()), "failure_examples": out.examples,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "failure_examples"}, indent=1))
    return 0 if out.crashes == 0 and out.accepted_mutants == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
