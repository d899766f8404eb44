"""Merging Hugging Face folders: loadable output, sharding, atomic writes, identical bytes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import merging.blocks
from merging.engine import merge, merge_state_dicts
from merging.errors import MergeError, NonFiniteError, ShapeMismatchError
from merging.folders import ModelFolder

TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _save(model: LlamaForCausalLM, folder: Path, **kwargs) -> Path:
    model.to(torch.bfloat16).save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A random tiny Llama base and two experts (base + small perturbations), bf16; one sharded."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY))
    folders = {"base": _save(base, root / "base")}
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    for number, name in enumerate(("math", "code")):
        expert = LlamaForCausalLM(LlamaConfig(**TINY))
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for parameter in expert.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02 * (number + 1))
        kwargs = {"max_shard_size": "20KB"} if name == "code" else {}
        folders[name] = _save(expert, root / name, **kwargs)
    return folders


def _config(zoo, method="ties", **extra):
    data = {
        "merge_method": method,
        "base_model": str(zoo["base"]),
        "models": [
            {"model": str(zoo["math"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(zoo["code"]), "parameters": {"weight": 0.4, "density": [0.3, 0.9]}},
        ],
        "dtype": "bfloat16",
    }
    data.update(extra)
    return data


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_merged_tiny_llama_loads_and_generates(zoo, tmp_path):
    assert (zoo["code"] / "model.safetensors.index.json").is_file()  # a sharded input
    out = merge(_config(zoo), tmp_path / "merged", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokens = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 7)
    assert model.dtype == torch.bfloat16
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}\n'
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    record = json.loads((out / "umm_merge.json").read_text())
    assert record["config"]["merge_method"] == "ties"
    assert set(record["inputs"]) == {str(zoo[n]) for n in ("base", "math", "code")}
    assert "model.safetensors.index.json" in record["inputs"][str(zoo["code"])]
    assert all(len(digest) == 64 for files in record["inputs"].values() for digest in files.values())


def _state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


@pytest.mark.parametrize("method", ["dare_ties", "slerp"])
def test_file_merge_equals_the_in_memory_merge_and_repeats_byte_for_byte(zoo, tmp_path, method, monkeypatch):
    if method == "slerp":
        config = {
            "merge_method": "slerp",
            "base_model": str(zoo["base"]),
            "models": [{"model": str(zoo["base"])}, {"model": str(zoo["math"])}],
            "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.3}]},
        }
    else:
        config = _config(zoo, method, seed=5)
    first = merge(config, tmp_path / "one", progress=False)
    monkeypatch.setattr(merging.blocks, "BLOCK_ELEMENTS", 200)  # many row blocks per tensor
    second = merge(config, tmp_path / "two", progress=False)
    assert _files(first) == _files(second)
    states = {str(zoo[n]): _state(zoo[n]) for n in ("base", "math", "code")}
    in_memory = merge_state_dicts(config, states)
    on_disk = _state(first)
    assert list(on_disk) == sorted(in_memory) or set(on_disk) == set(in_memory)
    for name, tensor in in_memory.items():
        assert torch.equal(tensor.view(torch.int16), on_disk[name].view(torch.int16)), name


def test_output_is_sharded_with_an_index(zoo, tmp_path):
    out = merge(
        _config(zoo, "task_arithmetic", models=[{"model": str(zoo["math"]), "parameters": {"weight": 1.0}}]),
        tmp_path / "sharded",
        progress=False,
        max_shard_bytes=30_000,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in _state(out).values())
    AutoModelForCausalLM.from_pretrained(out)


def test_float32_output_dtype(zoo, tmp_path):
    out = merge(_config(zoo, dtype="float32"), tmp_path / "f32", progress=False)
    assert {t.dtype for t in _state(out).values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_passthrough_slices_stack_layers(zoo, tmp_path):
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(zoo["math"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(zoo["code"]), "layer_range": [1, 3]}]},
        ],
    }
    out = merge(config, tmp_path / "stacked", progress=False)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    merged, math_state, code_state = _state(out), _state(zoo["math"]), _state(zoo["code"])
    key = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(merged[key.format(1)], math_state[key.format(1)])
    assert torch.equal(merged[key.format(2)], code_state[key.format(1)])
    assert torch.equal(merged[key.format(3)], code_state[key.format(2)])
    assert torch.equal(merged["model.embed_tokens.weight"], math_state["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], code_state["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(torch.tensor([[3, 4]]), max_new_tokens=2, min_new_tokens=2).shape == (1, 4)


def test_a_failed_merge_keeps_the_previous_output(zoo, tmp_path):
    out = merge(_config(zoo), tmp_path / "out", progress=False)
    before = _files(out)
    broken = tmp_path / "broken"
    _save(LlamaForCausalLM(LlamaConfig(**TINY)), broken)
    state = load_file(broken / "model.safetensors")
    state["model.layers.2.mlp.down_proj.weight"][0, 0] = float("inf")
    from safetensors.torch import save_file

    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    config = _config(zoo)
    config["models"][1]["model"] = str(broken)
    with pytest.raises(
        NonFiniteError, match=f"tensor 'model.layers.2.mlp.down_proj.weight' of model '{broken}'"
    ):
        merge(config, out, progress=False)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]  # no temp folder left


def test_architecture_and_shape_mismatches_are_reported(zoo, tmp_path):
    wide = _save(LlamaForCausalLM(LlamaConfig(**{**TINY, "intermediate_size": 64})), tmp_path / "wide")
    config = _config(zoo)
    config["models"][1]["model"] = str(wide)
    with pytest.raises(
        ShapeMismatchError,
        match=r"tensor 'model.layers.0.mlp.down_proj.weight' of model .* "
        r"has shape \[32, 64\], expected \[32, 48\]",
    ):
        merge(config, tmp_path / "never", progress=False)
    other = json.loads((wide / "config.json").read_text())
    other["architectures"] = ["MistralForCausalLM"]
    (wide / "config.json").write_text(json.dumps(other))
    with pytest.raises(ShapeMismatchError, match="has architectures \\['MistralForCausalLM'\\], expected"):
        merge(config, tmp_path / "never", progress=False)
    config["models"][1]["model"] = str(tmp_path / "absent")
    with pytest.raises(MergeError, match="is not a local folder"):
        merge(config, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_mapped_reads_survive_released_pages_and_never_write_the_file(zoo):
    shard = zoo["base"] / "model.safetensors"
    before = shard.read_bytes()
    expected = load_file(shard)["model.embed_tokens.weight"]
    with ModelFolder("base", zoo["base"]) as folder:
        read = folder.reader("model.embed_tokens.weight")
        release = folder.releaser("model.embed_tokens.weight")
        rows = read(10, 60)
        assert torch.equal(rows, expected[10:60])
        release(0, 96)  # the pages go; the view stays valid and maps them again
        assert torch.equal(rows, expected[10:60])
        rows.fill_(7.0)  # a private map: the process sees its own copy, the file is untouched
        assert bool((read(10, 60) == 7.0).all())
    assert shard.read_bytes() == before
