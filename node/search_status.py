"""What `umm status` shows of a round's searched merges: each proposal, its claim and its verdicts.

A proposal's row comes from the round's proposal records (who holds its envelope) and the verdict records
every verifying node publishes (node.records): the fitness it claims, the fitness the verifiers
recomputed, how many verified and how many refused it. Records are unverified hints (a client
does not recompute anything); a node adopts only proposals it verified itself.
"""

from __future__ import annotations

import statistics

from node.lookups import RecordReader
from node.records import parse_record, proposal_key, verdict_key


async def read_proposals(board: RecordReader, network_id: str, round_number: int) -> list[dict]:
    """One row per proposal of the round: id, holder, claimed and verified fitness, verdict counts."""
    rows = []
    for value in (await board.aread(proposal_key(network_id, round_number))).values():
        record = parse_record("proposal", value)
        if record is None:
            continue
        envelope = record["proposal"]
        values = (await board.aread(verdict_key(network_id, round_number, envelope))).values()
        verdicts = [v for v in (parse_record("verdict", x) for x in values) if v is not None]
        ids = {v["proposal"] for v in verdicts}
        verified = [v["fitness"] for v in verdicts if not v["reason"]]
        refused = [v["reason"] for v in verdicts if v["reason"]]
        rows.append(
            {
                "proposal": ids.pop() if len(ids) == 1 else "",  # its id, as verifiers name it
                "envelope": envelope,
                "holder": record["p2p"],
                "claimed": verdicts[0]["claimed"] if verdicts else None,
                "verified_fitness": statistics.median(verified) if verified else None,
                "verified_by": len(verified),
                "refused_by": len(refused),
                "reason": refused[0] if refused else "",
            }
        )
    return sorted(rows, key=lambda row: row["envelope"])


def proposals_table(round_number: int, rows: list[dict]):
    """The rich table of `read_proposals` rows."""
    from rich.table import Table

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.6f}"

    table = Table(
        "proposal",
        "held by",
        "claimed",
        "verified",
        "verified by",
        "refused by",
        "why refused",
        title=f"round {round_number}: searched-merge proposals",
    )
    for row in rows:
        table.add_row(
            (row["proposal"] or row["envelope"])[:16],
            row["holder"][:20],
            number(row["claimed"]),
            number(row["verified_fitness"]),
            str(row["verified_by"]),
            str(row["refused_by"]),
            row["reason"][:60],
        )
    return table
