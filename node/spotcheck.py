"""A node's spot checks: sampled attestations of the shards it does not merge (rules in protocol.spotcheck).

For every shard of a settled round that the node does not merge in full, each poll:

1. it orders the shard's published results by distinct full attesters (most first), then by
   distinct attesters of any kind (most first; ties: the smaller id) and takes the first it has
   not refused that states this round, this shard and shard count, the node's own candidates, the
   shard's planned tensors and the genesis recipe of its admitted contributions;
2. it draws its sample (`protocol.spotcheck.sign_sample` / `result_sample`: about
   ``SPOT_CHECK_DELTAS / contributions`` of the tensors, unpredictable to the publisher), fetches
   those tensors of the result and of every admitted contribution (the base is local), and
   recomputes them with the engine (`recheck`);
3. if every sampled tensor equals the result's entry it signs a ``sampled`` Attestation and
   publishes it as its result record of the shard; otherwise it adds the result to ``refused/<r>``
   (a quorum for that result is then refused by `NodeService._check_quorum`) and tries the next.

A verdict is kept per result id (``spot/<r>/<j>``), so a poll re-publishes instead of re-checking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from node.errors import FetchError, NodeError
from node.records import make_record, result_key
from node.rounds import Contribution, RoundPlan
from protocol.chunks import decode_tensors
from protocol.envelope import Signed, sign_message
from protocol.errors import ProtocolError
from protocol.messages import SCHEMA_VERSION, Attestation, MergeResult, TensorEntry
from protocol.spotcheck import recheck, result_sample, sign_sample
from protocol.verify import verify_message

if TYPE_CHECKING:
    from node.service import NodeService

logger = logging.getLogger(__name__)


def attesters(raw: Sequence[bytes], result_id: str, network_id: str) -> tuple[set[bytes], set[bytes]]:
    """The distinct signers of the valid attestations in `raw` that name `result_id`, and those of
    them that attest in full."""
    signers, full = set(), set()
    for data in raw:
        with contextlib.suppress(ProtocolError):
            att = verify_message(data, Attestation, network_id=network_id).message
            if att.result_id == result_id:
                signers.add(att.signer)
                if att.kind == "full":
                    full.add(att.signer)
    return signers, full


def result_rank(raw: Sequence[bytes], result_id: str, network_id: str) -> tuple[int, int, str]:
    """How a node orders results of one merge (smaller first): most distinct full attesters, then
    most distinct attesters of any kind, then the smaller id.

    Workers (`NodeService._attest_canonical`) and spot checkers (`spot_targets`) order by the same
    rank, so they move to the same id. While a shard's full attesters are its three workers (each
    attests one id), a result with a quorum (two of them) outranks every other result of its merge,
    so the nodes that have not yet recorded the round keep attesting it, whatever the quorum.
    """
    signers, full = attesters(raw, result_id, network_id)
    return -len(full), -len(signers), result_id


def spot_targets(attestations: dict[str, list[bytes]], network_id: str) -> list[str]:
    """Result ids with at least one full attestation, in `result_rank` order."""
    ranks = {result_id: result_rank(raw, result_id, network_id) for result_id, raw in attestations.items()}
    return sorted((result_id for result_id, rank in ranks.items() if rank[0] < 0), key=ranks.__getitem__)


def merge_content(result: MergeResult) -> tuple:
    """What two nodes' results of one shard must share to be the same merge: all but signer and time
    (the same recipe, fingerprint and candidates, and the same chunk list: a result whose chunks do
    not hold its tensors would pass the fingerprint yet fail every pull)."""
    return (
        result.recipe.id,
        result.merged_fingerprint,
        result.round,
        result.shard,
        result.shards,
        result.candidates,
        result.chunk_size,
        result.tensors,
    )


def attest_decided(service: NodeService, r: int, result: Signed) -> tuple[str, bytes] | None:
    """This node's sampled attestation of `result`, the decided result of its shard, if its spot
    check passed a result of the same merge (same content: the same sample and the same verdict);
    None if it passed none. The attestation then counts towards the quorum that the nodes still
    deciding the round read, instead of naming another id of the same merge."""
    j = result.message.shard
    spot = service.state.get(f"spot/{r}/{j}")
    if spot is None:
        return None
    if spot["result"] != result.id:
        try:
            checked = verify_message(
                service.store.get(spot["result"]), MergeResult, network_id=service.network_id
            )
        except (NodeError, ProtocolError):
            return None
        if merge_content(checked.message) != merge_content(result.message):
            return None
        spot = {"result": result.id, "attestation": _sampled_attestation(service, result).raw}
        service.state.set(f"spot/{r}/{j}", spot)
    return spot["result"], spot["attestation"]


async def spot_check_shards(
    service: NodeService,
    r: int,
    plan: RoundPlan,
    contributions: Sequence[Contribution],
    shards: Sequence[int],
    base_entries: Sequence[TensorEntry],
) -> None:
    """Spot-check each of `shards` of round `r` (the module docstring)."""
    for j in shards:
        await spot_check_shard(service, r, plan, contributions, j, base_entries)


async def spot_check_shard(
    service: NodeService,
    r: int,
    plan: RoundPlan,
    contributions: Sequence[Contribution],
    j: int,
    base_entries: Sequence[TensorEntry],
) -> None:
    """Attest (sampled) the best result of shard `j` whose sample recomputes; refuse those that do not."""
    records = await service.shard_records(r, j)
    refused = set(service.state.get(f"refused/{r}", []))
    for result_id in spot_targets(records.attestations, service.network_id):
        if result_id in refused:
            continue
        result = await _suitable_result(service, r, plan, j, result_id, records.holders.get(result_id, ()))
        if result is None:
            continue
        spot = service.state.get(f"spot/{r}/{j}")
        if spot is None or spot["result"] != result_id:
            verdict = await _check_sample(service, result, contributions, base_entries)
            if verdict is None:
                return  # chunks still missing: try again next poll
            if not verdict:
                service.state.set(f"refused/{r}", sorted(refused | {result_id}))
                refused.add(result_id)
                continue
            spot = {"result": result_id, "attestation": _sampled_attestation(service, result).raw}
            service.state.set(f"spot/{r}/{j}", spot)
            logger.info(
                "round %d shard %d: attests %s sampled (records: %s)",
                r,
                j,
                result_id[:8],
                records.tally(service.network_id),
            )
            service.state.set(f"view/{r}", [list(plan.candidates), len(plan.shards)])
        await service._publish(
            result_key(service.network_id, r, j),
            make_record(
                "result", result=result_id, attestation=spot["attestation"], p2p=str(service.p2p.peer_id)
            ),
        )
        return


async def _suitable_result(
    service: NodeService, r: int, plan: RoundPlan, j: int, result_id: str, holders
) -> Signed | None:
    """The result `result_id`, verified, if it is a merge of this node's round view (else None)."""
    try:
        await service.fetch([result_id], sorted(holders), attempts=1)
        result = verify_message(
            service.store.get(result_id), MergeResult, network_id=service.network_id, now=int(time.time())
        )
    except (NodeError, ProtocolError):
        return None
    m: MergeResult = result.message
    if (m.round, m.shard, m.shards, m.candidates) != (r, j, len(plan.shards), plan.candidates):
        return None
    if tuple(t.name for t in m.tensors) != plan.shards[j]:
        return None
    if m.recipe.id != service.genesis.recipe(r, list(m.recipe.contributions)).id:
        return None  # not the network's method, parameters or dtype
    return result


