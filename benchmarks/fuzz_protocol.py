"""Property-based fuzzing of every protocol decode path (hypothesis).

Properties, each run for `--cases` examples:

1. random bytes given to `open_envelope` raise only ProtocolError;
2. byte-level mutations (flip, insert, delete, truncate) of valid signed envelopes raise only
   ProtocolError and are never accepted;
3. single-field mutations of valid signed messages (replace any field, nested ones included, with
   an arbitrary msgpack value or a nearby one; drop a field; add an unknown field; change the
   envelope's type, version or signature), re-encoded canonically and sent with the original
   signature or re-signed by an attacker's key, raise only ProtocolError and are never accepted;
4. random bytes given to the tensor codecs, chunk reassembly and distribution-summary decoding
   raise only ProtocolError.

Usage: python benchmarks/fuzz_protocol.py [--cases 3000]   (4 properties x 3000 = 12,000 cases)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.fusion.align import Vocabulary
from merging.fusion.summary import ProbeSet, ResponseSummary
from protocol.aggregate import encode_result
from protocol.chunks import decode_entry, encode_tensors
from protocol.codecs import CODEC_NAMES, DTYPES, CodecSpec, decode_tensor, parse_codec
from protocol.encoding import pack, unpack
from protocol.envelope import open_envelope, sign_message, signing_input
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.messages import (
    SCHEMA_VERSION,
    Attestation,
    DeltaManifest,
    DistributionSummary,
    ExpertCard,
    MergeRecipe,
    MergeResult,
)
from protocol.summary import decode_summary, encode_summary, probe_set_fingerprint

NETWORK = "fuzznet"
NOW = 1_800_000_000
CHUNK = 4096
PROBE_TEXTS = ("probe one", "probe two")


def corpus() -> tuple[list[bytes], dict[str, bytes], DistributionSummary]:
    """Valid signed envelopes of every type, their chunks, and one summary."""
    alice, bob = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
    common = {"v": SCHEMA_VERSION, "network_id": NETWORK, "signer": alice.public_key, "created_at": NOW - 60}
    card = sign_message(
        ExpertCard(
            **common,
            name="expert",
            base_fingerprint="ba" * 32,
            architecture_fingerprint="ac" * 32,
            tokenizer_fingerprint="70" * 32,
            domains=("math",),
            license="apache-2.0",
        ),
        alice,
    )
    gen = torch.Generator().manual_seed(0)
    deltas = {"a.weight": torch.randn(16, 40, generator=gen) * 0.01, "a.bias": torch.randn(40, generator=gen)}
    entries, chunks = encode_tensors(deltas, parse_codec("topk:0.2+zstd"), CHUNK)
    more, more_chunks = encode_tensors({"b.weight": deltas["a.weight"]}, parse_codec("int8"), CHUNK)
    chunks.update(more_chunks)
    tensors = entries + more
    manifest = sign_message(
        DeltaManifest(
            **common,
            round=1,
            card_id=card.id,
            base_fingerprint="ba" * 32,
            architecture_fingerprint="ac" * 32,
            chunk_size=CHUNK,
            total_bytes=sum(e.nbytes for e in tensors),
            tensors=tensors,
        ),
        alice,
    )
    response_summary = ResponseSummary(
        probe=ProbeSet(PROBE_TEXTS),
        responses=("t1 t2 t3", "t4"),
        offsets=torch.tensor([0, 3, 5]),
        target_ids=torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32),
        token_ids=torch.tensor([[1, 2], [3, 4], [5, 1], [2, 3], [4, 5]], dtype=torch.int32),
        logprobs=-torch.tensor([[0.1, 2.0], [0.2, 3.0], [0.5, 1.0], [0.3, 0.4], [0.01, 5.0]]),
        vocabulary=Vocabulary("plain", {i: f"t{i}" for i in range(1, 6)}, {"eos": 5}),
        model_name="fuzz",
        prompt_style="plain",
    )
    s_entries, s_chunks = encode_summary(response_summary, chunk_size=CHUNK)
    chunks.update(s_chunks)
    summary = DistributionSummary(
        **common,
        round=1,
        card_id=card.id,
        probe_set_fingerprint=probe_set_fingerprint(PROBE_TEXTS),
        tokenizer_fingerprint="70" * 32,
        k=2,
        num_examples=2,
        chunk_size=CHUNK,
        tensors=s_entries,
    )
    merged = {"a.weight": deltas["a.weight"].bfloat16(), "a.bias": deltas["a.bias"].bfloat16()}
    r_entries, r_chunks, fingerprint = encode_result(merged, CHUNK)
    chunks.update(r_chunks)
    recipe = MergeRecipe.build(
        network_id=NETWORK,
        round=1,
        method="ties",
        parameters={"density": 0.5, "weight": [0.5, 1.0]},
        base_fingerprint="ba" * 32,
        architecture_fingerprint="ac" * 32,
        contributions=[manifest.id],
        dtype="bfloat16",
    )
    result = sign_message(
        MergeResult(
            **common,
            round=1,
            recipe=recipe,
            chunk_size=CHUNK,
            tensors=r_entries,
            merged_fingerprint=fingerprint,
            shard=0,
            shards=1,
            candidates=[manifest.id],
        ),
        alice,
    )
    attestation = sign_message(
        Attestation(
            **{**common, "signer": bob.public_key},
            round=1,
            recipe_id=recipe.id,
            result_id=result.id,
            merged_fingerprint=fingerprint,
            shard=0,
            shards=1,
            kind="full",
            checked_tensors=len(r_entries),
            checked_bytes=sum(t.nbytes for t in r_entries),
            sample_proof=b"",
        ),
        bob,
    )
    envelopes = [card.raw, manifest.raw, sign_message(summary, alice).raw, result.raw, attestation.raw]
    return envelopes, chunks, summary


ENVELOPES, CHUNKS, SUMMARY = corpus()
ATTACKER = Identity.from_seed(b"\x66" * 32)

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80)
    | st.binary(max_size=80),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


def accepted_only_if_identical(name: str, data: bytes, original: bytes | None) -> None:
    """Open `data`; anything but ProtocolError propagates; acceptance of changed bytes is a failure."""
    COUNTS[name] += 1
    try:
        open_envelope(data, network_id=NETWORK, now=NOW)
    except ProtocolError:
        return
    if data != original:
        raise AssertionError(f"a mutated envelope was accepted: {data[:80]!r}")


def paths(value, prefix=()):
    """Every path into nested maps and lists."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            out += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value[:6]):
            out += paths(child, (*prefix, index))
    return out


