import hashlib
import json

import msgpack
import pytest
import torch
from safetensors.torch import save_file

from protocol.errors import ModelFolderError
from protocol.fingerprint import (
    architecture_fingerprint,
    fingerprint_model,
    fingerprint_state_dict,
    read_tensor_infos,
    tokenizer_fingerprint,
    weights_fingerprint,
)

CONFIG = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "transformers_version": "5.0"}
TOKENIZER = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}, "added_tokens": []}


def tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(4, 8, generator=gen).bfloat16(),
        "layers.0.weight": torch.randn(8, 8, generator=gen),
        "norm.weight": torch.ones(8, dtype=torch.float16),
    }


def write_model(folder, state, shards=1, config=CONFIG, tokenizer_text=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    for i in range(shards):
        part = {n: state[n].contiguous() for n in names[i::shards]}
        save_file(part, str(folder / f"model-{i:05d}.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(tokenizer_text or json.dumps(TOKENIZER))
    return folder


def test_weights_fingerprint_matches_an_independent_computation(tmp_path):
    state = tensors()
    folder = write_model(tmp_path / "m", state)
    rows = sorted(
        [
            name,
            list(t.shape),
            str(t.dtype)[6:],
            hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest(),
        ]
        for name, t in state.items()
    )
    expected = hashlib.sha256(msgpack.packb(["umm-state-v1", rows], use_bin_type=True)).hexdigest()
    assert weights_fingerprint(folder) == expected == fingerprint_state_dict(state)


def test_sharding_does_not_change_fingerprints(tmp_path):
    one = fingerprint_model(write_model(tmp_path / "one", tensors(), shards=1))
    three = fingerprint_model(write_model(tmp_path / "three", tensors(), shards=3))
    assert one == three


def test_what_each_fingerprint_depends_on(tmp_path):
    ref = fingerprint_model(write_model(tmp_path / "ref", tensors()))
    changed_value = tensors()
    changed_value["norm.weight"][0] = 2.0
    value = fingerprint_model(write_model(tmp_path / "value", changed_value))
    assert value.base != ref.base and value.architecture == ref.architecture
    changed_shape = {**tensors(), "norm.weight": torch.ones(9, dtype=torch.float16)}
    assert architecture_fingerprint(write_model(tmp_path / "shape", changed_shape)) != ref.architecture
    changed_dtype = {**tensors(), "norm.weight": torch.ones(8, dtype=torch.float32)}
    assert architecture_fingerprint(write_model(tmp_path / "dtype", changed_dtype)) != ref.architecture
    other_version = {**CONFIG, "transformers_version": "5.1"}
    assert (
        architecture_fingerprint(write_model(tmp_path / "ver", tensors(), config=other_version))
        == ref.architecture
    )
    wider = {**CONFIG, "hidden_size": 16}
    assert (
        architecture_fingerprint(write_model(tmp_path / "cfg", tensors(), config=wider)) != ref.architecture
    )
    pretty = json.dumps(TOKENIZER, indent=4)
    assert (
        tokenizer_fingerprint(write_model(tmp_path / "pretty", tensors(), tokenizer_text=pretty))
        == ref.tokenizer
    )
    other_vocab = json.dumps({**TOKENIZER, "model": {"type": "BPE", "vocab": {"a": 1, "b": 0}}})
    assert (
        tokenizer_fingerprint(write_model(tmp_path / "vocab", tensors(), tokenizer_text=other_vocab))
        != ref.tokenizer
    )


def test_headers_only_for_architecture(tmp_path):
    folder = write_model(tmp_path / "m", tensors())
    infos = read_tensor_infos(folder)
    assert {n: (i.shape, i.dtype) for n, i in infos.items()} == {
        "embed.weight": ((4, 8), "bfloat16"),
        "layers.0.weight": ((8, 8), "float32"),
        "norm.weight": ((8,), "float16"),
    }


def test_bad_folders(tmp_path):
    with pytest.raises(ModelFolderError, match="safetensors files"):
        weights_fingerprint(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(ModelFolderError, match="JSON"):
        read_tensor_infos(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"\x01")
    with pytest.raises(ModelFolderError, match="header"):
        read_tensor_infos(tmp_path)
    folder = write_model(tmp_path / "m", tensors())
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match=r"tokenizer\.json or"):
        tokenizer_fingerprint(folder)
    (folder / "vocab.json").write_text("{}")
    assert len(tokenizer_fingerprint(folder)) == 64
    (folder / "config.json").write_text("[1]")
    with pytest.raises(ModelFolderError, match="JSON object"):
        architecture_fingerprint(folder)
