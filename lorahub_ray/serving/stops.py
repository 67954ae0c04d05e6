"""Stop strings in generated text, and the part of a growing text that is final (for streaming)."""

from __future__ import annotations

from collections.abc import Sequence


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string begins in ``text`` (None: none does)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def stable_text(text: str, stops: Sequence[str], *, cleans_spaces: bool = False) -> str:
    """The part of a growing decoded ``text`` that later tokens cannot change: without a trailing
    incomplete character (U+FFFD), without a tail that may be the start of a stop string, and (for
    tokenizers that clean up spaces before punctuation) without what follows the last space."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for size in range(min(end, max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[end - size : end]) for s in stops):
            end -= size
            break
    if cleans_spaces:
        space = text.rfind(" ", 0, end)
        end = space if space >= 0 else 0
    return text[:end]
