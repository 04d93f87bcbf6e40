"""The packet codec carries the larger bias vectors of BB split points (issue 16), without a ROM.

A task whose biases start at Lite0's stage 5 carries 16,912 of them (21,008 for the whole network),
against 3,904 for the tail.  In float16 they alone are 33.8 kB; the budget ladder's ``+bb_int8`` rung
codes them in int8 with one scale per block of 64 values, so every layer keeps its own scale however
different the layers' magnitudes are.
"""

from __future__ import annotations

import numpy as np
import pytest
from skill_edge.runtime.exchange.codec import I8_BLOCK
from skill_edge.runtime.exchange.keys import DeviceKey
from skill_edge.runtime.knowledge.records import KnowledgeError, RomShape, TaskKnowledge, TaskMeta
from skill_edge.runtime.exchange.packet import PacketCodec

FP = "ab" * 32
LAYERS = [480, 480, 80, 480, 480, 80, 480, 480, 112, 672, 672, 112, 672, 672, 112, 672, 672, 112]  # 7,520 values


def _bb_task(n_layers: int = 2) -> TaskKnowledge:
    rng = np.random.default_rng(0)
    sizes = LAYERS * n_layers
    # each layer on its own scale, 0.003 to 1: what a per-tensor scale would flatten to zero
    bb = np.concatenate([rng.normal(0, 10 ** rng.uniform(-2.5, 0), n) for n in sizes]).astype(np.float32)
    meta = TaskMeta(agent_id="teacher", seq=1, rom_fingerprint=FP, bb_layout_hash="c" * 32, bb_split=5)
    return TaskKnowledge("signs", ["a", "b", "c"], rng.normal(0, 0.1, (3, 64)).astype(np.float32),
                         np.zeros(3, np.float32), meta=meta, bb=bb).validate()


def test_int8_bb_keeps_every_layer_within_half_a_step_of_its_block_scale() -> None:
    k = _bb_task()
    key = DeviceKey.generate()
    lossless = PacketCodec().decode(PacketCodec().encode(k, key))
    assert np.array_equal(lossless.knowledge.bb, k.bb) and lossless.knowledge.meta.bb_split == 5
    budget = 2 * k.bb.size - 1000  # float16 biases alone do not fit
    p = PacketCodec(budget).decode(PacketCodec(budget).encode(k, key))
    assert "bb_int8" in p.plan.step
    assert p.raw_size <= budget
    got = p.knowledge.bb
    assert p.knowledge.meta.bb_split == 5 and got.shape == k.bb.shape
    blocks = np.abs(np.concatenate([k.bb, np.zeros((-k.bb.size) % I8_BLOCK, np.float32)])).reshape(-1, I8_BLOCK)
    bound = np.repeat(blocks.max(1) / 254, I8_BLOCK)[:k.bb.size] * (1 + 1e-5) + 1e-12
    assert np.all(np.abs(got - k.bb) <= bound)
    # the smallest layers keep their relative precision (per-block, not per-tensor, scales)
    small = np.abs(k.bb) < 0.01
    assert np.median(np.abs(got - k.bb)[small]) < 1e-4


def test_the_receiver_checks_bias_length_and_layout_against_the_split_point() -> None:
    k = _bb_task()
    shape = RomShape(FP, feature_dim=64, trunk_channels=8, tail_bias_total=40, tail_layout_hash="d" * 32,
                     bb_splits=((5, k.bb.size, "c" * 32), (7, 40, "d" * 32)))
    k.check_rom_shape(shape)
    k.meta.bb_split = 7
    with pytest.raises(KnowledgeError, match=f"carries {k.bb.size} beneficial biases, this device's ROM stages "
                                             "from split point 7 has 40 bias slots"):
        k.check_rom_shape(shape)
    k.meta.bb_split = 3
    with pytest.raises(KnowledgeError, match="no split point"):
        k.check_rom_shape(shape)
    k.meta.bb_split, k.meta.bb_layout_hash = 5, "e" * 32
    with pytest.raises(KnowledgeError, match="layout"):
        k.check_rom_shape(shape)
    k.bb, k.meta.bb_layout_hash = None, ""
    with pytest.raises(KnowledgeError, match="bb_split is 5 but the task carries no beneficial biases"):
        k.validate()
