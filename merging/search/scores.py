"""Scores of an in-memory model on a task split: teacher-forced proxies and greedy accuracy.

One forward pass per batch over `prompt + reference response` gives, per task:

* `loglik`: the mean log-probability of a response token;
* `seqprob`: the mean over examples of the probability of the whole reference response (the
  chance that sampling reproduces it, a smooth stand-in for exact-match accuracy);
* `tf_exact`: the share of examples whose every response token is the model's top choice given the
  reference so far (greedy decoding then writes the reference itself, so this bounds accuracy from
  below).

`accuracy` is the harness's greedy-decoding exact match (`merging.testbed.harness.evaluate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from merging.testbed.encoding import encoder_for
from merging.testbed.harness import evaluate
from merging.testbed.tasks import generate

PROXY_METRICS = ("loglik", "seqprob", "tf_exact")
SUM_NAMES = (*PROXY_METRICS, "tokens", "rows")  # what `proxy_sums` returns, in this order
METRICS = (*PROXY_METRICS, "accuracy")


@dataclass(frozen=True)
class TaskBatch:
    """Right-padded `prompt + response + end` rows of one task; `targets` is -100 off the response."""

    task: str
    input_ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor  # [rows, width]
    targets: torch.Tensor  # [rows, width - 1], the next token where it is a response token


def teacher_forced_batches(
    tokenizer: Any, tasks: Sequence[str], split: str, limit: int | None, batch_size: int
) -> list[TaskBatch]:
    """The first `limit` examples of each task's `split`, tokenized once as the model reads them
    (`encoder_for`: its chat template, or the plain prompt), in batches of one task."""
    batches = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encode = encoder_for(tokenizer)
    for task in tasks:
        rows = []
        for ex in generate(task, split)[:limit]:
            ids, prompt_len = encode(tokenizer, ex)
            rows.append((ids[:prompt_len], ids[prompt_len:]))
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            width = max(len(p) + len(r) for p, r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            targets = torch.full((len(chunk), width - 1), -100, dtype=torch.long)
            for row, (prompt, response) in enumerate(chunk):
                seq = prompt + response
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
                targets[row, len(prompt) - 1 : len(seq) - 1] = torch.tensor(response)
            batches.append(TaskBatch(task, ids, mask, targets))
    return batches


def proxy_sums(logits: torch.Tensor, batch: TaskBatch) -> dict[str, torch.Tensor]:
    """One batch's sums of the teacher-forced metrics, from its logits `[rows, width - 1, vocab]`
    (differentiable in the logits for `loglik` and `seqprob`), with the counts they are divided by."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    on = batch.targets != -100
    safe = batch.targets.clamp(min=0)
    token_lp = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * on  # [rows, width - 1]
    hit = (logits.argmax(-1) == safe) | ~on
    return {
        "loglik": token_lp.sum(dtype=torch.float64),
        "seqprob": token_lp.sum(-1, dtype=torch.float64).exp().sum(),
        "tf_exact": hit.all(-1).sum(dtype=torch.float64),
        "tokens": on.sum(dtype=torch.float64),
        "rows": torch.tensor(float(len(batch.targets)), dtype=torch.float64),
    }


def proxy_metrics(
    per_batch: Iterable[tuple[str, dict[str, torch.Tensor]]],
) -> dict[str, dict[str, torch.Tensor]]:
    """`{metric: {task: value}}` from `(task, proxy_sums(...))` of every batch (see the module docstring)."""
    sums: dict[str, dict[str, torch.Tensor]] = {}
    for task, batch_sums in per_batch:
        for name, value in batch_sums.items():
            task_sums = sums.setdefault(name, {})
            task_sums[task] = task_sums[task] + value if task in task_sums else value
    out: dict[str, dict[str, torch.Tensor]] = {}
    for metric in PROXY_METRICS:
        denominator = sums["tokens"] if metric == "loglik" else sums["rows"]
        out[metric] = {task: value / denominator[task] for task, value in sums[metric].items()}
    return out


def batch_logits(model: Any, batch: TaskBatch) -> torch.Tensor:
    """The model's next-token logits over a batch, the last position left out."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]


@torch.inference_mode()
def proxy_scores(model: Any, batches: Sequence[TaskBatch]) -> dict[str, dict[str, float]]:
    """`{metric: {task: value}}` for the teacher-forced metrics (see the module docstring)."""
    metrics = proxy_metrics((batch.task, proxy_sums(batch_logits(model, batch), batch)) for batch in batches)
    return {metric: {task: float(v) for task, v in values.items()} for metric, values in metrics.items()}


def accuracy_scores(
    model: Any, tokenizer: Any, tasks: Sequence[str], split: str, limit: int | None, batch_size: int = 512
) -> dict[str, float]:
    """Greedy-decoding exact match per task (the harness's)."""
    return dict(
        evaluate(model, tokenizer, list(tasks), split=split, limit=limit, batch_size=batch_size).accuracy
    )
