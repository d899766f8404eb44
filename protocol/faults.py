"""Contribution faults: the admission rule of one tensor, and the signed record of a fault it found.

Admission looks at a round's contributions one tensor at a time (`tensor_faults`, the one rule a
worker applies to its shard and a verifier applies to the one tensor a fault names):

- ``undecodable``: the contribution's delta of that tensor does not decode (malformed bytes, a
  codec check, NaN or Inf). This depends on its bytes alone.
- ``outlier``: with at least `MIN_OUTLIER_PEERS` contributions whose delta of the tensor decodes,
  the contribution's delta L2 norm (float64) exceeds ``outlier_factor`` x the median of those
  norms (a median of 0: no outlier). This depends on the tensor of every contribution of the set.

A fault found in any tensor excludes the contribution from the whole round (every shard): the
finder signs a `ContributionFault` naming the contribution, the tensor and the kind, and every
other node checks it by fetching that one tensor (of the accused for ``undecodable``, of every
contribution for ``outlier``) and applying `tensor_faults` itself. No I/O here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from protocol.errors import ProtocolError
from protocol.messages import TENSOR_NAME, KiB, RoundMessage
from protocol.schema import field, hex64, text

if TYPE_CHECKING:  # the message and the rule need no torch import (umm status reads faults)
    import torch

FAULT_KINDS = ("undecodable", "outlier")
MIN_OUTLIER_PEERS = 3  # contributions decodable in a tensor before its norms are compared


@dataclass(frozen=True)
class ContributionFault(RoundMessage):
    """A signer's claim that contribution ``contribution`` (a delta manifest id) of round ``round``
    fails admission in tensor ``tensor`` for reason ``kind`` (one of `FAULT_KINDS`)."""

    TYPE: ClassVar[str] = "contribution_fault"
    MAX_SIZE: ClassVar[int] = 1 * KiB

    contribution: str = field(hex64)
    tensor: str = field(text(512, TENSOR_NAME))
    kind: str = field(text(16, "|".join(FAULT_KINDS)))


@dataclass(frozen=True)
class TensorFault:
    """What `tensor_faults` found for one contribution in one tensor: the kind and why."""

    kind: str
    detail: str


def tensor_norm(delta: torch.Tensor) -> float:
    """A delta's L2 norm, computed in float64."""
    return float(delta.double().norm())


def tensor_faults(
    factor: float, name: str, contributions: Iterable[str], decode: Callable[[str], torch.Tensor]
) -> dict[str, TensorFault]:
    """The faults of tensor `name` among `contributions` (ids), by the rules of the module docstring.

    `decode(contribution_id)` returns that contribution's delta of `name`, raising ProtocolError for
    bytes that do not decode (any other exception is the caller's: e.g. a chunk it does not hold).
    Each delta is decoded, measured and dropped in turn, so one tensor is held at a time.
    """
    faults: dict[str, TensorFault] = {}
    norms: dict[str, float] = {}
    for cid in sorted(set(contributions)):
        try:
            norm = tensor_norm(decode(cid))
        except ProtocolError as exc:
            faults[cid] = TensorFault("undecodable", f"{name}: {type(exc).__name__}: {exc}")
            continue
        if not math.isfinite(norm):  # finite values whose squares overflow even float64
            faults[cid] = TensorFault("undecodable", f"{name}: expected a finite delta norm, got {norm}")
            continue
        norms[cid] = norm
    if len(norms) < MIN_OUTLIER_PEERS:
        return faults
    median = statistics.median(norms.values())
    for cid, norm in norms.items():
        if median > 0 and norm > factor * median:
            limit = f"{factor:g} x median {median:.4g}"
            faults[cid] = TensorFault("outlier", f"expected {name}'s delta norm <= {limit}, got {norm:.4g}")
    return faults
