"""The held-out cross-entropy rule a peer applies to a fused contribution."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from merging.fusion import FusionError
from merging.fusion.distill import DistillSpec, distill
from merging.fusion.refusal import (
    FusedContributionRefused,
    FusionCheck,
    check_fused,
    held_out_cross_entropy,
    is_held_out,
    require_lower_cross_entropy,
    split_held_out,
)
from merging.fusion.transfer import AlignedExample


class TableModel(torch.nn.Module):
    """Logits that depend only on the position: row t of `table` for every sequence."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None):
        rows = self.table[: input_ids.shape[1]].unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        return SimpleNamespace(logits=rows)


def _example() -> AlignedExample:
    # prompt (0,), response (1, 2): logits at positions 0 and 1 predict them
    return AlignedExample(
        (0,), (1, 2), torch.tensor([[1, 2], [2, -1]]), torch.tensor([[0.3, 0.1], [0.5, 0.0]]), 0.0
    )


def test_held_out_cross_entropy_is_the_mean_over_positions_with_a_distribution():
    table = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    lp = torch.log_softmax(table, dim=-1).tolist()
    first = -(0.75 * lp[0][1] + 0.25 * lp[0][2])
    second = -lp[1][2]
    ce = held_out_cross_entropy(TableModel(table), [_example(), _example()], pad_id=0)
    assert ce == pytest.approx((first + second) / 2)


def test_a_model_trained_toward_the_distributions_passes_and_the_pivot_itself_is_refused():
    pivot = TableModel(torch.zeros(3, 3))
    fused = TableModel(torch.zeros(3, 3))
    distill(fused, [_example()], DistillSpec(steps=30, batch_size=1, lr=0.1, lam=0.0, warmup=1), pad_id=0)
    check = check_fused(pivot, fused, [_example()], pad_id=0, margin=0.05)
    assert check.pivot == pytest.approx(math.log(3))
    assert check.accepted and check.fused < 0.95 * check.pivot
    require_lower_cross_entropy(check)
    same = check_fused(pivot, pivot, [_example()], pad_id=0)
    assert not same.accepted
    with pytest.raises(FusedContributionRefused, match="held-out cross-entropy"):
        require_lower_cross_entropy(same)


def test_the_margin_is_a_ratio_of_the_pivot_cross_entropy():
    assert FusionCheck(pivot=2.0, fused=1.9, margin=0.05).accepted
    assert not FusionCheck(pivot=2.0, fused=1.91, margin=0.05).accepted
    with pytest.raises(FusionError, match="margin"):
        check_fused(TableModel(torch.zeros(3, 3)), TableModel(torch.zeros(3, 3)), [_example()], 0, margin=1.0)


def test_held_out_prompts_are_chosen_by_their_hash_alone():
    prompts = [f"Sort [{i}, {i + 1}].\n" for i in range(400)]
    held = [p for p in prompts if is_held_out(p)]
    assert 20 <= len(held) <= 60  # about 10 % of 400
    assert [p for p in prompts if is_held_out(p)] == held
    assert not any(is_held_out(p, 0.0) for p in prompts) and all(is_held_out(p, 1.0) for p in prompts)
    examples = [_example() for _ in prompts]
    train, out = split_held_out(prompts, examples)
    assert len(out) == len(held) and len(train) == len(prompts) - len(held)


def test_no_distribution_to_check_against_is_an_error():
    empty = AlignedExample((0,), (1,), torch.tensor([[-1]]), torch.tensor([[0.0]]), 0.0)
    with pytest.raises(FusionError, match="held-out examples"):
        held_out_cross_entropy(TableModel(torch.zeros(2, 3)), [empty], pad_id=0)
