"""The split of a task's examples into few-shot examples and a disjoint test set, shared by every kind of task
source (:mod:`.sources` names them and reads them; the kinds are :mod:`.bbh`, :mod:`.reasoning_gym` and
:mod:`.bigbench`).

A kind of source is a :class:`Scheme`: it reads a task's examples (:class:`Item`) and says how its text spells the
split options. The examples are shuffled with the split seed (:meth:`Scheme.order_seed`); the few-shot split is the
first ``shots`` of them, the test split the rest without any example whose question repeats a few-shot one, capped
at ``size`` (:func:`split_indices`). A multiple-choice example is written as a BBH prompt with its options shuffled,
seeded by the split seed and the example's index (:func:`format_item`).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

from lorahub_ray.errors import DataError

SPLITS = ("fewshot", "test")
DEFAULT_SHOTS = 5
TEST_SIZE = 250
FORMAT_VERSION = 1  # of the materialised split files; bump when the formatting changes
LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Item:
    """One parsed example: a generative ``target``, or ``options`` with the index of the correct one."""

    input: str
    target: str | None = None
    options: tuple[str, ...] | None = None
    correct: int | None = None

    @property
    def key(self) -> tuple:
        """What makes two examples the same question (the option order aside)."""
        return (self.input, tuple(sorted(self.options)) if self.options else self.target)


@dataclass(frozen=True)
class Source:
    """A parsed source: where the task is, the split options, the scheme's own options (``params``, in the
    order given; ``format`` is BIG-bench's) and the scheme that reads it."""

    location: str
    split: str
    seed: int = 0
    shots: int = DEFAULT_SHOTS
    format: str = "auto"
    size: int = TEST_SIZE  # the test split's cap
    params: tuple[tuple[str, str], ...] = ()
    scheme: Scheme | None = field(default=None, compare=False, repr=False)  # set by sources.parse_source

    @property
    def uri(self) -> str:
        """The canonical text of this source (every split option written, the scheme's spelling)."""
        scheme = self.scheme
        pairs = [("split", self.split), (scheme.seed_key, self.seed), ("shots", self.shots)]
        if self.format != "auto":
            pairs.append(("format", self.format))
        if self.size != TEST_SIZE:
            pairs.append((scheme.size_key, self.size))
        pairs += list(self.params)
        return self.location + "?" + "&".join(f"{k}={v}" for k, v in pairs)


class Scheme:
    """One kind of source. Subclasses read their tasks' examples; the splits are shared (this module)."""

    prefix = ""  # "bbh:", "reasoning-gym:"
    label = ""  # how errors name it: "BBH"
    folder = ""  # its folder in the cache
    seed_key, size_key = "seed", "size"  # how the source's text spells the split seed and the test cap
    default_seed = 0
    options: tuple[str, ...] | None = ()  # its own options; None: any other option is its own
    formats: tuple[str, ...] = ("auto",)

    def claims(self, location: str) -> bool:
        return location.startswith(self.prefix)

    def check(self, source: Source) -> None:
        """Refuse bad options of the scheme's own, without reading any data (one line naming the source)."""

    def prepare(self, sources: list[Source]) -> None:
        """Fetch whatever ``sources`` need (a download, an extraction) at once, before any is read."""

    def name(self, source: Source) -> str:
        """The task's display name: a table's row, a module's name, the materialised file's name."""
        raise NotImplementedError

    def items(self, source: Source) -> list[Item]:
        """Every example of the task, checked (errors name the file and the example's index)."""
        raise NotImplementedError

    def fingerprint(self, source: Source) -> bytes:
        """What the examples depend on (file contents, a generator's version and config)."""
        raise NotImplementedError

    def order_seed(self, seed: int):
        """The seed of the ``random.Random`` that shuffles the examples before they are split."""
        return f"lorahub-ray {self.folder} split {seed}"

    def option_seed(self, seed: int, index: int):
        """The seed of the shuffle of one multiple-choice example's options."""
        return f"lorahub-ray {self.folder} options {seed} {index}"


def split_indices(items: list[Item], split: str, order_seed, shots: int, where: str,
                  size: int = TEST_SIZE) -> list[int]:
    if len(items) <= shots:
        raise DataError(f"{where}: {len(items)} examples, too few for {shots} few-shot examples and a test set")
    order = list(range(len(items)))
    random.Random(order_seed).shuffle(order)
    fewshot = order[:shots]
    if split == "fewshot":
        return fewshot
    seen = {items[i].key for i in fewshot}
    test = [i for i in order[shots:] if items[i].key not in seen][:size]
    if not test:
        raise DataError(f"{where}: every example repeats a few-shot one; no test set is left")
    return test


def format_item(item: Item, rng: random.Random) -> tuple[str, str]:
    """``(input, output)``: generative as is; multiple choice as a BBH prompt with shuffled options."""
    if item.options is None:
        return item.input, item.target
    order = list(range(len(item.options)))
    rng.shuffle(order)
    lines = [f"({LETTERS[k]}) {item.options[j]}" for k, j in enumerate(order)]
    answer = LETTERS[order.index(item.correct)]
    return item.input + "\nOptions:\n" + "\n".join(lines), f"({answer})"


@dataclass(frozen=True)
class Split:
    name: str  # the task's display name
    inputs: list[str]
    outputs: list[str]
