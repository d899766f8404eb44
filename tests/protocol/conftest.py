"""Factories for valid signed messages, and a mutate-and-re-sign helper, shared by protocol tests."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from protocol.chunks import encode_tensors
from protocol.codecs import CodecSpec, parse_codec
from protocol.envelope import Signed, sign_message
from protocol.fingerprint import fingerprint_state_dict
from protocol.identity import Identity
from protocol.messages import (
    SCHEMA_VERSION,
    Attestation,
    DeltaManifest,
    ExpertCard,
    MergeRecipe,
    MergeResult,
    SignedMessage,
)

NETWORK = "testnet"
NOW = 1_800_000_000
CHUNK = 4096
BASE_FP = "ba" * 32
ARCH_FP = "ac" * 32
TOK_FP = "70" * 32


def identity(n: int) -> Identity:
    """A fixed identity per small integer."""
    return Identity.from_seed(bytes([n]) * 32)


def card(who: Identity, **changes) -> ExpertCard:
    fields = dict(
        v=SCHEMA_VERSION,
        network_id=NETWORK,
        signer=who.public_key,
        created_at=NOW - 100,
        name="math-expert",
        base_fingerprint=BASE_FP,
        architecture_fingerprint=ARCH_FP,
        tokenizer_fingerprint=TOK_FP,
        domains=("math", "arithmetic"),
        license="apache-2.0",
    )
    fields.update(changes)
    return ExpertCard(**fields)


def delta_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layers.0.weight": torch.randn(32, 48, generator=gen) * 0.01,
        "layers.0.bias": torch.randn(48, generator=gen) * 0.01,
    }


def manifest(who: Identity, card_id: str, round_number: int = 1, seed: int = 0, **changes):
    """A DeltaManifest and its chunks."""
    entries, chunks = encode_tensors(delta_tensors(seed), parse_codec("int8+zstd"), chunk_size=CHUNK)
    fields = dict(
        v=SCHEMA_VERSION,
        network_id=NETWORK,
        signer=who.public_key,
        created_at=NOW - 50,
        round=round_number,
        card_id=card_id,
        base_fingerprint=BASE_FP,
        architecture_fingerprint=ARCH_FP,
        chunk_size=CHUNK,
        total_bytes=sum(e.nbytes for e in entries),
        tensors=entries,
    )
    fields.update(changes)
    return DeltaManifest(**fields), chunks


def recipe(round_number: int = 1, contributions=("11" * 32, "22" * 32)) -> MergeRecipe:
    return MergeRecipe.build(
        network_id=NETWORK,
        round=round_number,
        method="ties",
        parameters={"density": 0.5, "weight": [0.5, 0.7]},
        base_fingerprint=BASE_FP,
        architecture_fingerprint=ARCH_FP,
        contributions=list(contributions),
        dtype="bfloat16",
    )


def result(who: Identity, round_number: int = 1, seed: int = 0, **changes):
    """A MergeResult (raw codec) and its chunks."""
    tensors = {k: v.bfloat16() for k, v in delta_tensors(seed + 100).items()}
    entries, chunks = encode_tensors(tensors, CodecSpec(name="raw", zstd=False, k=0, block_size=0), CHUNK)
    fields = dict(
        v=SCHEMA_VERSION,
        network_id=NETWORK,
        signer=who.public_key,
        created_at=NOW - 10,
        round=round_number,
        recipe=recipe(round_number),
        chunk_size=CHUNK,
        tensors=entries,
        merged_fingerprint=fingerprint_state_dict(tensors),
        shard=0,
        shards=1,
        candidates=("11" * 32, "22" * 32, "33" * 32),
    )
    fields.update(changes)
    return MergeResult(**fields), chunks


def attestation(who: Identity, signed_result: Signed, **changes) -> Attestation:
    res = signed_result.message
    fields = dict(
        v=SCHEMA_VERSION,
        network_id=NETWORK,
        signer=who.public_key,
        created_at=NOW - 5,
        round=res.round,
        recipe_id=res.recipe.id,
        result_id=signed_result.id,
        merged_fingerprint=res.merged_fingerprint,
        shard=res.shard,
        shards=res.shards,
        kind="full",
        checked_tensors=len(res.tensors),
        checked_bytes=sum(t.nbytes for t in res.tensors),
        sample_proof=b"",
    )
    fields.update(changes)
    return Attestation(**fields)


def resign(message: SignedMessage, who: Identity, **changes) -> Signed:
    """Mutate fields of a valid message and sign it again (as an attacker with key `who` would)."""
    return sign_message(dataclasses.replace(message, **changes), who)


@pytest.fixture
def f() -> SimpleNamespace:
    """The factories above, plus constants."""
    return SimpleNamespace(
        NETWORK=NETWORK,
        NOW=NOW,
        CHUNK=CHUNK,
        identity=identity,
        card=card,
        manifest=manifest,
        recipe=recipe,
        result=result,
        attestation=attestation,
        resign=resign,
        sign=sign_message,
        delta_tensors=delta_tensors,
    )
