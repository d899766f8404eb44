"""What `umm status` shows of a round's contribution faults (node.faults): each claim and who made it.

Rows come from the round's fault records (node.records): per (contribution, tensor, kind), the
distinct keys that signed the claim. A status client checks signatures only, not the bytes: each
node excludes a contribution only for a claim it checked itself, so the rows are hints (a claim
made by one unknown key may be false).
"""

from __future__ import annotations

import time

from node.lookups import RecordReader
from node.records import fault_key, parse_record
from protocol.errors import ProtocolError
from protocol.faults import ContributionFault
from protocol.verify import verify_message


async def read_faults(board: RecordReader, network_id: str, round_number: int) -> list[dict]:
    """One row per claimed fault of the round: contribution, tensor, kind and the peers claiming it."""
    claimed: dict[tuple[str, str, str], set[str]] = {}
    now = int(time.time())
    for value in (await board.aread(fault_key(network_id, round_number))).values():
        record = parse_record("fault", value)
        for raw in record["faults"] if record is not None else ():
            try:
                m = verify_message(raw, ContributionFault, network_id=network_id, now=now).message
            except ProtocolError:
                continue
            if m.round == round_number:
                claimed.setdefault((m.contribution, m.tensor, m.kind), set()).add(m.peer_id)
    return [
        {"contribution": cid, "tensor": tensor, "kind": kind, "claimed_by": sorted(peers)}
        for (cid, tensor, kind), peers in sorted(claimed.items())
    ]


def faults_table(round_number: int, rows: list[dict]):
    """The rich table of `read_faults` rows."""
    from rich.table import Table

    table = Table("contribution", "tensor", "kind", "claimed by", title=f"round {round_number}: fault claims")
    for row in rows:
        peers = row["claimed_by"]
        table.add_row(
            row["contribution"][:16], row["tensor"], row["kind"], f"{len(peers)} ({peers[0][:20]}, ...)"
        )
    return table
