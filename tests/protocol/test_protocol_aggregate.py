import json
import subprocess
import sys
import textwrap

import pytest
import torch

from protocol.aggregate import aggregate, encode_result
from protocol.errors import RecipeError, TensorMismatchError
from protocol.fingerprint import fingerprint_state_dict
from protocol.messages import MergeRecipe

# Builds the same inputs in any process; `run(method)` prints the merged fingerprint and digests.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from protocol.aggregate import aggregate, encode_result
    from protocol.messages import MergeRecipe

    def inputs(n_experts=3):
        gen = torch.Generator().manual_seed(1234)
        base = {
            "model.embed_tokens.weight": torch.randn(64, 32, generator=gen).bfloat16(),
            "model.layers.0.mlp.up_proj.weight": torch.randn(96, 32, generator=gen).bfloat16(),
            "model.layers.1.mlp.up_proj.weight": torch.randn(96, 32, generator=gen).bfloat16(),
            "model.norm.weight": torch.ones(32, dtype=torch.bfloat16),
        }
        ids = [f"{i:02x}" * 32 for i in range(n_experts, 0, -1)]
        deltas = {c: {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in base.items()} for c in ids}
        return base, deltas

    def recipe(method, ids, params):
        return MergeRecipe.build(network_id="testnet", round=3, method=method, parameters=params,
                                 base_fingerprint="ba" * 32, architecture_fingerprint="ac" * 32,
                                 contributions=ids, dtype="bfloat16")

    def run(method, params):
        base, deltas = inputs()
        merged = aggregate(recipe(method, list(deltas), params), base, deltas)
        entries, _, fingerprint = encode_result(merged)
        return {"fingerprint": fingerprint, "digests": {e.name: e.digest for e in entries}}

    if __name__ == "__main__":
        torch.set_num_threads(int(sys.argv[1]))
        print(json.dumps([run("dare_ties", {"density": 0.5, "weight": 1.0}),
                          run("ties", {"density": 0.3, "weight": [0.5, 1.0]})]))
    """
)


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("agg") / "aggregate_once.py"
    path.write_text(SCRIPT)
    return path


def load(script):
    namespace = {"__name__": "aggregate_once"}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    return namespace


def test_two_processes_produce_identical_bytes(script):
    procs = [  # two processes at once, with different torch thread counts
        subprocess.Popen([sys.executable, str(script), str(threads)], stdout=subprocess.PIPE, text=True)
        for threads in (1, 2)
    ]
    outputs = []
    try:
        for proc in procs:
            stdout, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0
            outputs.append(json.loads(stdout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert outputs[0] == outputs[1]
    here = load(script)
    assert outputs[0][0] == here["run"]("dare_ties", {"density": 0.5, "weight": 1.0})
    # different methods give different results: the comparison above is not vacuous
    assert outputs[0][0]["fingerprint"] != outputs[0][1]["fingerprint"]


def test_task_arithmetic_matches_plain_sum(script):
    here = load(script)
    base, deltas = here["inputs"]()
    recipe = MergeRecipe.build(
        network_id="testnet",
        round=1,
        method="task_arithmetic",
        parameters={"weight": 1.0},
        base_fingerprint="ba" * 32,
        architecture_fingerprint="ac" * 32,
        contributions=list(deltas),
        dtype="float32",
    )
    merged = aggregate(recipe, base, deltas)
    for name, tensor in base.items():
        expected = tensor.float()
        for delta in deltas.values():
            expected = expected + delta[name]
        assert merged[name].dtype == torch.float32
        assert torch.allclose(merged[name], expected, atol=1e-5)


def test_input_order_does_not_matter(script):
    here = load(script)
    base, deltas = here["inputs"]()
    reordered = dict(reversed(list(deltas.items())))
    r1 = here["recipe"]("ties", list(deltas), {"density": 0.5, "weight": 1.0})
    r2 = here["recipe"]("ties", list(reordered), {"density": 0.5, "weight": 1.0})
    assert r1 == r2 and r1.contributions == tuple(sorted(deltas))
    a = aggregate(r1, base, deltas)
    b = aggregate(r2, dict(reversed(list(base.items()))), reordered)
    assert fingerprint_state_dict(a) == fingerprint_state_dict(b)
    entries, chunks, fingerprint = encode_result(a, chunk_size=4096)
    assert fingerprint == fingerprint_state_dict(a) and len(chunks) >= len(entries)


def test_bad_inputs(script):
    here = load(script)
    base, deltas = here["inputs"]()
    recipe = here["recipe"]("ties", list(deltas), {"density": 0.5, "weight": 1.0})
    with pytest.raises(RecipeError, match="merge engine"):
        aggregate(here["recipe"]("no_such_method", list(deltas), {}), base, deltas)
    with pytest.raises(RecipeError):
        aggregate(here["recipe"]("ties", list(deltas), {"bogus": 1}), base, deltas)
    with pytest.raises(TensorMismatchError, match="recipe's contributions"):
        aggregate(recipe, base, dict(list(deltas.items())[:2]))
    first = recipe.contributions[0]
    short = {**deltas, first: {k: v for k, v in deltas[first].items() if k != "model.norm.weight"}}
    with pytest.raises(TensorMismatchError, match="every base tensor"):
        aggregate(recipe, base, short)
    wrong = {**deltas, first: {**deltas[first], "model.norm.weight": torch.zeros(31)}}
    with pytest.raises(TensorMismatchError, match="shape"):
        aggregate(recipe, base, wrong)
