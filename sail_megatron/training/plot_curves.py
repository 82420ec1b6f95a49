"""A PNG of a run's loss, throughput and learning-rate curves from its `metrics.jsonl`.

python -m sail_megatron.training.plot_curves RUN_DIR [--out PNG]
"""

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from sail_megatron.training.run_logs import CURVES_FILE, METRICS_FILE, RESUME_EVENT

REQUIRED_KEYS = ("step",)
LOSS_KEYS = ("loss", "valid_loss")
"""A record carries the training loss of a logged step, a validation loss, or both."""


VALID_SOURCE_PREFIX = "valid_loss/"
"""Each validation source's loss: `valid_loss/<source>` (the total stays `valid_loss`)."""
SOURCE_COLORS = ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
SOURCE_STYLES = ("--", ":", "-.")


def valid_sources(records: Sequence[Dict]) -> List[str]:
    """The validation sources the records name, in the order they first appear."""
    seen: Dict[str, None] = {}
    for r in records:
        for key in r:
            if key.startswith(VALID_SOURCE_PREFIX):
                seen.setdefault(key[len(VALID_SOURCE_PREFIX) :], None)
    return list(seen)


class MetricsError(ValueError):
    """The metrics file is missing or holds no usable record."""


def _metrics_path(run_dir_or_metrics_path: Union[str, Path]) -> Path:
    p = Path(run_dir_or_metrics_path)
    return p / METRICS_FILE if p.is_dir() else p


def load_metrics(run_dir_or_metrics_path: Union[str, Path]) -> List[Dict]:
    """One record per step, sorted by step: the step's records merged, later lines winning; at a resume
    marker the records of the steps after its checkpoint are dropped (the resumed run runs them again).
    Malformed lines are skipped with one counted warning."""
    path = _metrics_path(run_dir_or_metrics_path)
    if not path.is_file():
        raise MetricsError(f"{path}: no such metrics file")
    by_step: Dict[int, Dict] = {}
    bad: List[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("event") == RESUME_EVENT and isinstance(rec.get("step"), int):
                    for later in [s for s in by_step if s > rec["step"]]:
                        del by_step[later]
                    continue
                if (
                    not isinstance(rec, dict)
                    or any(k not in rec for k in REQUIRED_KEYS)
                    or not any(k in rec for k in LOSS_KEYS)
                ):
                    raise ValueError(f"needs a JSON object with 'step' and one of {list(LOSS_KEYS)}")
                step = rec["step"]
                if isinstance(step, bool) or not isinstance(step, int):
                    raise ValueError(f"step {step!r} is not an integer")
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                bad.append(f"line {lineno}: {e}")
                continue
            by_step.setdefault(step, {}).update(rec)  # a step's training and validation records merge; later lines win
    if bad:
        shown = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
        warnings.warn(f"{path}: skipped {len(bad)} malformed line(s): {shown}", stacklevel=2)
    if not by_step:
        raise MetricsError(f"{path}: no usable records" + (f" ({bad[0]})" if bad else " (file is empty)"))
    return [by_step[s] for s in sorted(by_step)]


def _series(records: Sequence[Dict], key: str):
    """(steps, values) where the value is a finite number (null, missing and NaN are left out)."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _smooth(values: Sequence[float], weight: float = 0.9) -> List[float]:
    """Debiased exponential moving average (as TensorBoard draws it), so early points are not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_curves(run_dir_or_metrics_path: Union[str, Path], out_png: Optional[Union[str, Path]] = None) -> Path:
    """Draw loss (raw + smoothed, validation: the total and each source's), tokens/s (with TFLOP/s or MFU on a twin axis) and lr against step."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on cluster nodes
    import matplotlib.pyplot as plt

    path = _metrics_path(run_dir_or_metrics_path)
    records = load_metrics(path)
    out = Path(out_png) if out_png is not None else path.parent / CURVES_FILE

    fig, (ax_loss, ax_tput, ax_lr) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    fig.suptitle(path.parent.resolve().name)

    steps, loss = _series(records, "loss")
    ax_loss.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    if loss:
        ax_loss.plot(steps, _smooth(loss), color="tab:blue", linewidth=2, label="smoothed (EMA 0.9)")
    steps, valid = _series(records, "valid_loss")
    sources = valid_sources(records)
    if valid:
        label = "validation (all sources)" if len(sources) > 1 else "validation"
        ax_loss.plot(steps, valid, color="tab:red", marker="o", linewidth=2, label=label)
    if len(sources) > 1:  # with one source the total is its loss
        for i, name in enumerate(sources):
            steps, values = _series(records, f"{VALID_SOURCE_PREFIX}{name}")
            color, style = SOURCE_COLORS[i % len(SOURCE_COLORS)], SOURCE_STYLES[i // len(SOURCE_COLORS) % 3]
            ax_loss.plot(steps, values, color=color, linestyle=style, marker=".", linewidth=1.2, label=f"valid {name}")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right", fontsize="small", ncol=1 + len(sources) // 8)

    steps, tput = _series(records, "tokens_per_s")
    ax_tput.plot(steps, tput, color="tab:green", label="tokens/s")
    ax_tput.set_ylabel("tokens/s", color="tab:green")
    # Prefer MFU on the twin axis; fall back to TFLOP/s when no peak was known (e.g. CPU runs).
    for key, label, scale in (("mfu", "MFU (%)", 100.0), ("tflops_per_s", "TFLOP/s", 1.0)):
        s, v = _series(records, key)
        if v:
            twin = ax_tput.twinx()
            twin.plot(s, [x * scale for x in v], color="tab:orange", label=label)
            twin.set_ylabel(label, color="tab:orange")
            break

    steps, lr = _series(records, "lr")
    ax_lr.plot(steps, lr, color="tab:purple")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    for ax in (ax_loss, ax_tput, ax_lr):
        ax.grid(True, alpha=0.3)

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Plot a run's loss and throughput curves from metrics.jsonl.")
    parser.add_argument("run_dir", help=f"run folder holding {METRICS_FILE} (or the file itself)")
    parser.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        out = plot_curves(args.run_dir, args.out)
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
