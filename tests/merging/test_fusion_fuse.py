"""A summary carried over to a pivot tokenizer, and MinCE / AvgCE, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from merging.fusion import FusionError
from merging.fusion.align import BYTE_LEVEL, Vocabulary
from merging.fusion.fuse import AVGCE, MINCE, avg_ce_weights, fuse
from merging.fusion.summary import ProbeSet, ResponseSummary
from merging.fusion.transfer import AlignedExample, PivotTokens, align_summary, response_cross_entropy
from merging.testbed.tokenizers_build import char_tokenizer

SOURCE = Vocabulary(
    BYTE_LEVEL,
    {2: "</s>", 10: "12", 11: "1", 12: "\u01203", 13: "\u01204", 14: "\u010a"},
    {"eos": 2},
)


def _summary() -> ResponseSummary:
    """The source answered "12 3" in tokens "12", " 3", end of sequence."""
    token_ids = torch.tensor([[10, 11], [12, 13], [2, 14]], dtype=torch.int32)
    probs = torch.tensor([[0.6, 0.3], [0.5, 0.25], [0.8, 0.1]])
    return ResponseSummary(
        probe=ProbeSet(("x\n",)),
        responses=("12 3",),
        offsets=torch.tensor([0, 3]),
        target_ids=torch.tensor([10, 12, 2], dtype=torch.int32),
        token_ids=token_ids,
        logprobs=probs.log(),
        vocabulary=SOURCE,
    )


def test_a_summary_lands_on_the_pivot_tokens_that_start_a_source_token():
    tok = char_tokenizer()
    ids = {c: tok.convert_tokens_to_ids(c) for c in ["1", "2", " ", "3", "\n", "x"]}
    eos = tok.eos_token_id
    (example,), quality = align_summary(_summary(), PivotTokens(tok))
    assert example.prompt_ids == (ids["x"], ids["\n"])
    assert example.response_ids == (ids["1"], ids["2"], ids[" "], ids["3"], eos)
    # "12" (0.6) maps to "1" by edit distance, "1" (0.3) exactly: 0.9 on "1"
    assert example.dist_ids[0, 0] == ids["1"] and example.dist_probs[0, 0] == pytest.approx(0.9)
    assert example.dist_ids[1, 0] == -1 and example.dist_ids[3, 0] == -1  # inside source tokens
    assert example.dist_ids[2, 0] == ids[" "] and example.dist_probs[2, 0] == pytest.approx(0.75)
    assert example.dist_ids[4, :2].tolist() == [eos, ids["\n"]]
    assert example.dist_probs[4, :2].tolist() == pytest.approx([0.8, 0.1])
    shares = quality.shares()
    assert shares["exact"] == pytest.approx(1.2 / 2.55)
    assert shares["edit"] == pytest.approx(1.35 / 2.55)
    assert shares["dropped"] == 0.0
    assert shares["positions"] == pytest.approx(3 / 5)
    assert example.score == pytest.approx(-(math.log(0.9) + math.log(0.75) + math.log(0.8)) / 3, rel=1e-5)


def test_response_cross_entropy_bounds_a_token_outside_the_top_k_by_the_mass_left():
    dist_ids = torch.tensor([[4, 5], [6, -1], [-1, -1]])
    dist_probs = torch.tensor([[0.5, 0.3], [0.9, 0.0], [0.0, 0.0]])
    ce = response_cross_entropy(torch.tensor([5, 7, 8]), dist_ids, dist_probs)
    assert ce == pytest.approx(-(math.log(0.3) + math.log(0.1)) / 2, rel=1e-5)


def _example(score: float, probs: list[float], ids: list[int], response=(1, 2), source="") -> AlignedExample:
    dist_ids = torch.tensor([ids, [-1] * len(ids)])
    dist_probs = torch.tensor([probs, [0.0] * len(ids)])
    return AlignedExample((9,), response, dist_ids, dist_probs, score, source)


def test_min_ce_picks_per_prompt_the_source_with_the_lowest_score():
    a = [_example(1.0, [0.5, 0.5], [1, 2], source="a"), _example(0.2, [1.0, 0.0], [1, -1], source="a")]
    b = [_example(0.5, [0.9, 0.1], [1, 3], source="b"), _example(0.2, [0.7, 0.3], [1, 2], source="b")]
    fused = fuse([a, b], MINCE)
    assert [f.source for f in fused] == ["b", "a"]  # a tie goes to the first source


def test_avg_ce_weights_are_softmax_of_minus_the_score():
    weights = avg_ce_weights([1.0, 2.0, math.inf])
    e = math.exp(-1.0)
    assert weights == pytest.approx([1 / (1 + e), e / (1 + e), 0.0])


def test_avg_ce_averages_the_distributions_with_those_weights():
    a = _example(1.0, [0.6, 0.4], [1, 2])
    b = _example(2.0, [0.5, 0.5], [3, 1])
    (fused,) = fuse([[a], [b]], AVGCE)
    wa, wb = 1 / (1 + math.exp(-1.0)), math.exp(-1.0) / (1 + math.exp(-1.0))
    mass = {1: wa * 0.6 + wb * 0.5, 2: wa * 0.4, 3: wb * 0.5}
    ranked = sorted(mass.items(), key=lambda item: -item[1])
    assert fused.dist_ids[0].tolist() == [token for token, _ in ranked][:2]
    assert fused.dist_probs[0].tolist() == pytest.approx([p for _, p in ranked][:2])
    assert fused.dist_ids[1].tolist() == [-1, -1]


def test_avg_ce_refuses_sources_on_different_responses():
    with pytest.raises(FusionError, match="same response"):
        fuse([[_example(1.0, [1.0], [1])], [_example(1.0, [1.0], [1], response=(1, 3))]], AVGCE)


def test_one_source_is_its_own_fusion():
    source = [_example(1.0, [0.6, 0.4], [1, 2]), _example(3.0, [1.0, 0.0], [2, -1])]
    assert fuse([source], AVGCE) == source
    assert fuse([source], MINCE) == source


def test_fusion_refuses_sources_on_other_prompt_counts_and_unknown_methods():
    with pytest.raises(FusionError, match="same probe prompts"):
        fuse([[_example(1.0, [1.0], [1])], []])
    with pytest.raises(FusionError, match="fusion method"):
        fuse([[_example(1.0, [1.0], [1])]], "maxce")
