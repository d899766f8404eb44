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
