"""The check's report: report.md for people, report.json for scripts, summary.txt to paste into an issue."""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Sequence

from sail_megatron.bench.gpu_check.runner import STATUSES, PartResult


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(rows: List[Dict[str, Any]]) -> List[str]:
    columns: List[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def _md_figures(figures: Dict[str, Any]) -> List[str]:
    lines, tables = [], []
    for key, value in figures.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        elif isinstance(value, dict):
            lines.append(f"- {key}: " + ", ".join(f"{k} {fmt(v)}" for k, v in value.items()))
        elif isinstance(value, list):
            lines.append(f"- {key}: " + "; ".join(fmt(v) for v in value))
        else:
            lines.append(f"- {key}: {fmt(value)}")
    for key, rows in tables:
        lines += ["", f"{key}:", ""] + _md_table(rows)
    return lines


def _te_text(env: Dict[str, Any]) -> str:
    return env.get("transformer_engine") or f"not importable ({env.get('transformer_engine_error', 'not installed')})"


def environment_lines(env: Dict[str, Any]) -> List[str]:
    bandwidth = env.get("memory_bandwidth_tbps")
    return [
        f"- Device: {env.get('device', 'n/a')} ({env.get('capability', '?')}, {fmt(env.get('memory_gib'))} GiB), "
        f"{env.get('device_count', '?')} visible",
        f"- Driver {env.get('driver') or 'n/a'}, CUDA (torch) {env.get('torch_cuda') or 'n/a'}, "
        f"cuDNN {env.get('cudnn') or 'n/a'}",
        f"- torch {env.get('torch', 'n/a')}, Transformer Engine {_te_text(env)}, "
        f"megatron-core {env.get('megatron_core') or 'n/a'}, Triton {env.get('triton') or 'n/a'}, "
        f"DALI {env.get('dali') or 'n/a'}, apex {fmt(env.get('apex'))}, Python {env.get('python', 'n/a')}",
        f"- Peak dense TFLOP/s (bf16 / fp8): {fmt(env.get('peak_tflops_bf16'))} / {fmt(env.get('peak_tflops_fp8'))}; "
        f"memory bandwidth {fmt(bandwidth)} TB/s ({env.get('memory_bandwidth_source') or 'unknown'})",
    ] + [
        f"- {label}: {fmt(env[key])}"
        for key, label in (("probe_error", "Environment probe failed"), ("tokenizer_error", "Demo tokenizer failed"))
        if key in env
    ]


def report_document(
    env: Dict[str, Any], results: Sequence[PartResult], started: datetime.datetime, seconds: float, budget_s: float
) -> Dict[str, Any]:
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    return {
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "budget_s": budget_s,
        "environment": env,
        "counts": counts,
        "ok": counts["failed"] == 0 and counts["timeout"] == 0,
        "parts": [asdict(r) for r in results],
    }


def _duration(doc: Dict[str, Any]) -> str:
    minutes, secs = divmod(int(round(doc["duration_s"])), 60)
    return f"{minutes} min {secs:02d} s (budget {doc['budget_s']:.0f} s)"


def _counts(counts: Dict[str, int]) -> str:
    return (
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['timeout']} timed out, "
        f"{counts['skipped']} skipped"
    )


def render_markdown(doc: Dict[str, Any]) -> str:
    env, counts = doc["environment"], doc["counts"]
    lines = [
        "# GPU check",
        "",
        f"- Date: {doc['date']}; {_duration(doc)}",
        *environment_lines(env),
        f"- Result: {_counts(counts)}",
        "",
        "| part | status | time | summary |",
        "| --- | --- | --- | --- |",
    ]
    for p in doc["parts"]:
        summary = p["summary"] or p["reason"]
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']:.0f} s | {fmt(summary) if summary else ''} |")
    for p in doc["parts"]:
        lines += ["", f"## {p['name']}: {p['status']}", "", p["title"]]
        if p["command"]:
            lines += [
                "",
                f"`{p['command']}` ({p['seconds']:.0f} s, exit code {fmt(p['returncode'])}; log: `{p['log']}`)",
            ]
        if p["reason"]:
            lines += ["", f"**{p['reason']}**"]
        if p["figures"]:
            lines += [""] + _md_figures(p["figures"])
        if p["log_tail"]:
            lines += ["", "<details><summary>log tail</summary>", "", "````", p["log_tail"], "````", "", "</details>"]
    return "\n".join(lines) + "\n"


def render_summary(doc: Dict[str, Any]) -> str:
    """A few plain lines: the date, the machine and the versions, then one line per part (status, seconds, its
    one-line summary or the reason it did not pass)."""
    env = doc["environment"]
    width = max([len(p["name"]) for p in doc["parts"]] + [4])
    lines = [
        f"sail-megatron gpu-check {doc['date']}, {_duration(doc)}: {_counts(doc['counts'])}",
        f"device: {env.get('device', 'n/a')} ({env.get('capability', '?')}, {fmt(env.get('memory_gib'))} GiB), "
        f"driver {env.get('driver') or 'n/a'}, CUDA (torch) {env.get('torch_cuda') or 'n/a'}",
        f"versions: torch {env.get('torch', 'n/a')}, Transformer Engine {_te_text(env)}, "
        f"megatron-core {env.get('megatron_core') or 'n/a'}",
    ]
    for p in doc["parts"]:
        what = " ".join((p["summary"] or p["reason"] or "").split())
        if p["summary"] and p["reason"]:
            what += f" ({' '.join(p['reason'].split())})"
        lines.append(f"{p['name']:<{width}}  {p['status']:<7}  {p['seconds']:>4.0f} s  {what}".rstrip())
    return "\n".join(lines) + "\n"


class ReportPaths(NamedTuple):
    markdown: Path
    json: Path
    summary: Path


def write_report(out: Path, doc: Dict[str, Any]) -> ReportPaths:
    out.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(out / "report.md", out / "report.json", out / "summary.txt")
    paths.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    paths.markdown.write_text(render_markdown(doc))
    paths.summary.write_text(render_summary(doc))
    return paths
