"""The table `sail-bench plan` prints, from the plan's JSON document."""

from typing import Any, Dict

from sail_megatron.config.counts import format_count

TABLE_ROWS = 12
VIT = {"tensor": "TP", "data": "DP"}
"""Where the ViT runs: split over the TP ranks, or whole on each and data-parallel across them."""


def _fmt_hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 else f"{h:.1f}"


def _ep_cell(row: Dict[str, Any], moe: bool) -> str:
    return f" {row['ep']:>2}" if moe else ""


def render(doc: Dict[str, Any], show_all: bool = False) -> str:
    parts = doc["params_by_part"]
    lines = [
        f"sail-bench plan: {doc['config']} on {doc['gpus']} x {doc['gpu']} "
        f"({doc['gpu_memory_gib']:.1f} GiB; {100 * doc['headroom']:.0f}% kept free for fragmentation, NCCL and the "
        f"CUDA context: {doc['usable_memory_gib']:.1f} GiB usable)",
        f"model: {doc['model_preset']}, {format_count(doc['params_total'])} parameters built "
        f"(vision {format_count(parts['vision'])}, projector {format_count(parts['projector'])}, "
        f"language {format_count(parts['language'])}); trains {'+'.join(doc['trainable'])}; "
        f"{doc['precision']}",
        f"budget: {doc['budget']}"
        + ("" if "(run.train_tokens)" in doc["budget"] else f" = {format_count(doc['budget_tokens'])} tokens"),
        f"data ({doc['data']['source']}): {doc['data']['description']}",
        f"FLOPs: {doc['training_flops_per_token'] / 1e9:.3g} GFLOP per token to train, ViT counted "
        f"({100 * doc['vit_flops_share']:.0f}% of it)",
        f"throughput: {doc['throughput']['description']}",
        f"communication: {doc['communication']['description']}",
        "",
    ]
    moe = doc["moe"]  # an EP column for mixture-of-experts models
    header = (
        f"  {'TP':>2} {'PP':>2}{' EP' if moe else ''} {'DP':>5} {'ViT':<5}{'mbs':>3} {'recompute':<15}{'dist-opt':<9}"
        f"{'weights':>8}{'grads':>7}{'optim':>7}{'activ':>7}{'loader':>7}{'total':>7} {'fits':<5}"
        f"{'tok/s/GPU':>10}{'MFU':>6}{'comm':>6}{'GPU-hours':>11}{'days':>7}"
    )
    lines += [header + "   (memory in GiB per GPU)", "-" * len(header)]
    layouts = doc["layouts"]
    shown = layouts if show_all else layouts[:TABLE_ROWS]
    if not show_all and doc["picked"] is not None and doc["picked"] not in shown:
        shown = shown + [doc["picked"]]
    for r in shown:
        s = r["memory_split_gib"]
        recompute = (r["recompute_granularity"] or "none") + ("+vit" if r["recompute_vision"] else "")
        lines.append(
            f"{'*' if r['picked'] else ' '} {r['tp']:>2} {r['pp']:>2}{_ep_cell(r, moe)} {r['dp']:>5} "
            f"{VIT[r['vision_parallel']]:<5}{r['micro_batch_size']:>3} "
            f"{recompute:<15}{'on' if r['distributed_optimizer'] else 'off':<9}"
            f"{s['weights']:>8.1f}{s['grads']:>7.1f}{s['optimizer']:>7.1f}{s['activations']:>7.1f}{s['loader']:>7.2f}"
            f"{r['memory_gib_per_gpu']:>7.1f} {'yes' if r['fits'] else 'no':<5}"
            f"{r['tokens_per_s_per_gpu']:>10,.0f}{100 * r['mfu']:>5.1f}%{100 * r['comm_fraction']:>5.1f}%"
            f"{_fmt_hours(r['gpu_hours']):>11}"
            f"{r['days']:>7.1f}"
        )
    hidden = len(layouts) - len(shown)
    if hidden > 0:
        unfit = sum(not r["fits"] for r in layouts if r not in shown)
        lines.append(f"  ... {hidden} more layouts ({unfit} of them do not fit): --all lists them")
    lines.append("")
    p = doc["picked"]
    if p is None:
        lines.append(f"picked: none: {doc['why']}")
    else:
        lines.append(
            f"picked (*): TP={p['tp']} PP={p['pp']}{' EP=%d' % p['ep'] if moe else ''} DP={p['dp']}, "
            f"vision_parallel={p['vision_parallel']}, micro-batch {p['micro_batch_size']}, recompute "
            f"{(p['recompute_granularity'] or 'none') + (' + ViT' if p['recompute_vision'] else '')}, distributed "
            f"optimizer {'on' if p['distributed_optimizer'] else 'off'}: {doc['why']}. "
            f"{p['memory_gib_per_gpu']:.1f} GiB per GPU, {p['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU "
            f"({100 * p['comm_fraction']:.1f}% of the step communicating), "
            f"{_fmt_hours(p['gpu_hours'])} GPU-hours, {p['days']:.1f} days on {doc['gpus']} GPUs."
        )
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)
