"""What `umm status` shows of fused contributions: verdict records counted per contribution."""

from __future__ import annotations

import asyncio

from node.fusion_status import read_fusion_verdicts
from node.records import fusion_key, make_record
from protocol.encoding import pack

NETWORK = "net.0123456789abcdef"
FUSED = "a" * 64
OTHER = "b" * 64
SUMMARY = "c" * 64


class Board:
    def __init__(self, records: dict[str, dict[bytes, bytes]]) -> None:
        self.records = records

    async def aread(self, key: str, *, latest: bool = True) -> dict[bytes, bytes]:
        return self.records.get(key, {})


def _verdict(cid: str, pivot: float, fused: float, reason: str = "") -> bytes:
    return make_record("fusion", contribution=cid, pivot=pivot, fused=fused, reason=reason)


def test_verdicts_are_counted_and_the_accepting_nodes_cross_entropies_are_their_medians():
    key = fusion_key(NETWORK, 3, FUSED)
    board = Board(
        {
            key: {
                b"p1": _verdict(FUSED, 2.0, 1.0),
                b"p2": _verdict(FUSED, 2.2, 1.2),
                b"p3": _verdict(FUSED, 2.4, 0.8),
                b"p4": _verdict(FUSED, 2.0, 2.0, "held-out cross-entropy 2.0000 is not at most 0.95 x ..."),
                b"p5": _verdict(OTHER, 9.0, 0.0),  # names another contribution: not counted
                b"p6": pack({"contribution": FUSED}),  # malformed: not counted
            }
        }
    )
    (row,) = asyncio.run(read_fusion_verdicts(board, NETWORK, 3, {FUSED: (SUMMARY,)}))
    assert row["contribution"] == FUSED and row["fused_from"] == [SUMMARY]
    assert (row["accepted_by"], row["refused_by"]) == (3, 1)
    assert (row["pivot"], row["fused"]) == (2.2, 1.0)
    assert row["reason"].startswith("held-out cross-entropy 2.0000")


def test_a_fused_contribution_without_verdicts_shows_none_yet():
    (row,) = asyncio.run(read_fusion_verdicts(Board({}), NETWORK, 0, {FUSED: (SUMMARY,)}))
    assert (row["accepted_by"], row["refused_by"], row["pivot"], row["fused"]) == (0, 0, None, None)
