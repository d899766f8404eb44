"""Replay: the pivot's own responses and distributions, distilled beside the fused summaries.

A summary covers the source's domain only; distilled on it alone, the pivot copy forgets the
base's other skills, and its task vector then overwrites the homogeneous experts in any merge.
Replay (self-distillation, as in continual learning) adds prompts of every domain whose targets
are the untrained pivot's own greedy responses and top-k distributions, so the copy stays close to
the base off the source's domain and its task vector carries the source's skill alone. The replay
examples are built like a source's (`summarize`, then `align_summary` onto the pivot's own
tokenizer, where every token maps to itself) and mixed into the batches by count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from merging.fusion.summary import AUTO_PROMPTS, DEFAULT_K, ProbeSet, summarize
from merging.fusion.transfer import AlignedExample, PivotTokens, align_summary

REPLAY_SOURCE = "replay"


def replay_examples(
    model: Any,
    pivot: PivotTokens,
    prompts: ProbeSet,
    *,
    k: int = DEFAULT_K,
    max_new_tokens: int = 128,
    prompt_style: str = AUTO_PROMPTS,
    advance: Callable[[int], None] | None = None,
) -> list[AlignedExample]:
    """The pivot `model`'s own greedy responses on `prompts` with its top-k distributions along them,
    as distillation examples in its own tokens (their `source` is ``"replay"``)."""
    summary = summarize(
        model,
        pivot.tokenizer,
        prompts,
        k=k,
        max_new_tokens=max_new_tokens,
        model_name=REPLAY_SOURCE,
        prompt_style=prompt_style,
        advance=advance,
    )
    examples, _ = align_summary(summary, pivot, source=REPLAY_SOURCE)
    return examples
