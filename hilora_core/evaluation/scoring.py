"""How the evaluations score an answer: exact match after a light normalisation."""

from __future__ import annotations


def normalize_answer(text: str) -> str:
    """Strip whitespace and one trailing period; case is kept."""
    text = text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def exact_match(prediction: str, target: str) -> bool:
    """Exact match after :func:`normalize_answer` on both sides."""
    return normalize_answer(prediction) == normalize_answer(target)
