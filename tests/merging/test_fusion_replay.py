"""Replay: the pivot's own responses and distributions as targets, and what they keep in the copy."""

from __future__ import annotations

import pytest
import torch

from merging.fusion.distill import DistillSpec, distill
from merging.fusion.replay import REPLAY_SOURCE, replay_examples
from merging.fusion.summary import ProbeSet, summarize
from merging.fusion.transfer import PivotTokens, align_summary
from tests.merging.test_fusion_summary import PROBE, tiny_pivot, tiny_source

REPLAY = ProbeSet(("x = 4\nx += 3\nPrint x.\n", "Is true and not false?\n", "Compute 12 * 3.\n"))


def _greedy(model, tok, prompt: str, max_new_tokens: int) -> list[int]:
    """Argmax decoding one token at a time (stops after the end-of-sequence token)."""
    ids = tok(prompt)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] == tok.eos_token_id:
                break
    return out


def test_replay_examples_hold_the_pivots_own_greedy_tokens_and_top_k():
    model, tok = tiny_pivot(seed=5)
    examples = replay_examples(model, PivotTokens(tok), REPLAY, k=3, max_new_tokens=6)
    assert len(examples) == len(REPLAY.prompts)
    for prompt, example in zip(REPLAY.prompts, examples, strict=True):
        greedy = _greedy(model, tok, prompt, 6)
        assert example.source == REPLAY_SOURCE
        assert list(example.prompt_ids) == tok(prompt)["input_ids"]
        assert list(example.response_ids) == greedy
        sequence = torch.tensor([list(example.prompt_ids) + greedy])
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=sequence).logits[0].double(), dim=-1)
        start = len(example.prompt_ids) - 1
        for position, token in enumerate(greedy):
            row = probs[start + position]
            top = torch.topk(row, 3)
            assert example.dist_ids[position].tolist() == top.indices.tolist()
            assert example.dist_probs[position].tolist() == pytest.approx(top.values.tolist(), rel=1e-4)
            assert int(example.dist_ids[position, 0]) == token  # greedy: the most likely token


def _agreement(original, model, tok, prompts) -> float:
    """Share of the original's own greedy response tokens (teacher-forced) that `model` predicts too."""
    hits, count = 0, 0
    with torch.no_grad():
        for prompt in prompts:
            prompt_ids = tok(prompt)["input_ids"]
            response = _greedy(original, tok, prompt, 8)
            ids = torch.tensor([prompt_ids + response])
            start = len(prompt_ids) - 1
            predicted = model(input_ids=ids).logits[0, start:-1].argmax(-1).tolist()
            hits += sum(a == b for a, b in zip(predicted, response, strict=True))
            count += len(response)
    return hits / count


def test_replay_keeps_the_copy_answering_like_the_pivot_on_the_replayed_prompts():
    source, source_tok = tiny_source()
    _, tok = tiny_pivot()
    fused, _ = align_summary(summarize(source, source_tok, PROBE, k=4, max_new_tokens=8), PivotTokens(tok))
    original, _ = tiny_pivot()
    replayed = replay_examples(original, PivotTokens(tok), REPLAY, k=4, max_new_tokens=8)
    spec = DistillSpec(steps=40, batch_size=3, lr=1e-2, warmup=2)
    alone, _ = tiny_pivot()
    distill(alone, fused, spec, tok.pad_token_id)
    with_replay, _ = tiny_pivot()
    distill(with_replay, fused + replayed, spec, tok.pad_token_id)
    assert _agreement(original, original, tok, REPLAY.prompts) == 1.0
    kept_alone = _agreement(original, alone, tok, REPLAY.prompts)
    kept_with_replay = _agreement(original, with_replay, tok, REPLAY.prompts)
    assert kept_with_replay >= 0.9 and kept_alone <= 0.5, (kept_with_replay, kept_alone)
