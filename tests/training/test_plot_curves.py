"""Loss/throughput curves from metrics.jsonl: dedup after resume, malformed lines, a valid PNG."""

import json

import pytest

from sail_megatron.training.plot_curves import MetricsError, load_metrics, main, plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rec(step, loss, mfu=None):
    return {
        "step": step,
        "loss": loss,
        "tokens_per_s": 1000.0 + step,
        "tflops_per_s": 0.5 if mfu else None,
        "mfu": mfu,
        "lr": 1e-4 * step,
        "grad_norm": 1.0,
    }


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run-a"
    run.mkdir()
    lines = [json.dumps(_rec(s, 5.0 - 0.1 * s, mfu=0.3)) for s in range(1, 6)]
    lines.append("{not json")  # a torn write from a killed process
    lines.append(json.dumps({"loss": 1.0}))  # no step
    # Resumed from step 3: steps 4 and 5 repeat with new values, then 6 follows.
    lines += [json.dumps(_rec(s, 9.0 + s, mfu=0.3)) for s in (4, 5, 6)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_load_keeps_last_record_per_step(run_dir):
    with pytest.warns(UserWarning, match=r"skipped 2 malformed line\(s\).*line 6"):
        records = load_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records[3:]] == [13.0, 14.0, 15.0]
    assert records[0]["loss"] == pytest.approx(4.9)


def test_a_resume_marker_drops_the_steps_run_again(tmp_path):
    # The first attempt logged steps 1-5 and a validation at 4, then died; it resumed from its step-2
    # checkpoint and ran only to step 3 (a shorter run.train_steps): nothing after step 3 may survive.
    lines = [_rec(s, 5.0 - 0.1 * s) for s in range(1, 6)] + [{"step": 4, "valid_loss": 4.0}]
    lines += [{"event": "resume", "step": 2, "checkpoint": "iter_00000002"}, _rec(3, 7.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = load_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, pytest.approx(4.9)), (2, pytest.approx(4.8)), (3, 7.0)]


def test_validation_records_merge_into_their_step_and_are_drawn(tmp_path):
    lines = [{"step": 0, "valid_loss": 6.0}, _rec(1, 5.0), _rec(2, 4.0), {"step": 2, "valid_loss": 4.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = load_metrics(tmp_path)
    assert [(r["step"], r.get("loss"), r.get("valid_loss")) for r in records] == [
        (0, None, 6.0),
        (1, 5.0, None),
        (2, 4.0, 4.5),
    ]
    assert plot_curves(tmp_path).read_bytes().startswith(PNG_MAGIC)


def test_plot_writes_valid_png(run_dir):
    with pytest.warns(UserWarning):
        out = plot_curves(run_dir)
    assert out == run_dir / "curves.png"
    data = out.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    from PIL import Image

    with Image.open(out) as im:
        im.verify()


def test_cli_and_null_throughput(tmp_path):
    metrics = tmp_path / "cpu-run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text("".join(json.dumps(_rec(s, 3.0 / s)) + "\n" for s in range(1, 4)))  # mfu/tflops null
    out = tmp_path / "plots" / "c.png"
    assert main([str(metrics.parent), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_bad_input_names_the_file(tmp_path, capsys):
    with pytest.raises(MetricsError, match="metrics.jsonl: no such metrics file"):
        load_metrics(tmp_path)
    empty = tmp_path / "metrics.jsonl"
    empty.write_text("garbage\n")
    with pytest.warns(UserWarning), pytest.raises(MetricsError, match=r"metrics.jsonl: no usable records \(line 1"):
        load_metrics(empty)
    assert main([str(tmp_path / "nowhere")]) == 1
    assert "no such metrics file" in capsys.readouterr().err


def test_each_validation_source_gets_a_line(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    lines = [_rec(1, 5.0), _rec(2, 4.0)]
    for step, total in ((0, 6.0), (2, 4.5)):
        lines.append(
            {"step": step, "valid_loss": total, "valid_loss/captions": total - 0.5, "valid_loss/ocr/en": total + 0.5}
        )
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    assert plot_curves(tmp_path).read_bytes().startswith(PNG_MAGIC)
    (fig,) = figures
    drawn = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
    assert drawn["validation (all sources)"] == [6.0, 4.5]
    assert drawn["valid captions"] == [5.5, 4.0] and drawn["valid ocr/en"] == [6.5, 5.0]


def test_one_validation_source_is_the_total(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    lines = [_rec(1, 5.0), {"step": 1, "valid_loss": 4.0, "valid_loss/sft": 4.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    plot_curves(tmp_path)
    labels = [line.get_label() for line in figures[0].axes[0].get_lines()]
    assert "validation" in labels and not any(label.startswith("valid ") for label in labels)
