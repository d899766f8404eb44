"""Tiny Llama models built from a config in the test session (no downloads): a base and experts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = [f"t{i}" for i in range(60)] + ["<unk>", "<s>", "</s>", "<pad>"]


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    )


def make_base(folder: Path, seed: int = 0, hidden: int = 32) -> dict[str, torch.Tensor]:
    """A 2-layer Llama with hidden size 32 (float32), saved as a loadable HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_expert(base_dir: Path, folder: Path, seed: int, scale: float = 0.02) -> None:
    """base + a seeded random delta on every tensor, with the base's config and tokenizer."""
    from safetensors.torch import load_file

    base = load_file(base_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    expert = {k: (v + torch.randn(v.shape, generator=gen) * scale).contiguous() for k, v in base.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(expert, folder / "model.safetensors", metadata={"format": "pt"})
    for side in base_dir.iterdir():
        if side.name != "model.safetensors":
            (folder / side.name).write_bytes(side.read_bytes())
