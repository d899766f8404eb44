"""The check a peer runs on a fused contribution: does it lower the cross-entropy to the summaries?

Distillation is not bit-reproducible across machines, so a peer cannot recompute a fused pivot;
it recomputes a cheap forward pass instead. A fixed share of the probe prompts is held out from
distillation (chosen by the sha256 of each prompt, so every peer picks the same ones); on them, the
fused model's cross-entropy to the fused distributions (the fusion term of the distillation loss)
must be at most (1 - margin) times the pivot's, or the contribution is refused. Different thread
counts change the forward pass by float rounding only (about 1e-6 relative), far below any
useful margin.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from merging.fusion import FusionError
from merging.fusion.distill import distill_loss, make_batch
from merging.fusion.transfer import AlignedExample

DEFAULT_HELD_OUT = 0.1  # share of probe prompts kept out of distillation
DEFAULT_MARGIN = 0.05  # the fused model must lower the held-out cross-entropy by at least 5 %
_BUCKETS = 10_000


class FusedContributionRefused(FusionError):
    """A fused pivot that does not lower the held-out cross-entropy by the stated margin."""


def is_held_out(prompt: str, share: float = DEFAULT_HELD_OUT) -> bool:
    """Whether a probe prompt is held out of distillation: sha256 bucket below `share`."""
    digest = hashlib.sha256(b"umm-fusion-held-out\0" + prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % _BUCKETS < share * _BUCKETS


def split_held_out(
    prompts: Sequence[str], examples: Sequence[AlignedExample], share: float = DEFAULT_HELD_OUT
) -> tuple[list[AlignedExample], list[AlignedExample]]:
    """(examples to distill on, held-out examples), by their prompts."""
    train, held = [], []
    for prompt, example in zip(prompts, examples, strict=True):
        (held if is_held_out(prompt, share) else train).append(example)
    return train, held


@torch.no_grad()
def held_out_cross_entropy(
    model: Any, examples: Sequence[AlignedExample], pad_id: int, batch_size: int = 32
) -> float:
    """Mean over the examples' positions with a fused distribution of -sum_j q_j log p_model(j)."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(examples), batch_size):
            rows = examples[lo : lo + batch_size]
            batch = make_batch(rows, pad_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            positions = int(((batch.dist_ids >= 0) & (batch.dist_probs > 0)).any(dim=-1).sum())
            if positions:
                _, _, fusion = distill_loss(logits, batch, lam=0.0)
                total += fusion * positions
                count += positions
    finally:
        model.train(was_training)
    if count == 0:
        raise FusionError("expected held-out examples with fused distributions, got none")
    return total / count


@dataclass(frozen=True)
class FusionCheck:
    """The held-out cross-entropy of the pivot and of the fused model, and the verdict."""

    pivot: float
    fused: float
    margin: float

    @property
    def accepted(self) -> bool:
        return self.fused <= (1.0 - self.margin) * self.pivot


def check_fused(
    pivot: Any,
    fused: Any,
    held_out: Sequence[AlignedExample],
    pad_id: int,
    margin: float = DEFAULT_MARGIN,
) -> FusionCheck:
    """Compare the pivot and the fused model on the held-out examples."""
    if not 0.0 <= margin < 1.0:
        raise FusionError(f"expected a margin in [0, 1), got {margin}")
    return FusionCheck(
        held_out_cross_entropy(pivot, held_out, pad_id),
        held_out_cross_entropy(fused, held_out, pad_id),
        margin,
    )


def require_lower_cross_entropy(check: FusionCheck) -> None:
    """Raise `FusedContributionRefused` unless the check accepted the fused model."""
    if not check.accepted:
        raise FusedContributionRefused(
            f"expected the fused model's held-out cross-entropy to be at most {1 - check.margin:.2f} x the "
            f"pivot's {check.pivot:.4f}, got {check.fused:.4f}"
        )