def nearby(value, delta: int):
    """A value of the same type that differs a little."""
    if type(value) is bool:
        return not value
    if type(value) is int:
        return value + (delta or 1)
    if type(value) is float:
        return value + float(delta or 1) * 1e-3
    if type(value) is str:
        return value[:-1] if delta % 2 and value else value + chr(97 + abs(delta) % 26)
    if type(value) is bytes:
        return bytes([value[0] ^ 1]) + value[1:] if value else b"\x00"
    if isinstance(value, list):
        return value[:-1] if value else [0]
    return None


def replace_at(tree, path, new):
    if len(path) == 1:
        if new is _DELETE:
            del tree[path[0]]
        else:
            tree[path[0]] = new
        return
    replace_at(tree[path[0]], path[1:], new)


_DELETE = object()
COUNTS: Counter[str] = Counter()
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def make_properties(cases: int, derandomize: bool):
    config = settings(max_examples=cases, derandomize=derandomize, **SETTINGS)

    @config
    @given(st.binary(max_size=4096))
    def random_bytes(data):
        accepted_only_if_identical("random_bytes", data, None)

    @config
    @given(st.sampled_from(ENVELOPES), st.data())
    def byte_mutations(original, data):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append"]))
        pos = data.draw(st.integers(0, len(original) - 1))
        if kind == "flip":
            bit = data.draw(st.integers(0, 7))
            mutated = original[:pos] + bytes([original[pos] ^ (1 << bit)]) + original[pos + 1 :]
        elif kind == "insert":
            mutated = original[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + original[pos:]
        elif kind == "delete":
            mutated = original[:pos] + original[pos + data.draw(st.integers(1, 8)) :]
        elif kind == "truncate":
            mutated = original[:pos]
        else:
            mutated = original + data.draw(st.binary(min_size=1, max_size=8))
        accepted_only_if_identical("byte_mutations", mutated, original)

    @config
    @given(st.sampled_from(ENVELOPES), st.data())
    def field_mutations(original, data):
        envelope = unpack(original, max_size=1 << 26)
        payload = unpack(envelope["payload"], max_size=1 << 26)
        target = data.draw(st.sampled_from(["payload", "payload", "payload", "envelope"]))
        tree = payload if target == "payload" else envelope
        path = data.draw(st.sampled_from([*paths(tree), ("unknown_field",)]))
        how = data.draw(st.sampled_from(["value", "nearby", "delete"]))
        current = _get(tree, path)
        if path == ("unknown_field",) or how == "value":
            new = data.draw(values)
        elif how == "nearby":
            new = nearby(current, data.draw(st.integers(-3, 3)))
        else:
            new = _DELETE
        if new is not _DELETE and new == current and type(new) is type(current):
            return  # not a mutation
        replace_at(tree, path, new)
        try:
            body = pack(payload)
        except ProtocolError:
            return  # the attacker cannot even encode it
        if target == "payload":
            envelope["payload"] = body
            if data.draw(st.booleans()):  # re-signed by an attacker who does not hold the signer's key
                message_type = envelope["type"] if isinstance(envelope.get("type"), str) else "x"
                envelope["signature"] = ATTACKER.sign(signing_input(message_type, NETWORK, body))
        try:
            mutated = pack(envelope)
        except ProtocolError:
            return
        accepted_only_if_identical("field_mutations", mutated, original)

    @config
    @given(
        st.binary(max_size=512),
        st.sampled_from(CODEC_NAMES),
        st.booleans(),
        st.lists(st.integers(0, 40), min_size=0, max_size=3),
        st.sampled_from(sorted(DTYPES)),
        st.integers(1, 64),
        st.integers(0, 3),
    )
    def decoders(data, name, zstd, shape, dtype, size, which):
        COUNTS["decoders"] += 1
        try:
            spec = CodecSpec(
                name=name,
                zstd=zstd,
                k=size if name == "topk" else 0,
                block_size=size if name in ("int8", "int4") else 0,
            )
            if which == 0:
                decode_tensor(data, spec, tuple(shape), dtype)
            elif which == 1:
                entry = SUMMARY.tensors[size % 5]
                chunks = {address: data for address in entry.chunks}
                decode_entry(entry, chunks, CHUNK)
            elif which == 2:
                entry = SUMMARY.tensors[size % 5]
                chunks = {**CHUNKS, entry.chunks[0]: data}
                decode_summary(SUMMARY, chunks, PROBE_TEXTS)
            else:
                MergeRecipe.from_dict(unpack(data, max_size=MergeRecipe.MAX_SIZE))
        except ProtocolError:
            pass

    return [random_bytes, byte_mutations, field_mutations, decoders]


def _get(tree, path):
    for key in path:
        if (isinstance(tree, dict) and key in tree) or (
            isinstance(tree, list) and isinstance(key, int) and key < len(tree)
        ):
            tree = tree[key]
        else:
            return None
    return tree


def run(cases: int, derandomize: bool = False) -> Counter[str]:
    """Run every property for `cases` examples; raises on the first counterexample.

    `derandomize` draws the same examples every time (CI); the benchmark draws fresh ones.
    """
    COUNTS.clear()
    for prop in make_properties(cases, derandomize):
        prop()
    return Counter(COUNTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3000, help="examples per property (4 properties)")
    args = parser.parse_args()
    start = time.perf_counter()
    counts = run(args.cases)
    elapsed = time.perf_counter() - start
    for name, count in counts.items():
        print(f"{name:16s} {count:7d} cases  ok")
    print(f"{'total':16s} {sum(counts.values()):7d} cases  ok  ({elapsed:.1f} s)")


if __name__ == "__main__":
    main()
