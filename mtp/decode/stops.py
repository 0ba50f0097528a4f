"""Stop strings, on the host and only when asked for: a row stops at the first token whose text
completes one of them, and the stop string is cut from the text it returns."""

from __future__ import annotations

from typing import Sequence


def hit_stop(tokens: list[int], tokenizer, stops: Sequence[str]) -> bool:
    """Whether the text of tokens contains a stop string."""
    text = tokenizer.decode(tokens)
    return any(s in text for s in stops)


def cut_at_stop(tokens: list[int], before: int, tokenizer, stops: Sequence[str]) -> list[int]:
    """The shortest prefix of tokens whose text contains a stop string (the first `before`
    tokens held none)."""
    for end in range(before + 1, len(tokens) + 1):
        if hit_stop(tokens[:end], tokenizer, stops):
            return tokens[:end]
    return tokens


def strip_stop(text: str, stops: Sequence[str]) -> str:
    """text up to its first stop string."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
