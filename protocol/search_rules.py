"""Searched merges in a network: the genesis's search settings, the public dev set, and the round's
recipe built from a verified proposal (no I/O here).

A genesis enables search with a ``search`` map (absent: search is off and the genesis bytes are
those of a network without it):

    tasks           testbed task names the fitness is measured on (merging.testbed.tasks)
    limit           dev prompts per task
    dev_fingerprint `dev_set_fingerprint(tasks, limit)`: the public dev set every node regenerates
    budget          candidates each searcher scores per round
    granularity     layer groups searched (merging.search.space)
    keys            parameters searched per group and expert (e.g. ["weight", "density"])
    metric          teacher-forced proxy (loglik, seqprob, tf_exact; never greedy accuracy)
    aggregate       how per-task gains combine (mean, min, softmin)
    wait_seconds    how long after the round's candidates settle nodes wait for proposals before
                    they adopt the best verified one, or the genesis recipe if none is verified
    optimizer       optional: "gradient" has searchers fit the weights by Adam on the fitness's
                    gradient (task_arithmetic with loglik or seqprob; merging.search.gradient);
                    absent, CMA-ES (and the genesis bytes are those of a network before the key)

A round whose recipe comes from proposal P merges with P's method and its parameters in the
structured form ``{"proposal": P's id, "global": {...}, "models": {contribution id: {...}}}``
(`searched_parameters`), restricted to the contributions a shard admits; `recipe_parameters`
turns either form into the engine's top-level and per-model settings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from protocol.encoding import pack, sha256_hex
from protocol.errors import ProtocolError

if TYPE_CHECKING:
    from protocol.genesis import Genesis
    from protocol.messages import MergeRecipe
    from protocol.proposal import SearchProposal

DEV_SET_DOMAIN = "umm-dev-set-v1"
SEARCH_KEYS = (
    "tasks",
    "limit",
    "dev_fingerprint",
    "budget",
    "granularity",
    "keys",
    "metric",
    "aggregate",
    "wait_seconds",
)
OPTIONAL_SEARCH_KEYS = ("optimizer",)
STRUCTURED_KEYS = frozenset({"proposal", "global", "models"})
MAX_BUDGET = 100_000
MAX_WAIT_SECONDS = 86_400.0


class SearchSettingsError(ProtocolError):
    """A genesis's search settings that a node cannot apply."""

    reason = "search-settings"


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """The genesis's ``search`` map, checked (see the module docstring)."""

    tasks: tuple[str, ...]
    limit: int
    dev_fingerprint: str
    budget: int
    granularity: str
    keys: tuple[str, ...]
    metric: str
    aggregate: str
    wait_seconds: float
    optimizer: str = "cma"

    @classmethod
    def from_dict(cls, value: Any) -> SearchSettings:
        """The settings of a ``search`` map; SearchSettingsError naming the first problem."""
        if not isinstance(value, dict) or not set(SEARCH_KEYS) <= set(value) <= {
            *SEARCH_KEYS,
            *OPTIONAL_SEARCH_KEYS,
        }:
            got = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise SearchSettingsError(
                f"expected search settings with keys {list(SEARCH_KEYS)} (and optionally "
                f"{list(OPTIONAL_SEARCH_KEYS)}), got {got}"
            )
        settings = cls(
            tasks=tuple(value["tasks"]) if isinstance(value["tasks"], list) else (),
            limit=value["limit"],
            dev_fingerprint=value["dev_fingerprint"],
            budget=value["budget"],
            granularity=value["granularity"],
            keys=tuple(value["keys"]) if isinstance(value["keys"], list) else (),
            metric=value["metric"],
            aggregate=value["aggregate"],
            wait_seconds=value["wait_seconds"],
            optimizer=value.get("optimizer", "cma"),
        )
        settings.check()
        return settings

    def check_method(self, method: str) -> None:
        """SearchSettingsError unless `method` has a per-model weight and every searched key."""
        from merging.methods import METHODS

        spec = METHODS.get(method)
        if spec is None or "weight" not in spec.model_params:
            raise SearchSettingsError(
                f"expected a merge method with per-model weights to search, got {method!r}"
            )
        odd = [k for k in self.keys if k not in spec.model_params and k not in spec.global_params]
        if odd:
            raise SearchSettingsError(
                f"expected searched keys that merge method {method!r} has, got {odd[0]!r}"
            )
        if self.optimizer == "gradient":
            from merging.search.space import SearchSpaceError, check_gradient_search

            try:
                check_gradient_search(method, self.metric, self.keys)
            except SearchSpaceError as exc:
                raise SearchSettingsError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["tasks"], fields["keys"] = list(self.tasks), list(self.keys)
        if self.optimizer == "cma":
            del fields["optimizer"]  # CMA-ES is what a search map without the key means
        return fields

    def check(self) -> None:
        """SearchSettingsError unless every setting is one the search and every verifier accept."""
        from merging.errors import UmmError
        from merging.search.fitness import AGGREGATES
        from merging.search.scores import PROXY_METRICS
        from merging.search.space import DEFAULT_RANGES, LOCAL_GRANULARITIES, parse_granularity
        from merging.testbed.tasks import resolve_tasks

        if not self.tasks or not all(isinstance(t, str) for t in self.tasks):
            raise SearchSettingsError("expected search tasks to be a non-empty list of task names")
        try:
            resolve_tasks(list(self.tasks))
            kind = parse_granularity(self.granularity)[0]
        except UmmError as exc:
            raise SearchSettingsError(f"expected valid search settings, got: {exc}") from exc
        if kind in LOCAL_GRANULARITIES:
            raise SearchSettingsError(
                f"the {kind} granularity is for local searches only: a network's proposals carry a recipe,"
                " not a file of row weights"
            )
        if type(self.limit) is not int or not 1 <= self.limit <= 10_000:
            raise SearchSettingsError(
                f"expected a dev limit in [1, 10000] prompts per task, got {self.limit!r}"
            )
        if type(self.budget) is not int or not 1 <= self.budget <= MAX_BUDGET:
            raise SearchSettingsError(f"expected a search budget in [1, {MAX_BUDGET}], got {self.budget!r}")
        if not self.keys or any(k not in DEFAULT_RANGES for k in self.keys):
            raise SearchSettingsError(
                f"expected searched keys among {sorted(DEFAULT_RANGES)}, got {self.keys}"
            )
        if self.metric not in PROXY_METRICS:
            raise SearchSettingsError(
                f"expected a teacher-forced metric among {', '.join(PROXY_METRICS)}, got {self.metric!r}"
            )
        if self.aggregate not in AGGREGATES:
            raise SearchSettingsError(
                f"expected an aggregate among {', '.join(AGGREGATES)}, got {self.aggregate!r}"
            )
        from merging.search.space import OPTIMIZERS

        if self.optimizer not in OPTIMIZERS:
            raise SearchSettingsError(
                f"expected a search optimizer among {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        wait = self.wait_seconds
        if not isinstance(wait, float) or not math.isfinite(wait) or not 0.0 <= wait <= MAX_WAIT_SECONDS:
            raise SearchSettingsError(f"expected wait_seconds in [0, {MAX_WAIT_SECONDS:g}], got {wait!r}")
        expected = dev_set_fingerprint(self.tasks, self.limit)
        if self.dev_fingerprint != expected:
            raise SearchSettingsError(
                f"expected dev_fingerprint {expected[:16]} of the tasks' dev prompts, "
                f"got {str(self.dev_fingerprint)[:16]}"
            )


def dev_set_fingerprint(tasks: Sequence[str], limit: int) -> str:
    """sha256 of the public dev set: the first `limit` dev examples of each task (testbed-generated)."""
    from merging.testbed.tasks import generate

    rows = [[t, ex.prompt, ex.response] for t in tasks for ex in generate(t, "dev")[:limit]]
    return sha256_hex(pack([DEV_SET_DOMAIN, rows]))


def make_search_settings(
    tasks: Sequence[str],
    *,
    limit: int = 16,
    budget: int = 24,
    granularity: str = "layer",
    keys: Sequence[str] = ("weight",),
    metric: str = "loglik",
    aggregate: str = "mean",
    wait_seconds: float = 120.0,
    optimizer: str = "cma",
) -> SearchSettings:
    """Checked settings with the dev fingerprint computed (what `umm network create --search` stores)."""
    settings = SearchSettings(
        tuple(tasks),
        limit,
        dev_set_fingerprint(tuple(tasks), limit),
        budget,
        granularity,
        tuple(keys),
        metric,
        aggregate,
        float(wait_seconds),
        optimizer,
    )
    settings.check()
    return settings


def is_structured(parameters: Mapping[str, Any]) -> bool:
    """Whether recipe parameters are a searched recipe's ``{proposal, global, models}`` form."""
    return set(parameters) == STRUCTURED_KEYS


def recipe_parameters(
    parameters: Mapping[str, Any], contributions: Sequence[str]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(top-level parameters, per-contribution parameters) of a recipe's ``parameters``."""
    if not is_structured(parameters):
        return dict(parameters), {}
    models = parameters["models"]
    if not isinstance(parameters["global"], dict) or not isinstance(models, dict):
        raise SearchSettingsError("expected a searched recipe's 'global' and 'models' to be maps")
    return dict(parameters["global"]), {c: dict(models[c]) for c in contributions if c in models}


def searched_parameters(proposal: SearchProposal, admitted: Sequence[str]) -> dict[str, Any]:
    """The recipe parameters of `proposal` for the contributions `admitted` (a shard's)."""
    models = proposal.parameters["models"]
    return {
        "proposal": proposal.id,
        "global": proposal.parameters["global"],
        "models": {c: models[c] for c in sorted(admitted) if c in models},
    }


def round_recipe(
    genesis: Genesis, round_number: int, admitted: Sequence[str], proposal: SearchProposal | None
) -> MergeRecipe:
    """The recipe a shard of `admitted` contributions merges with: the genesis's without a proposal."""
    if proposal is None:
        return genesis.recipe(round_number, list(admitted))
    from protocol.messages import MergeRecipe

    return MergeRecipe.build(
        network_id=genesis.network_id,
        round=round_number,
        method=proposal.method,
        parameters=searched_parameters(proposal, admitted),
        base_fingerprint=genesis.base_fingerprint,
        architecture_fingerprint=genesis.architecture_fingerprint,
        contributions=list(admitted),
        dtype=genesis.dtype,
    )


def recipe_proposal(recipe: MergeRecipe) -> str | None:
    """The id of the proposal a recipe was built from (None: the genesis recipe)."""
    if is_structured(recipe.parameters) and isinstance(recipe.parameters["proposal"], str):
        return recipe.parameters["proposal"]
    return None


def describe_recipes(recipes: Sequence[MergeRecipe]) -> str:
    """One line naming the recipe a merged model used (its shards' recipes): method, and the
    searched proposal or the genesis recipe."""
    proposals = sorted({recipe_proposal(r) or "" for r in recipes})
    methods = ", ".join(sorted({r.method for r in recipes}))
    if proposals == [""]:
        return f"{methods}, the genesis recipe"
    return f"{methods}, searched: proposal {', '.join(p[:16] or 'none' for p in proposals)}"
