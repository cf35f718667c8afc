"""The user turn of a prompt rendered with a chat template: what /v1/completions routes on."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from hilora_core.models.base_model import resolve_base
from hilora_core.models.chat_turns import last_user_turn, user_turn_markers

# A header-style template (the shape of Llama 3's), written here to show nothing is specific to ChatML.
HEADER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_base(None))


def test_the_base_models_template(tokenizer):
    markers = user_turn_markers(tokenizer)
    assert markers is not None
    question = "Give the largest value among 62, 60, 93."
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    assert markers.opening in rendered and "system" not in markers.opening
    # an evaluation harness's request: the rendered prompt followed by a candidate answer
    assert last_user_turn(rendered + "93", markers) == question
    # several turns: the last user turn counts, as in a chat request
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "first question"},
                                          {"role": "assistant", "content": "an answer"},
                                          {"role": "user", "content": question}], tokenize=False)
    assert last_user_turn(chat, markers) == question
    # the ids path: decoded with the special tokens kept, the same turn is found
    ids = tokenizer(rendered)["input_ids"]
    assert last_user_turn(tokenizer.decode(ids, skip_special_tokens=False), markers) == question
    # plain text is not a rendered prompt
    assert last_user_turn("Who wrote Romeo and Juliet?", markers) is None


def test_another_template_and_none(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = HEADER_TEMPLATE
    markers = user_turn_markers(other)
    assert markers is not None and "<|start_header_id|>user<|end_header_id|>" in markers.opening
    rendered = other.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Name a colour."}],
                                         tokenize=False, add_generation_prompt=True)
    assert last_user_turn(rendered + "Red", markers) == "Name a colour."
    other.chat_template = None
    assert user_turn_markers(other) is None and last_user_turn("anything", None) is None
