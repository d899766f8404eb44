"""`evolve`: the whole local search, from a merge config to a searched recipe, model and report.

Files written under `out_dir`: `journal.jsonl` (every candidate, appended as it is scored;
a gradient search keeps its optimizer's state in `gradient_state.json`),
`recipe.yaml` (the best candidate as a mergekit-style config; with the `row` granularity it names
`recipe.rows.safetensors`, its row weights), `model/` (that recipe merged by
the same engine `umm merge` runs), `report.json` / `report.md` (test split) and `fitness.png`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.blocks import matrix_shape
from merging.config import MergeConfig, load_config
from merging.search.driver import CmaSettings, Progress, SearchResult, run_cma
from merging.search.fitness import MergeEvaluator, Objective
from merging.search.gradient import GradientFitness, GradientSettings, run_gradient
from merging.search.journal import Journal
from merging.search.recipe import write_recipe
from merging.search.report import build_report, fitness_plot, write_report
from merging.search.space import (
    LOCAL_GRANULARITIES,
    OPTIMIZERS,
    SearchSpace,
    SearchSpaceError,
    check_gradient_search,
    parse_granularity,
)
from merging.testbed.tasks import COMPOSITIONAL, DOMAINS
from merging.testbed.zoo import model_meta

RECIPE_NAME = "recipe.yaml"
MODEL_DIR = "model"


@dataclass(frozen=True)
class EvolveSettings:
    """Everything that determines a search's candidates (and so its journal)."""

    tasks: tuple[str, ...] = DOMAINS
    granularity: str = "attn_mlp"
    keys: tuple[str, ...] | None = None  # None: weight, and density where the method has it
    objective: Objective = field(default_factory=Objective)
    limit: int | None = 100  # dev prompts per task
    cma: CmaSettings = field(default_factory=CmaSettings)
    optimizer: str = "cma"  # or "gradient" (`merging.search.gradient`)
    gradient: GradientSettings = field(default_factory=GradientSettings)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise SearchSpaceError(
                f"expected an optimizer among {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )

    def to_dict(self, config: MergeConfig, space: SearchSpace) -> dict[str, Any]:
        optimizer = (
            {"cma": self.cma.to_dict()}
            if self.optimizer == "cma"  # the only optimizer of older journals, which keep resuming
            else {"optimizer": self.optimizer, "gradient": self.gradient.to_dict()}
        )
        return {
            "config": config.to_dict(),
            "tasks": list(self.tasks),
            "granularity": self.granularity,
            "keys": list(space.keys),
            "ranges": {k: list(space.ranges[k]) for k in space.keys},
            "objective": {
                "metric": self.objective.metric,
                "aggregate": self.objective.aggregate,
                "temperature": self.objective.temperature,
            },
            "limit": self.limit,
            **optimizer,
        }


def absolute_paths(config: MergeConfig) -> MergeConfig:
    """The config with its model paths made absolute (a recipe then works from any folder)."""
    data = config.to_dict()

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    for entry in data.get("models", []):
        entry["model"] = absolute(entry["model"])
    if "base_model" in data:
        data["base_model"] = absolute(data["base_model"])
    source = data.get("tokenizer_source")
    if source not in (None, "base"):
        data["tokenizer_source"] = absolute(source)
    return load_config(data)


@dataclass
class Search:
    """A prepared search: the evaluator (models loaded), its space and settings."""

    config: MergeConfig
    settings: EvolveSettings
    evaluator: MergeEvaluator
    space: SearchSpace

    @classmethod
    def prepare(cls, config: MergeConfig | str | Path, settings: EvolveSettings) -> Search:
        config = absolute_paths(load_config(config))
        if settings.optimizer == "gradient":
            check_gradient_search(config.merge_method, settings.objective.metric, settings.keys)
        elif parse_granularity(settings.granularity)[0] in LOCAL_GRANULARITIES:
            raise SearchSpaceError(f"the {settings.granularity} granularity needs the gradient optimizer")
        evaluator = MergeEvaluator(config, settings.tasks, settings.objective, limit=settings.limit)
        base = evaluator.state_dicts[config.base_model]
        space = SearchSpace(
            config,
            evaluator.template,
            evaluator.searched,
            granularity=settings.granularity,
            keys=settings.keys,
            rows={name: matrix_shape(base[name].shape)[0] for name in evaluator.searched},
        )
        return cls(config, settings, evaluator, space)

    def run(
        self, out_dir: Path, budget: int, *, resume: bool = False, progress: Progress | None = None
    ) -> SearchResult:
        """Search (or resume) under `out_dir` until `budget` candidates are scored."""
        journal = Journal.open(out_dir, self.settings.to_dict(self.config, self.space), resume=resume)
        try:
            if self.settings.optimizer == "gradient":
                fitness = GradientFitness(self.space, self.evaluator)
                return run_gradient(
                    self.space.start(), fitness, journal, budget, self.settings.gradient, progress
                )
            return run_cma(
                self.space.start(),
                lambda x: self.evaluator(self.space.apply(x)),
                journal,
                budget,
                self.settings.cma,
                progress,
            )
        finally:
            journal.close()

    def write_outputs(
        self,
        out_dir: Path,
        result: SearchResult,
        *,
        report_limit: int | None = None,
        say: Callable[[str], None] = lambda _msg: None,
    ) -> dict[str, Any]:
        """The recipe, the merged model, the test-split report and the fitness plot."""
        from merging.engine import merge

        best = result.best
        recipe = write_recipe(
            out_dir / RECIPE_NAME,
            self.space,
            best.x,
            self.evaluator.tensors,
            name="umm evolve best candidate",
        )
        say("merging the best recipe")
        merge(recipe, out_dir / MODEL_DIR, progress=False)
        say("scoring the test split")
        report = self.test_report(best.x, report_limit, result)
        write_report(out_dir, report)
        fitness_plot(
            result.evaluations,
            out_dir / "fitness.png",
            f"{self.config.merge_method}, {self.settings.granularity}",
        )
        return report

    def test_report(self, x: Sequence[float], limit: int | None, result: SearchResult) -> dict[str, Any]:
        """Test-split accuracy of base, experts, the uniform config and candidate `x`."""
        from merging.search.scores import accuracy_scores

        evaluator = self.evaluator
        tasks = [*DOMAINS, *COMPOSITIONAL]
        experts = [m for m in evaluator.state_dicts if m != self.config.base_model]
        accuracy: dict[str, dict[str, float]] = {}
        for name, model in [("base", self.config.base_model), *((Path(m).name, m) for m in experts)]:
            evaluator.load_state(evaluator.state_dicts[model])
            accuracy[name] = accuracy_scores(evaluator.model, evaluator.tokenizer, tasks, "test", limit)
        merges = (
            ("uniform", evaluator.template, None),
            ("searched", self.space.apply(x), self.space.row_weights(x)),
        )
        for name, params, rows in merges:
            evaluator.load_merge(params, rows)
            accuracy[name] = accuracy_scores(evaluator.model, evaluator.tokenizer, tasks, "test", limit)
        search = {
            "evaluations": len(result.evaluations),
            "best_fitness": result.best.fitness,
            "start_fitness": result.evaluations[0].fitness,
            "stop": result.stop,
            "dimensions": self.space.size,
            "groups": len(self.space.groups),
            "parameters": self.space.describe(x),
        }
        declared = {}
        for model in experts:
            meta = model_meta(model)
            if meta.get("role") == "expert" and meta.get("domain"):
                declared[meta["domain"]] = Path(model).name
        names = [Path(m).name for m in experts]
        return build_report(accuracy, names, split="test", search=search, declared=declared)
