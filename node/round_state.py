"""A node's round state, typed: what it merged, checked, refused and decided, per round and shard.

Each dataclass encodes to (and decodes from) exactly the msgpack value kept under its key in
``state.sqlite`` (node.state), so the bytes on disk are those older nodes wrote:

    round                 int: the round the node works on
    genesis               bytes: the genesis record
    contribution/<r>      `OwnContribution`: {"card", "manifest"} (written by `umm contribute`)
    summary/<r>           `OwnSummary`: {"card", "summary"} (other architectures)
    shard/<r>/<j>         `ShardMerge`: this node's full merge of shard j and what it attests
    spot/<r>/<j>          `SpotVerdict`: the result its spot check of shard j passed, and its attestation
    refused/<r>           [result id, ...]: results its spot checks refused
    view/<r>              `RoundView`: [candidates, shard count] of the round it merged or checked
    faults/<r>            [ContributionFault envelope, ...]: the faults this node found (node.faults)
    fusion/refused/<id>   str: why this node's check refused its own fused contribution (node.fusion_check)
    latest                `LatestRound`: the last decided round and what the node announces for it
    stats                 {"bytes_sent", "bytes_received"}
"""

from __future__ import annotations

import dataclasses
from typing import Any

from node.state import NodeState


@dataclasses.dataclass(frozen=True)
class OwnContribution:
    """This node's contribution to a round: its expert card envelope and its delta manifest id."""

    card: bytes
    manifest: str

    def encode(self) -> dict[str, Any]:
        return {"card": self.card, "manifest": self.manifest}

    @classmethod
    def decode(cls, value: dict[str, Any]) -> OwnContribution:
        return cls(value["card"], value["manifest"])


@dataclasses.dataclass(frozen=True)
class OwnSummary:
    """This node's distribution summary for a round: its card envelope and the summary's id."""

    card: bytes
    summary: str

    def encode(self) -> dict[str, Any]:
        return {"card": self.card, "summary": self.summary}

    @classmethod
    def decode(cls, value: dict[str, Any]) -> OwnSummary:
        return cls(value["card"], value["summary"])


@dataclasses.dataclass(frozen=True)
class ShardMerge:
    """This node's full merge of one shard: recipe, result and fingerprint, the round view it merged
    (candidates, shard count), and the result it attests (``attests``, empty before it attests)
    with that attestation's envelope."""

    recipe: str
    result: str
    fingerprint: str
    candidates: tuple[str, ...]
    shards: int
    attests: str = ""
    attestation: bytes = b""

    def encode(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "result": self.result,
            "fingerprint": self.fingerprint,
            "candidates": list(self.candidates),
            "shards": self.shards,
            "attests": self.attests,
            "attestation": self.attestation,
        }

    @classmethod
    def decode(cls, value: dict[str, Any]) -> ShardMerge:
        return cls(
            recipe=value["recipe"],
            result=value["result"],
            fingerprint=value["fingerprint"],
            candidates=tuple(value["candidates"]),
            shards=value["shards"],
            attests=value["attests"],
            attestation=value["attestation"],
        )

    def view(self) -> RoundView:
        return RoundView(self.candidates, self.shards)


@dataclasses.dataclass(frozen=True)
class SpotVerdict:
    """The result of a shard that this node's spot check passed, and its sampled attestation."""

    result: str
    attestation: bytes

    def encode(self) -> dict[str, Any]:
        return {"result": self.result, "attestation": self.attestation}

    @classmethod
    def decode(cls, value: dict[str, Any]) -> SpotVerdict:
        return cls(value["result"], value["attestation"])


@dataclasses.dataclass(frozen=True)
class RoundView:
    """The round a node merged or checked: its candidates (sorted ids) and its shard count."""

    candidates: tuple[str, ...]
    shards: int

    def encode(self) -> list:
        return [list(self.candidates), self.shards]

    @classmethod
    def decode(cls, value: list) -> RoundView:
        return cls(tuple(value[0]), value[1])


@dataclasses.dataclass(frozen=True)
class Announcement:
    """What a node announces for one shard of its latest round: a result id and an attestation."""

    shard: int
    result: str
    attestation: bytes

    def encode(self) -> list:
        return [self.shard, self.result, self.attestation]

    @classmethod
    def decode(cls, value: list) -> Announcement:
        return cls(*value)


