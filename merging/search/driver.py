"""CMA-ES over a search space's coordinates, journaled so that a killed search resumes exactly.

The search first scores the config's own (uniform) values, then runs generations of CMA-ES
(`cma`, bounded to the unit cube, step size `sigma0` of the cube's side, population from the
dimension unless given). Each candidate's fitness is appended to the journal as soon as it is known.
On resume, CMA-ES is rebuilt from the seed and fed the journal's generations: the candidates it
asks for must be the recorded ones (bit for bit), whose recorded fitness is reused, so the resumed
search continues to the same result as one never interrupted. CMA-ES draws from numpy's global
generator, so the driver keeps that generator's state to itself: nothing else the process does
can change the candidates.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from merging.search.fitness import Fitness
from merging.search.journal import Journal, JournalError


@dataclass(frozen=True)
class CmaSettings:
    """What determines the candidates: the seed, the initial step size and the population size."""

    seed: int = 0
    sigma0: float = 1 / 6
    popsize: int = 0  # 0: CMA-ES's default, 4 + floor(3 ln d)

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "sigma0": self.sigma0, "popsize": self.popsize}


@dataclass
class Evaluation:
    """One evaluated candidate, in evaluation order."""

    number: int
    generation: int
    member: int
    x: list[float]
    fitness: float
    scores: dict[str, float]
    gains: dict[str, float]


@dataclass
class SearchResult:
    evaluations: list[Evaluation] = field(default_factory=list)
    sigma: float = 0.0
    stop: str = "budget"

    @property
    def best(self) -> Evaluation:
        """The fittest candidate; the earliest among equals."""
        return max(self.evaluations, key=lambda e: (e.fitness, -e.number))


class _NumpyState:
    """A private copy of numpy's global generator state, swapped in around CMA-ES calls."""

    def __init__(self) -> None:
        self.state: Any = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        saved = np.random.get_state()
        if self.state is not None:
            np.random.set_state(self.state)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            self.state = np.random.get_state()
            np.random.set_state(saved)


def state_digest(es: Any) -> str:
    """sha256 of the optimizer's mean, step size and covariance (to check a replayed state)."""
    h = hashlib.sha256(np.asarray(es.mean, dtype=np.float64).tobytes())
    h.update(repr(float(es.sigma)).encode())
    covariance = getattr(getattr(es, "sm", None), "C", None)
    if covariance is not None:
        h.update(np.asarray(covariance, dtype=np.float64).tobytes())
    return h.hexdigest()


# (result so far, generation or gradient step, sigma or gradient norm)
Progress = Callable[[SearchResult, int, float], None]


def run_cma(
    start: Sequence[float],
    evaluate: Callable[[list[float]], Fitness],
    journal: Journal,
    budget: int,
    settings: CmaSettings,
    progress: Progress | None = None,
) -> SearchResult:
    """Search until `budget` candidates are scored (or CMA-ES stops); see the module docstring."""
    import cma

    recorded = {(r["generation"], r["member"]): r for r in journal.evaluations()}
    digests = {r["generation"]: r["digest"] for r in journal.records if r.get("type") == "generation"}
    result = SearchResult()
    rng = _NumpyState()

    def score(generation: int, member: int, x: list[float]) -> None:
        old = recorded.get((generation, member))
        if old is not None:
            if old["x"] != x:
                raise JournalError(
                    f"the journal's candidate {member} of generation {generation} differs from the one "
                    "this search draws (another cma version or seed?)"
                )
            fit = Fitness(old["fitness"], old["scores"], old["gains"])
        else:
            fit = evaluate(x)
            journal.append(
                {
                    "type": "eval",
                    "number": len(result.evaluations),
                    "generation": generation,
                    "member": member,
                    "x": x,
                    "fitness": fit.value,
                    "scores": fit.scores,
                    "gains": fit.gains,
                }
            )
        result.evaluations.append(
            Evaluation(len(result.evaluations), generation, member, x, fit.value, fit.scores, fit.gains)
        )

    options = {
        "bounds": [0.0, 1.0],
        "seed": settings.seed + 1,  # cma draws a time-based seed for 0
        "verbose": -9,
        "verb_log": 0,
        "verb_disp": 0,
        "verb_filenameprefix": "",
    }
    if settings.popsize:
        options["popsize"] = settings.popsize
    with rng.active():
        es = cma.CMAEvolutionStrategy(list(start), settings.sigma0, options)
    result.sigma = float(es.sigma)
    score(0, 0, [float(v) for v in start])
    if progress:
        progress(result, 0, result.sigma)
    generation = 0
    while len(result.evaluations) < budget:
        generation += 1
        with rng.active():
            asked = es.ask()
        xs = [[float(v) for v in candidate] for candidate in asked]
        taken = 0
        for member, x in enumerate(xs):
            if len(result.evaluations) >= budget:
                break
            score(generation, member, x)
            taken += 1
            if progress:
                progress(result, generation, result.sigma)
        if taken < len(xs):
            break  # the budget ended inside this generation
        fitness = [-e.fitness for e in result.evaluations[-len(xs) :]]  # cma minimizes
        with rng.active():
            es.tell(asked, fitness)
            stop = es.stop()
        result.sigma = float(es.sigma)
        digest = state_digest(es)
        if generation in digests:
            if digests[generation] != digest:
                raise JournalError(f"replaying generation {generation} of the journal gave another state")
        else:
            journal.append(
                {
                    "type": "generation",
                    "generation": generation,
                    "sigma": result.sigma,
                    "mean": [float(v) for v in es.mean],
                    "digest": digest,
                }
            )
        if progress:
            progress(result, generation, result.sigma)
        if stop:
            result.stop = ", ".join(sorted(stop))
            break
    return result
