"""reasoning-gym's procedural task generators as a task source (:mod:`.sources`).

``reasoning-gym:NAME?size=N&seed=S&KEY=VALUE...`` is the generator ``NAME`` of the ``reasoning-gym``
package (``pip install "lorahub-ray[hub]"``): ``reasoning_gym.create_dataset(NAME, size=N, seed=S, KEY=VALUE,
...)``, ``N`` examples (default :data:`DEFAULT_SIZE`) drawn with seed ``S`` (default 0). Every other option is
passed through to the generator's config, its value read as JSON when it parses (``max_words=12``,
``allow_negation=true``, ``operators=["+","-"]``) and as text otherwise. Each example's ``question`` is the
input and its ``answer`` the output, as the generator writes them: no prompt of ours is added.

The split options are those of every source (:mod:`.sources`), with the split seed spelled ``split_seed``
and the test cap ``test_size`` (``seed`` and ``size`` are the generator's). The same seed, size and config
give the same examples on any machine (the package generates them offline, in microseconds).

A task's name is the generator's, followed by its config if one is given
(``word_sequence_reversal-max_words=12-min_words=9``), so that two configs of one generator are two tasks.

An unknown generator is an error with close matches, and a config the generator refuses is an error that
says why; both before any model loads. A generator without a single right answer (``answer`` is ``None``;
it scores answers itself, e.g. graph colouring) cannot be scored by exact match and is refused, naming the
example.
"""

from __future__ import annotations

import hashlib
import json

from lorahub_ray.errors import DataError, LoraHubError, did_you_mean
from lorahub_ray.io.splits import Item, Scheme, Source

SCHEME = "reasoning-gym:"
DEFAULT_SIZE = 1000
DEFAULT_SEED = 0
EXTRA = "hub"  # the optional dependency's extra


def _package():
    try:
        import reasoning_gym
    except ImportError:
        raise LoraHubError(f'reasoning-gym sources need the reasoning-gym package: '
                           f'pip install "lorahub-ray[{EXTRA}]"') from None
    return reasoning_gym


def generators() -> list[str]:
    """Every generator the installed reasoning-gym registers."""
    _package()
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _where(source: Source) -> str:
    """The source as its errors name it: the generator and its own options."""
    return source.location + ("?" + "&".join(f"{k}={v}" for k, v in source.params) if source.params else "")


class ReasoningGym(Scheme):
    prefix, label, folder = SCHEME, "reasoning-gym", "reasoning-gym"
    seed_key, size_key = "split_seed", "test_size"
    options = None  # size, seed and any config key: the generator's

    def generator(self, source: Source) -> tuple[str, int, int, dict]:
        """``(name, size, seed, config)`` of a source, checked (without generating anything)."""
        name = source.location[len(SCHEME):].strip()
        where = _where(source)
        if not name:
            raise DataError(f"{where}: name a generator, as reasoning-gym:NAME")
        _package()
        known = generators()
        if name not in known:
            hint = did_you_mean(name, known)
            raise DataError(f"no reasoning-gym generator '{name}' ({len(known)} generators){hint}")
        params = dict(source.params)
        try:
            size, seed = int(params.pop("size", DEFAULT_SIZE)), int(params.pop("seed", DEFAULT_SEED))
        except ValueError:
            raise DataError(f"{where}: size and seed must be integers") from None
        if size < 2:
            raise DataError(f"{where}: size must be at least 2, got {size}")
        return name, size, seed, {k: _value(v) for k, v in params.items()}

    def dataset(self, source: Source):
        name, size, seed, config = self.generator(source)
        try:
            return _package().create_dataset(name, size=size, seed=seed, **config)
        except Exception as exc:  # a TypeError for an unknown key, an AssertionError or ValueError for a bad value
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{_where(source)}: reasoning-gym refused the config of '{name}' "
                            f"({type(exc).__name__}: {detail})") from None

    def check(self, source: Source) -> None:
        self.generator(source)

    def prepare(self, sources: list[Source]) -> None:
        for source in sources:  # a bad config is refused now, not when the task's turn comes
            self.dataset(source)

    def name(self, source: Source) -> str:
        name, _, _, config = self.generator(source)
        return name + "".join(f"-{k}={json.dumps(v, separators=(',', ':')) if not isinstance(v, str) else v}"
                              .replace("/", "_") for k, v in sorted(config.items()))

    def items(self, source: Source) -> list[Item]:
        dataset = self.dataset(source)
        items = []
        for i in range(len(dataset)):
            entry = dataset[i]
            question, answer = entry.get("question"), entry.get("answer")
            if answer is None:
                raise DataError(f"{_where(source)}, example {i}: no answer (the generator scores answers itself, "
                                f"so exact match cannot)")
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"{_where(source)}, example {i}: the question is not a non-empty string")
            items.append(Item(question, target=str(answer)))
        return items

    def fingerprint(self, source: Source) -> bytes:
        from importlib.metadata import version

        name, size, seed, config = self.generator(source)
        return hashlib.sha256(json.dumps([version("reasoning-gym"), name, size, seed, config], sort_keys=True,
                                         default=str).encode()).digest()


REASONING_GYM = ReasoningGym()
