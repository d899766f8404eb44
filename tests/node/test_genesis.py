"""Genesis records, DHT record parsing, node state; the node CLI's help and one-line errors."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from node_models import VOCAB, make_base

from node.cli import cli
from node.genesis import GenesisError, create_genesis, open_genesis, read_base_manifest
from node.records import make_record, parse_record
from node.state import NodeState
from node.store import ContentStore
from protocol.chunks import decode_tensors
from protocol.encoding import pack, unpack
from protocol.identity import Identity


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("genesis") / "base"
    make_base(folder)
    return folder


def test_genesis_roundtrip_serves_the_base_as_chunks(base_dir, tmp_path):
    creator = Identity.from_seed(b"\x01" * 32)
    with ContentStore(tmp_path / "store") as store:
        genesis, record = create_genesis("unit-net", base_dir, creator, store, quorum=2)
        assert open_genesis(record) == genesis
        assert re.fullmatch(r"unit-net\.[0-9a-f]{16}", genesis.network_id)
        assert genesis.network_id.endswith(genesis.id[:16])
        entries = read_base_manifest(store.get(genesis.base_manifest))
        from safetensors.torch import load_file

        original = load_file(base_dir / "model.safetensors")
        rebuilt = decode_tensors(entries, store.get, genesis.chunk_size)
        assert sorted(rebuilt) == sorted(original)
        assert all((rebuilt[k] == original[k]).all() for k in original)
        assert set(genesis.base_files) == {
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        }
        assert store.get(genesis.base_files["config.json"]) == (base_dir / "config.json").read_bytes()


def test_tampered_or_foreign_genesis_is_rejected(base_dir, tmp_path):
    creator = Identity.from_seed(b"\x02" * 32)
    with ContentStore(tmp_path / "store") as store:
        genesis, record = create_genesis("unit-net", base_dir, creator, store)
    fields = unpack(record, max_size=1 << 20)
    body = unpack(fields["body"], max_size=1 << 20)
    body["quorum"] = 1
    forged = pack({"body": pack(body), "signature": fields["signature"]})
    with pytest.raises(
        GenesisError, match="expected a valid genesis record, got: expected a valid signature"
    ):
        open_genesis(forged)
    with pytest.raises(GenesisError, match=f"expected genesis 0000, got genesis {genesis.id}"):
        open_genesis(record, expected_id="0000")
    with pytest.raises(GenesisError, match="exactly 'body' and 'signature'"):
        open_genesis(pack({"body": fields["body"]}))


def test_genesis_settings_are_checked(base_dir, tmp_path):
    creator = Identity.from_seed(b"\x03" * 32)
    with ContentStore(tmp_path / "store") as store:
        with pytest.raises(GenesisError, match="merge settings the engine accepts"):
            create_genesis("unit-net", base_dir, creator, store, method="no_such_method")
        with pytest.raises(GenesisError, match="reads their input Grams"):
            create_genesis("unit-net", base_dir, creator, store, method="regmean", parameters={})
        with pytest.raises(GenesisError, match="network name matching"):
            create_genesis("Bad Name", base_dir, creator, store)
        with pytest.raises(GenesisError, match=r"outlier factor > 1\.0, got 0\.5"):
            create_genesis("unit-net", base_dir, creator, store, outlier_factor=0.5)


def test_records_accept_only_their_exact_layout():
    good = make_record("contrib", card=b"env", manifest="ab" * 32, p2p="Qm")
    assert parse_record("contrib", good) == {"card": b"env", "manifest": "ab" * 32, "p2p": "Qm"}
    assert parse_record("contrib", pack({"card": b"env", "manifest": "AB" * 32, "p2p": "Qm"})) is None
    assert parse_record("contrib", pack({"card": b"env", "manifest": "ab" * 32, "p2p": "Qm", "x": 1})) is None
    assert parse_record("peers", pack({"p2p": "Qm", "signer": b"k", "latest": "0"})) is None
    assert parse_record("peers", b"\xc1 not msgpack") is None
    with pytest.raises(RuntimeError, match="do not form a valid result record"):
        make_record("result", result="short", attestation=b"", p2p="Qm")


def test_state_persists_values(tmp_path):
    with NodeState(tmp_path) as state:
        state.set("round", 3)
        state.set("contribution/3", {"card": b"c", "manifest": "m"})
    with NodeState(tmp_path) as state:
        assert state.get("round") == 3
        assert state.get("contribution/3") == {"card": b"c", "manifest": "m"}
        assert state.get("absent", "default") == "default"
        assert state.keys("contribution/") == ["contribution/3"]


NODE_COMMANDS = [["network", "create"], ["node", "start"], ["contribute"], ["pull"], ["status"]]


@pytest.mark.parametrize("command", NODE_COMMANDS, ids=" ".join)
def test_every_node_command_has_help_with_an_example(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example: umm " in result.output


def test_network_create_prints_the_network_id(base_dir, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "network",
            "create",
            "cli-net",
            "--base",
            str(base_dir),
            "--data-dir",
            str(tmp_path / "n1"),
            "--out",
            str(tmp_path / "genesis.bin"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert re.fullmatch(r"network: cli-net\.[0-9a-f]{16}", lines[0])
    genesis = open_genesis((tmp_path / "genesis.bin").read_bytes())
    assert lines == [f"network: {genesis.network_id}", f"genesis: {genesis.id}", lines[2]]
    assert lines[2].startswith("creator: umm1")


def test_bad_params_are_one_error_line(base_dir, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "network",
            "create",
            "cli-net",
            "--base",
            str(base_dir),
            "--data-dir",
            str(tmp_path),
            "--params",
            "[1, 2]",
        ],
    )
    assert result.exit_code == 2
    assert result.output == "Error: expected --params to be a map, got list\n"


def test_contribute_without_a_network_is_one_error_line(base_dir, tmp_path):
    result = CliRunner().invoke(cli, ["contribute", str(base_dir), "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert (
        result.output
        == f"Error: expected a node data folder with a network genesis at {tmp_path}, got none\n"
    )
    assert not (tmp_path / "state.sqlite").exists() and not (tmp_path / "store").exists()


def test_maddrs_file_is_read_or_reported_missing(tmp_path):
    from node.cli.node_cmd import _read_maddrs_file
    from node.errors import NodeError

    path = tmp_path / "maddrs"
    with pytest.raises(NodeError, match=f"expected a multiaddr file at {path} within 0.1 s, got none"):
        _read_maddrs_file(path, timeout=0.1)
    path.write_text("\n")
    with pytest.raises(NodeError, match="got an empty file"):
        _read_maddrs_file(path, timeout=0.1)
    path.write_text("/ip4/10.0.0.2/tcp/4001/p2p/QmA\n\n/ip4/127.0.0.1/tcp/4001/p2p/QmA\n")
    assert _read_maddrs_file(path, timeout=0.1) == [
        "/ip4/10.0.0.2/tcp/4001/p2p/QmA",
        "/ip4/127.0.0.1/tcp/4001/p2p/QmA",
    ]


def test_contribute_refuses_a_base_other_than_the_networks(base_dir, tmp_path):
    runner = CliRunner()
    created = runner.invoke(
        cli, ["network", "create", "cli-net", "--base", str(base_dir), "--data-dir", str(tmp_path / "n1")]
    )
    assert created.exit_code == 0, created.output
    other = tmp_path / "other-base"
    make_base(other, seed=1)
    result = runner.invoke(
        cli, ["contribute", str(base_dir), "--data-dir", str(tmp_path / "n1"), "--base", str(other)]
    )
    assert result.exit_code == 2
    assert result.output == f"Error: expected {other} to be the network's base model, got other weights\n"
    result = runner.invoke(
        cli,
        [
            "contribute",
            str(base_dir),
            "--data-dir",
            str(tmp_path / "n1"),
            "--network",
            "other.0000000000000000",
        ],
    )
    assert result.exit_code == 2
    assert result.output.startswith("Error: expected the node in ")


PROBES = ["t1 t2 t3", "t4 t5", "t6 t7 t8 t9"]


def test_an_expert_of_another_architecture_publishes_a_distribution_summary(base_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from node.contribute import contribute
    from protocol.envelope import open_envelope
    from protocol.messages import DistributionSummary
    from protocol.summary import decode_summary, probe_set_fingerprint

    other = tmp_path / "wider"
    make_base(other, seed=3, hidden=48)
    creator = Identity.from_seed(b"\x04" * 32)
    data = tmp_path / "n1"
    with ContentStore(data / "store") as store, NodeState(data) as state:
        genesis, record = create_genesis("unit-net", base_dir, creator, store, probe_set=PROBES)
        state.set("genesis", record)
    assert genesis.probe_set_fingerprint == probe_set_fingerprint(PROBES)
    done = contribute(data, other, k=4, max_new_tokens=6, name="wider")
    assert (done.kind, done.round) == ("summary", 0)
    with ContentStore(data / "store") as store, NodeState(data) as state:
        assert state.get("summary/0")["summary"] == done.manifest_id
        assert state.get("contribution/0") is None
        summary = open_envelope(
            store.get(done.manifest_id), DistributionSummary, network_id=genesis.network_id
        )
        assert (summary.message.k, summary.message.num_examples) == (4, 3)
        response_summary = decode_summary(summary.message, store.get, PROBES)
    assert response_summary.probe.prompts == tuple(PROBES) and len(response_summary.responses) == 3
    assert response_summary.model_name == "wider" and response_summary.k == 4
    # the first position's top-4 is the expert's own next-token distribution after the prompt
    model = LlamaForCausalLM.from_pretrained(other).eval()
    prompt = [VOCAB.index(word) for word in PROBES[0].split()]
    targets, top_ids, top_logprobs = response_summary.example(0)
    assert 1 <= len(targets) <= 7  # at most 6 response tokens and the end-of-sequence token
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + targets.tolist()])).logits[0, len(prompt) - 1]
    expected = torch.log_softmax(logits.double(), dim=-1).topk(4)
    assert top_ids[0].tolist() == expected.indices.tolist()
    assert top_logprobs[0].tolist() == pytest.approx(expected.values.tolist(), abs=1e-5)


def test_another_architecture_without_a_probe_set_is_refused(base_dir, tmp_path):
    from node.contribute import ArchitectureMismatchError, contribute

    other = tmp_path / "wider"
    make_base(other, seed=3, hidden=48)
    data = tmp_path / "n1"
    with ContentStore(data / "store") as store, NodeState(data) as state:
        _, record = create_genesis("unit-net", base_dir, Identity.from_seed(b"\x05" * 32), store)
        state.set("genesis", record)
    with pytest.raises(ArchitectureMismatchError, match="or a network with a probe set"):
        contribute(data, other)


def test_node_refuses_a_quorum_for_a_merge_it_did_not_compute(base_dir, tmp_path, monkeypatch):
    import asyncio
    from types import SimpleNamespace

    from protocol.decision import AttestedResult, AttestedRound

    with ContentStore(tmp_path / "store") as store:
        genesis, _ = create_genesis("unit-net", base_dir, Identity.from_seed(b"\x06" * 32), store)
    machine, service = _offline_machine(tmp_path / "node", genesis)
    candidates = ["11" * 32, "22" * 32]
    own = {
        "recipe": "aa" * 32,
        "fingerprint": "bb" * 32,
        "result": "cc" * 32,
        "candidates": candidates,
        "shards": 2,
        "attests": "cc" * 32,
        "attestation": b"a",
    }
    service.state.set("shard/0/1", own)  # this node computed shard 1 of 2
    service.state.set("view/0", [candidates, 2])

    def attested(shard: int, recipe_id: str, fingerprint: str) -> AttestedResult:
        message = SimpleNamespace(
            recipe=SimpleNamespace(id=recipe_id, contributions=tuple(candidates)),
            merged_fingerprint=fingerprint,
            tensors=(),
            shard=shard,
            shards=2,
            candidates=tuple(candidates),
            chunk_size=4096,
            round=0,
        )
        return AttestedResult(SimpleNamespace(id=f"{shard}d" * 32, message=message), [b"att"], 3)

    found = AttestedRound([attested(0, "aa" * 32, "01" * 32), attested(1, "ee" * 32, "ff" * 32)], "12" * 32)
    assert not asyncio.run(machine.record(0, found))
    assert service.state.get("latest") is None
    assert service.rounds.round == 0
    found = AttestedRound([attested(0, "aa" * 32, "01" * 32), attested(1, "aa" * 32, "bb" * 32)], "12" * 32)
    service.state.set("view/0", [[*candidates, "33" * 32], 2])  # it merged another candidate set
    assert not asyncio.run(machine.record(0, found))
    assert service.state.get("latest") is None
    service.state.set("view/0", [candidates, 2])
    # shard 0 was neither merged nor spot-checked here: a quorum alone does not move the node
    assert not asyncio.run(machine.record(0, found))
    assert service.state.get("latest") is None
    service.state.set("spot/0/0", {"result": "0d" * 32, "attestation": b"s"})  # its spot check passed
    assert asyncio.run(machine.record(0, found))
    latest = service.state.get("latest")
    assert latest["fingerprint"] == "12" * 32
    assert latest["results"] == ["0d" * 32, "1d" * 32]
    # shard 0 is re-announced with this node's sampled attestation, shard 1 with its full one
    assert latest["announce"] == [[0, "0d" * 32, b"s"], [1, "cc" * 32, b"a"]]
    assert service.rounds.round == 1


def test_a_node_merges_its_shards_then_after_the_fallback_time_the_ones_lacking_a_quorum(
    base_dir, tmp_path, monkeypatch
):
    import asyncio
    import dataclasses

    from node.rounds import RoundPlan
    from node.settings import FALLBACK_SECONDS
    from protocol.decision import ShardAttestations

    with ContentStore(tmp_path / "store") as store:
        genesis, _ = create_genesis("unit-net", base_dir, Identity.from_seed(b"\x07" * 32), store)
    held: dict[int, ShardAttestations] = {}
    machine, service = _offline_machine(tmp_path / "node", genesis, shards=held)
    others = [Identity.from_seed(bytes([n]) * 32).public_key for n in (21, 22, 23)]
    workers = tuple(sorted([service.identity.public_key, *others]))
    plan = RoundPlan(
        candidates=tuple(f"{n}{n}" * 32 for n in range(1, 5)),
        workers=workers,
        shards=(("a",), ("b",), ("c",), ("d",)),
        replicas=3,
        quorum=2,
    )
    position = workers.index(service.identity.public_key)
    mine = tuple(sorted({(position - t) % 4 for t in range(3)}))  # shards p-2, p-1, p
    (other,) = {0, 1, 2, 3} - set(mine)
    assert asyncio.run(machine.shards_to_compute(0, plan, 0.0)) == mine

    def attested_by(j: int, *signers: str) -> ShardAttestations:
        held = tuple(
            SimpleNamespace(message=SimpleNamespace(signer=s.encode(), kind="full")) for s in signers
        )
        return ShardAttestations(j, {"ab" * 32: held}, frozenset({4}))

    held.update({j: attested_by(j, "w1", "w2") for j in range(4)})
    held[other] = attested_by(other, "w1")  # one full attestation short of the quorum of 2
    assert asyncio.run(machine.shards_to_compute(0, plan, FALLBACK_SECONDS - 1)) == mine
    assert asyncio.run(machine.shards_to_compute(0, plan, FALLBACK_SECONDS)) == (0, 1, 2, 3)
    # the four workers alone (full or sampled) cannot reach the quorum: every node merges every shard
    assert asyncio.run(machine.shards_to_compute(0, dataclasses.replace(plan, quorum=4), 0.0)) == mine
    assert asyncio.run(machine.shards_to_compute(0, dataclasses.replace(plan, quorum=5), 0.0)) == (
        0,
        1,
        2,
        3,
    )


def test_a_node_attests_anothers_result_only_if_its_chunk_list_matches(base_dir, tmp_path, monkeypatch):
    import asyncio
    import dataclasses

    import torch

    from node.round_state import ShardMerge
    from protocol.aggregate import encode_result
    from protocol.envelope import sign_message
    from protocol.messages import SCHEMA_VERSION, MergeResult

    with ContentStore(tmp_path / "store") as store:
        genesis, _ = create_genesis("unit-net", base_dir, Identity.from_seed(b"\x08" * 32), store)
    board = {}
    published = []
    machine, service = _offline_machine(tmp_path / "node", genesis, records=board, published=published)
    candidates = ("11" * 32,)
    recipe = service.genesis.recipe(0, list(candidates))
    merged = {"w": torch.arange(6, dtype=torch.float32)}
    entries, _, fingerprint = encode_result(merged, service.genesis.chunk_size)

    def result(identity, tensors, created_at):
        return sign_message(
            MergeResult(
                v=SCHEMA_VERSION,
                network_id=service.network_id,
                signer=identity.public_key,
                created_at=created_at,
                round=0,
                recipe=recipe,
                chunk_size=service.genesis.chunk_size,
                tensors=tensors,
                merged_fingerprint=fingerprint,
                shard=0,
                shards=1,
                candidates=candidates,
            ),
            identity,
        )

    ours = result(service.identity, entries, 1_700_000_000)
    service.store.put(ours.raw, ours.id)
    other = Identity.from_seed(b"\x09" * 32)
    wrong_chunks = (dataclasses.replace(entries[0], chunks=("ab" * 32,)),)  # same fingerprint, other bytes
    theirs = {}
    for label, tensors in (("same", entries), ("other chunks", wrong_chunks)):
        created = 1_700_000_000
        while (candidate := result(other, tensors, created)).id >= ours.id:
            created += 1  # a smaller id than ours: the one every node would pick as canonical
        service.store.put(candidate.raw, candidate.id)
        theirs[label] = candidate
    own = {
        "recipe": recipe.id,
        "result": ours.id,
        "fingerprint": fingerprint,
        "candidates": list(candidates),
        "shards": 1,
        "attests": "",
        "attestation": b"",
    }
    for label, expected in (("other chunks", ours.id), ("same", theirs["same"].id)):
        record = make_record("result", result=theirs[label].id, attestation=b"x", p2p="peer")
        board.clear()
        board["them"] = record
        asyncio.run(machine.worker.attest_canonical(0, 0, ShardMerge.decode(own)))
        assert service.state.get("shard/0/0")["attests"] == expected, label
    assert [p["result"] for p in published] == [ours.id, ours.id]  # our result, attested either way


def _offline_machine(data_dir, genesis, *, shards=None, records=None, published=None):
    """A node's round machine with no DHT or daemon: fetch does nothing, publish appends the
    record to `published`, shard j's records are `shards[j]` (or the result records `records`)."""
    from types import SimpleNamespace

    from node.datafolder import load_or_create_identity
    from node.lookups import ShardRecords, read_shard_records
    from node.round_context import RoundContext
    from node.round_machine import RoundMachine
    from node.round_state import RoundState
    from protocol.decision import ShardAttestations

    store = ContentStore(data_dir / "store")
    state = NodeState(data_dir)

    class Board:
        async def aread(self, _key, *, latest=True):
            return dict(records or {})

    async def no_fetch(*_args, **_kwargs):
        return None

    async def publish(_key, value):
        if published is not None:
            published.append(parse_record("result", value))

    async def read_shard(r, j):
        if shards is not None:
            return ShardRecords(shards.get(j, ShardAttestations(j, {}, frozenset())), {})
        return await read_shard_records(Board(), genesis.network_id, r, j)

    ctx = RoundContext(
        genesis=genesis,
        identity=load_or_create_identity(data_dir),
        store=store,
        rounds=RoundState(state),
        fetch=no_fetch,
        publish=publish,
        read_shard=read_shard,
        peer_id="own-peer",
    )
    view = SimpleNamespace(
        identity=ctx.identity,
        store=store,
        state=state,
        rounds=ctx.rounds,
        genesis=genesis,
        network_id=genesis.network_id,
    )
    return RoundMachine(ctx, Board()), view


