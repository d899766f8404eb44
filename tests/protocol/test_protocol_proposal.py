"""Search proposals: schema, an honest claim accepted on recomputation, an inflated one refused,
bans and the deterministic choice of the round's recipe."""

from __future__ import annotations

import dataclasses

import pytest

from protocol.errors import SchemaError
from protocol.messages import SCHEMA_VERSION
from protocol.proposal import (
    FITNESS_TOLERANCE,
    ProposalBook,
    ProposalCheck,
    ProposalRefusedError,
    SearchProposal,
    require_verified,
    verify_proposal,
)
from tests.protocol.conftest import NETWORK, NOW, identity

CIDS = ("aa" * 32, "bb" * 32)
DEV = "de" * 32


def proposal(who: int = 1, fitness: float = 0.5, **changes) -> SearchProposal:
    fields = dict(
        v=SCHEMA_VERSION,
        network_id=NETWORK,
        signer=identity(who).public_key,
        created_at=NOW,
        round=3,
        candidates=CIDS,
        method="ties",
        parameters={
            "models": {
                cid: {"weight": [{"filter": "layers.0.", "value": 0.25}, {"value": 0.5}]} for cid in CIDS
            },
            "global": {},
        },
        dev_fingerprint=DEV,
        fitness=fitness,
        search_seed=who,
    )
    fields.update(changes)
    return SearchProposal(**fields)


def test_schema_refuses_unsorted_sets_strangers_and_int_fitness():
    with pytest.raises(SchemaError, match="sorted"):
        proposal(candidates=(CIDS[1], CIDS[0]))
    with pytest.raises(SchemaError, match="candidates only"):
        proposal(parameters={"models": {"cc" * 32: {}}, "global": {}})
    with pytest.raises(SchemaError, match="'models' and 'global'"):
        proposal(parameters={"models": {}})
    with pytest.raises(SchemaError, match="float"):
        proposal(fitness=1)
    assert SearchProposal.from_dict(proposal().to_dict()) == proposal()


@pytest.fixture(scope="module")
def recompute(tmp_path_factory):
    """Fitness of a proposal's recipe over the tiny models, as a verifying peer computes it."""
    import torch

    from merging.config import load_config
    from merging.search.fitness import MergeEvaluator, Objective
    from merging.search.space import SearchSpace
    from tests.search.tiny_models import build_tiny_models

    models = build_tiny_models(tmp_path_factory.mktemp("tiny"))
    paths = {CIDS[0]: str(models["alpha"]), CIDS[1]: str(models["beta"])}

    def config(p: SearchProposal) -> dict:
        return {
            "merge_method": p.method,
            "base_model": str(models["base"]),
            "models": [
                {"model": paths[cid], "parameters": p.parameters["models"][cid]} for cid in p.candidates
            ],
            "parameters": p.parameters["global"],
            "dtype": "float32",
        }

    def fitness(p: SearchProposal, threads: int = 1) -> float:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            evaluator = MergeEvaluator(
                load_config(config(p)), ["arithmetic", "lists"], Objective("loglik"), limit=4
            )
            SearchSpace(evaluator.config, evaluator.template, evaluator.searched)  # the recipe is searchable
            return evaluator(evaluator.template).value
        finally:
            torch.set_num_threads(previous)

    return fitness


def test_an_honest_proposal_is_accepted_and_an_inflated_one_refused(recompute):
    honest_value = recompute(proposal())
    honest = proposal(fitness=honest_value)
    check = verify_proposal(honest, lambda p: recompute(p, threads=2), candidates=CIDS, dev_fingerprint=DEV)
    assert check.ok and abs(check.recomputed - honest_value) < FITNESS_TOLERANCE
    inflated = proposal(fitness=honest_value + 0.05)
    refused = verify_proposal(inflated, recompute, candidates=CIDS, dev_fingerprint=DEV)
    assert not refused.ok and "claimed fitness" in refused.reason
    with pytest.raises(ProposalRefusedError, match="refused: claimed fitness"):
        require_verified(refused)


def test_set_and_dev_set_are_checked_before_any_recomputation():
    def never(_p):
        raise AssertionError("recomputed a proposal that should have been refused first")

    other_set = verify_proposal(proposal(), never, candidates=(CIDS[0],), dev_fingerprint=DEV)
    assert "another candidate set" in other_set.reason
    other_dev = verify_proposal(proposal(), never, candidates=CIDS, dev_fingerprint="00" * 32)
    assert other_dev.reason.startswith("expected dev set")


def checked(p: SearchProposal, recomputed: float) -> ProposalCheck:
    return verify_proposal(p, lambda _p: recomputed, candidates=CIDS, dev_fingerprint=DEV)


def test_book_picks_the_best_verified_breaks_ties_by_id_and_bans_liars():
    book = ProposalBook(3)
    a, b, c = proposal(1, 0.40), proposal(2, 0.60), proposal(3, 0.60, search_seed=99)
    for p in (a, b, c):
        book.update_checked(p, checked(p, p.fitness))
    assert book.best() == min((b, c), key=lambda p: p.id)  # equal fitness: the smaller id
    liar = proposal(2, 0.90, search_seed=7)
    book.update_checked(liar, checked(liar, 0.30))
    assert identity(2).public_key in book.banned
    assert book.best() == c  # signer 2's verified proposal is dropped with the ban
    later = proposal(2, 0.95, search_seed=8)
    assert not book.accepts(later)
    book.update_checked(later, checked(later, 0.95))
    assert book.best() == c
    assert not book.accepts(dataclasses.replace(a, round=4))
    assert ProposalBook(3).best() is None
