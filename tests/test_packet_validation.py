"""What a signed packet may contain, checked once at decode or receive (issue 15, findings 3, 5, 7, 8).

A trusted key proves who sent a packet, not that what it carries fits this device.  These
tests send packets signed by a trusted key that are wrong in one way each (a width, a
magnitude, a count, a number, a name) and check that they are refused with a clear reason,
as ``PacketError`` / a "rejected" receive result, and that honest packets still get in after.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import zstandard
from bench_modules import load_benchmark
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from skill_edge.runtime.knowledge.bank import KnowledgeBank
from skill_edge.runtime.exchange.keys import DeviceKey
from skill_edge.runtime.knowledge.records import (
    CREATED_RANGE,
    GmmcAnchor,
    KnowledgeError,
    MahalanobisAnchor,
    RomShape,
    TaskKnowledge,
    TaskMeta,
    validate_name,
)
from skill_edge.runtime.exchange.packet import HEADER, PacketCodec, PacketError, parse_frame
from skill_edge.runtime.exchange.receive import PacketReceiver
from skill_edge.runtime.exchange.sync import BankPlausibility

ROM = load_benchmark("fuzz_packets").ROM_FINGERPRINT  # the fixtures key and trust ("peer") are conftest.py's
#: A small ROM: 64 features, 8 trunk channels (so sqrt_l2_trunk anchors are 64 + 16 = 80 wide), 40 tail BB slots.
SHAPE = RomShape(ROM, feature_dim=64, trunk_channels=8, tail_bias_total=40,
                 tail_layout_hash=hashlib.sha256(b"tail layout").hexdigest()[:32])


def honest(task: str, seed: int = 0, *, d: int = SHAPE.feature_dim, trunk: int = SHAPE.trunk_channels,
           bb: int | None = SHAPE.tail_bias_total, agent: str = "agent-a", seq: int = 1) -> TaskKnowledge:
    """A task as a device on ``SHAPE`` learns it: anchors in sqrt_l2_trunk space (unit-norm scale)."""
    rng = np.random.default_rng(seed)
    c, k, m, a = 3, 4, 5, d + 2 * trunk
    centre = rng.normal(0, 1, a)
    means = (centre + rng.normal(0, 0.3, (k, a))) / math.sqrt(a)
    cmeans = (centre + rng.normal(0, 0.3, (c, a))) / math.sqrt(a)
    labels = np.repeat(np.arange(c), m)
    return TaskKnowledge(
        task=task, labels=[f"class {i}" for i in range(c)],
        head_weight=rng.normal(0, 0.1, (c, d)).astype(np.float32), head_bias=rng.normal(0, 0.1, c).astype(np.float32),
        meta=TaskMeta(agent_id=agent, seq=seq, created=1_760_000_000.0, rom_fingerprint=ROM,
                      bb_layout_hash=SHAPE.tail_layout_hash if bb else "", feature_transform="sqrt_l2_trunk",
                      n_train=120, metrics={"head_val_acc": 0.9}),
        bb=rng.normal(0, 0.02, bb).astype(np.float32) if bb else None,
        gmmc=GmmcAnchor(means.astype(np.float32), np.full((k, a), 0.05 / a, np.float32), np.full(k, 1 / k, np.float32)),
        maha=MahalanobisAnchor(cmeans.astype(np.float32),
                               (cmeans[labels] + rng.normal(0, 0.2 / math.sqrt(a), (c * m, a))).astype(np.float32),
                               labels.astype(np.float32)),
        thresholds={"gmmc": -50.0, "maha": -5.0},
    ).validate()


def resign(data: bytes, key: DeviceKey, *, metadata=None, tensors: dict[str, np.ndarray] | None = None) -> bytes:
    """``data`` (an fp32 packet) with its metadata and/or tensors changed, signed again by ``key``:
    what a trusted but buggy or hostile sender can produce, bypassing the encoder's own checks."""
    f = parse_frame(data)
    md = json.loads(f.metadata)
    if metadata is not None:
        metadata(md)
    raw = zstandard.ZstdDecompressor().decompress(f.payload) if f.compressed else f.payload
    arrays = dict(st_load(raw))
    arrays.update(tensors or {})
    raw = st_save(arrays)
    meta = json.dumps(md).encode()  # ensure_ascii: a lone surrogate travels as the JSON escape "\ud800"
    body = HEADER.pack(b"SKPK", 1, 0x02, 0, len(meta), len(raw), len(raw)) + meta + raw
    body += bytes.fromhex(key.key_id)
    return body + key.sign(body)


def fp32(k: TaskKnowledge, key: DeviceKey) -> bytes:
    return PacketCodec(compression="none").encode(k, key, plan="fp32")


# ---------------------------------------------------------------------------- finding 3: widths vs the ROM


