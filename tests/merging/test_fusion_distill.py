"""Distillation into a pivot copy: the loss against hand-computed values, batches, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from merging.fusion import FusionError
from merging.fusion.distill import DistillSpec, distill, distill_loss, make_batch
from merging.fusion.summary import summarize
from merging.fusion.transfer import AlignedExample, PivotTokens, align_summary
from tests.merging.test_fusion_summary import PROBE, tiny_pivot, tiny_source


def _row(prompt, response, ids, probs) -> AlignedExample:
    return AlignedExample(prompt, response, torch.tensor(ids), torch.tensor(probs), 0.0)


def test_batch_places_labels_and_distributions_under_the_logits_that_predict_them():
    rows = [
        _row((5, 6), (7, 2), [[7, 8], [-1, -1]], [[0.7, 0.2], [0.0, 0.0]]),
        _row((5,), (9,), [[9, -1]], [[1.0, 0.0]]),
    ]
    batch = make_batch(rows, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 2], [5, 9, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 7, 2], [9, -100, -100]]
    assert batch.dist_ids[0, 1].tolist() == [7, 8] and batch.dist_ids[0, 2].tolist() == [-1, -1]
    assert batch.dist_ids[1, 0].tolist() == [9, -1] and batch.dist_probs[0, 1].tolist() == pytest.approx(
        [0.7, 0.2]
    )


def test_loss_mixes_clm_and_cross_entropy_to_the_renormalized_fused_distribution():
    rows = [_row((0,), (1, 2), [[1, 2], [-1, -1]], [[0.6, 0.2], [0.0, 0.0]])]
    batch = make_batch(rows, pad_id=0)
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]]])  # [B=1, W-1=2, V=3]
    lp = torch.log_softmax(logits[0], dim=-1).tolist()
    clm = -(lp[0][1] + lp[1][2]) / 2
    fusion = -(0.75 * lp[0][1] + 0.25 * lp[0][2])  # q renormalized over its kept ids
    loss, clm_part, fusion_part = distill_loss(logits, batch, lam=0.9)
    assert clm_part == pytest.approx(clm) and fusion_part == pytest.approx(fusion)
    assert float(loss) == pytest.approx(0.9 * clm + 0.1 * fusion)
    text_only, _, _ = distill_loss(logits, batch, lam=1.0)
    assert float(text_only) == pytest.approx(clm)
    assert math.isfinite(float(distill_loss(logits, batch, lam=0.0)[0]))


@pytest.fixture(scope="module")
def fused():
    source, source_tok = tiny_source()
    summary = summarize(source, source_tok, PROBE, k=4, max_new_tokens=8)
    _, pivot_tok = tiny_pivot()
    examples, _ = align_summary(summary, PivotTokens(pivot_tok))
    return examples, pivot_tok


def _trained(examples, pad_id, seed, threads=1):
    model, _ = tiny_pivot()
    losses = distill(model, examples, DistillSpec(steps=4, batch_size=2, seed=seed, threads=threads), pad_id)
    return model.state_dict(), losses


def test_distillation_is_deterministic_for_a_seed_and_thread_count(fused):
    examples, tok = fused
    first, losses_a = _trained(examples, tok.pad_token_id, seed=3)
    second, losses_b = _trained(examples, tok.pad_token_id, seed=3)
    assert losses_a == losses_b
    assert all(torch.equal(first[name], second[name]) for name in first)
    other, _ = _trained(examples, tok.pad_token_id, seed=4)
    assert any(not torch.equal(first[name], other[name]) for name in first)
    untouched = tiny_pivot()[0].state_dict()
    assert any(not torch.equal(first[name], untouched[name]) for name in first)


def test_distillation_lowers_the_loss_on_its_examples(fused):
    examples, tok = fused
    model, _ = tiny_pivot()
    losses = distill(
        model, examples, DistillSpec(steps=40, batch_size=3, lr=1e-2, warmup=2), tok.pad_token_id
    )
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_bad_settings_are_refused():
    with pytest.raises(FusionError, match="lambda"):
        DistillSpec(lam=1.5)
    with pytest.raises(FusionError, match="positive steps"):
        DistillSpec(steps=0)
    with pytest.raises(FusionError, match="at least one fused example"):
        distill(tiny_pivot()[0], [], DistillSpec(steps=1), 0)


def test_frozen_parameters_stay_as_they_are(fused):
    examples, tok = fused
    model, _ = tiny_pivot()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    distill(
        model, examples, DistillSpec(steps=3, batch_size=2, frozen=("embed_tokens", "norm")), tok.pad_token_id
    )
    after = model.state_dict()
    for name in before:
        frozen = "embed_tokens" in name or "norm" in name or name == "lm_head.weight"
        assert torch.equal(before[name], after[name]) == frozen, name
