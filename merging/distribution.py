"""Top-k next-token distributions of a causal LM on a list of texts (FuseLLM's distribution summary).

FuseLLM (arXiv 2401.10491) fuses heterogeneous LLMs through their per-token probability
distributions, keeping the top k = 10 entries of each. `top_k_distribution` computes them: for
every token position i of every text, the k most likely next tokens after t_0..t_i with their
log-probabilities (most likely first; ties broken by the lower token id). Pure: no network, no
files; deterministic for a given model, tokenizer and texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging.errors import MergeError

DEFAULT_K = 10


@dataclass(frozen=True)
class TopKDistribution:
    """Top-k next-token distributions of all texts, concatenated by position.

    offsets:   int64 [examples + 1]; example j owns positions offsets[j]:offsets[j + 1]
    input_ids: int32 [positions]; the text's token at each position
    token_ids: int32 [positions, k]; the k most likely next tokens, most likely first
    logprobs:  float32 [positions, k]; their log-probabilities
    """

    offsets: torch.Tensor
    input_ids: torch.Tensor
    token_ids: torch.Tensor
    logprobs: torch.Tensor

    @property
    def k(self) -> int:
        return self.token_ids.shape[1]

    def example(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, token_ids, logprobs) of one example."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.input_ids[start:end], self.token_ids[start:end], self.logprobs[start:end]


@torch.no_grad()
def top_k_distribution(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    k: int = DEFAULT_K,
    max_length: int = 512,
) -> TopKDistribution:
    """Per-position top-k next-token ids and log-probs of `model` on each text (one text at a time)."""
    if not texts:
        raise MergeError("expected at least one text for the distribution summary, got none")
    if k < 1:
        raise MergeError(f"expected k >= 1, got {k}")
    model.eval()
    offsets = [0]
    inputs, ids, logps = [], [], []
    for text in texts:
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        input_ids = encoded["input_ids"]  # [1, T]
        if input_ids.shape[1] == 0:
            raise MergeError(f"expected every text to have at least one token, got none for {text[:40]!r}")
        logits = (
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0].float()
        )  # [T, V]
        if k > logits.shape[-1]:
            raise MergeError(f"expected k <= vocabulary size {logits.shape[-1]}, got {k}")
        log_probs = torch.log_softmax(logits, dim=-1)  # [T, V]
        order = torch.sort(log_probs, dim=-1, descending=True, stable=True)  # ties: lower id first
        inputs.append(input_ids[0].to(torch.int32))
        ids.append(order.indices[:, :k].to(torch.int32))  # [T, k]
        logps.append(order.values[:, :k].contiguous())  # [T, k]
        offsets.append(offsets[-1] + input_ids.shape[1])
    return TopKDistribution(
        offsets=torch.tensor(offsets, dtype=torch.int64),
        input_ids=torch.cat(inputs),
        token_ids=torch.cat(ids),
        logprobs=torch.cat(logps),
    )


def token_strings(tokenizer, distribution: TopKDistribution) -> dict[int, str]:
    """The token string of every id the distribution uses (for vocabulary alignment across tokenizers)."""
    used = torch.unique(torch.cat([distribution.input_ids, distribution.token_ids.flatten()])).tolist()
    return dict(zip(used, tokenizer.convert_ids_to_tokens(used), strict=True))
