"""What `umm status` shows of a round's fused contributions: provenance and the nodes' verdicts.

A row per contribution record whose card names distribution summaries (`fused_from`): the
summaries, and the verdict records every checking node publishes (node.records ``fusion``): how
many accepted it, how many refused it and why, and the median held-out cross-entropies. Records
are unverified hints (a client recomputes nothing); each node counts a fused contribution only
once it checked it itself (node.fusion_check).
"""

from __future__ import annotations

import statistics

from node.lookups import RecordReader
from node.records import fusion_key, parse_record
from protocol.envelope import open_envelope
from protocol.errors import ProtocolError
from protocol.messages import ExpertCard


def fused_contributions(records: list, network_id: str) -> dict[str, tuple[str, ...]]:
    """Contribution id -> the summary ids its card was distilled from, for the fused ones."""
    fused = {}
    for record in records:
        if record is None:
            continue
        try:
            card = open_envelope(record["card"], ExpertCard, network_id=network_id).message
        except ProtocolError:
            continue
        if card.fused_from:
            fused[record["manifest"]] = tuple(card.fused_from)
    return fused


async def read_fusion_verdicts(
    board: RecordReader, network_id: str, round_number: int, fused: dict[str, tuple[str, ...]]
) -> list[dict]:
    """One row per fused contribution of the round (see the module docstring)."""
    rows = []
    for cid, summaries in sorted(fused.items()):
        values = (await board.aread(fusion_key(network_id, round_number, cid))).values()
        verdicts = [v for v in (parse_record("fusion", x) for x in values) if v and v["contribution"] == cid]
        accepted = [v for v in verdicts if not v["reason"]]
        refused = [v["reason"] for v in verdicts if v["reason"]]
        rows.append(
            {
                "contribution": cid,
                "fused_from": list(summaries),
                "accepted_by": len(accepted),
                "refused_by": len(refused),
                "pivot": statistics.median(v["pivot"] for v in accepted) if accepted else None,
                "fused": statistics.median(v["fused"] for v in accepted) if accepted else None,
                "reason": refused[0] if refused else "",
            }
        )
    return rows


def fusion_table(round_number: int, rows: list[dict]):
    """The rich table of `read_fusion_verdicts` rows."""
    from rich.table import Table

    table = Table(
        "contribution",
        "fused from",
        "accepted by",
        "refused by",
        "held-out CE (base -> fused)",
        "why refused",
        title=f"round {round_number}: fused contributions",
    )
    for row in rows:
        ce = "-" if row["pivot"] is None else f"{row['pivot']:.4f} -> {row['fused']:.4f}"
        table.add_row(
            row["contribution"][:16],
            ", ".join(s[:16] for s in row["fused_from"]),
            str(row["accepted_by"]),
            str(row["refused_by"]),
            ce,
            row["reason"],
        )
    return table
