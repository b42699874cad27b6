"""MetricsLogger: console line, JSONL (resume-safe), TensorBoard, W&B (faked), progress bar."""
import io
import json
import sys
import types

import pytest
import torch

from redi_megatron.config.schema import LoggingConfig
from redi_megatron.training.logging import METRICS_FILE, MetricsLogger, read_metrics


class FakeClock:
    def __init__(self, dt=0.5):
        self.t, self.dt = 100.0, dt

    def __call__(self):
        self.t += self.dt
        return self.t


def metrics(step, pair=True):
    m = {"loss": torch.tensor(1.0 / step), "lr": 1e-6 * step, "grad_norm": 0.5, "num_pairs": 32}
    if pair:
        m.update(chosen_logps_norm=-0.3, rejected_logps_norm=-0.7 - 0.1 * step, margin=0.4 + 0.1 * step)
    return m


def make(tmp_path, stream=None, **kw):
    cfg = LoggingConfig(log_interval=kw.pop("log_interval", 2), tensorboard=kw.pop("tensorboard", False),
                        wandb_project=kw.pop("wandb_project", None), jsonl=True)
    return MetricsLogger(cfg, str(tmp_path / "run"), total_steps=kw.pop("total_steps", 5),
                         stream=stream if stream is not None else io.StringIO(), console=kw.pop("console", "lines"),
                         clock=FakeClock(), run_name="t", **kw)


def test_console_lines_at_interval_and_last_step(tmp_path):
    out = io.StringIO()
    with make(tmp_path, out) as log:
        for s in range(1, 6):
            log.log_step(s, metrics(s), tokens=1000)
    lines = out.getvalue().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["[t] step 2/5", "[t] step 4/5", "[t] step 5/5"]
    assert lines[0] == ("[t] step 2/5 | loss 0.5000 | lr 2.00e-06 | grad 0.500 | logp c -0.300 r -0.900 | "
                        "2.0k tok/s | 0.50 s/step | ETA 0:00:02")  # 3 steps left x 0.5 s
    assert lines[-1].endswith("ETA 0:00:00")


def test_throughput_is_robust_to_a_slow_step_and_accepts_measured_time(tmp_path):
    out = io.StringIO()
    clock = FakeClock(dt=1.0)
    cfg = LoggingConfig(log_interval=4, tensorboard=False, jsonl=True)
    with MetricsLogger(cfg, str(tmp_path / "run"), total_steps=8, stream=out, console="lines", clock=clock) as log:
        for s in (1, 2, 3, 4):
            # step 1 compiles and warms up (10x); step 3 also waited for a checkpoint save
            clock.dt = {1: 30.0, 3: 10.0}.get(s, 1.0)
            log.log_step(s, {"loss": 1.0}, tokens=1000)
        for s in (5, 6, 7, 8):
            rec = log.log_step(s, {"loss": 1.0}, tokens=1000, step_time=0.25)
    first, second = out.getvalue().splitlines()
    # medians without the first step: neither the warm-up nor the slow step counts, and the ETA is right
    assert "| 1.0k tok/s | 1.00 s/step | ETA 0:00:04" in first
    assert "| 4.0k tok/s |" in second and rec["step_time"] == 0.25 and rec["tokens_per_s"] == 4000.0


def test_first_step_gives_no_eta(tmp_path):
    out = io.StringIO()
    cfg = LoggingConfig(log_interval=1, tensorboard=False, jsonl=False)
    with MetricsLogger(cfg, str(tmp_path / "run"), total_steps=100, stream=out, console="lines",
                       clock=FakeClock(dt=40.0)) as log:
        log.log_step(1, {"loss": 1.0}, tokens=1000)
    assert "first step, warm-up included; ETA from the next" in out.getvalue() and "ETA 1:" not in out.getvalue()


def test_console_without_pair_metrics(tmp_path):
    out = io.StringIO()
    with make(tmp_path, out, log_interval=1, total_steps=1) as log:
        log.log_step(1, metrics(1, pair=False))
    assert "logp" not in out.getvalue() and "tok/s" not in out.getvalue() and "loss 1.0000" in out.getvalue()


