"""Generation options, and the batch runner of the Serve model deployment (Ray-free, torch-free at import).

A :class:`Job` is one request's work: its prompts, ``n`` completions of each, its :class:`Options`
(``max_new_tokens``, ``temperature``, ``top_p``, ``stop``) and, when it is streamed, a callback that
receives each choice's text as it is generated. :func:`run_batch` runs a batch of jobs, from any
route (``/generate``, ``/v1/completions``, ``/v1/chat/completions``), on a
:class:`~lorahub_ray.serving.host.ModelHost`:

* jobs are grouped by recipe and by options, and each group is its own ``generate`` call: a job's
  temperature, nucleus or stop strings never reach the rows of a job with other options, and a
  greedy job (temperature 0) runs exactly the greedy path of ``POST /generate``;
* each choice stops at EOS, at ``max_new_tokens`` (``finish_reason`` ``"length"``) or at the first
  stop string (``"stop"``; the text ends before it);
* prompts and completions are counted in tokens, for OpenAI's ``usage``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from lorahub_ray.serving.stops import first_stop

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclasses.dataclass(frozen=True)
class Options:
    """The generation options that a batch group shares (hashable: the group's key). Greedy when
    ``temperature`` is 0, where ``top_p`` means nothing and is normalised to 1."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", 1.0 if self.temperature == 0 else float(self.top_p))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def sampling(self) -> dict | None:
        """``generate_ids``' sampling argument: None (greedy) or the temperature and nucleus."""
        return None if self.temperature == 0 else {"temperature": self.temperature, "top_p": self.top_p}


@dataclasses.dataclass(eq=False)
class Job:
    """One request's work. Choice ``i * n + j`` is the ``j``-th completion of prompt ``i``."""

    prompts: list[str]
    options: Options = Options()
    n: int = 1
    # "recipe": the prompts are texts, rendered with the recipe's template (as /generate does);
    # "rendered": they are conversations already rendered with the chat template
    prompt_kind: str = "recipe"
    recipe_id: str | None = None
    # streaming: called from the generating thread with (choice index, new text) as text becomes final
    on_text: Callable[[int, str], None] | None = None

    @property
    def size(self) -> int:
        """Rows of generation: what batching counts."""
        return len(self.prompts) * self.n


def run_batch(host, jobs: Sequence[Job]) -> list[dict]:
    """Run ``jobs`` (each with its ``recipe_id``) on ``host``; per job ``{"choices": [{"text",
    "finish_reason", "completion_tokens"}], "prompt_tokens": [per prompt]}``."""
    groups: dict[tuple[str, Options], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.recipe_id, job.options), []).append(i)
    results: list = [None] * len(jobs)
    for (recipe_id, options), members in groups.items():
        for i, result in zip(members, _run_group(host, recipe_id, options, [jobs[i] for i in members])):
            results[i] = result
    return results


def _run_group(host, recipe_id: str, options: Options, jobs: list[Job]) -> list[dict]:
    from lorahub_ray.core.families import family_of_model
    from lorahub_ray.core.templates import prompt_ids

    with host.selected(recipe_id, sum(job.size for job in jobs)) as (model, tokenizer, template):
        family = family_of_model(model)
        family.prepare_tokenizer(tokenizer)
        rows, prompt_tokens = [], []  # rows: (prompt ids, job, choice index)
        for job in jobs:
            ids = prompt_ids(tokenizer, job.prompts, "rendered" if job.prompt_kind == "rendered" else template)
            prompt_tokens.append([len(p) for p in ids])
            rows += [(p, job, i * job.n + j) for i, p in enumerate(ids) for j in range(job.n)]
        outputs: list[list[int]] = []
        step = max(1, host.generate_batch_size)
        for start in range(0, len(rows), step):
            outputs += _generate(family, model, tokenizer, options, rows[start : start + step])
    results = {id(job): {"choices": [None] * job.size, "prompt_tokens": counts}
               for job, counts in zip(jobs, prompt_tokens)}
    for (_, job, index), tokens in zip(rows, outputs):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cut = first_stop(text, options.stop)
        finish = FINISH_LENGTH if cut is None and len(tokens) >= options.max_new_tokens else FINISH_STOP
        results[id(job)]["choices"][index] = {"text": text if cut is None else text[:cut], "finish_reason": finish,
                                              "completion_tokens": len(tokens)}
    return [results[id(job)] for job in jobs]


def _generate(family, model, tokenizer, options: Options, rows) -> list[list[int]]:
    """New token ids of each row of one ``generate`` call; a :class:`RowTracker` follows the rows when
    some stream or there are stop strings (it then holds each row's tokens, up to its stop)."""
    callbacks = [None if job.on_text is None else _bind(job.on_text, index) for _, job, index in rows]
    tracker = None
    if options.stop or any(callbacks):
        from lorahub_ray.serving.tracker import RowTracker

        tracker = RowTracker(tokenizer, options.stop, callbacks)
    out = family.generate_ids(model, tokenizer, [p for p, _, _ in rows], max_new_tokens=options.max_new_tokens,
                              sampling=options.sampling, stopping_criteria=tracker)
    return out if tracker is None else tracker.tokens


def _bind(callback: Callable[[int, str], None], index: int) -> Callable[[str], None]:
    return lambda text: callback(index, text)