def bank_receiver(tmp_path, trust) -> tuple[KnowledgeBank, PacketReceiver, list]:
    bank = KnowledgeBank(tmp_path / "bank")
    receiver = PacketReceiver(trust, ROM, tmp_path / "state", plausibility=BankPlausibility(bank), rom_shape=SHAPE)
    return bank, receiver, []


def store(bank: KnowledgeBank):
    return lambda p, raw: bank.put(p.knowledge, packet_bytes=raw)


@pytest.mark.parametrize("wrong, reason", [
    (dict(d=7), "its head reads 7 features, this device's ROM gives 64"),
    (dict(trunk=5), "anchors are 74 wide, on this device's ROM they are 80 wide"),
    (dict(bb=5), "it carries 5 beneficial biases, this device's ROM tail has 40 bias slots"),
])
def test_wrong_width_packet_into_an_empty_bank_is_rejected_and_an_honest_one_accepted_after(
        tmp_path, key, trust, wrong, reason):
    bank, receiver, _ = bank_receiver(tmp_path, trust)
    bad = receiver.receive(PacketCodec().encode(honest("narrow", 1, **wrong), key), on_accept=store(bank))
    assert bad.status == "rejected" and bad.code == "wrong-shape"
    assert reason in bad.reason and "'narrow'" in bad.reason
    assert bank.entries() == []
    for i, name in enumerate(["cifar", "flowers"]):  # the bank still takes honest tasks, one after the other
        ok = receiver.receive(PacketCodec().encode(honest(name, 10 + i), key), on_accept=store(bank))
        assert ok.status == "accepted", ok.reason
    assert sorted(e.task for e in bank.entries()) == ["cifar", "flowers"]


def test_bb_for_another_tail_layout_is_rejected(tmp_path, key, trust):
    _, receiver, _ = bank_receiver(tmp_path, trust)
    k = honest("bb", 2)
    k.meta.bb_layout_hash = "0" * 32
    r = receiver.receive(PacketCodec().encode(k, key))
    assert r.status == "rejected" and r.code == "wrong-shape" and "tail layout 0000000000000000" in r.reason


def test_rom_shape_comes_from_the_manifest_and_real_bb_tasks_travel(rom_dir, key, trust, tmp_path):
    """The widths are the ROM's own (Lite0: 1280 features, 192 trunk channels, the manifest's tail
    slots), and the manifest's 32-hex-digit tail layout hash is one a packet may carry."""
    from skill_edge.export.manifest import RomManifest

    manifest = RomManifest.read(rom_dir)
    shape = RomShape.from_manifest(manifest)
    assert (shape.fingerprint, shape.feature_dim, shape.trunk_channels) == (manifest.fingerprint, 1280, 192)
    assert shape.tail_bias_total == manifest.tail_bias_total and shape.anchor_dim("sqrt_l2_trunk") == 1664
    assert shape.anchor_dim("sqrt_l2") == 1280 and len(shape.tail_layout_hash) == 32
    k = honest("lite0", 3, d=1280, trunk=192, bb=shape.tail_bias_total)
    k.meta.rom_fingerprint, k.meta.bb_layout_hash = shape.fingerprint, shape.tail_layout_hash
    receiver = PacketReceiver(trust, shape.fingerprint, tmp_path / "state", rom_shape=shape)
    assert receiver.receive(PacketCodec().encode(k, key)).status == "accepted"
    short = honest("short-bb", 4, d=1280, trunk=192, bb=5)
    short.meta.rom_fingerprint, short.meta.bb_layout_hash = shape.fingerprint, shape.tail_layout_hash
    r = receiver.receive(PacketCodec().encode(short, key))
    assert r.code == "wrong-shape" and f"tail has {manifest.tail_bias_total} bias slots" in r.reason
    with pytest.raises(ValueError, match="another ROM"):
        PacketReceiver(trust, ROM, tmp_path / "state2", rom_shape=shape)


# ---------------------------------------------------------------------------- finding 5: values and counts


@pytest.mark.parametrize("tensor, value, reason", [
    ("gmmc.means", 1e30, "tensor gmmc.means holds a value of magnitude 1e+30; the limit is 10000"),
    ("head.weight", 3e38, "tensor head.weight holds a value of magnitude 3e+38"),
    ("maha.exemplars", -2e4, "tensor maha.exemplars holds a value of magnitude 2e+04"),
    ("bb", 1e6, "tensor bb holds a value of magnitude 1e+06"),
    ("gmmc.variances", 1e-45, "GMMC variances must be finite and within [1e-20, 1e+08]"),
    ("gmmc.variances", 1e30, "GMMC variances must be finite and within [1e-20, 1e+08]"),
])
def test_out_of_range_values_are_refused_at_decode(key, trust, tensor, value, reason):
    data = fp32(honest("t", 5), key)
    arr = st_load(parse_frame(data).payload)[tensor].copy()
    arr.reshape(-1)[3] = value
    with pytest.raises(PacketError) as exc:
        PacketCodec().decode(resign(data, key, tensors={tensor: arr}), trust=trust)
    assert exc.value.code == "bad-knowledge" and reason in exc.value.reason


