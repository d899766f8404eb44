"""Fitness of a merge candidate: merged in memory, scored on the dev split, one number out.

`MergeEvaluator` loads the base and the experts once, merges the tensors the search never changes
once, and for each candidate merges only the searched tensors into one live model (no files). The
objective turns per-task scores into one number that rewards every task: each score is expressed
as the share of the best input model's gain over the base that the merge keeps (`(s - base) /
(best - base)`), then combined by `mean`, `min` or `softmin` (`-t log mean exp(-g / t)`, a smooth
minimum that still sees every task).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.config import MergeConfig
from merging.engine import merge_state_dicts
from merging.errors import ConfigError
from merging.grams import open_gram_files
from merging.parameters import ResolvedParameters, resolve_parameters
from merging.row_weights import RowWeights
from merging.search.scores import METRICS, accuracy_scores, proxy_scores, teacher_forced_batches
from merging.testbed.tasks import resolve_tasks

AGGREGATES = ("mean", "min", "softmin")
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


@dataclass(frozen=True)
class Objective:
    """What a candidate is scored by: a metric per task, gain-normalized, then aggregated."""

    metric: str = "seqprob"
    aggregate: str = "softmin"
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"expected a fitness metric among {', '.join(METRICS)}, got {self.metric!r}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"expected an aggregate among {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        if not self.temperature > 0:
            raise ConfigError(f"expected a positive softmin temperature, got {self.temperature}")

    def combine(self, gains: Mapping[str, Any]) -> Any:
        """One fitness from the per-task gain shares: floats, or 0-d tensors (then differentiable)."""
        values = list(gains.values())
        if self.aggregate == "mean":
            return sum(values) / len(values)
        if self.aggregate == "min":
            return min(values)
        exp, log = (torch.exp, torch.log) if isinstance(values[0], torch.Tensor) else (math.exp, math.log)
        low = min(values)  # shifted for a stable log-sum-exp
        mean_exp = sum(exp(-(v - low) / self.temperature) for v in values) / len(values)
        return low - self.temperature * log(mean_exp)


def normalized_gains(
    scores: Mapping[str, float], base: Mapping[str, float], best: Mapping[str, float]
) -> dict[str, float]:
    """Per task, the share of the best input model's gain over the base kept (the raw gain where
    no input model gains anything)."""
    out = {}
    for task, value in scores.items():
        gain = best[task] - base[task]
        out[task] = (value - base[task]) / gain if gain > 1e-9 else value - base[task]
    return out


@dataclass
class Fitness:
    """A candidate's fitness and the per-task scores it came from."""

    value: float
    scores: dict[str, float]
    gains: dict[str, float] = field(default_factory=dict)


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder's safetensors files."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model folder {str(folder)!r} holds no .safetensors file")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    return state


def _input_grams(config: MergeConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Each expert's input Grams (`merging.grams`) when the method reads them, else none."""
    with ExitStack() as resources:
        return {model: stored.all() for model, stored in open_gram_files(config, resources).items()}


def changed_tensors(state_dicts: Mapping[str, Mapping[str, torch.Tensor]], base: str) -> list[str]:
    """Floating-point tensors of the base that some other model changes (non-zero task vector)."""
    reference = state_dicts[base]
    out = []
    for name, tensor in reference.items():
        if not tensor.is_floating_point():
            continue
        others = [sd[name] for model, sd in state_dicts.items() if model != base and name in sd]
        if any(not torch.equal(other, tensor) for other in others):
            out.append(name)
    return out


class MergeEvaluator:
    """Merges candidates in memory into one live model and scores them (see the module docstring)."""

    def __init__(
        self,
        config: MergeConfig,
        tasks: Sequence[str],
        objective: Objective,
        *,
        split: str = "dev",
        limit: int | None = None,
        batch_size: int = 256,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.base_model is None:
            raise ConfigError("umm evolve needs a config with a base_model (the experts' common base)")
        self.config = config
        self.tasks = resolve_tasks(list(tasks))
        self.objective = objective
        self.split, self.limit = split, limit
        models = [config.base_model, *(m.model for m in config.models if m.model != config.base_model)]
        self.state_dicts = {model: load_state_dict(model) for model in models}
        self.grams = _input_grams(config)
        self.tensors = list(self.state_dicts[config.base_model])
        self.template = resolve_parameters(config, self.tensors)
        self.searched = changed_tensors(self.state_dicts, config.base_model)
        if not self.searched:
            raise ConfigError("no expert differs from the base: there is nothing to search")
        wanted = set(self.searched) | {n for n in self.tensors if n.endswith(EMBEDDING_SUFFIXES)}
        self._inputs = {m: {n: t for n, t in sd.items() if n in wanted} for m, sd in self.state_dicts.items()}
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_source or config.base_model)
        self.model = AutoModelForCausalLM.from_pretrained(config.base_model)
        self.model.eval()
        self.model.requires_grad_(False)  # a gradient search differentiates the merge, never the model
        self._targets = self.model.state_dict()
        self.batches = teacher_forced_batches(self.tokenizer, self.tasks, split, limit, batch_size)
        base_scores = self.score_state(self.state_dicts[config.base_model])
        expert_scores = [self.score_state(self.state_dicts[m]) for m in models[1:]]
        self.base_scores = base_scores
        self.expert_scores = dict(zip(models[1:], expert_scores, strict=True))
        self.best_scores = {t: max(s[t] for s in expert_scores) for t in self.tasks}
        uniform = merge_state_dicts(config, self.state_dicts, parameters=self.template, grams=self.grams)
        self._constant = {n: t for n, t in uniform.items() if n not in set(self.searched)}
        self._constant_loaded = False
        self._memo: dict[str, dict] = {}  # per tensor, what a merge of these fixed inputs can reuse

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put a whole state dict (an input model's) into the live model."""
        self._load(state)
        self._constant_loaded = False

    def load_merge(self, parameters: ResolvedParameters, row_weights: RowWeights | None = None) -> None:
        """Put the merge of `parameters` (and `row_weights`, `merging.row_weights`) into the live model."""
        if not self._constant_loaded:
            self._load(self._constant)
            self._constant_loaded = True
        self._load(self.merge(parameters, row_weights))

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name not in self._targets:
                raise ConfigError(f"the base model's architecture has no tensor {name!r}")
            self._targets[name].copy_(tensor)

    def score_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The objective's metric per task for a whole state dict (loaded into the live model)."""
        self.load_state(state)
        return self._metric()

    def _metric(self) -> dict[str, float]:
        if self.objective.metric == "accuracy":
            return accuracy_scores(self.model, self.tokenizer, self.tasks, self.split, self.limit)
        return proxy_scores(self.model, self.batches)[self.objective.metric]

    def merge(
        self, parameters: ResolvedParameters, row_weights: RowWeights | None = None
    ) -> dict[str, torch.Tensor]:
        """The searched tensors merged with `parameters` and `row_weights` (the others never change)."""
        merged = merge_state_dicts(
            self.config,
            self._inputs,
            parameters=parameters,
            memo=self._memo,
            grams=self.grams,
            row_weights=row_weights,
        )
        return {name: merged[name] for name in self.searched}

    def __call__(self, parameters: ResolvedParameters) -> Fitness:
        self.load_merge(parameters)
        scores = self._metric()
        gains = normalized_gains(scores, self.base_scores, self.best_scores)
        return Fitness(self.objective.combine(gains), scores, gains)
