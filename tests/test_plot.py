"""redi-plot: PNG curves from metrics.jsonl, panels only for metrics present, data drawn as logged."""
import json
import math
import os

import numpy as np
import pytest

from redi_megatron.training.plot import PANELS, Run, build_figure, main, moving_average, series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path, steps=30, pair=True, nan_at=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            rec = {"step": s, "time": 0.0, "loss": 1.0 / s, "lr": 1e-6 * min(1.0, s / 3), "grad_norm": 0.5 + 0.01 * s,
                   "tokens_per_s": 1000.0 + s}
            if pair:
                rec.update(chosen_logps_norm=-0.3 + 0.001 * s, rejected_logps_norm=-0.6 - 0.01 * s,
                           margin=0.3 + 0.011 * s, accuracy=min(1.0, 0.5 + 0.02 * s))
            if s == nan_at:
                rec["loss"] = float("nan")
            f.write(json.dumps(rec) + "\n")
    return path


def test_redi_run_writes_every_panel(tmp_path, capsys):
    run = write_run(str(tmp_path / "redi"))
    assert main([run, "--out", str(tmp_path / "plots")]) == 0
    files = sorted(os.listdir(tmp_path / "plots"))
    assert files == sorted(["loss.png", "lr.png", "grad_norm.png", "logps.png", "margins.png", "accuracy.png",
                            "throughput.png", "overview.png"])
    for name in files:
        with open(tmp_path / "plots" / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert "wrote 8 PNG file(s)" in capsys.readouterr().out


def test_sft_run_has_no_pair_panels_and_default_out_dir(tmp_path):
    run = write_run(str(tmp_path / "sft"), pair=False)
    assert main([os.path.join(run, "metrics.jsonl")]) == 0
    files = set(os.listdir(os.path.join(run, "plots")))
    assert files == {"loss.png", "lr.png", "grad_norm.png", "throughput.png", "overview.png"}


def test_figure_draws_the_logged_values(tmp_path):
    recs = [json.loads(line) for line in open(os.path.join(write_run(str(tmp_path / "r"), steps=5), "metrics.jsonl"))]
    logps = next(p for p in PANELS if p.name == "logps")
    fig = build_figure(logps, [Run("r", recs)])
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"chosen", "rejected"}
    np.testing.assert_allclose(lines["rejected"].get_xdata(), [1, 2, 3, 4, 5])
    np.testing.assert_allclose(lines["rejected"].get_ydata(), [-0.6 - 0.01 * s for s in range(1, 6)])
    assert build_figure(next(p for p in PANELS if p.name == "margins"), [Run("r", [{"step": 1, "loss": 1}])]) is None


def test_two_runs_overlaid_with_labels_and_smoothing():
    loss = next(p for p in PANELS if p.name == "loss")
    redi = [{"step": s, "loss": float(s % 2)} for s in range(1, 7)]
    dpo = [{"step": s, "loss": 3.0} for s in range(1, 4)]
    fig = build_figure(loss, [Run("REDI", redi), Run("DPO", dpo)])
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["REDI: loss", "DPO: loss"]
    smoothed = build_figure(loss, [Run("REDI", redi)], smooth=2)
    raw, avg = smoothed.axes[0].get_lines()  # faint raw curve + the moving average on top
    np.testing.assert_allclose(raw.get_ydata(), [1, 0, 1, 0, 1, 0])
    np.testing.assert_allclose(avg.get_ydata(), [1, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert avg.get_label() == "loss" and raw.get_color() == avg.get_color()


def test_moving_average_ignores_nan_and_keeps_gaps():
    y = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    out = moving_average(y, 2)
    np.testing.assert_allclose(out[[0, 1, 3, 4]], [1.0, 2.0, 5.0, 6.0])  # the last 2 points, NaN left out
    assert math.isnan(out[2])
    np.testing.assert_array_equal(moving_average(y, 1), y)


def test_non_finite_values_are_counted_in_the_title(tmp_path):
    recs = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 0.5}]
    fig = build_figure(PANELS[0], [Run("r", recs)])
    assert "1 non-finite value(s)" in fig.axes[0].get_title()
    x, y = series(recs, "loss")
    assert x.tolist() == [1, 2, 3] and math.isnan(y[1])


@pytest.mark.parametrize("args, needle", [
    (["{missing}"], "no metrics file"),
    (["{empty}"], "no records yet"),
    (["{run}", "--labels", "a,b"], "--labels has 2 names for 1 runs"),
    (["{run}", "--smooth", "0"], "--smooth must be >= 1"),
    (["{odd}"], "none of the plotted metrics"),
])
def test_errors(tmp_path, capsys, args, needle):
    run = write_run(str(tmp_path / "run"), steps=3)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "metrics.jsonl").write_text('{"step": 1, "foo": 2}\n')
    paths = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"), "run": run,
             "odd": str(tmp_path / "odd")}
    assert main([a.format(**paths) for a in args] + ["--out", str(tmp_path / "o")]) == 2
    assert needle in capsys.readouterr().err
