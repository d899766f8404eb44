"""Token ids of a task example as a model is trained and prompted: its chat template when the
tokenizer has one (the harness's ``prompt_style="auto"``), the plain prompt otherwise. Training,
teacher-forced scoring and decoding all read examples through here, so they see the same tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from merging.testbed.harness import chat_prompt, plain_prompt
from merging.testbed.tasks import Example

Encoder = Callable[[Any, Example], tuple[list[int], int]]  # (tokenizer, example) -> (ids, prompt length)


def chat_encoder(tokenizer: Any, example: Example) -> tuple[list[int], int]:
    """Token ids of ``example`` as the harness prompts a chat model (`chat_prompt`), followed by
    the response and the template's end-of-turn marker; and the prompt's length."""
    task = example.task
    prompt = chat_prompt(tokenizer, task, example.prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(example.response + _end_of_turn(tokenizer), add_special_tokens=False)[
        "input_ids"
    ]
    return [*prompt_ids, *completion_ids], len(prompt_ids)


def _end_of_turn(tokenizer: Any) -> str:
    """What the chat template writes right after an assistant message (``<|im_end|>``, ...)."""
    cached = getattr(tokenizer, "_umm_end_of_turn", None)
    if cached is None:
        marker = "\x00RESPONSE\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        cached = text.split(marker, 1)[1].rstrip()
        tokenizer._umm_end_of_turn = cached
    return cached


def plain_encoder(tokenizer: Any, example: Example) -> tuple[list[int], int]:
    """Token ids of ``example`` as the harness prompts a model without a chat template (the
    instruction and a newline, with the tokenizer's BOS), then the response and EOS."""
    prompt_ids = tokenizer(plain_prompt(example.prompt), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    return [*prompt_ids, *response_ids, tokenizer.eos_token_id], len(prompt_ids)


def encoder_for(tokenizer: Any) -> Encoder:
    """The encoding matching the harness's ``prompt_style="auto"`` for this tokenizer."""
    return chat_encoder if getattr(tokenizer, "chat_template", None) else plain_encoder
