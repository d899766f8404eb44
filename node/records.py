"""The network's DHT layout: which small record lives under which key, and how to read it safely.

Keys (values are canonical msgpack maps of a few KiB, one subkey per DHT owner):

    umm/<network id>/genesis         the signed genesis record
    umm/<network id>/peers           {"p2p": libp2p peer id, "signer": Ed25519 key, "latest": round or -1}
    umm/<network id>/contrib/<r>     {"card": ExpertCard envelope, "manifest": DeltaManifest envelope id,
                                      "p2p": the holder's libp2p peer id}
    umm/<network id>/summary/<r>     {"card": ExpertCard envelope, "summary": DistributionSummary envelope
                                      id, "p2p": the holder's libp2p peer id} (experts of other architectures)
    umm/<network id>/pending/<r>     {"signer": Ed25519 key, "started": unix time, "p2p": libp2p peer id}
                                     (a contribution being prepared for round r: node.settle)
    umm/<network id>/result/<r>/<j>  {"result": MergeResult envelope id of shard j, "attestation":
                                      Attestation envelope, "p2p": the holder's libp2p peer id}
    umm/<network id>/fault/<r>       {"faults": [ContributionFault envelope, ...]} (at most
                                      MAX_FAULTS_PER_RECORD: contributions this node found failing
                                      admission in round r, node.faults)
    umm/<network id>/proposal/<r>    {"proposal": SearchProposal envelope id, "p2p": the holder's
                                      libp2p peer id} (searchers of a network with search)
    umm/<network id>/verdict/<r>/<p> {"proposal": the proposal's id (of its fields), "claimed": its
                                      claimed fitness, "fitness": the fitness the publisher
                                      recomputed (0.0 if it could not), "reason": why it refused
                                      it, or ""} (<p>: 16 hex of the proposal's envelope id)
    umm/<network id>/fusion/<r>/<c>  {"contribution": a fused contribution's id, "pivot": the base's
                                      held-out cross-entropy to its summaries, "fused": the
                                      contribution's, "reason": why the publisher refused it, or
                                      ""} (<c>: 16 hex of the contribution id; node.fusion_check)

Large things (manifests, results, tensors) are chunks addressed by sha256 and fetched peer to peer.
Every record is untrusted input: `parse_record` returns None for anything but a map with exactly
the expected fields of the expected types; envelopes inside are verified by protocol/.
"""

from __future__ import annotations

from typing import Any

from protocol.encoding import pack, unpack
from protocol.errors import ProtocolError

MAX_RECORD_BYTES = 8 * 1024
_HEX = frozenset("0123456789abcdef")

RECORD_FIELDS: dict[str, dict[str, type]] = {
    "peers": {"p2p": str, "signer": bytes, "latest": int},
    "contrib": {"card": bytes, "manifest": str, "p2p": str},
    "result": {"result": str, "attestation": bytes, "p2p": str},
    "summary": {"card": bytes, "summary": str, "p2p": str},
    "pending": {"signer": bytes, "started": int, "p2p": str},
    "proposal": {"proposal": str, "p2p": str},
    "verdict": {"proposal": str, "claimed": float, "fitness": float, "reason": str},
    "fault": {"faults": list},
    "fusion": {"contribution": str, "pivot": float, "fused": float, "reason": str},
}
MAX_FAULTS_PER_RECORD = 8


def genesis_key(network_id: str) -> str:
    return f"umm/{network_id}/genesis"


def peers_key(network_id: str) -> str:
    return f"umm/{network_id}/peers"


def contrib_key(network_id: str, round_number: int) -> str:
    return f"umm/{network_id}/contrib/{round_number}"


def summary_key(network_id: str, round_number: int) -> str:
    return f"umm/{network_id}/summary/{round_number}"


def pending_key(network_id: str, round_number: int) -> str:
    return f"umm/{network_id}/pending/{round_number}"


def result_key(network_id: str, round_number: int, shard: int = 0) -> str:
    return f"umm/{network_id}/result/{round_number}/{shard}"


def fault_key(network_id: str, round_number: int) -> str:
    return f"umm/{network_id}/fault/{round_number}"


def proposal_key(network_id: str, round_number: int) -> str:
    return f"umm/{network_id}/proposal/{round_number}"


def verdict_key(network_id: str, round_number: int, envelope_id: str) -> str:
    return f"umm/{network_id}/verdict/{round_number}/{envelope_id[:16]}"


def fusion_key(network_id: str, round_number: int, contribution_id: str) -> str:
    return f"umm/{network_id}/fusion/{round_number}/{contribution_id[:16]}"


def make_record(kind: str, **fields: Any) -> bytes:
    """A record's bytes; RuntimeError if the fields do not match the layout (a programming error)."""
    if parse_record(kind, pack(fields)) is None:
        raise RuntimeError(f"make_record: fields {sorted(fields)} do not form a valid {kind} record")
    return pack(fields)


def parse_record(kind: str, data: bytes) -> dict[str, Any] | None:
    """The record's fields, or None if `data` is not a well-formed record of `kind`."""
    expected = RECORD_FIELDS[kind]
    try:
        value = unpack(data, max_size=MAX_RECORD_BYTES)
    except ProtocolError:
        return None
    if not isinstance(value, dict) or set(value) != set(expected):
        return None
    for name, kind_type in expected.items():
        if type(value[name]) is not kind_type:
            return None
    faults = value.get("faults", ())
    if len(faults) > MAX_FAULTS_PER_RECORD or any(type(item) is not bytes for item in faults):
        return None
    for digest_field in ("manifest", "result", "summary", "proposal", "contribution"):
        digest = value.get(digest_field)
        if digest is not None and (len(digest) != 64 or not set(digest) <= _HEX):
            return None
    return value
