"""Cross-validated selection (``--select cv``): the composition chosen on held-out evidence.

The reference keeps the weights with the lowest few-shot objective, which overfits five examples.
Here several candidates are compared by how well they do on examples they were not fitted on:

* ``base``: the base model alone (all weights 0);
* ``single:<module>``: each module alone (one-hot weight 1), scored through shared forward passes;
* composition searches (:class:`SearchSetting`): the reference search from 0 (``lorahub``), and
  searches warm-started at the r-th best single module *of the fold's fit examples*
  (``from-best-<r>``), each optionally with a stronger L1 (``... l1=<alpha>``).

Folds: leave-one-out for at most 5 examples, k-fold (round-robin, k=5) for more. A fold refits
every search candidate on its fit examples (the warm starts are ranked on them too) and scores
every candidate on its held-out examples; fixed candidates (base, single modules) need no refit.
Scores are the held-out loss (no regulariser), and with ``score="generate"`` the exact match of
greedy generations on the held-out examples, ties broken by the loss. Ties left go to the simpler
candidate (base, then single modules, then searches).

A held-out example is scored by its token-mean cross-entropy; with ``answers=True``, one with an *answer set*
(its input's options, or a closed set of few-shot targets such as yes/no) by its right answer among the set
(:mod:`lorahub_ray.core.answer_loss`; not the default: on real BBH navigate it failed, docs/bbh.md). A report row
holds its mean held-out cross-entropy (``cv_ce``) and log-probability of the answer set (``cv_answer_mass``).

The winner is picked from the candidates' fold scores by a rule chosen by name
(:mod:`lorahub_ray.core.selection_rules`: ``paired``, the default, ``one-se`` or ``min``).
The winner is refit on all examples.

The folds are independent: :func:`select` runs them through ``map_folds(context, tasks)``, which
yields one :class:`FoldResult` per task in any order; :func:`sequential` (the default) runs them one
after the other here. A parallel backend passes its own: each :class:`FoldTask` is small and
picklable, and :meth:`SelectionContext.spec` with the context's modules is what another process needs
to build an equal context around its own copy of the model
(:class:`lorahub_ray.cluster.folds.RayFolds` runs the folds on Ray actors).

Ray-free and model-family-agnostic: everything runs through :class:`FewShotObjective` and
:func:`lorahub_ray.evaluation.generate.generate`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

from lorahub_ray.core.answer_loss import answer_losses
from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.objective import FewShotObjective, LossFn, l1_regularization
from lorahub_ray.core.selection_rules import DEFAULT, RULES, rank_keys, reason, standard_error
from lorahub_ray.core.search import (DEFAULT_BUDGET, DEFAULT_OPTIMIZER, Evaluation, SearchResult, make_optimizer,
                                     minimize)
from lorahub_ray.errors import LoraHubError
from lorahub_ray.evaluation.generate import exact_match, generate
from lorahub_ray.evaluation.options import answer_sets

SELECT_METHODS = ("reference", "cv")
SCORES = ("loss", "generate")
LEAVE_ONE_OUT_MAX = 5  # leave-one-out up to this many examples, k-fold above
K_FOLDS = 5
CHUNK = 16  # fixed candidates per shared forward pass
BASE = "base"


@dataclass(frozen=True)
class SearchSetting:
    """One composition search: from 0 (``start=0``, the reference) or one-hot at the ``start``-th best
    single module of the fit examples; with the objective's own regulariser (``l1=None``) or
    ``l1 · mean|w|``."""

    name: str
    start: int = 0
    l1: float | None = None


@dataclass(frozen=True)
class SelectionConfig:
    score: str = "loss"
    warm_starts: int = 2  # searches warm-started at the best 1..warm_starts single modules
    l1: tuple[float, ...] = ()  # stronger L1 strengths, each tried with every start
    folds: int = K_FOLDS  # k of k-fold, above LEAVE_ONE_OUT_MAX examples
    max_new_tokens: int = 64  # with score="generate"
    # with score="loss": "paired", the reference search unless a candidate beats it fold by fold by more than the
    # noise; "one-se", the simplest candidate within one standard error of the lowest mean held-out loss; "min",
    # the lowest mean held-out loss (selection_rules)
    rule: str = "paired"
    answers: bool = False  # True: an example with an answer set is scored by its right answer among them

    def check(self) -> None:
        if self.score not in SCORES:
            raise LoraHubError(f"unknown score {self.score!r}; choose from {', '.join(SCORES)}")
        if self.rule not in RULES:
            raise LoraHubError(f"unknown selection rule {self.rule!r}; choose from {', '.join(RULES)}")
        if self.warm_starts < 0:
            raise LoraHubError(f"warm_starts must be at least 0, got {self.warm_starts}")
        if self.folds < 2:
            raise LoraHubError(f"folds must be at least 2, got {self.folds}")
        bad = [a for a in self.l1 if not (isinstance(a, (int, float)) and math.isfinite(a) and a >= 0)]
        if bad:
            raise LoraHubError(f"L1 strengths must be finite and >= 0, got {bad[0]!r}")

    def settings(self, num_modules: int) -> list[SearchSetting]:
        starts = [0] + list(range(1, min(self.warm_starts, num_modules) + 1))
        out = []
        for alpha in (None, *self.l1):
            for start in starts:
                name = DEFAULT if start == 0 else f"from-best-{start}"
                out.append(SearchSetting(name if alpha is None else f"{name} l1={alpha:g}", start,
                                         None if alpha is None else float(alpha)))
        return out


def make_folds(n: int, k: int = K_FOLDS) -> list[list[int]]:
    """Held-out example indices per fold: leave-one-out for ``n <= 5``, else ``k`` round-robin folds."""
    if n < 2:
        raise LoraHubError(f"cross-validation needs at least 2 few-shot examples, got {n}")
    if n <= LEAVE_ONE_OUT_MAX:
        return [[i] for i in range(n)]
    return [list(range(f, n, k)) for f in range(min(k, n))]


@dataclass(frozen=True)
class FoldTask:
    """One fold: fit on ``fit``, score on ``held_out`` (example indices)."""

    fold: int
    fit: tuple[int, ...]
    held_out: tuple[int, ...]


@dataclass
class FoldResult:
    fold: int
    held_out: list[int]
    loss: dict[str, float]  # candidate -> mean held-out loss
    correct: dict[str, int] = field(default_factory=dict)  # candidate -> exact matches (score="generate")
    ce: dict[str, float] = field(default_factory=dict)  # candidate -> mean held-out token-mean cross-entropy
    answer_mass: dict[str, float] = field(default_factory=dict)  # candidate -> mean log P(answer set), if any
    weights: dict[str, list[float]] = field(default_factory=dict)  # search candidate -> weights fitted in the fold
    warm_starts: list[str] = field(default_factory=list)  # the fold's best single modules, best first
    searches: int = 0
    evaluations: int = 0
    seconds: float = 0.0


def _l1(alpha: float, weights: Sequence[float]) -> float:
    return l1_regularization(weights, alpha)


class SelectionContext:
    """What every fold shares: the model (a :class:`LoraComposer`), the tokenizer, the examples and
    the search settings. ``run_fold`` and ``refit`` only read it (the composer is recomposed per call)."""

    def __init__(self, composer: LoraComposer, tokenizer, inputs: Sequence[str], outputs: Sequence[str], *,
                 names: Sequence[str], loss: str | LossFn = "reference", batch_size: int | None = None,
                 regularizer: Callable[[Sequence[float]], float] = l1_regularization,
                 budget: int = DEFAULT_BUDGET, optimizer: str = DEFAULT_OPTIMIZER, seed: int = 42, asks: int = 1,
                 config: SelectionConfig = SelectionConfig(), template: str = "plain",
                 model: str | None = None, device: str | None = None):
        config.check()
        self.model, self.device = model, device  # where the base model comes from, for a backend that loads it
        self.template = template  # every fold's losses and generations render the inputs with it
        self.composer, self.tokenizer = composer, tokenizer
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.names = list(names)
        self.loss, self.batch_size, self.regularizer = loss, batch_size, regularizer
        self.budget, self.optimizer, self.seed, self.asks = budget, optimizer, seed, asks
        self.config = config
        self.settings = config.settings(len(self.names))
        # each example's answer set (None: scored by its token-mean cross-entropy)
        self.answer_sets = answer_sets(self.inputs, self.outputs) if config.answers else [None] * len(self.inputs)
        self._rankings: dict[tuple[int, ...], list[int]] = {}  # fit examples -> modules by their loss alone

    def spec(self) -> dict:
        """The keyword arguments that rebuild an equal context around another copy of the model:
        ``SelectionContext(composer, tokenizer, **context.spec())``, the composer holding
        ``context.composer.modules`` (those the search sees) with ``context.composer.merge_method``."""
        return dict(inputs=self.inputs, outputs=self.outputs, names=self.names, loss=self.loss,
                    batch_size=self.batch_size, regularizer=self.regularizer, budget=self.budget,
                    optimizer=self.optimizer, seed=self.seed, asks=self.asks, config=self.config,
                    template=self.template, model=self.model, device=self.device)

    # --- candidates ------------------------------------------------------------------------
    def fixed(self) -> dict[str, list[float]]:
        """The candidates that need no fit: the base model and each module alone."""
        k = len(self.names)
        out = {BASE: [0.0] * k}
        for i, name in enumerate(self.names):
            out[f"single:{name}"] = [1.0 if j == i else 0.0 for j in range(k)]
        return out

    def candidate_names(self) -> list[str]:
        return list(self.fixed()) + [s.name for s in self.settings]

    def objective(self, indices: Sequence[int], *, loss: str | LossFn | None = None, batch_size=None,
                  regularizer=None) -> FewShotObjective:
        """The few-shot objective on the examples at ``indices`` alone."""
        return FewShotObjective(self.composer, self.tokenizer, [self.inputs[i] for i in indices],
                                [self.outputs[i] for i in indices], loss=loss or self.loss,
                                batch_size=batch_size if loss else self.batch_size,
                                regularizer=regularizer or self.regularizer, template=self.template)

    def ranked_singles(self, objective: FewShotObjective) -> list[int]:
        """Module indices by the loss of each module alone on ``objective``'s examples, best first."""
        onehots = list(self.fixed().values())[1:]
        losses = [v for s in range(0, len(onehots), CHUNK) for v in objective.losses(onehots[s : s + CHUNK])]
        return sorted(range(len(onehots)), key=lambda i: (losses[i], i))

    def fit(self, setting: SearchSetting, indices: Sequence[int],
            callback: Callable[[Evaluation, float], None] | None = None) -> tuple[SearchResult, str | None]:
        """The search ``setting`` on the examples at ``indices``; returns it and its warm start's module.
        ``callback`` is the search's (:func:`~lorahub_ray.core.search.minimize`): after every evaluation."""
        regularizer = self.regularizer if setting.l1 is None else functools.partial(_l1, setting.l1)
        objective = self.objective(indices, regularizer=regularizer)
        k, start = len(self.names), None
        init = [0.0] * k
        if setting.start:
            key = tuple(indices)  # every warm start of a fold ranks the same modules on the same examples: once
            if key not in self._rankings:
                self._rankings[key] = self.ranked_singles(objective)
            start = self._rankings[key][setting.start - 1]
            init[start] = 1.0
        opt = make_optimizer(self.optimizer, k, budget=self.budget, seed=self.seed, num_workers=self.asks, init=init)
        result = minimize(objective, k, budget=self.budget, optimizer=self.optimizer, seed=self.seed, opt=opt,
                          num_workers=self.asks, evaluate_batch=objective.evaluate_many if self.asks > 1 else None,
                          callback=callback)
        return result, None if start is None else self.names[start]

    def scored(self, candidates: dict[str, list[float]], indices: Sequence[int]) -> tuple[dict, dict, dict]:
        """Each candidate's mean held-out loss on the examples at ``indices``, its mean token-mean cross-entropy
        there and, if some have an answer set, its mean log-probability of the answer set (``{}`` otherwise)."""
        names, weights = list(candidates), list(candidates.values())
        loss, ce, mass = answer_losses(self.composer, self.tokenizer, [self.inputs[i] for i in indices],
                                       [self.outputs[i] for i in indices], [self.answer_sets[i] for i in indices],
                                       weights, batch_size=self.batch_size, template=self.template, chunk=CHUNK)
        loss, ce = ({n: float(v) if math.isfinite(v) else math.inf for n, v in zip(names, x)} for x in (loss, ce))
        return loss, ce, dict(zip(names, mass)) if any(self.answer_sets[i] for i in indices) else {}

    def _correct(self, candidates: dict[str, list[float]], indices: Sequence[int]) -> dict[str, int]:
        correct = {}
        if self.config.score == "generate":
            inputs, targets = [self.inputs[i] for i in indices], [self.outputs[i] for i in indices]
            for name, w in candidates.items():
                self.composer.compose(w)
                predictions = generate(self.composer.model, self.tokenizer, inputs,
                                       max_new_tokens=self.config.max_new_tokens, template=self.template)
                correct[name] = sum(exact_match(p, t) for p, t in zip(predictions, targets))
        return correct

    def run_fold(self, task: FoldTask, advance: Callable[..., None] | None = None) -> FoldResult:
        """Fit every search candidate on the fold's fit examples and score every candidate on its held-out ones.
        ``advance(n, info=...)`` (a progress bar's, counting fold × candidate) hears of every search evaluation
        (``1/budget`` of its candidate) and of the fixed candidates once they are scored."""
        start = time.perf_counter()
        advance = advance or _no_progress
        candidates = self.fixed()
        fitted, warm, evaluations = {}, {}, 0
        for setting in self.settings:
            label = f"fold {task.fold + 1}: {setting.name}"
            result, module = self.fit(setting, task.fit, callback=lambda e, best, label=label: advance(
                1 / self.budget, info=f"{label} {e.step + 1}/{self.budget}"))
            fitted[setting.name] = result.weights
            evaluations += len(result.history)
            if module is not None:
                warm[setting.start] = module
        advance(0, info=f"fold {task.fold + 1}: held-out scores")
        candidates.update(fitted)
        loss, ce, mass = self.scored(candidates, task.held_out)
        correct = self._correct(candidates, task.held_out)
        advance(len(candidates) - len(fitted))
        return FoldResult(task.fold, list(task.held_out), loss, correct, ce, mass, fitted,
                          [warm[r] for r in sorted(warm)], len(self.settings), evaluations, time.perf_counter() - start)


