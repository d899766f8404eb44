"""Tensor-sharded aggregation: which tensors form a shard and which workers compute it (pure rules).

The merge engine merges tensor by tensor (DARE/DELLA seeds by tensor name, TIES thresholds per
tensor, layer-wise parameters resolved against the whole model's tensor list), so a shard's merged
bytes equal the same tensors of the full merge. A round therefore splits like reduce-scatter +
all-gather:

- workers: the round's ``W`` distinct contribution signers, sorted by public key;
- shards: ``S = min(W, tensors)`` byte-balanced groups of the base's tensors (`plan_shards`);
- shard ``j`` is computed in full by the workers at positions ``(j + t) mod W`` for ``t < R``
  (`shard_workers`), with ``R = min(W, full + 1)`` (`replica_count`) where ``full`` is the number of
  full attestations a shard needs (protocol.spotcheck: ``min(quorum, 2)``): one spare worker per
  shard, so one dead or lying worker does not stall the shard; the rest of the quorum comes from
  sampled attestations of the other nodes (protocol.spotcheck);
- every node assembles the round's result from the shards' attested results; its fingerprint is
  `assembled_fingerprint`, equal to the fingerprint of the full merge when every shard admitted
  the same contributions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from protocol.messages import MAX_SHARDS, MergeResult, TensorEntry, state_fingerprint


def shard_count(workers: int, tensors: int) -> int:
    """How many shards a round with `workers` workers over `tensors` tensors has (at least 1)."""
    if workers < 1 or tensors < 1:
        raise RuntimeError("shard_count: a round needs at least one worker and one tensor")
    return min(workers, tensors, MAX_SHARDS)


def replica_count(workers: int, quorum: int) -> int:
    """Workers per shard: `quorum` (the full attestations needed) plus one spare, at least 2, at
    most `workers`."""
    return max(1, min(workers, max(2, quorum + 1)))


def plan_shards(sizes: Iterable[tuple[str, int]], count: int) -> tuple[tuple[str, ...], ...]:
    """Split tensors (name, bytes) into `count` byte-balanced shards, each a sorted tuple of names.

    Largest tensor first (ties by name) to the lightest shard so far (ties by shard index): every
    tensor lands in exactly one shard, no shard is empty, and the heaviest shard exceeds the mean
    by at most the largest tensor. The same sizes and count give the same plan on every machine.
    """
    items = sorted(sizes, key=lambda item: (-item[1], item[0]))
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise RuntimeError("plan_shards: tensor names must be unique")
    if not 1 <= count <= len(items):
        raise RuntimeError(f"plan_shards: expected 1..{len(items)} shards, got {count}")
    loads = [0] * count
    members: list[list[str]] = [[] for _ in range(count)]
    for name, size in items:
        target = min(range(count), key=lambda j: (loads[j], j))
        loads[target] += size
        members[target].append(name)
    return tuple(tuple(sorted(group)) for group in members)


def plan_for(base: Sequence[TensorEntry], count: int) -> tuple[tuple[str, ...], ...]:
    """`plan_shards` over the base model's tensor entries (bytes = their raw encoded size)."""
    return plan_shards(((entry.name, entry.nbytes) for entry in base), count)


def shard_workers(shard: int, workers: int, replicas: int) -> tuple[int, ...]:
    """Positions (in the sorted worker list) of the `replicas` workers that compute `shard`."""
    if not 1 <= replicas <= workers:
        raise RuntimeError(f"shard_workers: expected 1..{workers} replicas, got {replicas}")
    return tuple((shard + t) % workers for t in range(replicas))


def shards_of_worker(position: int, shards: int, workers: int, replicas: int) -> tuple[int, ...]:
    """The shards the worker at `position` computes (the inverse of `shard_workers`)."""
    return tuple(j for j in range(shards) if position in shard_workers(j, workers, replicas))


def assembled_fingerprint(results: Iterable[MergeResult]) -> str:
    """The fingerprint of the model made of these shard results' tensors (`state_fingerprint`)."""
    return state_fingerprint(
        (t.name, t.shape, t.dtype, t.digest) for result in results for t in result.tensors
    )
