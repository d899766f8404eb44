"""A source's summary carried over to the pivot's tokenizer: aligned examples and alignment quality.

For every probe prompt the pivot tokenizes the prompt and the source's response (plus its
end-of-sequence token when the source closed the response with one); the response tokens of the
two tokenizers are aligned (`merging.fusion.align`), and each pivot token that starts where a
source token starts receives that source token's top-k distribution, its ids mapped into the pivot
vocabulary (the mass of source ids that map to one pivot id adds up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from merging.fusion.align import (
    EDIT,
    EXACT,
    Vocabulary,
    VocabularyMap,
    align_tokens,
    map_vocabulary,
    token_starts,
)
from merging.fusion.summary import ResponseSummary, encode_prompt


@dataclass(frozen=True)
class AlignedExample:
    """One probe prompt in the pivot's tokens, with the source distributions carried over.

    dist_ids:   int64 [len(response_ids), k]; pivot ids of the distribution predicting each
                response token, most likely first, -1 where there is none
    dist_probs: float32 [len(response_ids), k]; their probabilities (not renormalized)
    score:      the source's cross-entropy on this response (nats per pivot token with a
                distribution; see `response_cross_entropy`), used by MinCE / AvgCE
    """

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    dist_ids: torch.Tensor
    dist_probs: torch.Tensor
    score: float
    source: str = ""

    @property
    def has_dist(self) -> torch.Tensor:
        return self.dist_ids[:, 0] >= 0


@dataclass
class AlignmentQuality:
    """Where the source's top-k probability mass went, over the pivot positions that received one."""

    exact: float = 0.0
    edit: float = 0.0
    dropped: float = 0.0
    response_tokens: int = 0  # pivot response tokens
    transferred: int = 0  # of them, those that received a source distribution

    def add(self, other: AlignmentQuality) -> None:
        self.exact += other.exact
        self.edit += other.edit
        self.dropped += other.dropped
        self.response_tokens += other.response_tokens
        self.transferred += other.transferred

    def shares(self) -> dict[str, float]:
        """Shares of the mass mapped exactly, by edit distance, dropped; share of positions covered."""
        mass = self.exact + self.edit + self.dropped
        return {
            "exact": self.exact / mass if mass else 0.0,
            "edit": self.edit / mass if mass else 0.0,
            "dropped": self.dropped / mass if mass else 0.0,
            "positions": self.transferred / self.response_tokens if self.response_tokens else 0.0,
        }


def response_cross_entropy(
    response_ids: torch.Tensor, dist_ids: torch.Tensor, dist_probs: torch.Tensor
) -> float:
    """Mean over positions with a distribution of -log q(actual token); a token outside the mapped
    top-k gets the mass the top-k leaves (at least 1e-6), an upper bound on its probability."""
    has = dist_ids[:, 0] >= 0
    if not bool(has.any()):
        return float("inf")
    hit = (dist_ids == response_ids[:, None]) & (dist_ids >= 0)
    p_token = (dist_probs * hit).sum(dim=1)
    rest = (1.0 - dist_probs.sum(dim=1)).clamp(min=1e-6)
    p = torch.where(p_token > 0, p_token, rest)
    return float(-torch.log(p[has].double()).mean())


