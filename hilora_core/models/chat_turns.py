"""Find the user's words inside a prompt already rendered with the base model's chat template.

Evaluation harnesses (lm-evaluation-harness with ``--apply_chat_template``, or tasks whose contexts are
pre-rendered) send ``/v1/completions`` prompts such as
``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nQUESTION<|im_end|>\\n<|im_start|>assistant\\nANSWER``.
Routing on that whole text embeds the system prompt, role names and the candidate answer, which pushes
an in-pool request off the pool. Routing should see QUESTION, as it does for a chat request.

The markers are learned from the template itself by rendering sentinel messages, so no model's format is
hard-coded here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_FIRST, _SECOND, _REPLY = "\x01hilora-user-1\x01", "\x01hilora-user-2\x01", "\x01hilora-reply\x01"


@dataclass(frozen=True)
class UserTurnMarkers:
    """The text that opens a user turn and the text that closes it (may be empty)."""

    opening: str
    closing: str


def _common_suffix(a: str, b: str) -> str:
    return os.path.commonprefix([a[::-1], b[::-1]])[::-1]


def user_turn_markers(tokenizer) -> UserTurnMarkers | None:
    """The user-turn markers of ``tokenizer``'s chat template, or None when it has no usable template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        one = tokenizer.apply_chat_template([{"role": "user", "content": _FIRST}], tokenize=False)
        two = tokenizer.apply_chat_template(
            [{"role": "user", "content": _FIRST}, {"role": "assistant", "content": _REPLY},
             {"role": "user", "content": _SECOND}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses these messages has no markers to learn
        return None
    if not isinstance(one, str) or _FIRST not in one or _SECOND not in two:
        return None
    # The opening: what precedes a user message both at the start and after an assistant reply.
    opening = _common_suffix(one[:one.index(_FIRST)], two[two.index(_REPLY) + len(_REPLY):two.index(_SECOND)])
    # The closing: what follows a user message both at the end and before an assistant reply.
    closing = os.path.commonprefix([one[one.index(_FIRST) + len(_FIRST):],
                                    two[two.index(_FIRST) + len(_FIRST):two.index(_REPLY)]])
    if closing.strip() and opening.startswith(closing):
        opening = opening[len(closing):]  # the previous turn's end is not part of the opening
    if not opening.strip():
        return None  # a template that does not mark user turns: nothing reliable to find
    return UserTurnMarkers(opening=opening, closing=closing)


def last_user_turn(text: str, markers: UserTurnMarkers | None) -> str | None:
    """The content of the last user turn in a rendered prompt; None when ``text`` is not such a prompt."""
    if markers is None:
        return None
    at = text.rfind(markers.opening)
    if at < 0:
        return None
    content = text[at + len(markers.opening):]
    if markers.closing:
        end = content.find(markers.closing)
        if end >= 0:
            content = content[:end]
    content = content.strip()
    return content or None
