"""Distillation of fused distributions into a copy of the pivot model (FuseLLM's objective).

loss = lam * CLM(response tokens) + (1 - lam) * CE(fused distribution, model)

CLM is the mean cross-entropy of the response tokens (prompt tokens are not trained on); the fusion
term is, over the response positions that carry a fused distribution, the mean of
-sum_j q_j log p_model(j), q the fused top-k renormalized over the ids it keeps. FuseLLM uses
lam = 0.9; lam = 1 trains on the responses' text alone. AdamW, linear warmup then cosine decay;
batches are drawn from the examples in an order seeded by `seed`, so a run is deterministic for a
seed and a torch thread count (`threads`, pinned for the run).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from merging.fusion import FusionError
from merging.fusion.transfer import AlignedExample
from merging.testbed.training import pinned_threads, warmup_cosine

FUSELLM_LAMBDA = 0.9


@dataclass(frozen=True)
class DistillSpec:
    """Settings of one distillation run."""

    steps: int = 600
    lr: float = 2e-3
    batch_size: int = 32
    lam: float = FUSELLM_LAMBDA
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 1
    frozen: tuple[str, ...] = ()  # parameters whose name contains one of these stay as they are

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise FusionError(f"expected lambda in [0, 1], got {self.lam}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise FusionError(
                f"expected positive steps, batch size and learning rate, got {self.steps}, "
                f"{self.batch_size}, {self.lr}"
            )


@dataclass(frozen=True)
class Batch:
    """Right-padded rows: inputs, CLM labels (-100 outside responses), fused ids and probabilities
    aligned with the logits that predict each token (-1 / 0 where there is none)."""

    input_ids: torch.Tensor  # [B, W]
    attention_mask: torch.Tensor  # [B, W]
    labels: torch.Tensor  # [B, W - 1]
    dist_ids: torch.Tensor  # [B, W - 1, k]
    dist_probs: torch.Tensor  # [B, W - 1, k]


def make_batch(rows: Sequence[AlignedExample], pad_id: int) -> Batch:
    """The batch of `rows`; position t of labels and distributions is predicted by logits at t."""
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    k = max(r.dist_ids.shape[1] for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width - 1), -100, dtype=torch.long)
    dist_ids = torch.full((len(rows), width - 1, k), -1, dtype=torch.long)
    dist_probs = torch.zeros((len(rows), width - 1, k), dtype=torch.float32)
    for r, row in enumerate(rows):
        sequence = [*row.prompt_ids, *row.response_ids]
        start, end = len(row.prompt_ids) - 1, len(sequence) - 1
        input_ids[r, : len(sequence)] = torch.tensor(sequence)
        mask[r, : len(sequence)] = 1
        labels[r, start:end] = torch.tensor(row.response_ids)
        dist_ids[r, start:end, : row.dist_ids.shape[1]] = row.dist_ids
        dist_probs[r, start:end, : row.dist_probs.shape[1]] = row.dist_probs
    return Batch(input_ids, mask, labels, dist_ids, dist_probs)


def distill_loss(logits: torch.Tensor, batch: Batch, lam: float) -> tuple[torch.Tensor, float, float]:
    """(loss, CLM part, fusion part) of `logits` [B, W - 1, V] on `batch`."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    clm = torch.nn.functional.nll_loss(
        log_probs.reshape(-1, log_probs.shape[-1]), batch.labels.reshape(-1), ignore_index=-100
    )
    valid = batch.dist_ids >= 0
    q = batch.dist_probs * valid
    total = q.sum(dim=-1)
    has = total > 0
    if lam >= 1.0 or not bool(has.any()):
        return clm, clm.item(), 0.0
    q = q / total.clamp(min=1e-12).unsqueeze(-1)
    picked = log_probs.gather(-1, batch.dist_ids.clamp(min=0))
    fusion = -(q * picked).sum(dim=-1)[has].mean()
    return lam * clm + (1.0 - lam) * fusion, clm.item(), fusion.item()


def distill(
    model: Any,
    examples: Sequence[AlignedExample],
    spec: DistillSpec,
    pad_id: int,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `model` in place on the fused `examples`; returns the loss of every step."""
    if not examples:
        raise FusionError("expected at least one fused example to distill, got none")
    with pinned_threads(spec.threads):
        torch.manual_seed(spec.seed)
        rng = random.Random(spec.seed)
        params = [
            p
            for name, p in model.named_parameters()
            if p.requires_grad and not any(f in name for f in spec.frozen)
        ]
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))

        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, spec.warmup, spec.steps)
        )
        order: list[int] = []
        losses: list[float] = []
        model.train()
        for step in range(spec.steps):
            rows = []
            for _ in range(min(spec.batch_size, len(examples))):
                if not order:
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                rows.append(examples[order.pop()])
            batch = make_batch(rows, pad_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            loss, _, _ = distill_loss(logits, batch, spec.lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
        model.eval()
    return losses
