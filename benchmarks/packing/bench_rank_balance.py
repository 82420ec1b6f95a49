"""Vision work per step across data-parallel ranks, before and after the look-ahead balance.

Simulates what the trainer does: each of --ranks data-parallel ranks reads its own sample stream with
--workers energon workers, each packing buffers of --packing-buffer samples with `plan_packs` (seq
4096, 40 tiles per pack as in the recipes) and handing rows out round-robin. A step takes --micro rows
per rank. Before: each rank takes its next rows. After: `sail_megatron.data.rank_balance` with a
look-ahead of L rows and a maximum delay of W steps (the same functions the trainer calls, the
all-gather replaced by a list). Prints, per distribution and setting, the per-step max/mean tiles
across ranks (mean, 95th percentile, worst step), sum(max) / sum(mean) over all steps (what the
slowest rank costs in vision time), how long rows wait (in the buffer, from read to use; and later
than they would have run without balancing), and the selection's CPU time per step and rank.

    python benchmarks/packing/bench_rank_balance.py [--ranks 8] [--micro 4] [--steps 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root: the tests' generators

from sail_megatron.data.packing import plan_packs  # noqa: E402
from sail_megatron.data.rank_balance import choose_target, step_options, summarize  # noqa: E402
from tests.data.test_packing import caption_like, sft_like  # noqa: E402


def rank_stream(make, rank: int, rows: int, args) -> list[int]:
    """Tile counts of one rank's packed rows, in the order its loader hands them out."""
    per_worker: list[list[int]] = [[] for _ in range(args.workers)]
    need = -(-rows // args.workers)
    for w, out in enumerate(per_worker):
        chunk = 0
        while len(out) < need:
            seed = args.seed * 1_000_003 + (rank * 1000 + w) * 100_000 + chunk
            tokens, tiles = make(args.packing_buffer, seed=seed)
            plan = plan_packs(tokens, tiles, args.seq_length, args.max_tiles, seed=seed)
            out.extend(plan.tiles_per_pack(tiles))
            chunk += 1
    return [per_worker[i % args.workers][i // args.workers] for i in range(rows)]


def ratios(sums: np.ndarray) -> np.ndarray:
    """Per-step max/mean over ranks; sums is [steps, ranks]."""
    mean = sums.mean(axis=1)
    return np.where(mean > 0, sums.max(axis=1) / np.maximum(mean, 1e-9), 1.0)


def simulate(streams: list[list[int]], steps: int, micro: int, lookahead: int, max_delay: int, max_tiles: int):
    """Returns ([steps, ranks] tile sums, waits in buffer, delays vs in-order, seconds per step and rank)."""
    ranks, max_sum = len(streams), micro * max_tiles
    buffers: list[list[tuple[int, int, int]]] = [[] for _ in range(ranks)]  # (stream index, deadline, tiles)
    pulled = [0] * ranks
    sums = np.zeros((steps, ranks), dtype=np.int64)
    waits, delays = [], []
    local_s = target_s = 0.0
    for step in range(steps):
        for r in range(ranks):
            while len(buffers[r]) < micro + lookahead:
                q = pulled[r]
                buffers[r].append((q, q // micro + max_delay, streams[r][q]))
                pulled[r] += 1
        began = time.perf_counter()
        options = [step_options([t for _, _, t in b], [d for _, d, _ in b], step, micro) for b in buffers]
        summaries = [summarize(o, max_sum) for o in options]
        local_s += time.perf_counter() - began
        began = time.perf_counter()
        target = choose_target(summaries, micro, max_sum)
        target_s += time.perf_counter() - began
        for r, o in enumerate(options):
            began = time.perf_counter()
            chosen = o.take(target)
            local_s += time.perf_counter() - began
            for i in chosen:
                q, _, t = buffers[r][i]
                sums[step, r] += t
                pulled_at = 0 if q < micro + lookahead else (q - lookahead) // micro
                waits.append(step - pulled_at)
                delays.append(step - q // micro)
            taken = set(chosen)
            buffers[r] = [e for i, e in enumerate(buffers[r]) if i not in taken]
    # Every rank runs its own options/summary/take and the (shared) target choice once per step.
    per_rank_step = local_s / (steps * ranks) + target_s / steps
    return sums, np.asarray(waits), np.asarray(delays), per_rank_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--micro", type=int, default=4, help="micro-batches (packed rows) per rank per step")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--max-tiles", type=int, default=40, help="max_tiles_per_pack")
    parser.add_argument("--packing-buffer", type=int, default=512, help="packing_buffer_size")
    parser.add_argument("--workers", type=int, default=4, help="loader workers per rank")
    parser.add_argument("--lookahead", type=int, nargs="+", default=[4, 8, 16], help="rows buffered beyond a step")
    parser.add_argument("--max-delay", type=int, nargs="+", default=[4, 8], help="steps a row may run late")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(
        f"ranks={args.ranks} micro={args.micro} steps={args.steps} seq_length={args.seq_length} "
        f"max_tiles_per_pack={args.max_tiles} packing_buffer={args.packing_buffer} workers={args.workers}"
    )
    header = (
        f"{'distribution':<10} {'setting':<14} {'tiles/step':>10} {'mean':>6} {'p95':>6} {'worst':>6} "
        f"{'sum ratio':>9} {'wait mean':>9} {'wait max':>8} {'late max':>8} {'ms/step':>8}"
    )
    print(header)
    print("-" * len(header))
    distributions = (("sft", sft_like), ("caption", caption_like))
    for name, make in distributions:
        need = args.steps * args.micro + max(args.lookahead) + args.micro
        streams = [rank_stream(make, r, need, args) for r in range(args.ranks)]
        before = np.asarray(
            [[sum(s[k * args.micro : (k + 1) * args.micro]) for s in streams] for k in range(args.steps)]
        )
        rb = ratios(before)
        print(
            f"{name:<10} {'in order':<14} {before.mean():>10.1f} {rb.mean():>6.3f} {np.percentile(rb, 95):>6.3f} "
            f"{rb.max():>6.3f} {before.max(axis=1).sum() / before.mean(axis=1).sum():>9.3f} "
            f"{'-':>9} {'-':>8} {'-':>8} {'-':>8}"
        )
        for lookahead in args.lookahead:
            for max_delay in args.max_delay:
                sums, waits, delays, seconds = simulate(
                    streams, args.steps, args.micro, lookahead, max_delay, args.max_tiles
                )
                ra = ratios(sums)
                setting = f"L={lookahead} W={max_delay}"
                print(
                    f"{name:<10} {setting:<14} {sums.mean():>10.1f} {ra.mean():>6.3f} {np.percentile(ra, 95):>6.3f} "
                    f"{ra.max():>6.3f} {sums.max(axis=1).sum() / sums.mean(axis=1).sum():>9.3f} "
                    f"{waits.mean():>9.2f} {waits.max():>8} {max(0, delays.max()):>8} {seconds * 1e3:>8.3f}"
                )


if __name__ == "__main__":
    main()