def test_a_mahalanobis_anchor_without_exemplar_rows_is_refused(key, trust):
    data = fp32(honest("t", 6), key)
    empty = {"maha.exemplars": np.zeros((0, 80), np.float32), "maha.exemplar_labels": np.zeros(0, np.float32)}
    with pytest.raises(PacketError) as exc:
        PacketCodec().decode(resign(data, key, tensors=empty), trust=trust)
    assert exc.value.code == "bad-knowledge" and "at least one exemplar row" in exc.value.reason
    with pytest.raises(KnowledgeError, match="at least one exemplar row"):
        replace(honest("t", 6), maha=MahalanobisAnchor(np.zeros((3, 80), np.float32), np.zeros((0, 80), np.float32),
                                                       np.zeros(0, np.float32))).validate()


def test_honest_values_at_every_ladder_step_still_decode(key, trust):
    k = honest("ladder", 7)
    codec = PacketCodec()
    for plan in codec.plans(k):
        got = codec.decode(codec.encode(k, key, plan=plan), trust=trust).knowledge
        assert got.task == "ladder" and got.gmmc.variances.min() > 0


# ---------------------------------------------------------------------------- finding 7: numbers


@pytest.mark.parametrize("change, field", [
    (lambda md: md["meta"].update(created=10**400), "meta.created"),
    (lambda md: md["meta"].update(created=1e300), "meta.created"),
    (lambda md: md["meta"].update(created=-1.0), "meta.created"),
    (lambda md: md["thresholds"].update(gmmc=10**400), "thresholds"),
    (lambda md: md["thresholds"].update(gmmc=-1e300), "thresholds"),
    (lambda md: md["meta"]["metrics"].update(head_val_acc=10**400), "meta.metrics"),
    (lambda md: md["meta"].update(n_train=10**400), "meta.n_train"),
    (lambda md: md["meta"].update(seq=10**400), "meta.seq"),
])
def test_huge_or_out_of_range_numbers_are_a_packet_error_not_an_overflow(key, trust, tmp_path, change, field):
    data = resign(fp32(honest("t", 8), key), key, metadata=change)
    with pytest.raises(PacketError) as exc:
        PacketCodec().decode(data, trust=trust)
    assert exc.value.code == "bad-metadata" and field in exc.value.reason
    assert len(exc.value.reason) < 400  # a 400-digit integer is not echoed
    r = PacketReceiver(trust, ROM, tmp_path / "state", rom_shape=SHAPE).receive(data)
    assert r.status == "rejected" and r.code == "bad-metadata"


def test_created_bounds_are_what_a_listing_can_show(key, trust):
    import datetime

    lo, hi = CREATED_RANGE
    assert datetime.datetime.fromtimestamp(hi, datetime.timezone.utc).year == 9999
    for created in (lo, hi, 1_760_000_000):
        data = resign(fp32(honest("t", 9), key), key, metadata=lambda md, c=created: md["meta"].update(created=c))
        assert PacketCodec().decode(data, trust=trust).created == created


def test_bank_records_are_bounded_too(tmp_path):
    """A record read back from the bank goes through the same ``validate``: 1e300 never lists."""
    k = honest("t", 10)
    k.meta.created = 1e300
    with pytest.raises(KnowledgeError, match="created = 1e"):
        k.validate()
    k.meta.created = 1_760_000_000.0
    k.thresholds = {"gmmc": 10**400}
    with pytest.raises(KnowledgeError, match="open-set threshold 'gmmc'"):
        k.validate()
    with pytest.raises(KnowledgeError, match="incomplete task record"):
        TaskKnowledge.from_parts({**honest("t", 10).metadata(), "thresholds": {"gmmc": 10**400}},
                                 honest("t", 10).tensors())


# ---------------------------------------------------------------------------- finding 8: names

BAD_NAMES = {
    "empty": "",
    "slash": "a/b",
    "root": "/",
    "dot": ".",
    "dotdot": "..",
    "hidden": ".profile",
    "backslash": "a\\b",
    "nul": "a\x00b",
    "newline": "a\nb",
    "ansi": "\x1b[31mred\x1b[0m",
    "osc-title": "\x1b]0;pwned\x07task",
    "c1-csi": "a\x9b31mb",
    "rtl-override": "abc\u202egnp.exe",
    "zero-width": "a\u200bb",
    "lone-surrogate": "a\ud800b",
    "private-use": "a\ue000b",
    "line-separator": "a\u2028b",
    "201-chars": "a" * 201,
    "201-encoded": "\u00e9" * 33 + "ab" + "c",  # 36 characters, 201 once percent-encoded (each \u00e9 is %C3%A9)
    "cjk-67": "\u732b" * 67,  # 67 characters, 201 bytes, 603 once percent-encoded
    "leading-space": " task",
    "trailing-space": "task ",
}
GOOD_NAMES = ["flowers", "cifar10 pair 3", "Blumen-\u00c4", "\u732b\u3068\u72ac", "a" * 200, "\u00e9" * 33 + "ab",
              "\u732b" * 22 + "ab", "task.v2", "x_y-z (1)", "a~b"]


