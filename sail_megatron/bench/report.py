"""The benchmark's outputs: a console table, the JSON document and a PNG (throughput and MFU per
variant side by side, and each variant's step-time breakdown as a stacked bar)."""

import json
from pathlib import Path
from typing import Dict

BREAKDOWN_ORDER = [
    "data_wait",
    "vision_forward",
    "language_forward",
    "backward",
    "pipeline_p2p",
    "grad_sync",
    "optimizer",
    "param_gather",
]


def table(results: Dict[str, Dict]) -> str:
    # MFU against the bf16 peak; FP8 runs also against the FP8 peak ("MFU fp8").
    lines = [
        f"{'variant':<16}{'ms/step':>10}{'tok/s/dev':>12}{'TFLOP/s/dev':>13}{'MFU':>8}{'MFU fp8':>9}{'pack':>7}"
        f"{'data wait':>11}{'mem GiB':>9}"
    ]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"{name:<16}  skipped: {r['skipped']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mfu_fp8 = f"{100 * r['mfu_fp8']:.1f}%" if r.get("mfu_fp8") is not None else "n/a"
        pack = f"{100 * r['packing_utilization']:.0f}%" if r["packing_utilization"] is not None else "n/a"
        lines.append(
            f"{name:<16}{1000 * r['step_time_s']['median']:>10.1f}{r['tokens_per_s_per_device']:>12,.0f}"
            f"{r['tflops_per_s_per_device']:>13.4g}{mfu:>8}{mfu_fp8:>9}{pack:>7}"
            f"{100 * r['data_wait_frac']:>10.0f}%{r['peak_memory_gib']:>9.2f}"
        )
        if r["breakdown_s_per_step"]:
            parts = ", ".join(f"{k} {1000 * r['breakdown_s_per_step'].get(k, 0):.1f}" for k in BREAKDOWN_ORDER)
            lines.append(f"{'':<16}breakdown ms/step: {parts}")
        lines.append(f"{'':<16}{_vision_line(r)}")
    return "\n".join(lines)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _vision_line(r: Dict) -> str:
    """The ViT's share of the FLOPs and of the forward time, the tiles each rank encoded and what each rank
    handed to collectives per micro-batch, by process group."""
    share = r.get("vision_flops_share")
    forward = r.get("vision_forward_s_per_step")
    tiles = r.get("decoded_tiles_per_rank_per_step") or {}
    comm = ", ".join(f"{k} {_mib(v)}" for k, v in (r.get("comm_bytes_per_micro_batch") or {}).items()) or "none"
    return (
        f"vision ({r.get('vision_parallel', 'tensor')}): {100 * share:.0f}% of FLOPs"
        + (f", forward {1000 * forward:.1f} ms/step" if forward is not None else "")
        + f", tiles/rank/step max {tiles.get('max', 0):.1f} mean {tiles.get('mean', 0):.1f}"
        + f"; comm per micro-batch: {comm}"
        if share is not None
        else f"comm per micro-batch: {comm}"
    )


def write_json(doc: Dict, path: Path) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def plot(doc: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {k: v for k, v in doc["results"].items() if "skipped" not in v}
    names = list(results)
    fig, (ax_tput, ax_break) = plt.subplots(1, 2, figsize=(12, 4.5))
    tput = [results[n]["tokens_per_s_per_device"] for n in names]
    bars = ax_tput.bar(names, tput, color="#4C72B0")
    ax_tput.set_ylabel("tokens/s per device")
    ax_tput.set_title("throughput")
    for bar, n in zip(bars, names):
        mfu = results[n]["mfu"]
        label = f"{100 * mfu:.1f}% MFU" if mfu is not None else f"{results[n]['tflops_per_s_per_device']:.3g} TFLOP/s"
        ax_tput.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
        )
    bottom = [0.0] * len(names)
    for phase in BREAKDOWN_ORDER:
        values = [1000 * results[n]["breakdown_s_per_step"].get(phase, 0.0) for n in names]
        if any(values):
            ax_break.bar(names, values, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax_break.set_ylabel("ms per step (timed steps)")
    ax_break.set_title("step-time breakdown")
    ax_break.legend(fontsize=7)
    for ax in (ax_tput, ax_break):
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"{doc['config']} on {doc['device']} ({doc['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
