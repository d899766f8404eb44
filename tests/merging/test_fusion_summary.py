"""Response summaries: built from a tiny model, written, read back, and refused for another probe set.

The tiny models here (a character-level Llama pivot and a byte-level BPE GPT-2 source) are built in
the test, untrained; the other fusion tests import `tiny_pivot` and `tiny_source`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from merging.fusion import FusionError
from merging.fusion.summary import ProbeSet, load_summary, read_probe_file, save_summary, summarize
from merging.testbed.tokenizers_build import bpe_tokenizer, char_tokenizer

PROBE = ProbeSet(("Sort [5, 3, 1].\n", "Compute 60 + 96.\n", "Reverse [2, 7].\n"))


def tiny_pivot(seed: int = 0):
    tok = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config).eval(), tok


def tiny_source(seed: int = 1):
    tok = bpe_tokenizer([p + "ascending: 1 3 5\nAnswer: [1, 3, 5]" for p in PROBE.prompts] * 4, 300)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return GPT2LMHeadModel(config).eval(), tok


def save_tiny(model, tok, folder: Path) -> Path:
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_probe_fingerprint_is_the_genesis_fingerprint():
    from protocol.summary import probe_set_fingerprint

    assert PROBE.fingerprint() == probe_set_fingerprint(list(PROBE.prompts))
    with_references = ProbeSet(PROBE.prompts, ("a", "b", "c"))
    assert with_references.fingerprint() != PROBE.fingerprint()


def test_summary_holds_the_top_k_of_the_model_along_its_own_response():
    model, tok = tiny_source()
    summary = summarize(model, tok, PROBE, k=4, max_new_tokens=6)
    assert summary.k == 4 and len(summary.responses) == len(PROBE.prompts)
    for index, (prompt, response) in enumerate(zip(PROBE.prompts, summary.responses, strict=True)):
        targets, ids, logprobs = summary.example(index)
        response_ids = tok(response, add_special_tokens=False)["input_ids"]
        expected_targets = response_ids + ([tok.eos_token_id] if len(response_ids) < 6 else [])
        assert targets.tolist() == expected_targets
        prompt_ids = tok(prompt)["input_ids"]
        sequence = torch.tensor([prompt_ids + expected_targets])
        with torch.no_grad():
            logits = model(input_ids=sequence).logits[0]
        wanted = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
        top = torch.topk(wanted, 4, dim=-1)
        torch.testing.assert_close(logprobs, top.values, rtol=0, atol=1e-5)
        assert torch.equal(torch.gather(wanted, 1, ids.long()), logprobs)


def test_summary_round_trips_through_its_file(tmp_path):
    model, tok = tiny_source()
    summary = summarize(model, tok, PROBE, k=3, max_new_tokens=5, model_name="tiny")
    path = save_summary(summary, tmp_path / "s.summary")
    back = load_summary(path, PROBE)
    assert back.probe == PROBE and back.responses == summary.responses and back.model_name == "tiny"
    for name in ("offsets", "target_ids", "token_ids", "logprobs"):
        assert torch.equal(getattr(back, name), getattr(summary, name))
    assert back.vocabulary == summary.vocabulary


def test_a_summary_of_another_probe_set_is_refused(tmp_path):
    model, tok = tiny_source()
    path = save_summary(summarize(model, tok, PROBE, k=2, max_new_tokens=3), tmp_path / "s.summary")
    other = ProbeSet(PROBE.prompts[:2])
    with pytest.raises(FusionError, match="expected a summary of probe set"):
        load_summary(path, other)


def test_a_damaged_summary_file_is_refused(tmp_path):
    model, tok = tiny_source()
    path = save_summary(summarize(model, tok, PROBE, k=2, max_new_tokens=3), tmp_path / "s.summary")
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(FusionError, match="unreadable"):
        load_summary(path)
    with pytest.raises(FusionError, match="found none"):
        load_summary(tmp_path / "missing.summary")


def test_reference_responses_are_teacher_forced_and_closed():
    model, tok = tiny_source()
    probe = ProbeSet(PROBE.prompts[:1], ("Answer: [1, 3, 5]",))
    summary = summarize(model, tok, probe, k=2, max_new_tokens=2)
    expected = tok("Answer: [1, 3, 5]", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert summary.responses == probe.references
    assert summary.target_ids.tolist() == expected


def test_probe_files_list_prompts_or_prompts_with_references(tmp_path):
    (tmp_path / "a.json").write_text('["p1\\n", "p2\\n"]')
    assert read_probe_file(tmp_path / "a.json") == ProbeSet(("p1\n", "p2\n"))
    (tmp_path / "b.json").write_text('[{"prompt": "p", "reference": "r"}]')
    assert read_probe_file(tmp_path / "b.json") == ProbeSet(("p",), ("r",))
    (tmp_path / "c.txt").write_text("one\n\ntwo\n")
    assert read_probe_file(tmp_path / "c.txt") == ProbeSet(("one", "two"))
    (tmp_path / "d.json").write_text("[1, 2]")
    with pytest.raises(FusionError, match="to list strings"):
        read_probe_file(tmp_path / "d.json")


def test_chat_prompts_are_wrapped_in_each_models_own_template():
    from merging.fusion.summary import encode_prompt, render_prompt
    from merging.fusion.transfer import PivotTokens, align_summary

    model, tok = tiny_source()
    tok.chat_template = "{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}assistant:"
    summary = summarize(model, tok, PROBE, k=2, max_new_tokens=3, prompt_style="chat")
    assert render_prompt(tok, "hi", "chat") == "<s>user: hi\nassistant:"
    assert encode_prompt(tok, "hi", "chat")[0] == tok.bos_token_id  # from the template, not added twice
    _, pivot_tok = tiny_pivot()
    pivot_tok.chat_template = "{% for m in messages %}Q: {{ m['content'] }}{% endfor %}A:"
    examples, _ = align_summary(summary, PivotTokens(pivot_tok))
    assert examples[0].prompt_ids == tuple(pivot_tok("Q: " + PROBE.prompts[0] + "A:")["input_ids"])
    with pytest.raises(FusionError, match="chat template"):
        render_prompt(char_tokenizer(), "hi", "chat")
    assert render_prompt(char_tokenizer(), "hi", "auto") == "hi"  # no template: plain
    assert render_prompt(tok, "hi", "auto") == "<s>user: hi\nassistant:"
