"""A round's distribution summaries, as the fuser and the fused-contribution check read them.

`round_summaries` reads the round's summary records (node.records) and keeps, one per signer (the
newest), those whose card and summary verify, name each other, and target this round and the
genesis probe set. `load_summaries` fetches summaries by id (their envelope, then their tensor
chunks), verifies and decodes them (protocol.summary.decode_summary) into the response summaries
merging.fusion distills from. Both run in the event loop; decoding is cheap (a few MB a summary).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from merging.fusion.summary import ResponseSummary
from node.errors import NodeError
from node.lookups import RecordReader
from node.records import parse_record, summary_key
from node.round_context import RoundContext
from protocol.envelope import Signed
from protocol.errors import ProtocolError
from protocol.genesis import read_probe_set
from protocol.messages import DistributionSummary, ExpertCard
from protocol.summary import decode_summary
from protocol.verify import verify_message


@dataclass(frozen=True)
class SummaryRef:
    """A round's verified summary record: the summary's id, its card and the holder to fetch from."""

    summary: str
    card: Signed
    holder: str


async def round_summaries(ctx: RoundContext, board: RecordReader, r: int) -> dict[str, SummaryRef]:
    """Summary id -> `SummaryRef` for round `r`'s summaries whose envelopes verify (module docstring)."""
    now = int(time.time())
    newest: dict[bytes, tuple[int, SummaryRef]] = {}
    for value in (await board.aread(summary_key(ctx.network_id, r))).values():
        record = parse_record("summary", value)
        if record is None:
            continue
        try:
            card = verify_message(record["card"], ExpertCard, network_id=ctx.network_id, now=now)
        except ProtocolError:
            continue
        try:
            if ctx.store.missing([record["summary"]]):
                await ctx.fetch([record["summary"]], [record["p2p"]], attempts=1)
            summary = _summary_envelope(ctx, record["summary"], now)
        except NodeError:  # not reachable this poll
            continue
        if summary is None:
            continue
        m: DistributionSummary = summary.message
        if m.signer != card.message.signer or m.card_id != card.id or m.round != r:
            continue
        held = newest.get(m.signer)
        if held is None or (m.created_at, summary.id) > (held[0], held[1].summary):
            newest[m.signer] = (m.created_at, SummaryRef(summary.id, card, record["p2p"]))
    return {ref.summary: ref for _, ref in newest.values()}


def _summary_envelope(ctx: RoundContext, summary_id: str, now: int) -> Signed | None:
    try:
        summary = verify_message(
            ctx.store.get(summary_id), DistributionSummary, network_id=ctx.network_id, now=now
        )
    except ProtocolError:
        return None
    if summary.message.probe_set_fingerprint != ctx.genesis.probe_set_fingerprint:
        return None
    return summary


async def load_summaries(
    ctx: RoundContext, ids: Sequence[str], holders: Iterable[str] = ()
) -> list[tuple[str, ResponseSummary]]:
    """(id, response summary) for each summary id, fetched from `holders` (and every announced
    peer), verified and decoded; FetchError if one cannot be fetched, ProtocolError if one does
    not verify or is not a summary of the genesis probe set."""
    if not ctx.genesis.probe_set_fingerprint:
        raise ProtocolError("expected a network with a probe set, got one without")
    holders = list(holders)
    now = int(time.time())
    await ctx.fetch(list(ids), holders)
    envelopes = []
    for summary_id in ids:
        summary = verify_message(
            ctx.store.get(summary_id), DistributionSummary, network_id=ctx.network_id, now=now
        )
        envelopes.append(summary)
    await ctx.fetch([d for s in envelopes for t in s.message.tensors for d in t.chunks], holders)
    texts = read_probe_set(ctx.store.get(ctx.genesis.probe_set_fingerprint))
    return [(s.id, decode_summary(s.message, ctx.store.get, texts)) for s in envelopes]