def test_jsonl_one_record_per_step(tmp_path):
    with make(tmp_path) as log:
        for s in range(1, 4):
            rec = log.log_step(s, metrics(s), tokens=2048)
    assert rec["step"] == 3 and rec["tokens_per_s"] == pytest.approx(2048 / 0.5)
    lines = open(tmp_path / "run" / METRICS_FILE).read().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["loss"] == 1.0 and isinstance(first["loss"], float) and first["num_pairs"] == 32
    assert first["step_time"] == pytest.approx(0.5) and first["tokens"] == 2048
    assert [r["step"] for r in read_metrics(str(tmp_path / "run"))] == [1, 2, 3]


def test_resume_drops_records_after_the_checkpoint_and_torn_line(tmp_path):
    with make(tmp_path, total_steps=10) as log:
        for s in range(1, 8):  # crashed at step 7; last checkpoint at step 5
            log.log_step(s, metrics(s))
    path = tmp_path / "run" / METRICS_FILE
    with open(path, "a") as f:
        f.write('{"step": 8, "loss": 0.')  # killed mid-write
    out = io.StringIO()
    with make(tmp_path, out, total_steps=10, start_step=5) as log:
        assert "dropped 3 record(s) after step 5" in out.getvalue()
        for s in range(6, 9):
            log.log_step(s, {"loss": 100.0 + s})
    recs = read_metrics(str(path))
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert recs[4]["loss"] == pytest.approx(0.2) and recs[5]["loss"] == 106.0
    assert len(open(path).read().splitlines()) == 8


def test_resume_repairs_missing_final_newline(tmp_path):
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / METRICS_FILE
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}')  # complete record, no newline
    with make(tmp_path, start_step=2) as log:
        log.log_step(3, {"loss": 0.25})
    assert [r["loss"] for r in read_metrics(str(path))] == [1.0, 0.5, 0.25]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / METRICS_FILE
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a metrics record"):
        read_metrics(str(path))
    with pytest.raises(ValueError, match="line 2"):
        make(tmp_path, start_step=1)


def test_disabled_rank_is_a_no_op(tmp_path):
    out = io.StringIO()
    log = make(tmp_path, out, enabled=False, tensorboard=True, wandb_project="p")
    assert log.log_step(1, metrics(1)) is None
    log.message("x")
    log.close()
    assert out.getvalue() == "" and not (tmp_path / "run").exists()


def test_non_numeric_metric_is_an_error(tmp_path):
    with make(tmp_path) as log, pytest.raises(ValueError, match="metric 'note' must be a number"):
        log.log_step(1, {"loss": 1.0, "note": "hi"})


def test_tensorboard_scalars_and_resume_purge(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with make(tmp_path, tensorboard=True, total_steps=4) as log:
        for s in range(1, 5):
            log.log_step(s, {"loss": float(s)})
    with make(tmp_path, tensorboard=True, total_steps=4, start_step=2) as log:
        for s in range(3, 5):
            log.log_step(s, {"loss": 10.0 * s})
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match="pip install tensorboard, or set logging.tensorboard=false"):
        make(tmp_path, tensorboard=True)


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match="wandb package is not installed"):
        make(tmp_path, wandb_project="redi")


def test_wandb_logs_and_resumes_same_run(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with make(tmp_path, wandb_project="redi", config={"optimizer": {"lr": 1e-6}}) as log:
        log.log_step(1, {"loss": 0.5})
    with make(tmp_path, wandb_project="redi", start_step=1):
        pass
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["project"] == "redi" and inits[0]["resume"] == "allow"
    assert inits[0]["config"] == {"optimizer": {"lr": 1e-6}}
    assert inits[0]["id"] == inits[1]["id"]  # the resumed job continues the same W&B run
    log_call = next(c for c in calls if c[0] == "log")
    assert log_call[1] == 1 and log_call[2]["train/loss"] == 0.5
    assert calls.count(("finish",)) == 2


def test_progress_bar_mode(tmp_path):
    out = io.StringIO()
    with make(tmp_path, out, console="bar", total_steps=3) as log:
        for s in range(1, 4):
            log.log_step(s, metrics(s), tokens=10)
        log.message("collapse monitor at step 3: ...")
    text = out.getvalue()
    assert "3/3" in text and "collapse monitor at step 3" in text and "loss" in text
