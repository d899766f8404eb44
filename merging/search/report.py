"""The search's report: test-split accuracy of the base, the experts, the uniform and the searched
merge, gain retention per domain, the compositional tasks, and a plot of fitness per evaluation.

The test split is never seen by the search (it scores the dev split only).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from merging.atomic import write_atomic, write_text_atomic
from merging.search.driver import Evaluation
from merging.testbed.harness import gain_retention
from merging.testbed.tasks import COMPOSITIONAL, DOMAINS


def expert_domains(
    expert_scores: Mapping[str, Mapping[str, float]], declared: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Per domain, its expert: the ones `declared` (domain -> expert, from the zoo's metadata) if
    any, else the expert that scores highest on it (the earliest listed among equals)."""
    if declared:
        return {d: declared[d] for d in DOMAINS if d in declared and declared[d] in expert_scores}
    out = {}
    for domain in DOMAINS:
        scoring = [(scores[domain], -i, name) for i, (name, scores) in enumerate(expert_scores.items())]
        if scoring and all(domain in s for s in expert_scores.values()):
            out[domain] = max(scoring)[2]
    return out


def build_report(
    accuracy: Mapping[str, Mapping[str, float]],
    experts: Sequence[str],
    *,
    split: str,
    search: Mapping[str, Any],
    declared: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """JSON-ready report. `accuracy` maps `base`, each expert, `uniform` and `searched` to
    `{task: accuracy}`; retention is `(model - base) / (domain's expert - base)` per domain that
    has an expert (`declared`, domain -> expert name, else each domain's best scorer)."""
    owners = expert_domains({name: accuracy[name] for name in experts}, declared)
    expert_best = {domain: accuracy[name][domain] for domain, name in owners.items()}
    rows = {}
    for name, scores in accuracy.items():
        domains = [d for d in DOMAINS if d in scores]
        row: dict[str, Any] = {
            "accuracy": dict(scores),
            "domain_mean": sum(scores[d] for d in domains) / len(domains) if domains else None,
        }
        if name != "base":
            retention = gain_retention(scores, accuracy["base"], expert_best)
            kept = [v for v in retention.values() if v is not None]
            row["retention"] = retention
            row["retention_mean"] = sum(kept) / len(kept) if kept else None
        rows[name] = row
    best_expert = max(experts, key=lambda name: (rows[name]["domain_mean"] or 0.0, name))
    return {
        "split": split,
        "domain_experts": owners,
        "best_single_expert": best_expert,
        "models": rows,
        "search": dict(search),
    }


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown tables."""
    rows = report["models"]
    tasks = [t for t in (*DOMAINS, *COMPOSITIONAL) if t in rows["base"]["accuracy"]]
    lines = [
        f"# Merge search report ({report['split']} split)",
        "",
        "| model | " + " | ".join(tasks) + " | domain mean | retention mean |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for name, row in rows.items():
        cells = [f"{row['accuracy'][t]:.3f}" for t in tasks]
        mean = row.get("retention_mean")
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {row['domain_mean']:.3f} | "
            + ("-" if mean is None else f"{mean:.3f}")
            + " |"
        )
    lines += ["", "Gain retention per domain, (model - base) / (domain expert - base):", ""]
    domains = [d for d in DOMAINS if d in report["domain_experts"]]
    lines += ["| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for name, row in rows.items():
        if "retention" in row:
            cells = [
                "-" if row["retention"].get(d) is None else f"{row['retention'][d]:.2f}" for d in domains
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    search = report["search"]
    lines += [
        "",
        f"Best single expert by domain mean: {report['best_single_expert']}.",
        f"Search: {search.get('evaluations')} evaluations, best dev fitness {search.get('best_fitness'):.4f} "
        f"(start {search.get('start_fitness'):.4f}), stop: {search.get('stop')}.",
        "",
    ]
    return "\n".join(lines)


def fitness_plot(evaluations: Sequence[Evaluation], path: Path, title: str) -> Path:
    """A PNG of every candidate's fitness and the best so far, against evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.subplots()
    numbers = [e.number for e in evaluations]
    values = [e.fitness for e in evaluations]
    best, running = [], float("-inf")
    for value in values:
        running = max(running, value)
        best.append(running)
    axes.scatter(numbers, values, s=8, alpha=0.5, label="candidate")
    axes.plot(numbers, best, color="C3", label="best so far")
    axes.set_xlabel("evaluations")
    axes.set_ylabel("dev fitness")
    axes.set_title(title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return write_atomic(path, buffer.getvalue())


def write_report(out_dir: Path, report: Mapping[str, Any]) -> None:
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    write_text_atomic(out_dir / "report.md", markdown(report))
