"""Search settings in the genesis (off by default, bytes unchanged), and the round recipe built
from a verified proposal: what the shards merge and what attestations cover."""

from __future__ import annotations

import pytest
import torch

from merging.engine import merge_state_dicts
from protocol.aggregate import aggregate, recipe_config
from protocol.encoding import pack
from protocol.encoding import unpack as unpack_sized
from protocol.genesis import Genesis, GenesisError, open_genesis, sign_genesis
from protocol.messages import SCHEMA_VERSION
from protocol.proposal import SearchProposal
from protocol.search_rules import (
    SearchSettings,
    SearchSettingsError,
    describe_recipes,
    dev_set_fingerprint,
    make_search_settings,
    recipe_proposal,
    round_recipe,
)
from tests.protocol.conftest import NOW, identity

CIDS = ("aa" * 32, "bb" * 32, "cc" * 32)
OLD_FIELDS = (  # a genesis's fields before search existed
    "name",
    "created_at",
    "creator",
    "base_fingerprint",
    "architecture_fingerprint",
    "tokenizer_fingerprint",
    "base_manifest",
    "base_files",
    "chunk_size",
    "method",
    "parameters",
    "dtype",
    "quorum",
    "members",
    "outlier_factor",
    "min_contributions",
    "settle_seconds",
    "probe_set_fingerprint",
    "v",
)


@pytest.fixture(scope="module")
def settings() -> SearchSettings:
    return make_search_settings(["arithmetic", "logic"], limit=3, budget=5, keys=("weight", "density"))


def unpack(data: bytes):
    return unpack_sized(data, max_size=1 << 20)


def genesis(search: dict | None = None, **changes) -> Genesis:
    fields = dict(
        name="searched",
        created_at=NOW,
        creator=identity(1).public_key,
        base_fingerprint="ba" * 32,
        architecture_fingerprint="ac" * 32,
        tokenizer_fingerprint="70" * 32,
        base_manifest="11" * 32,
        base_files={"config.json": "22" * 32},
        chunk_size=4096,
        method="ties",
        parameters={"density": 0.5, "weight": 1.0},
        dtype="float32",
        quorum=0,
        members=None,
        outlier_factor=3.0,
        min_contributions=2,
        settle_seconds=2.0,
        probe_set_fingerprint="",
        search=search,
    )
    fields.update(changes)
    return Genesis(**fields)


def test_a_genesis_without_search_keeps_the_bytes_of_networks_before_search():
    g = genesis()
    old = {name: getattr(g, name) for name in OLD_FIELDS}
    assert g.body_bytes() == pack(old)
    record = sign_genesis(g, identity(1))
    assert "search" not in unpack(unpack(record)["body"])
    assert open_genesis(record) == g and open_genesis(record).search_settings is None


def test_a_genesis_with_search_round_trips_and_its_settings_are_checked(settings):
    g = genesis(settings.to_dict())
    opened = open_genesis(sign_genesis(g, identity(1)))
    assert opened.search_settings == settings
    assert opened.id != genesis().id
    tampered = {**settings.to_dict(), "dev_fingerprint": "00" * 32}
    with pytest.raises(GenesisError, match="dev_fingerprint"):
        open_genesis(sign_genesis(genesis(tampered), identity(1)))
    with pytest.raises(GenesisError, match="density"):  # task arithmetic has no density to search
        open_genesis(
            sign_genesis(
                genesis(settings.to_dict(), method="task_arithmetic", parameters={"weight": 1.0}), identity(1)
            )
        )
    body = unpack(unpack(sign_genesis(g, identity(1)))["body"])
    body["search"] = None
    record = pack({"body": pack(body), "signature": identity(1).sign(pack(["umm-genesis-v1", pack(body)]))})
    with pytest.raises(GenesisError, match="nil"):
        open_genesis(record)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"budget": 0}, "budget"),
        ({"metric": "accuracy"}, "teacher-forced"),
        ({"tasks": ["no-such-task"]}, "no-such-task"),
        ({"granularity": "rows"}, "granularity"),
        ({"granularity": "row"}, "local searches only"),  # proposals carry no row-weights file
        ({"keys": ["temperature"]}, "keys"),
        ({"wait_seconds": 5}, "wait_seconds"),
        ({"limit": 4}, "dev_fingerprint"),  # another dev set than the fingerprint names
        ({"optimizer": "sgd"}, "search optimizer"),
        ({"seed": 3}, "optionally"),
    ],
)
def test_bad_search_settings_are_one_clear_error(settings, change, words):
    with pytest.raises(SearchSettingsError, match=words):
        SearchSettings.from_dict({**settings.to_dict(), **change})