async def _check_sample(
    service: NodeService,
    result: Signed,
    contributions: Sequence[Contribution],
    base_entries: Sequence[TensorEntry],
) -> bool | None:
    """Recompute this node's sample of `result`: True if it matches, False if not, None to wait."""
    m: MergeResult = result.message
    names = result_sample(sign_sample(service.identity, m), m)
    by_id = {c.id: c for c in contributions}
    admitted = [by_id[cid] for cid in m.recipe.contributions]  # the recipe's ids are among our candidates
    wanted = [d for t in m.tensors if t.name in names for d in t.chunks]
    for c in admitted:
        wanted += [d for t in c.manifest.message.tensors if t.name in names for d in t.chunks]
    with contextlib.suppress(FetchError):
        await service.fetch(wanted, [], attempts=1)
    if service.store.missing(wanted):
        return None
    try:
        deltas = {c.id: service._decode(c, names) for c in admitted}
    except ProtocolError as exc:  # an admitted contribution whose sampled bytes do not decode
        logger.warning("round %d shard %d: spot check refuses %s: %s", m.round, m.shard, result.id, exc)
        return False
    sampled_base = tuple(e for e in base_entries if e.name in set(names))
    base = decode_tensors(sampled_base, service.store.get, service.genesis.chunk_size)
    model = [e.name for e in base_entries]
    try:
        differing = await asyncio.to_thread(recheck, m, names, base, deltas, model)
    except ProtocolError as exc:  # the recipe's inputs do not merge (e.g. a delta of another shape)
        differing = (f"none ({exc})",)
    if differing:
        logger.warning(
            "round %d shard %d: spot check refuses %s: sampled tensors %s differ",
            m.round,
            m.shard,
            result.id,
            list(differing),
        )
        return False
    logger.info(
        "round %d shard %d: spot check of %d tensors matches %s", m.round, m.shard, len(names), result.id
    )
    return True


def _sampled_attestation(service: NodeService, result: Signed) -> Signed:
    m: MergeResult = result.message
    proof = sign_sample(service.identity, m)
    names = set(result_sample(proof, m))
    return sign_message(
        Attestation(
            v=SCHEMA_VERSION,
            network_id=service.network_id,
            signer=service.identity.public_key,
            created_at=int(time.time()),
            round=m.round,
            recipe_id=m.recipe.id,
            result_id=result.id,
            merged_fingerprint=m.merged_fingerprint,
            shard=m.shard,
            shards=m.shards,
            kind="sampled",
            checked_tensors=len(names),
            checked_bytes=sum(t.nbytes for t in m.tensors if t.name in names),
            sample_proof=proof,
        ),
        service.identity,
    )
