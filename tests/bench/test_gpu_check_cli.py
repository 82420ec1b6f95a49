"""tools/gpu_check.py on a machine without CUDA, its part runner and its report writer (fake parts: the real
ones need a GPU; docs/gpu.md). The parts' own CPU-testable logic: tests/bench/test_gpu_check_parts.py."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sail_megatron.bench.gpu_check import (
    Context,
    Part,
    PartResult,
    bench_figures,
    render_markdown,
    render_summary,
    report_document,
    run_parts,
    write_report,
)

ROOT = Path(__file__).resolve().parents[2]


def test_exits_2_without_a_gpu(tmp_path):
    run = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--out", str(tmp_path / "report")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "gpu-check needs a CUDA GPU" in run.stderr and "sees no CUDA device" in run.stderr
    assert not (tmp_path / "report").exists()  # nothing run, nothing written


def _fake_results():
    return [
        PartResult(
            "pytest-gpu",
            "The GPU tests.",
            "passed",
            41.2,
            "python -m pytest tests/gpu",
            0,
            "3 passed in 40.1s",
            figures={"passed": 3},
            log="gpu_check/logs/pytest-gpu.log",
            log_tail="...\n3 passed in 40.1s",
        ),
        PartResult(
            "layers",
            "TE vs local.",
            "failed",
            95.0,
            "python -m sail_megatron.bench.gpu_check worker layers",
            1,
            "3/4 within rel L2 0.05 (worst 0.9)",
            figures={
                "comparisons": [
                    {"model": "tiny", "batch": "padded", "rel_l2": 0.0123, "ok": True},
                    {"model": "tiny", "batch": "packed", "rel_l2": 0.91, "ok": False},
                ]
            },
            log_tail="FAILED: tiny packed: TE vs local logits differ | by 0.91",
        ),
        PartResult(
            "train-bf16",
            "sail-bench.",
            "timeout",
            150.0,
            "python -m sail_megatron.bench ...",
            None,
            reason="killed after 150 s",
            log_tail="measuring baseline",
        ),
        PartResult("train-fp8", "FP8.", "skipped", reason="Transformer Engine is not importable (No module)"),
    ]


ENV = {
    "device": "NVIDIA H100 80GB HBM3",
    "capability": "sm_90",
    "memory_gib": 79.1,
    "device_count": 1,
    "driver": "550.54.15",
    "torch": "2.13.0",
    "torch_cuda": "12.8",
    "cudnn": 91000,
    "transformer_engine": None,
    "transformer_engine_error": "ModuleNotFoundError: No module named 'transformer_engine'",
    "megatron_core": "0.16.1",
    "triton": "3.9.0",
    "dali": "2.4.0",
    "apex": False,
    "python": "3.11.7",
    "peak_tflops_bf16": 989.0,
    "peak_tflops_fp8": 1979.0,
    "memory_bandwidth_tbps": 3.35,
    "memory_bandwidth_source": "datasheet figure for H100",
}


def test_report_markdown_and_json(tmp_path):
    import datetime

    started = datetime.datetime(2026, 11, 23, 9, 30, tzinfo=datetime.timezone.utc)
    doc = report_document(ENV, _fake_results(), started, 301.4, 450)
    md_path, json_path, summary_path = write_report(tmp_path, doc)

    back = json.loads(json_path.read_text())
    assert back["date"] == "2026-11-23T09:30:00+00:00" and back["duration_s"] == 301.4
    assert back["counts"] == {"passed": 1, "failed": 1, "timeout": 1, "skipped": 1} and back["ok"] is False
    assert back["environment"]["device"] == "NVIDIA H100 80GB HBM3"
    assert [p["status"] for p in back["parts"]] == ["passed", "failed", "timeout", "skipped"]
    assert back["parts"][1]["figures"]["comparisons"][1]["rel_l2"] == 0.91
    assert set(back["parts"][0]) >= {
        "name",
        "title",
        "status",
        "seconds",
        "command",
        "returncode",
        "summary",
        "reason",
        "figures",
        "log",
        "log_tail",
    }

    md = md_path.read_text()
    assert md == render_markdown(back)
    assert md.startswith("# GPU check\n")
    assert "- Date: 2026-11-23T09:30:00+00:00; 5 min 01 s" in md
    assert "NVIDIA H100 80GB HBM3 (sm_90, 79.10 GiB)" in md and "Driver 550.54.15, CUDA (torch) 12.8" in md
    assert "Transformer Engine not importable (ModuleNotFoundError" in md and "megatron-core 0.16.1" in md
    assert "- Result: 1 passed, 1 failed, 1 timed out, 1 skipped" in md
    assert "| pytest-gpu | passed | 41 s | 3 passed in 40.1s |" in md
    assert "| train-bf16 | timeout | 150 s | killed after 150 s |" in md
    assert "| train-fp8 | skipped | 0 s | Transformer Engine is not importable (No module) |" in md
    # A list of rows becomes a table; a log tail is fenced (a '|' in it stays as is).
    assert "| model | batch | rel_l2 | ok |" in md and "| tiny | packed | 0.91 | no |" in md
    assert "````\nFAILED: tiny packed: TE vs local logits differ | by 0.91\n````" in md
    assert "## train-fp8: skipped" in md and "**Transformer Engine is not importable (No module)**" in md

    # summary.txt: the date, the machine and the versions, then one line per part to paste into an issue.
    summary = summary_path.read_text()
    assert summary == render_summary(back)
    lines = summary.splitlines()
    assert lines[0] == (
        "sail-megatron gpu-check 2026-11-23T09:30:00+00:00, 5 min 01 s (budget 450 s): "
        "1 passed, 1 failed, 1 timed out, 1 skipped"
    )
    assert lines[1] == "device: NVIDIA H100 80GB HBM3 (sm_90, 79.10 GiB), driver 550.54.15, CUDA (torch) 12.8"
    assert lines[2].startswith("versions: torch 2.13.0, Transformer Engine not importable (ModuleNotFoundError")
    assert lines[2].endswith("megatron-core 0.16.1")
    assert lines[3:] == [
        "pytest-gpu  passed     41 s  3 passed in 40.1s",
        "layers      failed     95 s  3/4 within rel L2 0.05 (worst 0.9)",
        "train-bf16  timeout   150 s  killed after 150 s",
        "train-fp8   skipped     0 s  Transformer Engine is not importable (No module)",
    ]


def _python_part(name, code, timeout_s=60, **kw):
    return Part(name, f"fake part {name}", timeout_s, lambda ctx: [sys.executable, "-c", code], **kw)


def test_runner_records_each_outcome_and_goes_on(tmp_path):
    ctx = Context(root=ROOT, out=tmp_path, env={"transformer_engine": None, "transformer_engine_error": "absent"})

    def collect(ctx, log):
        return json.loads((ctx.work / "fig.json").read_text()), "read back"

    write = f"import json, pathlib; pathlib.Path({str(ctx.work / 'fig.json')!r}).write_text(json.dumps({{'x': 1.5}}))"
    parts = [
        _python_part("crash", "import sys; print('boom'); sys.exit(3)"),
        _python_part("slow", "import time; print('started', flush=True); time.sleep(60)", timeout_s=2),
        _python_part("needs-te", "print('never')", needs_te=True),
        _python_part("ok", write + "; print('done')", collect=collect),
        _python_part("late", "print('never')"),
    ]
    seen = []
    results = run_parts(parts, ctx, budget_s=40, on_done=lambda r: seen.append(r.name))
    by = {r.name: r for r in results}
    assert seen == ["crash", "slow", "needs-te", "ok", "late"]
    assert by["crash"].status == "failed" and by["crash"].returncode == 3 and by["crash"].log_tail.endswith("boom")
    assert by["slow"].status == "timeout" and "started" in by["slow"].log_tail and by["slow"].seconds < 30
    assert by["needs-te"].status == "skipped" and "absent" in by["needs-te"].reason
    assert by["ok"].status == "passed" and by["ok"].figures == {"x": 1.5} and by["ok"].summary == "read back"
    assert Path(by["ok"].log).read_text().startswith("$ ")
    # Under 30 s of the budget left: not started, and the report says so.
    short = run_parts([_python_part("late", "print('never')")], ctx, budget_s=5)
    assert short[0].status == "skipped" and "budget" in short[0].reason


def test_bench_figures_from_a_sail_bench_document():
    doc = {
        "device": "NVIDIA H100 80GB HBM3",
        "precision": "bf16",
        "fp8": "hybrid",
        "resolved_config": {"precision": {"layers": "auto"}},
        "results": {
            "baseline": {
                "step_time_s": {"median": 0.75},
                "tokens_per_s_per_device": 21000.0,
                "tflops_per_s_per_device": 420.0,
                "mfu": 0.4247,
                "mfu_fp8": 0.2122,
                "peak_memory_gib": 61.0,
                "breakdown_s_per_step": {"backward": 0.4},
            }
        },
    }
    figures, summary = bench_figures(doc)
    assert figures["MFU vs bf16 peak"] == 0.4247 and figures["MFU vs FP8 peak"] == 0.2122
    assert figures["breakdown (ms/step)"] == {"backward": 400.0}
    assert summary == "21,000 tok/s/GPU, 420 TFLOP/s, MFU 42.5% (21.2% of the FP8 peak)"
    skipped, why = bench_figures({"results": {"baseline": {"skipped": "needs CUDA"}}})
    assert why == "no variant was measured" and skipped["skipped"] == {"baseline": "needs CUDA"}


def test_memory_bandwidth_by_device_name():
    from types import SimpleNamespace

    from sail_megatron.bench.gpu_check import memory_bandwidth

    assert memory_bandwidth("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert memory_bandwidth("NVIDIA H100 PCIe")[0] == 2.0e12
    assert memory_bandwidth("NVIDIA H200")[0] == 4.8e12
    assert memory_bandwidth("NVIDIA GH200 480GB")[0] == 4.0e12  # not the H200 entry
    # Unknown devices: from the memory clock (kHz) and bus width, when torch reports them.
    props = SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)
    assert memory_bandwidth("NVIDIA Future GPU", props)[0] == 2 * 2_619_000e3 * 5120 / 8
    assert memory_bandwidth("NVIDIA Future GPU")[0] is None


def test_pytest_summary_is_read_from_the_log():
    from sail_megatron.bench.gpu_check import default_parts

    part = next(p for p in default_parts() if p.name == "pytest-gpu")
    log = (
        "$ python -m pytest tests/gpu\n..s\nSKIPPED [1] tests/gpu/x.py: needs Transformer Engine\n"
        "2 passed, 1 skipped in 33.10s\n"
    )
    counts, summary = part.collect(None, log)
    assert counts == {"passed": 2, "skipped": 1} and summary == "2 passed, 1 skipped in 33.10s"


def test_a_timeout_kills_processes_in_sessions_of_their_own(tmp_path):
    # torchrun starts each rank in a session of its own: killing the part's process group would leave them.
    ctx = Context(root=ROOT, out=tmp_path)
    pid_file = tmp_path / "rank.pid"
    rank = "import time; time.sleep(120)"
    code = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {rank!r}], start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('launched', flush=True); time.sleep(120)"
    )
    (result,) = run_parts([_python_part("launcher", code, timeout_s=3)], ctx, budget_s=60)
    assert result.status == "timeout" and "launched" in result.log_tail
    rank_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{rank_pid}").exists() and _state(rank_pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{rank_pid}").exists() or _state(rank_pid) == "Z"


def _state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
