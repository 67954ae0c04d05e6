"""Following the rows of one batched ``generate`` call, step by step: a transformers stopping criterion
that records each row's new tokens, ends a row at its first stop string, and streams each row's text
as it becomes final (imported only where generation runs: it needs transformers)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria

from lorahub_ray.serving.stops import first_stop, stable_text


class RowTracker(StoppingCriteria):
    """Called by ``generate`` after each step with the sequences so far (their last column is the new
    token of each row). ``tokens[r]``: row ``r``'s new tokens, without EOS and without what came after
    its stop string. ``on_text[r]`` (or None) receives row ``r``'s text in pieces whose concatenation
    is the text up to its stop (the caller sends what is left once the row ends)."""

    def __init__(self, tokenizer, stops: Sequence[str], on_text: Sequence[Callable[[str], None] | None]):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.stops = tuple(stops)
        self.on_text = list(on_text)
        self.cleans_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        rows = len(self.on_text)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.sent = [""] * rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if self.done[row]:
                continue
            if token == self.eos:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            if self.stops or self.on_text[row] is not None:
                self._follow(row)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _follow(self, row: int) -> None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        cut = first_stop(text, self.stops)
        if cut is not None:
            self.done[row] = True
            text = text[:cut]
        else:
            text = stable_text(text, self.stops, cleans_spaces=self.cleans_spaces)
        sent = self.sent[row]
        if self.on_text[row] is not None and len(text) > len(sent) and text.startswith(sent):
            self.on_text[row](text[len(sent):])
            self.sent[row] = text