MapFolds = Callable[[SelectionContext, Sequence[FoldTask]], Iterable[FoldResult]]


def sequential(context: SelectionContext, tasks: Sequence[FoldTask],
               advance: Callable[..., None] | None = None) -> Iterator[FoldResult]:
    """The default ``map_folds``: one fold after the other, in this process (``advance``: see ``run_fold``)."""
    return (context.run_fold(t, advance) for t in tasks)


def _no_progress(n: float = 1, **fields) -> None:
    return None


@dataclass
class Selection:
    winner: str
    weights: list[float]
    search: SearchResult  # the winner's refit on all examples (a fixed candidate: its one evaluation)
    regularizer: str  # the winner's regulariser, as the recipe names it
    report: dict  # recipe.search["selection"]


def fold_tasks(n: int, k: int = K_FOLDS) -> list[FoldTask]:
    """The folds of ``n`` examples (:func:`make_folds`) as tasks: fit on the others, score the held-out."""
    return [FoldTask(f, tuple(i for i in range(n) if i not in set(held)), tuple(held))
            for f, held in enumerate(make_folds(n, k))]


def cross_validate(context: SelectionContext, *, map_folds: MapFolds = sequential) -> list[FoldResult]:
    """Run every fold (through ``map_folds``) and return their results in fold order."""
    tasks = fold_tasks(len(context.inputs), context.config.folds)
    results = sorted(map_folds(context, tasks), key=lambda r: r.fold)
    if [r.fold for r in results] != list(range(len(tasks))):
        raise LoraHubError(f"map_folds returned folds {[r.fold for r in results]}, expected 0..{len(tasks) - 1}")
    return results


