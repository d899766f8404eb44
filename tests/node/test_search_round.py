"""A node's choice of a round's recipe in a network with search: which recipes it merges with and
which decided recipes it accepts (node.search_round, without a network)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from node.search_round import SearchRound, searcher_seed
from protocol.proposal import ProposalCheck
from protocol.search_rules import make_search_settings, round_recipe
from tests.protocol.test_protocol_search_rules import CIDS, genesis, proposal


def test_a_node_merges_with_the_adopted_proposal_and_accepts_only_verified_recipes(tmp_path):
    settings = make_search_settings(["arithmetic", "logic"], limit=3, budget=5, keys=("weight", "density"))
    g = genesis(settings.to_dict())
    rounds = SearchRound(SimpleNamespace(genesis=g), board=None, folder=tmp_path)
    verified, stranger = proposal(settings), dataclasses.replace(proposal(settings), search_seed=8)
    rounds.book(4).update_checked(verified, ProposalCheck(verified.id, verified.fitness, verified.fitness))
    admitted = list(CIDS[:2])
    assert rounds.recipe(4, admitted) == g.recipe(4, admitted)  # nothing adopted yet: the genesis's
    rounds.adopted[4] = verified
    assert rounds.recipe(4, admitted) == round_recipe(g, 4, admitted, verified)
    assert rounds.acceptable(4, round_recipe(g, 4, admitted, verified))
    assert rounds.acceptable(4, g.recipe(4, admitted))  # the fallback stays acceptable
    assert not rounds.acceptable(4, round_recipe(g, 4, admitted, stranger))  # never verified here
    assert not rounds.acceptable(5, round_recipe(g, 5, admitted, verified))  # verified for round 4 only
    forged = round_recipe(g, 4, admitted, verified)
    params = {**forged.parameters, "global": {"density": 0.9, "weight": 1.0}}  # the id, other settings
    forged = type(forged).build(**{**forged.to_dict(), "parameters": params})
    assert not rounds.acceptable(4, forged)


def test_searchers_draw_their_own_seed_per_round():
    seeds = {searcher_seed(bytes([k]) * 32, r) for k in (1, 2) for r in (0, 1)}
    assert len(seeds) == 4 and seeds == {searcher_seed(bytes([k]) * 32, r) for k in (1, 2) for r in (0, 1)}


def test_a_gradient_searcher_claims_the_fitness_a_verifier_recomputes(tmp_path):
    from node.search_inputs import make_evaluator
    from node.search_round import _Inputs
    from tests.search.tiny_models import EXPERT_NAMES, build_tiny_models

    models = build_tiny_models(tmp_path / "models")
    settings = make_search_settings(["arithmetic", "lists"], limit=3, budget=4, optimizer="gradient")
    g = genesis(settings.to_dict(), method="task_arithmetic", parameters={"weight": 0.5})
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[name])} for name in EXPERT_NAMES],
        "parameters": {"weight": 0.5},
        "dtype": "float32",
    }
    inputs = SimpleNamespace(
        candidates=EXPERT_NAMES, config=config, evaluator=make_evaluator(config, settings)
    )
    rounds = SearchRound(SimpleNamespace(genesis=g), board=None, folder=tmp_path / "rounds")
    parameters, claim = rounds._search(0, inputs, seed=1)
    recomputed = _Inputs.recompute(inputs, SimpleNamespace(parameters=parameters))
    assert recomputed == claim  # the engine's merge, scored as every verifier scores it
    genesis_recipe = SimpleNamespace(parameters={"models": {}, "global": {"weight": 0.5}})
    assert claim > _Inputs.recompute(inputs, genesis_recipe)  # the search improved on the uniform merge
    header = (tmp_path / "rounds" / "0-journal" / "journal.jsonl").read_text().splitlines()[0]
    assert '"optimizer":"gradient"' in header and '"cma"' not in header
