"""Pack planner vs first-fit-decreasing on the SFT-like and caption-like distributions.

Prints, per distribution and planner: packs, token-slot utilization, max/mean tiles per pack, the
issue's bound max(1.10, 1.05 * largest sample / mean), and planning time (best of --repeats).
The distributions and the baseline are the ones the tests use (tests/data/test_packing.py).

    python benchmarks/packing/bench_packer.py [--samples 10000] [--seq-length 4096] [--max-tiles 40]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root: the tests' generators

from sail_megatron.data.packing import PackPlan, plan_packs  # noqa: E402
from tests.data.test_packing import balance_bound, caption_like, first_fit_decreasing, sft_like  # noqa: E402


def _timed(fn: Callable[[], PackPlan], repeats: int) -> tuple[PackPlan, float]:
    best, plan = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        plan = fn()
        best = min(best, time.perf_counter() - start)
    return plan, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--max-tiles", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    s, m = args.seq_length, args.max_tiles

    print(f"samples={args.samples} seq_length={s} max_tiles={m} seed={args.seed}")
    header = (
        f"{'distribution':<10} {'planner':<22} {'packs':>6} {'lower':>7} {'util':>7} "
        f"{'max/mean':>8} {'bound':>6} {'max':>4} {'mean':>6} {'target':>6} {'ms':>8}"
    )
    print(header)
    print("-" * len(header))
    # sft-600: text-only median 600, where ~9.03 tiles per full pack make 1.10 unreachable without
    # capping packs at 9 tiles (see the tests' docstring); shown for honesty, not as a target.
    distributions = (
        ("sft", sft_like),
        ("caption", caption_like),
        ("sft-600", lambda n, seed: sft_like(n, seed=seed, text_median=600)),
    )
    for name, make in distributions:
        tokens, tiles = make(args.samples, seed=args.seed)
        lower = math.ceil(int(tokens[tokens <= s].sum()) / s)  # no plan has fewer packs
        planners = (
            ("plan_packs", lambda: plan_packs(tokens, tiles, s, m, seed=args.seed)),
            ("first_fit_decreasing", lambda: first_fit_decreasing(tokens, tiles, s, m)),
        )
        for label, fn in planners:
            plan, seconds = _timed(fn, args.repeats)
            per_pack = plan.tiles_per_pack(tiles)
            util, balance = plan.token_utilization(tokens, s), plan.tile_balance(tiles)
            bound = balance_bound(plan, tiles)
            ok = "met" if util >= 0.97 and balance <= bound else "MISSED"
            print(
                f"{name:<10} {label:<22} {plan.num_packs:>6} {lower:>7} {util:>7.2%} {balance:>8.3f} "
                f"{bound:>6.3f} {max(per_pack):>4} {sum(per_pack) / len(per_pack):>6.2f} {ok:>6} "
                f"{seconds * 1e3:>8.1f}"
            )


if __name__ == "__main__":
    main()
