"""`umm evolve CONFIG.yaml --out DIR`: search per-layer-group merge parameters (CMA-ES or gradient)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from merging.search.space import OPTIMIZERS
from node.cli.options import quiet_third_parties, verbose_option

DEFAULT_TASKS = "arithmetic,lists,logic,tracing"


@click.command("evolve")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the journal, recipe.yaml, model/, report and fitness.png.",
)
@click.option(
    "--tasks", default=DEFAULT_TASKS, show_default=True, help="Fitness tasks (dev split), comma-separated."
)
@click.option(
    "--budget",
    default=150,
    show_default=True,
    type=click.IntRange(min=1),
    help="Candidates to score, the config's own values included.",
)
@click.option("--resume", is_flag=True, help="Continue the search journaled in --out.")
@click.option(
    "--granularity",
    default="attn_mlp",
    show_default=True,
    help="Layer groups: layer, attn_mlp, module, blocks:K, or row (a weight per output row; gradient only).",
)
@click.option(
    "--params",
    "keys",
    default=None,
    help="Searched parameters, comma-separated [default: weight, plus density where the method has it].",
)
@click.option(
    "--metric",
    default="seqprob",
    show_default=True,
    type=click.Choice(["seqprob", "loglik", "tf_exact", "accuracy"]),
    help="Per-task score: teacher-forced proxies, or greedy-decoding accuracy.",
)
@click.option(
    "--aggregate",
    default="softmin",
    show_default=True,
    type=click.Choice(["softmin", "min", "mean"]),
    help="How the per-task gain shares combine into one fitness.",
)
@click.option("--temperature", default=0.1, show_default=True, type=float, help="Softmin temperature.")
@click.option(
    "--limit", default=100, show_default=True, type=click.IntRange(min=1), help="Dev prompts per task."
)
@click.option(
    "--optimizer",
    default="cma",
    show_default=True,
    type=click.Choice(OPTIMIZERS),
    help="CMA-ES, or Adam on the fitness's gradient (task_arithmetic with loglik or seqprob).",
)
@click.option(
    "--lr", default=0.03, show_default=True, type=float, help="Gradient step size, in units of each range."
)
@click.option(
    "--patience",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="Gradient steps without a rise of the best fitness before stopping (0: the whole budget).",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(min=0, max=2**31 - 3),
    help="CMA-ES seed: the same seed draws the same candidates.",
)
@click.option(
    "--popsize",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="CMA-ES population (0: 4 + 3 ln d).",
)
@click.option(
    "--sigma0", default=1 / 6, show_default=True, type=float, help="Initial step, in units of each range."
)
@click.option(
    "--report-limit", default=None, type=click.IntRange(min=1), help="Test prompts per task in the report."
)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="Torch threads.")
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")
@verbose_option()
def evolve_command(config: Path, out_dir: Path, **options: Any) -> None:
    """Search the merge parameters of CONFIG per layer group on the dev split: CMA-ES, or (for
    task_arithmetic with a teacher-forced likelihood metric) Adam on the fitness's gradient.

    Every candidate is merged in memory and scored; the journal in --out makes the search
    resumable (--resume continues to the same result). At the end --out holds recipe.yaml (which
    `umm merge` turns into the same model), model/, report.md/json (test split) and fitness.png.

    With --granularity row (gradient only) the recipe names recipe.rows.safetensors, a weight per
    output row of every tensor and expert.

    \b
    Example:
      umm evolve ties.yaml --budget 150 --out runs/ties
      umm evolve ta.yaml --optimizer gradient --metric loglik --aggregate mean --out runs/ta
      umm evolve ta.yaml --optimizer gradient --metric loglik --aggregate mean \\
          --granularity row --budget 150 --limit 200 --out runs/row
    """
    quiet_third_parties(options["verbose"])
    import torch
    from transformers.utils import logging as transformers_logging

    if not options["verbose"]:
        transformers_logging.disable_progress_bar()  # "Loading weights" bars, drawn for every model load

    from merging.search.driver import CmaSettings
    from merging.search.evolve import EvolveSettings, Search
    from merging.search.fitness import Objective
    from merging.search.gradient import GradientSettings

    torch.set_num_threads(options["threads"])
    keys = tuple(k.strip() for k in options["keys"].split(",")) if options["keys"] else None
    settings = EvolveSettings(
        tasks=tuple(t.strip() for t in options["tasks"].split(",") if t.strip()),
        granularity=options["granularity"],
        keys=keys,
        objective=Objective(options["metric"], options["aggregate"], options["temperature"]),
        limit=options["limit"],
        cma=CmaSettings(options["seed"], options["sigma0"], options["popsize"]),
        optimizer=options["optimizer"],
        gradient=GradientSettings(lr=options["lr"], patience=options["patience"]),
    )
    show = not options["no_progress"]
    say = _sayer(show)
    say("loading the models and scoring the inputs")
    search = Search.prepare(config, settings)
    space = search.space
    say(f"{space.size} dimensions over {len(space.groups)} groups, {len(search.evaluator.searched)} tensors")
    with _progress(show, options["budget"], options["optimizer"]) as progress:
        result = search.run(out_dir, options["budget"], resume=options["resume"], progress=progress)
    report = search.write_outputs(out_dir, result, report_limit=options["report_limit"], say=say)
    searched, uniform = report["models"]["searched"], report["models"]["uniform"]
    click.echo(
        f"best dev fitness {result.best.fitness:.4f} after {len(result.evaluations)} evaluations; "
        f"test retention {_fmt(searched.get('retention_mean'))} "
        f"(uniform {_fmt(uniform.get('retention_mean'))}); "
        f"written to {out_dir}"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _sayer(show: bool):
    def say(message: str) -> None:
        if show:
            click.echo(message, err=True)

    return say


class _progress:
    """A rich progress bar fed by the search's callback: generation (or gradient step), evaluations,
    best fitness, sigma (or the gradient's norm), ETA."""

    def __init__(self, show: bool, budget: int, optimizer: str) -> None:
        self.show, self.budget = show, budget
        self.labels = ("generation", "sigma") if optimizer == "cma" else ("step", "|gradient|")
        self.bar: Any = None

    def __enter__(self):
        if not self.show:
            return None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.bar.start()
        task = self.bar.add_task("search", total=self.budget)

        step_label, spread_label = self.labels

        def update(result, generation: int, sigma: float) -> None:
            best = result.best.fitness
            self.bar.update(
                task,
                completed=len(result.evaluations),
                description=f"{step_label} {generation}  best {best:.4f}  {spread_label} {sigma:.3f}",
            )

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def register(group: click.Group) -> None:
    """Add `evolve` to the `umm` command group."""
    group.add_command(evolve_command)
