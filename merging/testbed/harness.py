"""Evaluation harness: batched greedy decoding, answer extraction, exact-match accuracy.

`evaluate` takes an in-memory model and tokenizer, so a merge search can call it hundreds of times
without touching disk. Prompts are sorted by length and left-padded into batches; decoding is
greedy with the KV cache and stops at end-of-sequence (tiny zoo models) or once every row has
written its ``Answer:`` line (chat models).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from merging.testbed.kvcache import reserved_cache
from merging.testbed.tasks import DOMAINS, TASKS, Example, generate, resolve_tasks

# Appended to the instruction for chat models; tiny zoo models learned the format directly.
CHAT_INSTRUCTION = (
    "Solve it with a few short steps, then end with a final line of the form 'Answer: <answer>', "
    "where <answer> is {hint}."
)
_ANSWER_LINE = re.compile(r"answer\s*[:：]\s*(.*)", re.IGNORECASE)
_ANSWER_IS = re.compile(r"\bthe (?:final )?answer is\s*[:：]?\s*(.*)", re.IGNORECASE)
_TRUE = {"true", "t", "yes"}
_FALSE = {"false", "f", "no"}


def plain_prompt(instruction: str) -> str:
    """The prompt format the tiny zoo models are trained on: the instruction, then a newline."""
    return instruction + "\n"


def chat_prompt(tokenizer: Any, task: str, instruction: str) -> str:
    """The instruction as one user turn in the tokenizer's chat template, generation prompt added."""
    content = f"{instruction}\n{CHAT_INSTRUCTION.format(hint=TASKS[task].answer_hint)}"
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def extract_answer(text: str) -> str | None:
    """The text after the last ``Answer:`` in ``text`` (to the end of that line); failing that,
    after the last ``the answer is`` (chat models often word it so); else None."""
    matches = list(_ANSWER_LINE.finditer(text)) or list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    return matches[-1].group(1).split("\n", 1)[0].strip()


def normalize_answer(answer: str | None) -> str | None:
    """Canonical form for comparison: markdown, trailing dots and inner spacing removed,
    booleans as ``True``/``False``, integers without leading zeros or thousands separators."""
    if answer is None:
        return None
    text = answer.strip().strip("*`$ ").rstrip(".").strip().strip("*`$ ")
    text = re.sub(r"\\boxed\{(.*)\}", r"\1", text).strip()
    low = text.lower()
    if low in _TRUE:
        return "True"
    if low in _FALSE:
        return "False"
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+|[-+]?\d+", text):
        return str(int(text.replace(",", "")))
    if text.startswith("[") and text.endswith("]"):
        items = [item.strip() for item in text[1:-1].split(",") if item.strip()]
        return "[" + ", ".join(normalize_answer(item) or "" for item in items) + "]"
    return re.sub(r"\s+", " ", text)


def score(output: str, expected: str) -> bool:
    """Exact match of the extracted, normalized final answer against the expected one."""
    got = normalize_answer(extract_answer(output))
    return bool(got) and got == normalize_answer(expected)


@dataclass
class EvalResult:
    """Accuracy per task and on average, with every generated output kept for inspection."""

    accuracy: dict[str, float]
    counts: dict[str, int]
    outputs: dict[str, list[str]] = field(repr=False)
    seconds: float = 0.0
    prompt_tokens: int = 0  # prompt tokens processed, padding aside
    generated_tokens: int = 0  # tokens decoded, up to each row's stop

    @property
    def tokens_per_second(self) -> float:
        """Decoding throughput: prompt and generated tokens per second of the whole evaluation."""
        total = self.prompt_tokens + self.generated_tokens
        return total / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy) if self.accuracy else 0.0

    @property
    def prompts_per_second(self) -> float:
        return sum(self.counts.values()) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": dict(self.accuracy),
            "mean": self.mean,
            "counts": dict(self.counts),
            "seconds": self.seconds,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
        }


def _uses_chat(tokenizer: Any, prompt_style: str) -> bool:
    if prompt_style not in ("auto", "plain", "chat"):
        raise ValueError(f"expected prompt_style auto, plain or chat, got {prompt_style!r}")
    if prompt_style == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    return prompt_style == "chat"