@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_one_name_rule_refuses(name):
    with pytest.raises(KnowledgeError) as exc:
        validate_name(name)
    assert str(exc.value).isprintable() and "\x1b" not in str(exc.value)  # the message never echoes the escape


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_one_name_rule_accepts(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_bad_task_names_and_labels_are_refused_at_decode(key, trust, name):
    data = fp32(honest("t", 11), key)
    for change in (lambda md: md.update(task=name), lambda md: md.update(labels=["ok", name, "fine"])):
        with pytest.raises(PacketError) as exc:
            PacketCodec().decode(resign(data, key, metadata=change), trust=trust)
        assert exc.value.code == "bad-name" and exc.value.reason.isprintable()


@pytest.mark.parametrize("field", ["agent_id", "metrics", "thresholds"])
def test_other_printed_strings_are_refused_at_decode(key, trust, field):
    """agent id, metric and threshold names are shown by ``packet inspect`` / ``bank show`` too."""
    evil = "\x1b]0;pwned\x07"
    change = {"agent_id": lambda md: md["meta"].update(agent_id=evil),
              "metrics": lambda md: md["meta"]["metrics"].update({evil: 1.0}),
              "thresholds": lambda md: md["thresholds"].update({evil: 1.0})}[field]
    with pytest.raises(PacketError) as exc:
        PacketCodec().decode(resign(fp32(honest("t", 12), key), key, metadata=change), trust=trust)
    assert exc.value.code == "bad-metadata" and "\x1b" not in exc.value.reason


def test_good_names_travel(key, trust):
    for name in GOOD_NAMES:
        k = replace(honest(name, 13), labels=["a", name, "c"])
        got = PacketCodec().decode(PacketCodec().encode(k, key), trust=trust)
        assert got.task == name and got.labels == ["a", name, "c"]


def test_the_encoder_and_the_bank_apply_the_same_rule(key, tmp_path):
    k = honest("t", 14)
    for name in ("..", "a\x1b[2Jb", "a\ud800"):
        with pytest.raises(KnowledgeError):
            replace(k, task=name).validate()
        with pytest.raises(KnowledgeError):
            PacketCodec().encode(replace(k, task=name), key)
        with pytest.raises(KnowledgeError):
            KnowledgeBank(tmp_path / "bank").put(replace(k, task=name))


def test_the_plan_step_that_packet_inspect_shows_cannot_carry_escapes(key, trust):
    data = fp32(honest("t", 15), key)
    for step in ("\x1b]0;pwned\x07", "int8\u202e", "a" * 101, ""):
        with pytest.raises(PacketError) as exc:
            PacketCodec().decode(resign(data, key, metadata=lambda md, s=step: md["meta"]["encoding"].update(step=s)),
                                 trust=trust)
        assert exc.value.code == "bad-metadata" and "step" in exc.value.reason and "\x1b" not in exc.value.reason
    for step in ("fp32", "int3+gmmc_k=5+bb_int8+exemplars=2+head_int2"):
        ok = resign(data, key, metadata=lambda md, s=step: md["meta"]["encoding"].update(step=s))
        assert PacketCodec().decode(ok, trust=trust).plan.step == step


@pytest.mark.parametrize("name", GOOD_NAMES + ["\u00e9" * 33 + "abc", "\u732b" * 23, "a b" * 50, "z" * 200])
def test_a_name_that_passes_always_fits_a_transport_path_and_an_outbox_file(name, tmp_path):
    """The rule's length limit is the transports' own: the percent-encoded folder name / MQTT topic
    level of ``transport.base.encode_segment`` (200 characters).  Names used to pass decode and then
    fail at publish; now a name passes exactly when it can travel."""
    from skill_edge.runtime.exchange.transport.base import encode_segment
    from skill_edge.runtime.exchange.transport.directory import packet_path

    try:
        validate_name(name)
        passes = True
    except KnowledgeError:
        passes = False
    try:
        encode_segment("task", name)
        travels = True
    except ValueError:
        travels = False
    assert passes == travels
    if passes:
        path = packet_path(tmp_path, "default", name, "agent-a", 2**63 - 1)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")  # no ENAMETOOLONG
        (tmp_path / f"{name}-{2**63 - 1}.skp").write_bytes(b"x")  # the outbox name learn writes
