"""The tiny expert zoo: a base model, its domain experts, and heterogeneous experts, trained locally.

* **base**: a Llama-style causal LM with a character-level tokenizer, pretrained on the easy
  variants of every task (it learns the prompt format and the primitive steps of each domain, but
  scores low on the full tasks);
* **experts**: full fine-tunes of the base, one per domain, on that domain's full tasks plus a
  little replay of the base's curriculum, with a modest learning rate and step count so they stay
  in the base's basin (the homogeneous family that weight merging needs);
* **heterogeneous**: a GPT-2 model with its own byte-level BPE tokenizer, trained from scratch
  mostly on one domain (the family that only distribution fusion can combine).

`build_zoo` is deterministic (seeded, fixed torch thread count) and caches the zoo in a folder
named by the sha256 of its recipe: an unchanged recipe returns at once, a changed one rebuilds.
Experts train in parallel worker processes, one per core, after the base.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from merging.atomic import write_text_atomic
from merging.errors import UmmError
from merging.testbed.tasks import DOMAINS, TASKS
from merging.testbed.tokenizers_build import bpe_tokenizer, char_tokenizer
from merging.testbed.training import TrainSpec, corpus, pinned_threads, train

SUITE_VERSION = "6"  # bump when task formats change: it is part of every recipe digest
ZOO_CACHE_ENV = "UMM_ZOO_CACHE"
MANIFEST = "zoo.json"
MODEL_META = "testbed.json"
BUILD_WORKERS = min(2, os.cpu_count() or 1)  # processes training experts side by side


class ZooError(UmmError):
    """A zoo size, recipe or cache folder that cannot be used."""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one zoo model; ``tokenizer`` is ``"char"`` or ``"bpe"`` (with ``bpe_vocab``)."""

    arch: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    tokenizer: str = "char"
    bpe_vocab: int = 0
    max_positions: int = 256

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class HeteroSpec:
    """A heterogeneous expert: its own architecture and tokenizer, trained on ``train.mixture``."""

    name: str
    domain: str
    model: ModelSpec
    train: TrainSpec

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "domain": self.domain,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
        }


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that determines the zoo's weights; its digest names the cache folder."""

    size: str
    seed: int
    threads: int
    base_model: ModelSpec
    base_train: TrainSpec
    expert_train: TrainSpec  # its mixture (replay) is joined by the expert's own domain at weight 1
    domains: tuple[str, ...] = DOMAINS
    heterogeneous: tuple[HeteroSpec, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite_version": SUITE_VERSION,
            "size": self.size,
            "seed": self.seed,
            "threads": self.threads,
            "base_model": self.base_model.to_dict(),
            "base_train": self.base_train.to_dict(),
            "expert_train": self.expert_train.to_dict(),
            "domains": list(self.domains),
            "heterogeneous": [h.to_dict() for h in self.heterogeneous],
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class Zoo:
    """Paths of a built zoo: HF folders loadable with AutoModelForCausalLM / AutoTokenizer."""

    root: Path
    recipe: ZooRecipe
    base: Path
    experts: dict[str, Path] = field(default_factory=dict)
    heterogeneous: dict[str, Path] = field(default_factory=dict)
    build_seconds: dict[str, float] = field(default_factory=dict)

    def models(self) -> dict[str, Path]:
        """Every model by display name: ``base``, each domain, then each heterogeneous expert."""
        return {"base": self.base, **self.experts, **self.heterogeneous}


# The base's curriculum: the easy variant of every task, and a little of the full tasks. Each full
# task's share is as large as it can be while the base still scores low on it: lists and tracing
# answers are whole lists or every variable, so the base can practise them at full length (and its
# experts need only small updates); arithmetic, logic and the compositional tasks stay rare.
_BASE_FULL_SHARE = {
    "arithmetic": 0.05,
    "lists": 0.5,
    "logic": 0.03,
    "tracing": 0.4,
    "list_arith": 0.1,
    "bool_trace": 0.03,
}
_BASE_MIXTURE = (
    *((f"{task}@easy", 1.0) for task in TASKS),
    *((task, _BASE_FULL_SHARE[task]) for task in TASKS),
)
# Experts replay a little of the base's curriculum and of the other full tasks: less forgetting,
# task vectors that stay specific to their domain, so that they add up.
_REPLAY = (*((f"{task}@easy", 0.03) for task in TASKS), *((task, 0.03) for task in TASKS))


# Experts leave the parameters every domain reads alike (the tied character embeddings and the
# RMSNorm gains) as the base trained them: their task vectors then interfere less when added.
_SHARED_PARAMETERS = ("embed_tokens", "norm")


def _hetero_mixture(domain: str) -> tuple[tuple[str, float], ...]:
    return ((domain, 4.0), *((f"{task}@easy", 0.5) for task in TASKS))


RECIPES: dict[str, ZooRecipe] = {
    "micro": ZooRecipe(
        size="micro",
        seed=0,
        threads=1,
        base_model=ModelSpec("llama", hidden=32, layers=2, heads=2, intermediate=64),
        base_train=TrainSpec(steps=60, lr=1e-2, batch_size=16, mixture=_BASE_MIXTURE, warmup=10),
        expert_train=TrainSpec(steps=20, lr=3e-3, batch_size=16, mixture=_REPLAY, warmup=5),
        heterogeneous=(
            HeteroSpec(
                "gpt2-lists",
                "lists",
                ModelSpec(
                    "gpt2", hidden=32, layers=2, heads=2, intermediate=64, tokenizer="bpe", bpe_vocab=300
                ),
                TrainSpec(steps=40, lr=1e-2, batch_size=16, mixture=_hetero_mixture("lists"), warmup=5),
            ),
        ),
    ),
    "small": ZooRecipe(
        size="small",
        seed=0,
        threads=1,
        base_model=ModelSpec("llama", hidden=64, layers=2, heads=2, intermediate=192),
        base_train=TrainSpec(steps=1000, lr=5e-3, batch_size=32, mixture=_BASE_MIXTURE, warmup=30),
        expert_train=TrainSpec(
            steps=1000, lr=1.5e-3, batch_size=32, mixture=_REPLAY, warmup=10, frozen=_SHARED_PARAMETERS
        ),
        heterogeneous=(
            HeteroSpec(
                "gpt2-lists",
                "lists",
                ModelSpec(
                    "gpt2", hidden=64, layers=2, heads=2, intermediate=256, tokenizer="bpe", bpe_vocab=400
                ),
                TrainSpec(steps=2000, lr=5e-3, batch_size=32, mixture=_hetero_mixture("lists"), warmup=30),
            ),
        ),
    ),
}


def default_cache_dir() -> Path:
    """``$UMM_ZOO_CACHE`` if set, else ``~/.cache/umm/zoo``."""
    env = os.environ.get(ZOO_CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "umm" / "zoo"


def _make_tokenizer(spec: ModelSpec, seed: int) -> PreTrainedTokenizerFast:
    if spec.tokenizer == "char":
        return char_tokenizer()
    if spec.tokenizer == "bpe":
        return bpe_tokenizer(corpus(list(TASKS), n=300, seed=seed), spec.bpe_vocab)
    raise ZooError(f"expected tokenizer 'char' or 'bpe', got {spec.tokenizer!r}.")


def _make_model(spec: ModelSpec, tok: PreTrainedTokenizerFast, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    ids = {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if spec.arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=True,
            **ids,
        )
        return LlamaForCausalLM(config)
    if spec.arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tok),
            n_embd=spec.hidden,
            n_layer=spec.layers,
            n_head=spec.heads,
            n_inner=spec.intermediate,
            n_positions=spec.max_positions,
            **ids,
        )
        return GPT2LMHeadModel(config)
    raise ZooError(f"expected arch 'llama' or 'gpt2', got {spec.arch!r}.")


def _save(model: torch.nn.Module, tok: PreTrainedTokenizerFast, out: Path, meta: dict[str, Any]) -> Path:
    """Save an HF folder atomically: write beside ``out``, then rename into place."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_text_atomic(tmp / MODEL_META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load_manifest(root: Path, recipe: ZooRecipe) -> Zoo | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("digest") != recipe.digest():
        return None
    return Zoo(
        root=root,
        recipe=recipe,
        base=root / data["base"],
        experts={k: root / v for k, v in data["experts"].items()},
        heterogeneous={k: root / v for k, v in data["heterogeneous"].items()},
        build_seconds=data.get("build_seconds", {}),
    )


def build_zoo(
    size: str = "micro",
    cache_dir: str | Path | None = None,
    *,
    recipe: ZooRecipe | None = None,
    log: Callable[[str], None] | None = None,
) -> Zoo:
    """Train (or fetch from the cache) the zoo of ``size``; ``recipe`` overrides the named recipe."""
    if recipe is None:
        if size not in RECIPES:
            raise ZooError(f"expected zoo size {' or '.join(RECIPES)}, got {size!r}.")
        recipe = RECIPES[size]
    for domain in recipe.domains:
        if domain not in TASKS:
            raise ZooError(f"expected expert domains among {', '.join(TASKS)}, got {domain!r}.")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = root / f"{recipe.size}-{recipe.digest()[:16]}"
    say = log or (lambda _msg: None)
    with _locked(root):
        cached = _load_manifest(root, recipe)
        if cached is not None:
            return cached
        with pinned_threads(recipe.threads):
            zoo = _train_zoo(root, recipe, say)
        manifest = {
            "digest": recipe.digest(),
            "recipe": recipe.to_dict(),
            "base": "base",
            "experts": {k: str(v.relative_to(root)) for k, v in zoo.experts.items()},
            "heterogeneous": {k: str(v.relative_to(root)) for k, v in zoo.heterogeneous.items()},
            "build_seconds": zoo.build_seconds,
        }
        write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return zoo


def _train_zoo(root: Path, recipe: ZooRecipe, say: Callable[[str], None]) -> Zoo:
    """The base here; heterogeneous experts (from the start) and domain experts (once the base is
    trained) on `BUILD_WORKERS` spawned processes, each with the recipe's torch threads. Every model
    is seeded by the recipe alone, so the bytes do not depend on which process trains it. With one
    worker everything runs in this process."""
    seconds: dict[str, float] = {}
    workers = max(1, min(BUILD_WORKERS, len(recipe.domains) + len(recipe.heterogeneous)))
    if workers > 1:
        pool_context = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        pool_context = _InProcess()
    digest = recipe.digest()
    with pool_context as pool:
        hetero_jobs = {
            s.name: pool.submit(
                _train_in_worker,
                root / "heterogeneous" / s.name,
                recipe,
                s.model,
                s.train,
                recipe.seed,
                {"role": "heterogeneous", "domain": s.domain, "recipe": digest},
            )
            for s in recipe.heterogeneous
        }
        start = time.perf_counter()
        base, tok = _train_base(recipe)
        base_path = _save(base, tok, root / "base", {"role": "base", "recipe": digest})
        seconds["base"] = round(time.perf_counter() - start, 2)
        say(f"trained base in {seconds['base']:.1f} s")
        expert_jobs = {
            domain: pool.submit(
                _train_in_worker,
                root / "experts" / domain,
                recipe,
                recipe.base_model,
                replace(recipe.expert_train, mixture=((domain, 1.0), *recipe.expert_train.mixture)),
                recipe.seed + 1 + i,
                {"role": "expert", "domain": domain, "recipe": digest},
                base.state_dict(),
            )
            for i, domain in enumerate(recipe.domains)
        }
        experts = {domain: _collect(job, domain, seconds, say) for domain, job in expert_jobs.items()}
        hetero = {name: _collect(job, name, seconds, say) for name, job in hetero_jobs.items()}
    return Zoo(root, recipe, base_path, experts, hetero, seconds)


class _InProcess:
    """A pool of one that runs each job as it is submitted (no process to spawn)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # delivered by `result()`, as a worker's would be
            future.set_exception(exc)
        return future

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _collect(job: Future, name: str, seconds: dict[str, float], say: Callable[[str], None]) -> Path:
    path, took = job.result()
    seconds[name] = took
    say(f"trained {name} in {took:.1f} s")
    return path


def _train_base(recipe: ZooRecipe) -> tuple[torch.nn.Module, Any]:
    tok = _make_tokenizer(recipe.base_model, recipe.seed)
    base = _make_model(recipe.base_model, tok, recipe.seed)
    train(base, tok, recipe.base_train, seed=recipe.seed)
    return base, tok


def _train_in_worker(
    folder: Path,
    recipe: ZooRecipe,
    model: ModelSpec,
    spec: TrainSpec,
    seed: int,
    meta: dict[str, str],
    start_state: dict[str, torch.Tensor] | None = None,
) -> tuple[Path, float]:
    """One expert, trained in a build worker from `start_state` (a domain expert: the base's
    weights) or from its seeded initialization (a heterogeneous expert): its folder and seconds."""
    start = time.perf_counter()
    with pinned_threads(recipe.threads):
        tok = _make_tokenizer(model, recipe.seed)
        network = _make_model(model, tok, recipe.seed)
        if start_state is not None:
            network.load_state_dict(start_state)
        train(network, tok, spec, seed=seed)
        path = _save(network, tok, folder, meta)
    return path, round(time.perf_counter() - start, 2)


def model_meta(model_dir: str | Path) -> dict[str, Any]:
    """The zoo metadata of a model folder (role, domain), or an empty dict for other models."""
    path = Path(model_dir) / MODEL_META
    return json.loads(path.read_text()) if path.exists() else {}