def _max_new_tokens(tokenizer: Any, examples: Sequence[Example], chat: bool) -> int:
    longest = max(len(tokenizer(ex.response, add_special_tokens=False)["input_ids"]) for ex in examples)
    return int(longest * 2 + 32) if chat else longest + 4


@torch.inference_mode()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int],
    *,
    stop_at_answer: bool = False,
    add_special_tokens: bool = True,
    stats: dict[str, int] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (one left-padded batch, KV cache), decoded to text.

    ``max_new_tokens`` is one budget for all rows or one per row; a row stops at its budget or at
    an end-of-sequence token (or, with ``stop_at_answer``, once it has written an ``Answer:``
    line). Finished rows leave the batch, cache included, once they are an eighth of it, so the
    remaining steps compute only live rows. ``add_special_tokens`` lets the tokenizer add its BOS
    (plain prompts of models that need one); chat-template text already carries its own special
    tokens. ``stats``, if given, receives the prompt and generated token counts (padding aside).
    """
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    enc = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    width = max(len(ids) for ids in enc)
    input_ids = torch.full((len(enc), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for row, ids in enumerate(enc):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    device = next(model.parameters()).device
    input_ids, mask = input_ids.to(device), mask.to(device)
    steps = max(budgets, default=0)
    generated = torch.full((len(enc), max(steps, 1)), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(len(enc), dtype=torch.long, device=device)  # tokens generated per row
    live = torch.arange(len(enc), device=device)  # original row of each batch row
    finished = torch.zeros(len(enc), dtype=torch.bool, device=device)  # per batch row
    row_budget = torch.tensor(budgets, device=device)
    eos = torch.tensor(eos_ids, device=device)
    newline_ids = _newline_ids(tokenizer) if stop_at_answer else None
    cache = reserved_cache(model, width + min(steps, 128))  # grown by doubling past that
    full_mask = torch.cat([mask, torch.ones((len(enc), steps), dtype=mask.dtype, device=device)], dim=1)
    step_ids, step_pos = input_ids, (mask.cumsum(-1) - 1).clamp(min=0)
    for step in range(steps):
        out = model(
            input_ids=step_ids,
            attention_mask=full_mask[:, : width + step],
            position_ids=step_pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.cache
        next_ids = out.logits[:, -1, :].argmax(-1)
        generated[live, step] = next_ids
        lengths[live] = step + 1
        finished |= torch.isin(next_ids, eos) | (row_budget[live] <= step + 1)
        if newline_ids is not None and bool(torch.isin(next_ids, newline_ids).any()):
            finished |= _answer_complete(
                tokenizer, generated[live, : step + 1], finished, next_ids, newline_ids
            )
        done = int(finished.sum())
        if done == len(live):
            break
        step_ids = next_ids[:, None]
        step_pos = step_pos[:, -1:] + 1
        if done * 8 >= len(live):  # drop finished rows: every later step then costs less
            keep = torch.nonzero(~finished).flatten()
            cache.batch_select_indices(keep)
            live, step_ids, step_pos, full_mask = live[keep], step_ids[keep], step_pos[keep], full_mask[keep]
            finished = finished[keep]
    if stats is not None:
        stats["prompt_tokens"] = stats.get("prompt_tokens", 0) + int(mask.sum())
        stats["generated_tokens"] = stats.get("generated_tokens", 0) + int(lengths.sum())
    texts = []
    for row, (tokens, budget) in enumerate(zip(generated.tolist(), budgets, strict=True)):
        tokens = tokens[: min(budget, int(lengths[row]))]
        cut = next((i for i, tok in enumerate(tokens) if tok in eos_ids), len(tokens))
        texts.append(tokenizer.decode(tokens[:cut], skip_special_tokens=True))
    return texts


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _newline_ids(tokenizer: Any) -> torch.Tensor:
    """Ids of the vocabulary's tokens whose text holds a newline (an answer line ends with one)."""
    cached = getattr(tokenizer, "_umm_newline_ids", None)
    if cached is None:
        vocab = tokenizer.get_vocab()
        texts = tokenizer.convert_tokens_to_string
        cached = torch.tensor(sorted(i for t, i in vocab.items() if "\n" in texts([t])), dtype=torch.long)
        tokenizer._umm_newline_ids = cached
    return cached


