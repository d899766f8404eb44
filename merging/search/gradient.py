"""Gradient search: the searched weights of a task-arithmetic merge fitted by Adam on the dev fitness.

CMA-ES (`driver.py`) needs only fitness values. When the merge is linear in the searched values
(`task_arithmetic`: base + lambda * sum of weight x task vector) and the metric is a teacher-forced
likelihood (`loglik`, `seqprob`), the very fitness CMA-ES climbs is differentiable in the
candidate's coordinates, and one backward pass gives its slope in every dimension at once
(AdaMerging, arXiv 2310.02575, fits layer-wise coefficients the same way on unlabelled entropy).

Each step merges the current candidate in memory, scores it on the dev batches (the forward pass
the gradient needs), and moves it by projected Adam inside the unit cube. The journal gets one
record per step, fsynced: the candidate and its fitness. The optimizer's state after the move
(Adam's moments: three candidates' worth of floats) is needed only to go on from the last step, so
it is not journaled but kept in `gradient_state.json`, replaced atomically before the step's
record is appended, together with that record: a kill between the two leaves the state one step
ahead, and resuming journals the record the state holds. Resuming restores the state exactly
(floats are written with `repr`), so a resumed search continues to the result of an uninterrupted
one (same thread count). The search stops at the
budget, or when the best fitness has not risen by `tolerance` for `patience` steps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from merging.atomic import write_text_atomic
from merging.errors import UmmError
from merging.search.driver import Evaluation, Progress, SearchResult
from merging.search.fitness import Fitness, MergeEvaluator, normalized_gains
from merging.search.journal import Journal, JournalError
from merging.search.scores import SUM_NAMES, TaskBatch, batch_logits, proxy_metrics, proxy_sums
from merging.search.space import SearchSpace, SearchSpaceError, check_gradient_search

STATE_NAME = "gradient_state.json"


class GradientError(UmmError):
    """A gradient search that cannot go on (a fitness whose slope is not finite)."""


@dataclass(frozen=True)
class GradientSettings:
    """Adam's step size (in units of each range), and the stopping rule."""

    lr: float = 0.03
    patience: int = 20  # steps without a rise of `tolerance` before stopping; 0: run the whole budget
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise SearchSpaceError(f"expected a positive gradient step size, got {self.lr}")
        if self.patience < 0 or not self.tolerance >= 0:
            raise SearchSpaceError("expected a patience and a tolerance of 0 or more")

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "patience": self.patience, "tolerance": self.tolerance}


class _Term(NamedTuple):
    """One searched tensor of a `LinearMerge`: where its weights come from, and its inputs."""

    name: str
    base: torch.Tensor
    deltas: torch.Tensor  # [experts, *shape]
    weights: list[int | float | slice]  # per expert: a coordinate, the config's value, or a row range
    weight_shape: tuple[int, ...]  # [experts] (one weight each), or [experts, rows, 1, ...] (`row`)
    scale: int | float  # lambda: a coordinate or the config's value
    normalize: bool
    dtype: torch.dtype