class PivotTokens:
    """The pivot tokenizer with its vocabulary prepared once for many summaries."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocabulary = Vocabulary.from_tokenizer(tokenizer)
        if tokenizer.eos_token_id is None:
            from merging.fusion import FusionError

            raise FusionError("expected the pivot's tokenizer to have an end-of-sequence token, got none")

    def encode(self, prompt: str, response: str, close: bool, style: str) -> tuple[list[int], list[int]]:
        prompt_ids = encode_prompt(self.tokenizer, prompt, style)
        response_ids = list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        return prompt_ids, [*response_ids, self.tokenizer.eos_token_id] if close else response_ids


def align_summary(
    summary: ResponseSummary,
    pivot: PivotTokens,
    *,
    source: str = "",
    advance: Callable[[int], None] | None = None,
) -> tuple[list[AlignedExample], AlignmentQuality]:
    """Every probe prompt of `summary` in the pivot's tokens, and the alignment quality over all."""
    mapping = map_vocabulary(summary.vocabulary, pivot.vocabulary, torch.unique(summary.token_ids).tolist())
    examples, quality = [], AlignmentQuality()
    source_eos = summary.vocabulary.specials.get("eos")
    for index, (prompt, response) in enumerate(zip(summary.probe.prompts, summary.responses, strict=True)):
        targets, ids, logprobs = summary.example(index)
        close = source_eos is not None and int(targets[-1]) == source_eos
        prompt_ids, response_ids = pivot.encode(prompt, response, close, summary.prompt_style)
        example, part = _align_example(
            summary.vocabulary, pivot.vocabulary, mapping, targets.tolist(), ids, logprobs, response_ids
        )
        examples.append(AlignedExample(tuple(prompt_ids), tuple(response_ids), *example, source=source))
        quality.add(part)
        if advance is not None:
            advance(1)
    return examples, quality


def _text_sequence(vocabulary: Vocabulary, ids: list[int]) -> tuple[list[int], list[str], list[bool]]:
    """Positions, texts and wildcard flags of the non-special tokens (unknown tokens are wildcards)."""
    positions, texts, wild = [], [], []
    for position, token_id in enumerate(ids):
        role = vocabulary.roles.get(token_id)
        if role is not None and role != "unk":
            continue
        positions.append(position)
        texts.append("" if role == "unk" else vocabulary.text(token_id))
        wild.append(role == "unk")
    return positions, texts, wild


def _special_pairs(
    source: Vocabulary, target: Vocabulary, s_ids: list[int], t_ids: list[int]
) -> dict[int, int]:
    """Target position -> source position for special tokens of the same role, in order of occurrence."""
    queues: dict[str, list[int]] = {}
    for position, token_id in enumerate(s_ids):
        role = source.roles.get(token_id)
        if role is not None and role != "unk":
            queues.setdefault(role, []).append(position)
    pairs = {}
    for position, token_id in enumerate(t_ids):
        role = target.roles.get(token_id)
        if role is not None and role != "unk" and queues.get(role):
            pairs[position] = queues[role].pop(0)
    return pairs


def _align_example(
    source: Vocabulary,
    target: Vocabulary,
    mapping: VocabularyMap,
    source_ids: list[int],
    token_ids: torch.Tensor,
    logprobs: torch.Tensor,
    response_ids: list[int],
) -> tuple[tuple[torch.Tensor, torch.Tensor, float], AlignmentQuality]:
    s_pos, s_texts, s_wild = _text_sequence(source, source_ids)
    t_pos, t_texts, t_wild = _text_sequence(target, response_ids)
    path = align_tokens(s_texts, t_texts, source_wildcards=s_wild, target_wildcards=t_wild)
    starts = {t_pos[j]: s_pos[i] for j, i in token_starts(path).items()}
    starts.update(_special_pairs(source, target, source_ids, response_ids))
    k = token_ids.shape[1]
    dist_ids = torch.full((len(response_ids), k), -1, dtype=torch.int64)
    dist_probs = torch.zeros((len(response_ids), k), dtype=torch.float32)
    quality = AlignmentQuality(response_tokens=len(response_ids), transferred=len(starts))
    probs = logprobs.double().exp()
    for t_position, s_position in sorted(starts.items()):
        mass: dict[int, float] = {}
        for token_id, p in zip(token_ids[s_position].tolist(), probs[s_position].tolist(), strict=True):
            mapped, kind = mapping[token_id]
            if kind == EXACT:
                quality.exact += p
            elif kind == EDIT:
                quality.edit += p
            else:
                quality.dropped += p
                continue
            mass[mapped] = mass.get(mapped, 0.0) + p
        ranked = sorted(mass.items(), key=lambda item: (-item[1], item[0]))
        for slot, (mapped, p) in enumerate(ranked):
            dist_ids[t_position, slot] = mapped
            dist_probs[t_position, slot] = p
    score = response_cross_entropy(torch.tensor(response_ids, dtype=torch.int64), dist_ids, dist_probs)
    return (dist_ids, dist_probs, score), quality