def _answer_complete(
    tokenizer: Any, tokens: torch.Tensor, done: torch.Tensor, last: torch.Tensor, newline_ids: torch.Tensor
) -> torch.Tensor:
    """Rows whose text so far holds an ``Answer:`` line ended by a newline; only rows that have
    just written a newline are decoded (the others cannot have completed one)."""
    flags = done.clone()
    for row in torch.nonzero(~done & torch.isin(last, newline_ids)).flatten().tolist():
        text = tokenizer.decode(tokens[row], skip_special_tokens=True)
        flags[row] = bool(re.search(r"answer\s*[:：][^\n]*\S[^\n]*\n", text, re.IGNORECASE))
    return flags


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Iterable[str] | str | None = None,
    split: str = "test",
    limit: int | None = None,
    *,
    batch_size: int = 256,
    prompt_style: str = "auto",
    seed: int = 0,
) -> EvalResult:
    """Exact-match accuracy of ``model`` on each task's ``split`` (first ``limit`` examples).

    The prompts of all tasks are pooled and sorted by token budget, then length, before batching,
    so batches are full, padding is short and a batch's rows stop close together; each prompt
    keeps its own budget (chat models: twice the longest reference response, plus 32).
    """
    names = resolve_tasks(tasks)
    chat = _uses_chat(tokenizer, prompt_style)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    examples = {
        name: generate(name, split, seed=seed)[: limit if limit is not None else None] for name in names
    }
    prompts, budgets = [], []
    for name in names:
        budget = _max_new_tokens(tokenizer, examples[name], chat)
        for ex in examples[name]:
            prompts.append(chat_prompt(tokenizer, name, ex.prompt) if chat else plain_prompt(ex.prompt))
            budgets.append(budget)
    stats: dict[str, int] = {}
    try:
        texts = _generate_sorted(model, tokenizer, prompts, budgets, batch_size, chat, stats)
    finally:
        model.train(was_training)
    accuracy, counts, outputs = {}, {}, {}
    offset = 0
    for name in names:
        mine = texts[offset : offset + len(examples[name])]
        offset += len(mine)
        accuracy[name] = sum(score(t, ex.answer) for t, ex in zip(mine, examples[name], strict=True)) / len(
            mine
        )
        counts[name] = len(mine)
        outputs[name] = mine
    return EvalResult(
        accuracy,
        counts,
        outputs,
        time.perf_counter() - start,
        stats.get("prompt_tokens", 0),
        stats.get("generated_tokens", 0),
    )


def _generate_sorted(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    budgets: Sequence[int],
    batch_size: int,
    chat: bool,
    stats: dict[str, int],
) -> list[str]:
    """Batches of prompts with like token budgets (so like answer lengths), then like lengths:
    rows of a batch finish close together and padding stays short."""
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], len(prompts[i]), i))
    texts: list[str] = [""] * len(prompts)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        outs = greedy_generate(
            model,
            tokenizer,
            [prompts[i] for i in chunk],
            [budgets[i] for i in chunk],
            stop_at_answer=chat,
            add_special_tokens=not chat,
            stats=stats,
        )
        for i, text in zip(chunk, outs, strict=True):
            texts[i] = text
    return texts


def gain_retention(
    scores: Mapping[str, float], base: Mapping[str, float], experts: Mapping[str, float]
) -> dict[str, float | None]:
    """Per domain, (model - base) / (domain expert - base); None where the expert gains nothing."""
    out: dict[str, float | None] = {}
    for domain in DOMAINS:
        if domain not in scores or domain not in base or domain not in experts:
            continue
        gain = experts[domain] - base[domain]
        out[domain] = (scores[domain] - base[domain]) / gain if gain > 0 else None
    return out
