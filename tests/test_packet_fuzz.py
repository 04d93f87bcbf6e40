"""Parser fuzzing with hypothesis: mutated packets raise PacketError and nothing else, and none verifies.

The mutation operators and checks live in benchmarks/fuzz_packets.py, whose full run
(``--cases 100000``) is recorded in benchmarks/results/fuzz.json; CI runs a few thousand here.
"""

from __future__ import annotations

import pytest
from bench_modules import load_benchmark
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

fuzz = load_benchmark("fuzz_packets")
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
RAW_CASES, RESIGNED_CASES = 1500, 600  # the full 100k run: benchmarks/fuzz_packets.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fuzz.build_corpus(tmp_path_factory.mktemp("fuzz-trust"))


def _assert_clean(out) -> None:
    assert out.crashes == 0, out.examples[0]["error"]
    assert out.accepted_mutants == 0, "a mutated packet decoded and verified"


def test_corpus_is_valid(corpus):
    for i, data in enumerate(corpus.packets):
        p = corpus.codec.decode(data)
        if p.signer is not None:
            assert corpus.codec.decode(data, trust=corpus.trust).verified_by == "fuzz-peer", i


@settings(FUZZ, max_examples=RAW_CASES)
@given(data=st.data())
def test_byte_mutants_are_rejected(corpus, data):
    original = data.draw(st.sampled_from(corpus.packets))
    other = data.draw(st.sampled_from(corpus.packets))
    mutant = data.draw(fuzz.raw_mutation(original, other))
    out = fuzz.Outcomes()
    fuzz.check_raw(corpus, original, mutant, out)
    _assert_clean(out)


@settings(FUZZ, max_examples=RESIGNED_CASES)
@given(data=st.data())
def test_resigned_inner_mutants_decode_cleanly_or_raise_packet_error(corpus, data):
    mutant = data.draw(fuzz.resigned_mutation(corpus))
    out = fuzz.Outcomes()
    fuzz.check_resigned(corpus, mutant, out)
    _assert_clean(out)


def test_harness_counts_an_accepted_forgery(corpus):
    """The check itself must be able to fail: a re-signed mutant passed off as a raw one is counted."""
    original = corpus.packets[0]
    forged = fuzz.reframe(original, corpus.key, metadata=fuzz.parse_frame(original).metadata.replace(
        b'"n_train":100', b'"n_train":101'))
    out = fuzz.Outcomes()
    fuzz.check_raw(corpus, original, forged, out)
    assert out.accepted_mutants == 1
