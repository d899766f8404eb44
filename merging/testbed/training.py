"""Deterministic causal-LM training of the tiny zoo models on the task suite.

Each batch is a set of ``prompt\\n + response + </s>`` sequences, right-padded; the loss covers the
response tokens only. AdamW with linear warmup and cosine decay. The seed and the torch thread count
are fixed by the caller (see `pinned_threads`) so a recipe always trains the same weights.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from merging.testbed.harness import plain_prompt
from merging.testbed.tasks import SPLIT_SIZES, Example, generate


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings for one run; ``mixture`` maps ``task`` or ``task@easy`` -> sampling weight."""

    steps: int
    lr: float
    batch_size: int
    mixture: tuple[tuple[str, float], ...]
    warmup: int = 20
    weight_decay: float = 0.0
    easy: bool = False  # train on the tasks' easier variants (the base model's curriculum)
    frozen: tuple[str, ...] = ()  # parameters whose name contains one of these stay as they are
    anchor: float = 0.0  # decoupled decay toward the starting weights (L2-SP), per unit of lr

    def to_dict(self) -> dict[str, Any]:
        extra = {"anchor": self.anchor} if self.anchor else {}  # older recipes keep their digests
        return {
            **extra,
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "mixture": [list(item) for item in self.mixture],
            "warmup": self.warmup,
            "weight_decay": self.weight_decay,
            "easy": self.easy,
            "frozen": list(self.frozen),
        }


@contextlib.contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op torch threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


Encoder = Callable[[Any, Example], tuple[list[int], int]]  # (tokenizer, example) -> (ids, prompt length)
StepHook = Callable[[int, float], None]  # called after each step with (steps done, loss)


def _encode(tokenizer: Any, example: Example) -> tuple[list[int], int]:
    prompt_ids = tokenizer(plain_prompt(example.prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    return [*prompt_ids, *response_ids, tokenizer.eos_token_id], len(prompt_ids)


def _examples(entry: str, n: int, seed: int, easy: bool) -> list[Example]:
    """Training examples for a mixture entry: ``task`` or ``task@easy`` (the easier variant)."""
    task, _, level = entry.partition("@")
    return generate(task, "train", n=n, seed=seed, easy=easy or level == "easy")


def _batches(
    tokenizer: Any, spec: TrainSpec, rng: random.Random, seed: int, encode: Encoder = _encode
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input_ids, labels) batches from the mixture's fixed train splits (cycled)."""
    total = sum(weight for _, weight in spec.mixture)
    need = {
        task: max(1, min(SPLIT_SIZES["train"], math.ceil(spec.steps * spec.batch_size * weight / total)))
        for task, weight in spec.mixture
    }
    pools = {
        task: [encode(tokenizer, ex) for ex in _examples(task, n, seed, spec.easy)]
        for task, n in need.items()
    }
    cursors = dict.fromkeys(pools, 0)
    tasks = [task for task, _ in spec.mixture]
    weights = [weight for _, weight in spec.mixture]
    pad = tokenizer.pad_token_id
    while True:
        rows: list[tuple[list[int], int]] = []
        for task in rng.choices(tasks, weights=weights, k=spec.batch_size):
            rows.append(pools[task][cursors[task] % len(pools[task])])
            cursors[task] += 1
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (ids, prompt_len) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        yield input_ids, labels


def _full_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def response_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same cross-entropy, with the output head applied only where a label is scored: on a
    large vocabulary (Gemma-3's 262k tokens) the head over every position dominates a step."""
    hidden = model.base_model(input_ids=input_ids).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    scored = targets != -100
    logits = model.get_output_embeddings()(hidden[scored])
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits.float(), targets[scored])


def warmup_cosine(step: int, warmup: int, steps: int) -> float:
    """Learning-rate factor at `step`: linear warm-up over `warmup` steps, then cosine down to 5 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _pull_toward(params: list[torch.Tensor], start: list[torch.Tensor], rate: float) -> None:
    """Move every parameter ``rate`` of the way back to its starting value (decoupled L2-SP)."""
    for param, origin in zip(params, start, strict=True):
        param.sub_(param - origin, alpha=rate)


def train(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: TrainSpec,
    seed: int,
    *,
    encode: Encoder = _encode,
    on_step: StepHook | None = None,
    scored_head_only: bool = False,
) -> list[float]:
    """Train ``model`` in place for ``spec.steps`` steps; returns the loss of every step.

    ``encode`` turns an example into token ids (default: the plain prompt format of the tiny
    zoo); ``scored_head_only`` computes logits on labelled positions only (`response_loss`)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    trained, held = [], []
    for name, param in model.named_parameters():
        (held if any(part in name for part in spec.frozen) else trained).append(param)
    for param in held:
        param.requires_grad_(False)
    optimizer = torch.optim.AdamW(trained, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, spec.warmup, spec.steps)
    )
    start = [param.detach().clone() for param in trained] if spec.anchor else []
    model.train()
    losses: list[float] = []
    batches = _batches(tokenizer, spec, rng, seed, encode)
    loss_of = response_loss if scored_head_only else _full_loss
    for step in range(spec.steps):
        input_ids, labels = next(batches)
        loss = loss_of(model, input_ids, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if spec.anchor:
            _pull_toward(trained, start, optimizer.param_groups[0]["lr"] * spec.anchor)
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    for param in held:
        param.requires_grad_(True)
    model.eval()
    return losses


def corpus(tasks: Sequence[str], n: int, seed: int) -> list[str]:
    """Plain training texts (prompt and response) for fitting a tokenizer."""
    return [
        plain_prompt(ex.prompt) + ex.response
        for task in tasks
        for ex in generate(task, "train", n=n, seed=seed)
    ]