def progress_plan(context: SelectionContext) -> tuple[str, int]:
    """A progress bar's label and total for :func:`select`: one unit per fold × candidate, and one for the refit."""
    folds, candidates = len(make_folds(len(context.inputs), context.config.folds)), len(context.candidate_names())
    return f"cv: {folds} folds × {candidates} candidates", folds * candidates + 1


def select(context: SelectionContext, *, map_folds: MapFolds = sequential,
           advance: Callable[..., None] | None = None) -> Selection:
    """Cross-validate every candidate, pick the winner and refit it on all examples. ``advance(n, info=...)``
    (a progress bar's, of :func:`progress_plan`'s total) hears of every search evaluation in the folds when they
    run here (:func:`sequential`), of each whole fold from another ``map_folds``, and of the refit's evaluations."""
    started = time.perf_counter()
    advance = advance or _no_progress
    if map_folds is sequential:
        map_folds = functools.partial(sequential, advance=advance)
    else:  # elsewhere (Ray): a whole fold at a time
        backend, per_fold = map_folds, len(context.candidate_names())
        map_folds = lambda ctx, tasks: (_advanced(r, advance, per_fold) for r in backend(ctx, tasks))  # noqa: E731
    results = cross_validate(context, map_folds=map_folds)
    chosen = choose(context, results, fold_seconds=time.perf_counter() - started, refit_callback=lambda e, best: advance(
        1 / context.budget, info=f"refit {e.step + 1}/{context.budget}, best {best:.4f}"))
    advance(1 - chosen.report["cost"]["refit_searches"], info=f"winner {chosen.winner}")
    return chosen