def test_network_create_with_search_writes_the_settings_into_the_genesis(base_dir, tmp_path):
    from protocol.search_rules import dev_set_fingerprint

    args = ["network", "create", "cli-search", "--base", str(base_dir), "--data-dir", str(tmp_path / "n1")]
    args += ["--search-tasks", "arithmetic,logic", "--search-limit", "3", "--search-budget", "7"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "genesis.bin")])
    assert result.exit_code == 0, result.output
    settings = open_genesis((tmp_path / "genesis.bin").read_bytes()).search_settings
    assert (settings.tasks, settings.limit, settings.budget) == (("arithmetic", "logic"), 3, 7)
    assert settings.dev_fingerprint == dev_set_fingerprint(["arithmetic", "logic"], 3)
    bad = CliRunner().invoke(cli, [*args, "--search-metric", "accuracy"])
    assert bad.exit_code == 2
    assert bad.output.startswith("Error: expected a teacher-forced metric among loglik, seqprob, tf_exact")
    assert len(bad.output.splitlines()) == 1
    rows = CliRunner().invoke(cli, [*args, "--search-granularity", "row"])
    assert rows.exit_code == 2 and "the row granularity is for local searches only" in rows.output
    assert len(rows.output.splitlines()) == 1
    ties = CliRunner().invoke(cli, [*args, "--search-optimizer", "gradient"])  # the default method
    assert ties.exit_code == 2 and "linear in its weights" in ties.output
    assert len(ties.output.splitlines()) == 1
    search = args[7:]  # the --search-* options above, for a second network in another folder
    gradient = ["network", "create", "cli-gradient", "--base", str(base_dir)]
    gradient += ["--data-dir", str(tmp_path / "n2")]
    gradient += [*search, "--search-optimizer", "gradient", "--method", "task_arithmetic"]
    result = CliRunner().invoke(
        cli, [*gradient, "--params", "{weight: 0.5}", "--out", str(tmp_path / "g2.bin")]
    )
    assert result.exit_code == 0, result.output
    assert open_genesis((tmp_path / "g2.bin").read_bytes()).search_settings.optimizer == "gradient"
