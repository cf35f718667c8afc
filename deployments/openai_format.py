"""OpenAI response shapes: choices, stream chunks and the two logprobs formats, from a replica's results.

A replica's logprob entry (``ModelReplica._logprob``) is
``{"token", "bytes", "id", "logprob", "top_logprobs": [{"token", "bytes", "id", "logprob"}, ...]}``.
Chat reports ``{"content": [entries], "refusal": None}``; completions report the legacy lists
``tokens``, ``token_logprobs``, ``top_logprobs`` (token -> logprob) and ``text_offset``.
"""

from __future__ import annotations

import json


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """The chat ``logprobs`` object of some generated tokens."""
    if entries is None:
        return None
    content = [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
                "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}
                                 for t in e["top_logprobs"]]} for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[dict] | None, text_offset: int = 0) -> dict | None:
    """The completions ``logprobs`` object; ``text_offset`` is the character offset of the first token."""
    if entries is None:
        return None
    offsets, at = [], text_offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["logprob"] is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}


def choice(kind: str, index: int, result: dict, echo_prefix: str | None = None) -> dict:
    """One choice of a non-streamed response from a replica's ``generate`` result."""
    if kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": result["text"]},
                "logprobs": chat_logprobs(result.get("logprobs")), "finish_reason": result["finish_reason"]}
    text = result["text"]
    entries = result.get("logprobs")
    if echo_prefix is not None:
        text = echo_prefix + text
        if entries is not None:
            entries = (result.get("prompt_logprobs") or []) + entries
    offset = 0 if echo_prefix is not None else len(result.get("prompt_text") or "")
    return {"index": index, "text": text, "logprobs": completion_logprobs(entries, offset),
            "finish_reason": result["finish_reason"]}


def chunk(kind: str, base: dict, index: int, delta: str, finish: str | None, first: bool,
          logprobs: list[dict] | None, extra: dict | None = None) -> str:
    """One server-sent event of a stream; ``base`` holds id, object, created and model."""
    if kind == "chat":
        d = {"role": "assistant", "content": delta} if first else {"content": delta}
        ch = {"index": index, "delta": d, "logprobs": chat_logprobs(logprobs), "finish_reason": finish}
    else:
        ch = {"index": index, "text": delta, "logprobs": completion_logprobs(logprobs), "finish_reason": finish}
    body = {**base, "choices": [ch], **(extra or {})}
    return f"data: {json.dumps(body)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
