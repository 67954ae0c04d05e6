"""The held-out loss of an example with an answer set: the loss of its right answer among the set.

An example whose answer is one of a known set (the options its input lists, or a closed set of targets such as
yes/no: :func:`lorahub_ray.evaluation.options.answer_sets`) is scored by ``-log P(y | x) / Σ_a P(a | x)``, each
answer's probability that of its whole token sequence, EOS included (the family's loss batches, the template's
rendering). What every answer of the task shares (the ``(``, ``)`` and EOS of ``(A)``, the yes/no vocabulary)
cancels out, and what is left is the choice between the answers. :mod:`lorahub_ray.core.selection` scores held-out
examples this way. Why: the token-mean cross-entropy of a short answer is mostly its *form*, which every answer
of the task shares, and little its *choice*, so a module that learned the form and answers one thing to
everything can have the lowest held-out loss of all (docs/bbh.md: BBH's navigate). Over the answer set a
constant answer scores as what it is: right where the answer is its own, wrong elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.objective import SHARED_PASS_ROWS, token_losses


def answer_losses(composer: LoraComposer, tokenizer, inputs: Sequence[str], outputs: Sequence[str],
                  answer_sets: Sequence[tuple[str, ...] | None], candidates: Sequence[Sequence[float]], *,
                  batch_size: int | None = None, template: str = "plain", chunk: int = 16
                  ) -> tuple[list[float], list[float], list[float]]:
    """For each candidate (a weight vector), means over the examples of: the loss (an example with an answer set:
    its right answer's loss among the set; one without: its token-mean cross-entropy), the token-mean
    cross-entropy of the target, and the log-probability of the answer set (over the examples that have one;
    ``nan`` if none has). The candidates share forward passes, ``chunk`` at a time, and no more than keep a pass
    within :data:`~lorahub_ray.core.objective.SHARED_PASS_ROWS` tokens, as the objective's own shared passes."""
    rows = [(k, a) for k, answers in enumerate(answer_sets) for a in (answers or (outputs[k],))]
    batches = composer.family.loss_batches(tokenizer, [inputs[k] for k, _ in rows], [a for _, a in rows],
                                           batch_size=batch_size, device=composer.device, template=template)
    chunk = max(1, min(chunk, SHARED_PASS_ROWS // max(batch["input_ids"].numel() for batch in batches)))
    nll, tokens = [], []
    for start in range(0, len(candidates), chunk):
        with torch.inference_mode(), composer.candidates(candidates[start : start + chunk]) as count:
            parts = [token_losses(composer.model, batch, count) for batch in batches]
        nll.append(torch.cat([p[0] for p in parts], dim=1))
        tokens.append(torch.cat([p[1] for p in parts], dim=1))
    # [candidates, rows]: each row's summed token cross-entropy, on the CPU (the sums below are small)
    nll, tokens = torch.cat(nll).cpu(), torch.cat(tokens).cpu()
    loss = torch.zeros(len(candidates), dtype=torch.float64)
    ce, masses = torch.zeros_like(loss), []
    for k, answers in enumerate(answer_sets):
        at = [r for r, (j, _) in enumerate(rows) if j == k]
        right = at[0] if answers is None else at[[rows[r][1] for r in at].index(outputs[k].strip())]
        token_mean = nll[:, right] / tokens[:, right].clamp(min=1)
        ce += token_mean
        if answers is None:
            loss += token_mean
            continue
        mass = torch.logsumexp(-nll[:, at], dim=1)  # log P(answer set)
        loss += nll[:, right] + mass  # -log P(right answer | answer set)
        masses.append(mass)
    mean_mass = torch.stack(masses).mean(0) if masses else torch.full_like(loss, float("nan"))
    n = len(answer_sets)
    return (loss / n).tolist(), (ce / n).tolist(), mean_mass.tolist()
