"""The trainer's log line, metrics.jsonl and TensorBoard carry MFU against the bf16 peak and, under FP8,
against the FP8 peak too (the same figures sail-bench reports). One process, no process group."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sail_megatron.config import PrecisionConfig
from sail_megatron.config.budget import Budget, ScalePoints
from sail_megatron.training import monitor
from sail_megatron.training.flops import PeakFlops
from sail_megatron.training.metered_data import DataTally
from sail_megatron.training.progress import Consumed, Progress

STEP_TIME_S = 2.0
FLOPS_PER_STEP = 2.0 * 494.5e12  # half of an H100's bf16 peak over the 2 s step


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    # The monitor's reductions are collectives; alone they are the identity.
    monkeypatch.setattr(monitor, "sum_over_data_parallel", list)
    monkeypatch.setattr(monitor, "max_over_world", list)
    monkeypatch.setattr(monitor, "sum_over_world", list)
    monkeypatch.setattr(monitor, "sum_counts_over_data_parallel", Counter)


def _log_one_step(run_dir, peaks, capsys):
    progress = Progress(Budget("steps", 1), ScalePoints(), Consumed())
    mon = monitor.TrainingMonitor(run_dir, progress, log_interval=1, peak_flops=peaks)
    result = SimpleNamespace(skipped=False, loss=2.5, grad_norm=1.0)
    tally = DataTally(micro_batches=1, samples=3, tokens=4000, slots=4096, tiles=4, flops=FLOPS_PER_STEP)
    progress.last_step, progress.consumed = Consumed(1, 4000, 3), Consumed(1, 4000, 3)
    mon.end_step(1, result, STEP_TIME_S, tally, {"language": 1e-4}, Counter())
    mon.close()
    (record,) = [json.loads(line) for line in (run_dir / monitor.METRICS_FILE).read_text().splitlines()]
    return record, capsys.readouterr().out


def _scalars(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}


def test_fp8_run_reports_mfu_against_both_peaks(tmp_path, capsys):
    record, line = _log_one_step(tmp_path, PeakFlops(bf16=989e12, fp8=1979e12), capsys)
    assert record["mfu"] == pytest.approx(0.5) and record["mfu_fp8"] == pytest.approx(494.5 / 1979)
    assert "MFU 50.0% bf16 / 25.0% FP8" in line
    scalars = _scalars(tmp_path)
    assert scalars["throughput/mfu"] == pytest.approx(0.5)
    assert scalars["throughput/mfu_fp8"] == pytest.approx(494.5 / 1979)


def test_bf16_run_reports_one_mfu(tmp_path, capsys):
    record, line = _log_one_step(tmp_path, PeakFlops(bf16=989e12), capsys)
    assert record["mfu"] == pytest.approx(0.5) and record["mfu_fp8"] is None
    assert "MFU 50.0% |" in line and "FP8" not in line
    assert "throughput/mfu_fp8" not in _scalars(tmp_path)


def test_a_bare_peak_is_the_bf16_peak(tmp_path, capsys):
    # What train.py passes today: device_peak_flops(...)[0].
    record, _ = _log_one_step(tmp_path, 989e12, capsys)
    assert record["mfu"] == pytest.approx(0.5) and record["mfu_fp8"] is None


def test_no_peak_no_mfu(tmp_path, capsys):
    record, line = _log_one_step(tmp_path, None, capsys)
    assert record["mfu"] is None and record["mfu_fp8"] is None and "MFU" not in line


@pytest.mark.parametrize(
    "fp8, dtype, want",
    [
        ("hybrid", "bf16", PeakFlops(bf16=989e12, fp8=1979e12)),
        (None, "bf16", PeakFlops(bf16=989e12)),
        (None, "fp16", PeakFlops(bf16=989e12)),
        (None, "fp32", PeakFlops()),
    ],
)
def test_device_peaks_on_an_h100(monkeypatch, fp8, dtype, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    peaks = monitor.device_peak_flops(PrecisionConfig(dtype=dtype, fp8=fp8))
    assert peaks == want
    assert peaks[0] == want.bf16  # train.py's `[0]`: MFU against the bf16 peak, also under FP8


def test_peak_override_is_the_bf16_peak():
    assert monitor.device_peak_flops(PrecisionConfig(fp8="hybrid"), 500.0) == PeakFlops(bf16=500e12)


def test_validation_reports_the_total_and_each_source(tmp_path, capsys):
    from sail_megatron.training.validation import SourceLoss, ValidResult

    progress = Progress(Budget("steps", 1), ScalePoints(), Consumed())
    mon = monitor.TrainingMonitor(tmp_path, progress, log_interval=1, peak_flops=None)
    sources = {"captions": SourceLoss(2.0, 300), "ocr/en": SourceLoss(3.0, 100), "empty": SourceLoss(None, 0)}
    mon.log_validation(4, ValidResult(loss=2.25, trained_tokens=400, seconds=1.5, sources=sources))
    mon.close()
    (record,) = [json.loads(line) for line in (tmp_path / monitor.METRICS_FILE).read_text().splitlines()]
    assert record["valid_loss"] == 2.25 and record["valid_tokens"] == 400
    assert record["valid_loss/captions"] == 2.0 and record["valid_tokens/captions"] == 300
    assert record["valid_loss/ocr/en"] == 3.0 and record["valid_loss/empty"] is None
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("validation at step      4 | loss 2.2500 | 400 tokens")
    assert lines[1:] == [
        "    captions | loss 2.0000 | 300 tokens",
        "    ocr/en   | loss 3.0000 | 100 tokens",
        "    empty    | loss n/a | 0 tokens",
    ]
    scalars = _scalars(tmp_path)
    assert scalars["loss/valid"] == 2.25 and scalars["loss/valid/captions"] == 2.0
    assert scalars["loss/valid/ocr/en"] == 3.0 and "loss/valid/empty" not in scalars


def test_one_validation_source_prints_one_line(tmp_path, capsys):
    from sail_megatron.training.validation import SourceLoss, ValidResult

    progress = Progress(Budget("steps", 1), ScalePoints(), Consumed())
    mon = monitor.TrainingMonitor(tmp_path, progress, log_interval=1, peak_flops=None, tensorboard=False)
    mon.log_validation(0, ValidResult(loss=2.0, trained_tokens=10, seconds=0.1, sources={"sft": SourceLoss(2.0, 10)}))
    mon.close()
    (record,) = [json.loads(line) for line in (tmp_path / monitor.METRICS_FILE).read_text().splitlines()]
    assert record["valid_loss/sft"] == record["valid_loss"] == 2.0  # the keys do not depend on the count
    assert len(capsys.readouterr().out.splitlines()) == 1