@dataclasses.dataclass(frozen=True)
class LatestRound:
    """The last round this node decided: fingerprint, per shard the result and its attestations,
    and what it announces per shard."""

    round: int
    fingerprint: str
    results: tuple[str, ...]
    attestations: tuple[tuple[bytes, ...], ...]
    announce: tuple[Announcement, ...]

    def encode(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "fingerprint": self.fingerprint,
            "results": list(self.results),
            "attestations": [list(a) for a in self.attestations],
            "announce": [a.encode() for a in self.announce],
        }

    @classmethod
    def decode(cls, value: dict[str, Any]) -> LatestRound:
        return cls(
            round=value["round"],
            fingerprint=value["fingerprint"],
            results=tuple(value["results"]),
            attestations=tuple(tuple(a) for a in value["attestations"]),
            announce=tuple(Announcement.decode(a) for a in value["announce"]),
        )


class RoundState:
    """Typed reads and writes of a node's round state in a `NodeState` (keys in the module docstring)."""

    def __init__(self, state: NodeState) -> None:
        self.state = state

    @property
    def round(self) -> int:
        return int(self.state.get("round", 0))

    def set_round(self, r: int) -> None:
        self.state.set("round", r)

    def genesis_record(self) -> bytes | None:
        return self.state.get("genesis")

    def set_genesis_record(self, record: bytes) -> None:
        self.state.set("genesis", record)

    def contribution(self, r: int) -> OwnContribution | None:
        return _decoded(OwnContribution, self.state.get(f"contribution/{r}"))

    def set_contribution(self, r: int, value: OwnContribution) -> None:
        self.state.set(f"contribution/{r}", value.encode())

    def summary(self, r: int) -> OwnSummary | None:
        return _decoded(OwnSummary, self.state.get(f"summary/{r}"))

    def set_summary(self, r: int, value: OwnSummary) -> None:
        self.state.set(f"summary/{r}", value.encode())

    def pending(self, r: int) -> int | None:
        """When `umm contribute` started preparing a contribution for round r (unix time), if it is."""
        return self.state.get(f"pending/{r}")

    def set_pending(self, r: int, started: int | None) -> None:
        """Note (or, with None, clear) a contribution being prepared for round r."""
        if started is None:
            self.state.delete(f"pending/{r}")
        else:
            self.state.set(f"pending/{r}", started)

    def shard(self, r: int, j: int) -> ShardMerge | None:
        return _decoded(ShardMerge, self.state.get(f"shard/{r}/{j}"))

    def set_shard(self, r: int, j: int, value: ShardMerge | None) -> None:
        """Keep (or, with None, forget) this node's merge of shard `j`."""
        self.state.set(f"shard/{r}/{j}", None if value is None else value.encode())

    def spot(self, r: int, j: int) -> SpotVerdict | None:
        return _decoded(SpotVerdict, self.state.get(f"spot/{r}/{j}"))

    def set_spot(self, r: int, j: int, value: SpotVerdict) -> None:
        self.state.set(f"spot/{r}/{j}", value.encode())

    def fused_refusal(self, manifest_id: str) -> str | None:
        """Why this node's check refused its own fused contribution `manifest_id` (None: it did not)."""
        return self.state.get(f"fusion/refused/{manifest_id}")

    def set_fused_refusal(self, manifest_id: str, reason: str) -> None:
        self.state.set(f"fusion/refused/{manifest_id}", reason)

    def refused(self, r: int) -> frozenset[str]:
        return frozenset(self.state.get(f"refused/{r}", []))

    def refuse(self, r: int, result_id: str) -> None:
        self.state.set(f"refused/{r}", sorted(self.refused(r) | {result_id}))

    def view(self, r: int) -> RoundView | None:
        return _decoded(RoundView, self.state.get(f"view/{r}"))

    def set_view(self, r: int, value: RoundView) -> None:
        self.state.set(f"view/{r}", value.encode())

    def faults(self, r: int) -> tuple[bytes, ...]:
        """The signed faults this node found in round r (node.faults), oldest first."""
        return tuple(self.state.get(f"faults/{r}", []))

    def add_fault(self, r: int, envelope: bytes) -> None:
        self.state.set(f"faults/{r}", [*self.faults(r), envelope])

    def latest(self) -> LatestRound | None:
        return _decoded(LatestRound, self.state.get("latest"))

    def set_latest(self, value: LatestRound) -> None:
        self.state.set("latest", value.encode())

    def set_stats(self, bytes_sent: int, bytes_received: int) -> None:
        self.state.set("stats", {"bytes_sent": bytes_sent, "bytes_received": bytes_received})


def _decoded(cls, value):
    return None if value is None else cls.decode(value)