def test_the_gradient_optimizer_is_named_in_the_genesis_only_when_chosen(settings):
    assert "optimizer" not in settings.to_dict() and settings.optimizer == "cma"
    gradient = make_search_settings(["arithmetic", "logic"], limit=3, budget=5, optimizer="gradient")
    assert gradient.to_dict()["optimizer"] == "gradient"
    g = genesis(gradient.to_dict(), method="task_arithmetic", parameters={"weight": 0.5})
    assert open_genesis(sign_genesis(g, identity(1))).search_settings == gradient
    with pytest.raises(GenesisError, match="linear in its weights"):  # TIES elects signs: no gradient
        open_genesis(sign_genesis(genesis(gradient.to_dict()), identity(1)))
    with pytest.raises(SearchSettingsError, match="differentiable metric"):
        make_search_settings(["arithmetic"], limit=3, metric="tf_exact", optimizer="gradient").check_method(
            "task_arithmetic"
        )


def test_the_dev_fingerprint_names_the_tasks_and_the_prompt_count():
    one = dev_set_fingerprint(["arithmetic"], 3)
    assert one == dev_set_fingerprint(["arithmetic"], 3)
    assert len({one, dev_set_fingerprint(["arithmetic"], 4), dev_set_fingerprint(["logic"], 3)}) == 3


def proposal(settings: SearchSettings) -> SearchProposal:
    return SearchProposal(
        v=SCHEMA_VERSION,
        network_id=genesis().network_id,
        signer=identity(2).public_key,
        created_at=NOW,
        round=4,
        candidates=CIDS,
        method="ties",
        parameters={
            "models": {
                CIDS[0]: {"weight": [{"filter": "layers.0.", "value": 0.25}, {"value": 0.75}]},
                CIDS[1]: {"weight": 0.5, "density": 0.9},
            },
            "global": {"density": 0.5, "weight": 1.0},
        },
        dev_fingerprint=settings.dev_fingerprint,
        fitness=0.5,
        search_seed=7,
    )


def test_a_searched_recipe_merges_each_admitted_expert_with_its_parameters(settings):
    g, p = genesis(settings.to_dict()), proposal(settings)
    recipe = round_recipe(g, 4, [CIDS[1], CIDS[0]], p)
    assert recipe.contributions == CIDS[:2] and recipe_proposal(recipe) == p.id
    assert recipe.method == "ties" and recipe.network_id == g.network_id
    config = recipe_config(recipe)
    assert [m.model for m in config.models] == list(CIDS[:2])
    assert config.models[1].parameters == {"weight": 0.5, "density": 0.9}
    names = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight")
    gen = torch.Generator().manual_seed(3)
    base = {n: torch.randn(4, 6, generator=gen) for n in names}
    deltas = {c: {n: 0.1 * torch.randn(4, 6, generator=gen) for n in names} for c in CIDS[:2]}
    merged = aggregate(recipe, base, deltas)
    by_hand = {  # the same merge written as a plain engine config, experts named by hand
        "merge_method": "ties",
        "base_model": "b",
        "models": [
            {
                "model": "x",
                "parameters": {"weight": [{"filter": "layers.0.", "value": 0.25}, {"value": 0.75}]},
            },
            {"model": "y", "parameters": {"weight": 0.5, "density": 0.9}},
        ],
        "parameters": {"density": 0.5, "weight": 1.0},
        "dtype": "float32",
        "seed": recipe.seed,
    }
    experts = {m: {n: base[n] + deltas[c][n] for n in names} for m, c in (("x", CIDS[0]), ("y", CIDS[1]))}
    expected = merge_state_dicts(by_hand, {"b": base, **experts})
    assert all(torch.equal(merged[n], expected[n]) for n in names)
    assert round_recipe(g, 4, CIDS[:2], None) == g.recipe(4, list(CIDS[:2]))  # no proposal: the genesis's


def test_pull_names_the_recipe_a_model_used(settings):
    g, p = genesis(settings.to_dict()), proposal(settings)
    assert describe_recipes([g.recipe(0, list(CIDS))]) == "ties, the genesis recipe"
    searched = [round_recipe(g, 0, CIDS[:1], p), round_recipe(g, 0, CIDS[:2], p)]
    assert describe_recipes(searched) == f"ties, searched: proposal {p.id[:16]}"