class LinearMerge:
    """The searched tensors of a task-arithmetic merge as a differentiable function of a candidate.

    Same formula as the engine's `task_arithmetic` (`merging.operators`; with row weights
    `row_weighted_task_arithmetic`): base + lambda * sum_j w_j (expert_j - base), divided by sum_j
    w_j where `normalize` is set; values the space does not search keep the config's."""

    def __init__(self, space: SearchSpace, evaluator: MergeEvaluator) -> None:
        base_state = evaluator.state_dicts[evaluator.config.base_model]
        live = evaluator.model.state_dict()  # the scored model's dtypes (bfloat16 for the real zoo)
        index: dict[tuple[str, str, str | None], int] = {}  # a `row` space: the first row's coordinate
        for i, d in enumerate(space.dimensions):
            index.setdefault((d.group, d.key, d.model), i)
        self.lows = torch.tensor([d.low for d in space.dimensions], dtype=torch.float64)
        self.spans = torch.tensor([d.high - d.low for d in space.dimensions], dtype=torch.float64)
        self.terms: list[_Term] = []
        for group, tensors in space.groups.items():
            for name in tensors:
                params = space.template[name]
                base = base_state[name].float()
                deltas = torch.stack([evaluator.state_dicts[m][name].float() - base for m in space.experts])
                count = len(space.experts)
                shape: tuple[int, ...] = (count,)
                if space.rowwise:  # [experts, rows, 1, ...]; a 1-D tensor is one row (`matrix_shape`)
                    ones = [1] * (base.dim() - 1)
                    shape = (count, base.shape[0], *ones) if base.dim() > 1 else (count, *[1] * base.dim())
                weights: list[int | float | slice] = []
                for m in space.experts:
                    entry = index.get((group, "weight", m), float(params.models[m]["weight"]))
                    rowwise = space.rowwise and isinstance(entry, int)
                    weights.append(slice(entry, entry + space.rows[group]) if rowwise else entry)
                scale = index.get((group, "lambda", None), float(params.globals["lambda"]))
                normalize = bool(params.globals["normalize"])
                self.terms.append(
                    _Term(name, base, deltas, weights, shape, scale, normalize, live[name].dtype)
                )

    def tensors(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The searched tensors merged at candidate `x` (coordinates in [0, 1], float64), in the
        live model's dtypes."""
        values = (self.lows + x.clamp(0.0, 1.0) * self.spans).float()

        def pick(entry: int | float | slice) -> torch.Tensor:
            if isinstance(entry, float):
                return torch.tensor(entry, dtype=torch.float32)
            return values[entry]

        out = {}
        for term in self.terms:
            w = torch.stack([pick(e).reshape(-1) for e in term.weights]).reshape(term.weight_shape)
            if len(term.weight_shape) > 1:  # one weight per output row (a `row` space)
                mixed, total = (w * term.deltas).sum(0), w.sum(0)
            else:
                mixed, total = torch.tensordot(w, term.deltas, dims=1), w.sum()
            if term.normalize:
                mixed = mixed / torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
            out[term.name] = (term.base + pick(term.scale) * mixed).to(
                term.dtype
            )  # as the engine's merge loads
        return out


class GradientFitness:
    """The evaluator's fitness of a candidate, differentiable in its coordinates."""

    def __init__(self, space: SearchSpace, evaluator: MergeEvaluator) -> None:
        from torch.func import functional_call

        check_gradient_search(evaluator.config.merge_method, evaluator.objective.metric, space.keys)
        self.space, self.evaluator = space, evaluator
        self.merge = LinearMerge(space, evaluator)
        self._call = functional_call
        evaluator.load_merge(space.apply(space.start()))  # the tensors no candidate changes

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        ev = self.evaluator
        per_batch = ((b.task, self._batch_sums(x, b)) for b in ev.batches)
        scores = proxy_metrics(per_batch)[ev.objective.metric]
        gains = normalized_gains(scores, ev.base_scores, ev.best_scores)
        return ev.objective.combine(gains), scores, gains

    def _batch_sums(self, x: torch.Tensor, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """One batch's metric sums; the forward pass is run again during the backward pass
        (checkpointed), so memory holds one batch's activations, not every batch's."""

        def sums(x: torch.Tensor) -> torch.Tensor:
            tensors = self.merge.tensors(x)

            def model(**inputs: Any) -> Any:
                return self._call(self.evaluator.model, tensors, (), inputs)

            return torch.stack(list(proxy_sums(batch_logits(model, batch), batch).values()))

        stacked = checkpoint(sums, x, use_reentrant=False)
        return dict(zip(SUM_NAMES, stacked.unbind(), strict=True))


def _floats(values: torch.Tensor) -> list[float]:
    return [float(v) for v in values.detach().reshape(-1)]


def run_gradient(
    start: Sequence[float],
    fitness: Callable[[torch.Tensor], tuple[torch.Tensor, dict, dict]],
    journal: Journal,
    budget: int,
    settings: GradientSettings,
    progress: Progress | None = None,
) -> SearchResult:
    """Fit the candidate by projected Adam until `budget` steps or the stopping rule (see the module
    docstring); every step's candidate is an evaluation of the result."""
    x = torch.tensor(list(start), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=settings.lr)
    result = SearchResult()
    state_path, header = journal.path.parent / STATE_NAME, _header_digest(journal)
    saved = _read_state(state_path, journal)
    for number, record in enumerate(_journaled_steps(journal, saved)):
        if record.get("number") != number or "gradient_norm" not in record:
            raise JournalError("the search journal was not written by a gradient search")
        result.evaluations.append(
            Evaluation(number, number, 0, record["x"], record["fitness"], record["scores"], record["gains"])
        )
    if result.evaluations:
        _restore(x, optimizer, _last_state(journal, saved, state_path, len(result.evaluations) - 1))
    while len(result.evaluations) < budget and not _stalled(result, settings):
        step = len(result.evaluations)
        candidate = _floats(x)
        optimizer.zero_grad()
        value, scores, gains = fitness(x)
        (-value).backward()
        gradient_norm = float(x.grad.norm())
        if not torch.isfinite(x.grad).all():
            raise GradientError(f"the fitness's gradient at step {step} is not finite; try --metric loglik")
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        fit = Fitness(float(value.detach()), _detached(scores), _detached(gains))
        record = {
            "type": "eval",
            "number": step,
            "generation": step,
            "member": 0,
            "x": candidate,
            "fitness": fit.value,
            "scores": fit.scores,
            "gains": fit.gains,
            "gradient_norm": gradient_norm,
        }
        state = {"journal": header, "number": step, "record": record, "next": _state(x, optimizer)}
        write_text_atomic(state_path, json.dumps(state, separators=(",", ":")))
        journal.append(record)
        result.evaluations.append(Evaluation(step, step, 0, candidate, fit.value, fit.scores, fit.gains))
        result.sigma = gradient_norm
        if progress:
            progress(result, step, gradient_norm)
    if _stalled(result, settings) and len(result.evaluations) < budget:
        result.stop = f"no rise of {settings.tolerance:g} in {settings.patience} steps"
    return result


def _journaled_steps(journal: Journal, saved: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The journal's step records, after journaling the one a kill kept out of it (the state file
    `saved` is written first, so it may be one step ahead of the journal, never more)."""
    records = list(journal.evaluations())
    if saved is not None and saved["number"] == len(records):
        journal.append(saved["record"])
        records.append(saved["record"])
    return records


def _last_state(
    journal: Journal, saved: dict[str, Any] | None, state_path: Path, number: int
) -> dict[str, Any]:
    """Adam's state after step `number`, the journal's last: from the state file `saved` (older
    journals hold it in the record)."""
    last = journal.records[-1]
    if "next" in last:
        return last["next"]
    if saved is None or saved["number"] != number:
        raise JournalError(
            f"{str(state_path)!r} does not hold the optimizer's state after step {number}, the journal's last"
        )
    return saved["next"]


def _header_digest(journal: Journal) -> str:
    """Ties a state file to its journal: a state left by another search is not this one's."""
    header = journal.records[0] if journal.records else {}
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def _read_state(path: Path, journal: Journal) -> dict[str, Any] | None:
    """The state file's content, or None where there is none or it belongs to another journal."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        int(saved["number"]), saved["record"], saved["next"], saved["journal"]
    except (ValueError, KeyError, TypeError):
        raise JournalError(f"the gradient search's state file {str(path)!r} cannot be read") from None
    return saved if saved["journal"] == _header_digest(journal) else None


def _detached(values: dict[str, torch.Tensor]) -> dict[str, float]:
    return {task: float(v.detach()) for task, v in values.items()}


def _stalled(result: SearchResult, settings: GradientSettings) -> bool:
    """True when the last `patience` steps raised the best fitness by less than `tolerance`."""
    done = result.evaluations
    if not settings.patience or len(done) <= settings.patience:
        return False
    before = max(e.fitness for e in done[: -settings.patience])
    return max(e.fitness for e in done[-settings.patience :]) < before + settings.tolerance


def _state(x: torch.Tensor, optimizer: torch.optim.Adam) -> dict[str, Any]:
    state = optimizer.state[x]
    return {
        "x": _floats(x),
        "step": float(state["step"]),
        "exp_avg": _floats(state["exp_avg"]),
        "exp_avg_sq": _floats(state["exp_avg_sq"]),
    }


def _restore(x: torch.Tensor, optimizer: torch.optim.Adam, saved: dict[str, Any]) -> None:
    if len(saved["x"]) != x.numel():
        raise JournalError(
            f"the journal's candidates have {len(saved['x'])} coordinates, this search {x.numel()}"
        )
    with torch.no_grad():
        x.copy_(torch.tensor(saved["x"], dtype=torch.float64))
    optimizer.state[x] = {
        "step": torch.tensor(saved["step"]),
        "exp_avg": torch.tensor(saved["exp_avg"], dtype=torch.float64),
        "exp_avg_sq": torch.tensor(saved["exp_avg_sq"], dtype=torch.float64),
    }
