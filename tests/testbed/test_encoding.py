"""The encodings training, teacher-forced scoring and decoding share."""

import torch
from transformers import AutoTokenizer

from merging.search.scores import teacher_forced_batches
from merging.testbed.encoding import chat_encoder, plain_encoder
from merging.testbed.tasks import generate

TOY_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}|{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_plain_encoding_scores_only_the_response(micro_zoo):
    tok = AutoTokenizer.from_pretrained(micro_zoo.base)
    example = generate("lists", "train", n=1)[0]
    ids, prompt_len = plain_encoder(tok, example)
    assert tok.decode(ids[:prompt_len], skip_special_tokens=True) == example.prompt + "\n"
    assert tok.decode(ids[prompt_len:-1]) == example.response and ids[-1] == tok.eos_token_id


def test_chat_encoding_ends_with_the_templates_end_of_turn(micro_zoo):
    tok = AutoTokenizer.from_pretrained(micro_zoo.base)
    tok.chat_template = TOY_TEMPLATE
    example = generate("logic", "train", n=1)[0]
    ids, prompt_len = chat_encoder(tok, example)
    assert tok.decode(ids[:prompt_len]).startswith(f"<user>{example.prompt}\n")
    assert tok.decode(ids[:prompt_len]).endswith("|<assistant>")
    assert tok.decode(ids[prompt_len:]) == example.response + "|"


def test_teacher_forced_targets_are_the_chat_response_and_its_end_of_turn(micro_zoo):
    tok = AutoTokenizer.from_pretrained(micro_zoo.base)
    tok.chat_template = TOY_TEMPLATE
    example = generate("arithmetic", "dev", n=1)[0]
    (batch,) = teacher_forced_batches(tok, ["arithmetic"], "dev", 1, 8)
    targets = batch.targets[0][batch.targets[0] != -100]
    assert tok.decode(targets) == example.response + "|"
    prompt = tok.decode(batch.input_ids[0][: int(torch.nonzero(batch.targets[0] != -100)[0]) + 1])
    assert prompt.startswith(f"<user>{example.prompt}\n") and prompt.endswith("<assistant>")