def _advanced(result: FoldResult, advance: Callable[..., None], n: int) -> FoldResult:
    advance(n, info=f"fold {result.fold + 1} done")
    return result


def choose(context: SelectionContext, results: Sequence[FoldResult], *, fold_seconds: float | None = None,
           refit_callback: Callable[[Evaluation, float], None] | None = None) -> Selection:
    """Rank the candidates by their fold scores, pick the winner and refit it on all examples.
    ``fold_seconds`` defaults to the folds' own seconds summed; ``refit_callback`` is the refit search's
    callback (after every evaluation; a fixed winner needs no search)."""
    n = len(context.inputs)
    if fold_seconds is None:
        fold_seconds = sum(r.seconds for r in results)
    generate_score = context.config.score == "generate"
    if generate_score and any(not r.correct for r in results):
        raise LoraHubError("score='generate' needs fold results with exact matches: cross-validate with it")
    names = context.candidate_names()
    rows = []
    for order, name in enumerate(names):
        # the loss as scored (answer sets), or without answer sets (answers=False): the cross-entropy
        losses = [(r.loss if context.config.answers or not r.ce else r.ce)[name] for r in results]
        row = {"name": name, "kind": BASE if name == BASE else "single" if name.startswith("single:") else "search",
               "fold_losses": losses, "cv_loss": sum(v * len(r.held_out) for v, r in zip(losses, results)) / n,
               "cv_loss_se": standard_error(losses)}
        masses = [r.answer_mass[name] for r in results if r.answer_mass]
        if masses:
            row["cv_answer_mass"] = sum(masses) / len(masses)
            row["cv_ce"] = sum(r.ce[name] * len(r.held_out) for r in results) / n
        if generate_score:
            row["fold_correct"] = [r.correct[name] for r in results]
            row["cv_accuracy"] = 100.0 * sum(row["fold_correct"]) / n
        setting = next((s for s in context.settings if s.name == name), None)
        if setting is not None:
            row["setting"] = asdict(setting)
            row["fold_weights"] = [r.weights[name] for r in results]
        rows.append(row)
    keys, threshold = rank_keys(context.config, rows)
    ranked = [row for _, row in sorted(zip(keys, rows), key=lambda kr: kr[0])]
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    winner = ranked[0]
    refit_start = time.perf_counter()
    setting = next((s for s in context.settings if s.name == winner["name"]), None)
    warm_start = None
    if setting is None:  # fixed: nothing to refit, its objective on all examples is recorded
        weights = context.fixed()[winner["name"]]
        objective = context.objective(range(n))
        search = SearchResult(weights=weights, objective=objective(weights), optimizer="none", algorithm="fixed",
                              budget=0, seed=context.seed)
        regularizer = None
    else:
        search, warm_start = context.fit(setting, range(n), callback=refit_callback)
        weights, regularizer = search.weights, setting.l1
    report = {
        "method": "cv", "score": context.config.score, "scheme": "leave-one-out" if n <= LEAVE_ONE_OUT_MAX else "k-fold",
        "folds": [r.held_out for r in results], "winner": winner["name"], "reason": reason(context.config, ranked, len(results), threshold),
        "rule": None if context.config.score == "generate" else context.config.rule, "loss_threshold": threshold,
        "answer_sets": [list(a) if a else None for a in context.answer_sets],
        "candidates": rows,  # in candidate order; "rank" gives the ranking (rank 1 is the winner)
        "fold_warm_starts": [r.warm_starts for r in results], "refit_warm_start": warm_start,
        "config": {**asdict(context.config), "l1": list(context.config.l1), "budget": context.budget,
                   "optimizer": str(context.optimizer), "seed": context.seed},
        "cost": {"fold_searches": sum(r.searches for r in results), "refit_searches": int(setting is not None),
                 "evaluations": sum(r.evaluations for r in results) + len(search.history),
                 "fold_seconds": fold_seconds, "refit_seconds": time.perf_counter() - refit_start},
    }
    return Selection(winner["name"], list(weights), search,
                     None if regularizer is None else f"l1({regularizer:g})", report)
