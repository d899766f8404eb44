"""The fuzz harness of benchmarks/fuzz_protocol.py, with fewer cases (the benchmark runs >= 10,000)."""

import importlib.util
from pathlib import Path

import pytest

import protocol.envelope

FUZZ = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_protocol.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_protocol", FUZZ)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decoders_raise_only_protocol_errors_and_never_accept_mutations(fuzz):
    counts = fuzz.run(cases=150, derandomize=True)
    assert set(counts) == {"random_bytes", "byte_mutations", "field_mutations", "decoders"}
    assert min(counts.values()) >= 100


def test_harness_catches_a_verifier_that_skips_signatures(fuzz, monkeypatch):
    monkeypatch.setattr(protocol.envelope, "verify_signature", lambda *args: None)
    with pytest.raises(AssertionError, match="mutated envelope was accepted"):
        fuzz.run(cases=300, derandomize=True)
