"""Fusion of several sources' aligned distributions, per probe prompt (FuseLLM's MinCE and AvgCE).

Each source's `AlignedExample` carries a score: its cross-entropy on the response the example
trains on (`merging.fusion.transfer.response_cross_entropy`). With a reference response in the
probe set every source is scored on that same text; without one each source is scored on its own
greedy response (how sure it is of its answer).

* MinCE: per prompt, the source with the lowest score (ties: the first source); its response and
  distributions are the fused ones.
* AvgCE: per prompt and position, the sources' distributions averaged with weights
  softmax(-score) over the sources, the top k kept; it needs every source on the same response
  (a probe set with references), since distributions over different texts cannot be averaged.

A single source gives its own aligned distributions, whichever the method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from merging.fusion import FusionError
from merging.fusion.transfer import AlignedExample, response_cross_entropy

MINCE, AVGCE = "mince", "avgce"
METHODS = (MINCE, AVGCE)


def fuse(sources: Sequence[Sequence[AlignedExample]], method: str = MINCE) -> list[AlignedExample]:
    """The fused examples of the sources (each a list over the same probe prompts)."""
    if method not in METHODS:
        raise FusionError(f"expected a fusion method among {', '.join(METHODS)}, got {method!r}")
    if not sources:
        raise FusionError("expected at least one source to fuse, got none")
    counts = {len(s) for s in sources}
    if len(counts) != 1:
        raise FusionError(f"expected every source on the same probe prompts, got {sorted(counts)} examples")
    if len(sources) == 1:
        return list(sources[0])
    fused = []
    for index in range(counts.pop()):
        candidates = [source[index] for source in sources]
        fused.append(_min_ce(candidates) if method == MINCE else _avg_ce(candidates, index))
    return fused


def _min_ce(candidates: Sequence[AlignedExample]) -> AlignedExample:
    scores = [c.score if math.isfinite(c.score) else math.inf for c in candidates]
    return candidates[min(range(len(candidates)), key=lambda i: (scores[i], i))]


def avg_ce_weights(scores: Sequence[float]) -> list[float]:
    """softmax(-score); sources without a distribution (infinite score) get 0."""
    finite = [s for s in scores if math.isfinite(s)]
    if not finite:
        return [1.0 / len(scores)] * len(scores)
    low = min(finite)
    raw = [math.exp(-(s - low)) if math.isfinite(s) else 0.0 for s in scores]
    total = math.fsum(raw)
    return [r / total for r in raw]


def _avg_ce(candidates: Sequence[AlignedExample], index: int) -> AlignedExample:
    first = candidates[0]
    if any(c.response_ids != first.response_ids or c.prompt_ids != first.prompt_ids for c in candidates):
        raise FusionError(
            f"expected every source on the same response for AvgCE (a probe set with references), "
            f"got different responses for prompt {index}"
        )
    weights = avg_ce_weights([c.score for c in candidates])
    k = max(c.dist_ids.shape[1] for c in candidates)
    positions = len(first.response_ids)
    dist_ids = torch.full((positions, k), -1, dtype=torch.int64)
    dist_probs = torch.zeros((positions, k), dtype=torch.float32)
    for position in range(positions):
        mass: dict[int, float] = {}
        for candidate, weight in zip(candidates, weights, strict=True):
            for token_id, p in zip(
                candidate.dist_ids[position].tolist(), candidate.dist_probs[position].tolist(), strict=True
            ):
                if token_id >= 0 and weight > 0:
                    mass[token_id] = mass.get(token_id, 0.0) + weight * p
        ranked = sorted(mass.items(), key=lambda item: (-item[1], item[0]))[:k]
        for slot, (token_id, p) in enumerate(ranked):
            dist_ids[position, slot] = token_id
            dist_probs[position, slot] = p
    response = torch.tensor(first.response_ids, dtype=torch.int64)
    return AlignedExample(
        first.prompt_ids,
        first.response_ids,
        dist_ids,
        dist_probs,
        response_cross_entropy(response, dist_ids, dist_probs),
        source="+".join(c.source for c in candidates),
    )
