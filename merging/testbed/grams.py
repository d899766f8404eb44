"""Collect a model's input Grams (`merging.grams`) by running it over token sequences.

Every linear layer but the output head (tied to the embeddings, which no Gram describes) gets a
forward pre-hook that adds `X^T X` of its input rows (float32 per sequence, summed in float64).
Layers fed the very same input tensor (a block's query, key and value projections) are found on
the first sequence and share one sum. The result is divided by the token count, so each model's
Grams weigh the same whatever the size of its data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from merging.grams import write_grams
from merging.testbed.encoding import encoder_for
from merging.testbed.models import load_pretrained
from merging.testbed.tasks import generate, resolve_tasks


def _linear_layers(model: Any) -> dict[str, torch.nn.Linear]:
    """Weight name -> linear module, without a head whose weight is the input embedding's."""
    embedding = model.get_input_embeddings().weight
    return {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.weight is not embedding
    }


def _shared_inputs(model: Any, layers: dict[str, torch.nn.Linear], ids: list[int]) -> dict[str, str]:
    """Weight name -> the first weight name (in module order) whose layer reads the same input tensor.

    The inputs are held until compared, so no freed tensor's identity is taken for another's."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0]))
        for name, module in layers.items()
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    firsts: list[str] = []
    shared: dict[str, str] = {}
    for name in layers:
        same = next((first for first in firsts if seen[first] is seen[name]), None)
        if same is None:
            firsts.append(name)
        shared[name] = same or name
    return shared


def collect_grams(
    model: Any, sequences: Sequence[list[int]], progress: Callable[[int], None] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """(key -> mean input Gram float64, weight name -> key, tokens) of `model` over `sequences`."""
    if not sequences:
        raise ValueError("expected at least one token sequence to collect Grams over, got none")
    layers = _linear_layers(model)
    shared = _shared_inputs(model, layers, sequences[0])
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, inputs: torch.Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
        gram = (rows.T @ rows).to(torch.float64)  # one sequence in float32, the running sum in float64
        sums[key] = sums[key] + gram if key in sums else gram

    hooks = [
        layers[key].register_forward_pre_hook(lambda _m, args, key=key: add(key, args[0]))
        for key in sorted(set(shared.values()))
    ]
    tokens = 0
    try:
        with torch.no_grad():
            for number, ids in enumerate(sequences, start=1):
                model(torch.tensor([ids]))
                tokens += len(ids)
                if progress is not None:
                    progress(number)
    finally:
        for hook in hooks:
            hook.remove()
    return {key: total / tokens for key, total in sums.items()}, shared, tokens


def task_sequences(tokenizer: Any, tasks: Iterable[str], examples: int, split: str) -> list[list[int]]:
    """The first `examples` prompts of each task's `split` with their responses, as the model was
    tuned on them (`merging.testbed.encoding`)."""
    encode = encoder_for(tokenizer)
    return [encode(tokenizer, ex)[0] for task in tasks for ex in generate(task, split, examples)]


def summary_sequences(tokenizer: Any, summary_paths: Sequence[str | Path]) -> list[list[int]]:
    """The probe prompts and responses of response summaries in `tokenizer`'s tokens: what a pivot
    copy fused from them was distilled on (`merging.fusion`)."""
    from merging.fusion.pipeline import MINCE, fusion_targets, load_summaries
    from merging.fusion.transfer import PivotTokens

    summaries = load_summaries(summary_paths)
    labelled = [(str(path), summary) for path, summary in zip(summary_paths, summaries, strict=True)]
    examples, _ = fusion_targets(labelled, PivotTokens(tokenizer), MINCE)
    return [[*example.prompt_ids, *example.response_ids] for example in examples]


def write_model_grams(
    model_dir: str | Path,
    tasks: Iterable[str] | str | None = None,
    *,
    summaries: Sequence[str | Path] = (),
    examples: int = 64,
    split: str = "train",
    threads: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Collect `model_dir`'s input Grams over test-bed tasks (or the response summaries it was fused
    from) and write them into it (`merging.grams`)."""
    if (tasks is None) == (not summaries):
        raise ValueError(
            "expected either tasks or response summaries to collect Grams over, not both or neither"
        )
    torch.set_num_threads(threads)
    model, tokenizer = load_pretrained(model_dir)
    model.eval()
    if summaries:
        sequences = summary_sequences(tokenizer, summaries)
        source = "summaries:" + ",".join(Path(p).name for p in summaries)
    else:
        names = resolve_tasks(tasks)
        sequences = task_sequences(tokenizer, names, examples, split)
        source = f"testbed:{','.join(names)}:{split}:{examples}"
    done = None if progress is None else (lambda number: progress(number, len(sequences)))
    grams, shared, tokens = collect_grams(model, sequences, done)
    return write_grams(model_dir, grams, shared, tokens=tokens, source=source)
