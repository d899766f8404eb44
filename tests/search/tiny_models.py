"""Tiny synthetic base and experts for the search tests (built in the test session, no zoo)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

EXPERT_NAMES = ("alpha", "beta")


def _tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def build_tiny_models(root: Path) -> dict[str, Path]:
    """`base` and two experts: the base plus seeded noise on the layer weights (embeddings and
    norms left alone, as the zoo's experts leave them)."""
    from merging.testbed.tokenizers_build import char_tokenizer

    tokenizer = char_tokenizer()
    model = _tiny_llama(tokenizer)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {}
    for index, name in enumerate(("base", *EXPERT_NAMES)):
        generator = torch.Generator().manual_seed(100 + index)
        state = {}
        for key, value in base_state.items():
            if index and ".layers." in key and "norm" not in key:
                value = value + 0.2 * torch.randn(value.shape, generator=generator)
            state[key] = value
        model.load_state_dict(state)
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        paths[name] = folder
    return paths


def write_config(path: Path, models: dict[str, Path], method: str = "ties", **extra) -> Path:
    """A uniform config over the tiny experts."""
    params = {"weight": 0.5, "density": 0.7} if method != "task_arithmetic" else {"weight": 0.5}
    data = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[name]), "parameters": dict(params)} for name in EXPERT_NAMES],
        "dtype": "float32",
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path
