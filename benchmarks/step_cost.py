"""The rule that picks an adapted layer's path for one candidate (lorahub_ray.core.compose.CALL_ELEMENTS), measured
per layer shape: the unmerged low-rank update on ``rows`` rows (``result += s·(x Aᵀ) Bᵀ``, as the lean forward runs
it) against merging the update into a copy of the weight (``W = W₀ + s·B·A``, once per composition), for the
adapted layers of the two benchmark worlds (SmolLM2-135M's q_proj and v_proj at rank 8, Flan-T5-base's q and v at
rank 16). Each measurement cycles through 40 copies of the layer's tensors, so that they come from memory as in a
forward pass, and the kinds run interleaved, 15 rounds, medians.

Prints, per shape: both times at each row count, the cost per element each moves (rows·(in + 2·out) for the update,
2·in·out for the merge), the measured break-even rows and the rule's, (2·in·out − CALL_ELEMENTS) / (in + 2·out).
Then a path not built, measured at the step's row count (a few examples' tokens): the down-projection folded into
the base product (one ``F.linear`` on a ``[out + r, in]`` weight, ``[W₀; A]``, then the up-projection from its last
``r`` columns), against the base product alone and the base product plus the unmerged update.

Usage: python benchmarks/step_cost.py [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"SmolLM2 q_proj": (576, 576, 8), "SmolLM2 v_proj": (576, 192, 8), "Flan-T5-base q, v": (768, 768, 16)}
ROWS = (1, 8, 40, 128, 270, 320, 512, 1024)
STEP_ROWS = {"SmolLM2 q_proj": 270, "SmolLM2 v_proj": 270, "Flan-T5-base q, v": 320}  # the benchmarks' steps
COPIES, ROUNDS = 40, 15


def measure(d_in: int, d_out: int, r: int, clock) -> dict[int, tuple[float, float]]:
    """Seconds per layer of the unmerged update and of a merge, by rows."""
    import torch

    weights = [torch.randn(d_out, d_in) for _ in range(COPIES)]
    merged = [torch.empty(d_out, d_in) for _ in range(COPIES)]
    a = [torch.randn(r, d_in) * 0.02 for _ in range(COPIES)]
    b = [torch.randn(d_out, r) * 0.02 for _ in range(COPIES)]
    out = {}
    for rows in ROWS:
        x = [torch.randn(rows, d_in) for _ in range(COPIES)]
        result = [torch.randn(rows, d_out) for _ in range(COPIES)]

        def unmerged():
            for i in range(COPIES):
                result[i].addmm_(x[i] @ a[i].T, b[i].T, alpha=2.0)

        def merge():
            for i in range(COPIES):
                torch.addmm(weights[i], b[i], a[i], alpha=2.0, out=merged[i])

        times = {unmerged: [], merge: []}
        with torch.inference_mode():
            for _ in range(ROUNDS):
                for fn, seconds in times.items():
                    start = clock()
                    fn()
                    seconds.append((clock() - start) / COPIES)
        out[rows] = (statistics.median(times[unmerged]), statistics.median(times[merge]))
    return out


def measure_fold(d_in: int, d_out: int, r: int, rows: int, clock) -> dict[str, float]:
    """Seconds per layer of the base product alone, with the unmerged update, and with the down-projection folded
    into it; checks that the fold gives the unmerged path's values."""
    import torch
    import torch.nn.functional as F

    weights = [torch.randn(d_out, d_in) for _ in range(COPIES)]
    a = [torch.randn(r, d_in) * 0.02 for _ in range(COPIES)]
    b = [torch.randn(d_out, r) * 0.02 for _ in range(COPIES)]
    folded = [torch.cat([w, a_]) for w, a_ in zip(weights, a)]
    x = [torch.randn(rows, d_in) for _ in range(COPIES)]

    def base():
        return [F.linear(x[i], weights[i]) for i in range(COPIES)]

    def unmerged():
        out = base()
        for i in range(COPIES):
            out[i].addmm_(x[i] @ a[i].T, b[i].T, alpha=2.0)
        return out

    def fold():
        out = []
        for i in range(COPIES):
            both = F.linear(x[i], folded[i])
            out.append(both[:, :d_out].addmm_(both[:, d_out:], b[i].T, alpha=2.0))
        return out

    times = {base: [], unmerged: [], fold: []}
    with torch.inference_mode():
        if not all(torch.allclose(u, f, atol=1e-5) for u, f in zip(unmerged(), fold())):
            raise AssertionError("the folded path does not give the unmerged path's values")
        for _ in range(ROUNDS):
            for fn, seconds in times.items():
                start = clock()
                fn()
                seconds.append((clock() - start) / COPIES)
    return {fn.__name__: statistics.median(seconds) for fn, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (for a busy machine, with --threads 1)")
    args = parser.parse_args()
    import torch

    from lorahub_ray.core.compose import CALL_ELEMENTS

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch threads: {torch.get_num_threads()}; clock: {args.clock}; load average (1, 5, 15 min): "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    for name, (d_in, d_out, r) in SHAPES.items():
        times = measure(d_in, d_out, r, clock)
        per_row, merge_elements = d_in + 2 * d_out, 2 * d_in * d_out
        merge = statistics.median(m for _, m in times.values())
        print(f"\n{name}: in {d_in}, out {d_out}, rank {r}; a merge {merge * 1e6:.0f} us "
              f"({merge / merge_elements * 1e9:.2f} ns per element moved; median over the rounds of every row count)")
        for rows, (unmerged, merge) in times.items():
            print(f"    {rows:5d} rows: unmerged update {unmerged * 1e6:6.0f} us "
                  f"({unmerged / (rows * per_row + CALL_ELEMENTS) * 1e9:.2f} ns per element, the call's fixed cost "
                  f"counted as {CALL_ELEMENTS}), merge {merge * 1e6:6.0f} us -> {'merge' if merge < unmerged else 'update'}")
        measured = next((rows for rows, (unmerged, merge) in times.items() if merge < unmerged), None)
        rule = max(0, (merge_elements - CALL_ELEMENTS)) / per_row
        print(f"    break-even: measured, the first row count above where merging is cheaper: {measured}; "
              f"the rule merges from {rule:.0f} rows on (all calls of one composition together)")
    print("\nthe down-projection folded into the base product ([W0; A], then the up-projection), at the step's rows:")
    for name, (d_in, d_out, r) in SHAPES.items():
        rows = STEP_ROWS[name]
        t = measure_fold(d_in, d_out, r, rows, clock)
        print(f"    {name}, {rows} rows: base product {t['base'] * 1e6:.0f} us; with the unmerged update "
              f"{t['unmerged'] / t['base']:.3f}x, folded {t['fold'] / t['base']:.3f}x of it")
    print("\nload average (1, 5, 15 min): " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
