"""One-GPU check of the training path at the recipes' shapes: parity, packing, throughput, memory, head.

    python benchmarks/gpu_check.py --out DIR [--quick] [--skip-parity] [--parts a,b] [--peak-tflops 989]
    python benchmarks/gpu_check.py --device cpu --tiny --quick --out DIR      # CPU smoke run (~15 s)
    bash benchmarks/gpu_check.sh                                              # the prepared GPU run (docs/gpu.md)

Everything runs through the project's own code: the recipes ``examples/configs/qwen2.5-math-1.5b_{sft,redi}.yaml``
(``load_config``; random init, as no checkpoint travels), ``build_model_and_optimizer``, ``train_step`` /
``forward_only`` and the losses. TF32 stays as training leaves it (off: nothing in training turns it on) and
is forced off for the parity parts. Between parts everything built is dropped, then ``gc.collect()`` and
``torch.cuda.empty_cache()``; each part's peak memory is its own.

Parts (``--parts``, in this order):
- ``packed_vs_alone``: the recipe model (Qwen2.5-Math-1.5B: 28 x 1536, 12/2 heads, vocab 151,936) in bf16,
  four sequences packed in one 16,384-token THD row, against each sequence alone: per-token log-probs
  must agree (leaks and RoPE offsets at real lengths). Negative controls on the same row: a planted
  attention leak (one attention segment over the row) must be detected, and a RoPE offset (positions
  along the row) is reported.
- ``matmul_ceiling``: bf16 matmuls of the model's own GEMM shapes at the SFT row, weighted as a step runs
  them, and an 8192^3 product: the measured ceiling beside the datasheet ``--peak-tflops``.
- ``throughput_sft`` / ``throughput_redi``: optimizer steps at the recipes' shapes (32,768 / 40,960-token
  rows, full recompute, fused log-prob head, distributed optimizer): per step seconds, tokens/s, peak
  memory and memory held; model TFLOP/s, MFU against the datasheet and against the measured ceiling;
  memory held after each timed step must be flat (a leak check).
- ``fused_head``: the log-prob head alone at 32,768 tokens x 151,936 in bf16, fused vs the output layer's
  logits + chunked log-probs: time, peak memory, agreement.
- ``parity_vs_cpu``: a tiny model (head dim 64) in a subprocess with CUDA hidden, fp32 on the CPU (gloo);
  the same weights on this device in fp32 and in bf16 run SFT and REDI forward/backward; losses and
  gradients compared. (On ``--device cpu`` the reference runs in-process.)

``--skip-parity`` drops ``packed_vs_alone`` and ``parity_vs_cpu``. ``--quick`` runs fewer steps and
repetitions. ``--tiny`` swaps in a 2-layer 256-wide model and 512/640-token rows (the CPU smoke test).

Writes ``gpu_check.json`` (meta, parts, checks, ok; rewritten after every part) and ``gpu_check_steps.jsonl``
(one line per optimizer step, as it happens) into ``--out``; prints a summary. Exit status: 0 when every
check passes, 1 when one fails (or a part crashed), 2 when the device is missing.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_check_parts as P  # noqa: E402

PARTS = ("packed_vs_alone", "matmul_ceiling", "throughput_sft", "throughput_redi", "fused_head", "parity_vs_cpu")
PARITY_PARTS = ("packed_vs_alone", "parity_vs_cpu")
# Tolerances. packed_vs_alone: RMS over a sequence's loss tokens of the per-token log-prob difference (nats),
# and of its mean log-prob per token; see docs/gpu.md for how they were chosen.
PACKED_RMS_TOL = 0.02
PACKED_MEAN_TOL = 0.005
MEM_FLAT_TOL_GIB = {"cuda": 0.0625, "cpu": 0.03125}  # growth of memory held after the timed steps
MEM_RELEASED_TOL_GIB = {"cuda": 0.5, "cpu": 4 / 1024}  # live tensors at a part's start above the run's start
# (--tiny's model + optimizer are 14 MiB of live tensors; what stays between parts, RoPE tables, < 1 MiB)
HEAD_LOGP_TOL, HEAD_GRAD_TOL = 1e-2, 5e-2


# ----------------------------------------------------------------------------- parity against the CPU
def _parity_batches(loss: str, vocab: int) -> list:
    from redi_megatron.data.batch import ROLE_CHOSEN, ROLE_REJECTED, ROLE_SFT, build_microbatch

    rng = P.np.random.default_rng(1 if loss == "sft" else 2)
    roles = [ROLE_SFT] * 6 if loss == "sft" else [ROLE_CHOSEN, ROLE_REJECTED] * 3
    seqs = [P._spec(rng, int(rng.integers(525, 701)), r, i if loss == "sft" else i // 2, vocab)
            for i, r in enumerate(roles)]
    return [build_microbatch(seqs[:3], 2304, pad_id=0, pad_to_multiple_of=8),
            build_microbatch(seqs[3:], 2304, pad_id=0, pad_to_multiple_of=8)]


def parity_run(dtype: str) -> dict:
    """Loss and full gradients (by local-spec name) of one forward/backward per loss, on this process's device."""
    from redi_megatron.data.batch import StepBatch
    from redi_megatron.models.param_names import local_name
    from redi_megatron.parallel.loss_scaling import reduce_step_metrics
    from redi_megatron.testing.params import gather_stage_tensors
    from redi_megatron.training.step import forward_backward

    out = {}
    for loss in ("sft", "redi"):
        c = P.components(P.recipe(loss, tiny=True, extra=(f"train.dtype={dtype}",)), init_seed=7)
        mbs = _parity_batches(loss, c.model_cfg.vocab_size)
        metrics = reduce_step_metrics(forward_backward(c, StepBatch(mbs, 0, 0, 0)), c.groups)
        grads = gather_stage_tensors(c.chunks, c.groups.tp, select=lambda p: p.main_grad)
        # keyed by local-spec names: the CPU reference runs the local spec, this process maybe TE's
        out[loss] = {"loss": metrics["loss"], "grads": {local_name(k): v.float().cpu() for k, v in grads.items()}}
        del c
    return out


def _compare(ref: dict, got: dict) -> dict:
    rows = {}
    for loss in ("sft", "redi"):
        r, g = ref[loss], got[loss]
        rel = max(float((g["grads"][k] - v).norm() / v.norm().clamp_min(1e-30)) for k, v in r["grads"].items())
        rows[loss] = {"loss_ref": r["loss"], "loss": g["loss"], "loss_abs_diff": abs(g["loss"] - r["loss"]),
                      "worst_grad_rel_norm_diff": rel}
    return rows


def start_cpu_reference(tmp: str) -> tuple[subprocess.Popen, str]:
    """The fp32 CPU reference in a subprocess with CUDA hidden; runs while this process uses the GPU."""
    ref_file = os.path.join(tmp, "cpu_reference.pt")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--cpu-reference", ref_file], env=env)
    return proc, ref_file


def parity_vs_cpu(a, device, ref_job) -> dict:
    if ref_job is None:  # --device cpu: the reference is this process's own fp32 run
        ref = parity_run("fp32")
        return {"fp32": _compare(ref, ref), "bf16": _compare(ref, parity_run("bf16"))}
    proc, ref_file = ref_job
    if proc.wait(timeout=600) != 0:
        raise RuntimeError(f"the CPU reference subprocess failed (exit {proc.returncode})")
    ref = torch.load(ref_file)
    with tf32_off():
        return {"fp32": _compare(ref, parity_run("fp32")), "bf16": _compare(ref, parity_run("bf16"))}


class tf32_off:
    """TF32 off for matmuls and cuDNN inside the block, restored after."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


# ----------------------------------------------------------------------------- packed row vs alone
def packed_vs_alone(a, device) -> dict:
    """Four sequences (37/29/19/11% of the row) packed in one row of 16,384 tokens (512 with --tiny) vs each
    alone, in the recipe's dtype, through ``forward_only`` and the recipe's head; plus the negative controls."""
    from redi_megatron.data.batch import ROLE_SFT, build_microbatch, padded_length
    from redi_megatron.training.components import sequence_multiple

    cfg = P.recipe("sft", a.tiny, tuple(a.set))
    row = a.packed_tokens or (512 if a.tiny else 16384)
    rng = P.np.random.default_rng(3)
    seqs = [P._spec(rng, int(row * f), ROLE_SFT, i, cfg.model.vocab_size) for i, f in enumerate((.37, .29, .19, .11))]
    multiple = sequence_multiple(cfg)
    packed_mb = build_microbatch(seqs, row, pad_id=0, pad_to_multiple_of=multiple)
    alone_mbs = [build_microbatch([s], padded_length(s.length, multiple), pad_id=0, pad_to_multiple_of=multiple)
                 for s in seqs]
    # The noise floor: each sequence alone in a longer row (tail padding): no packing, only other matmul
    # shapes, so whatever differs here is rounding, not a leak.
    pad_to = 64 if a.tiny else 1024
    longer_mbs = [build_microbatch([s], padded_length(s.length + 1, pad_to), pad_id=0, pad_to_multiple_of=multiple)
                  for s in seqs]
    c = P.components(cfg)  # Megatron's own init, on the device (name-seeded init draws 1.5B numbers on the CPU)
    planted = "attention-leak" if "attention-leak" in a.plant else None
    with tf32_off():
        alone = [P.sequence_values(lp, mb)[0] for lp, mb in zip(P.row_logps(c, alone_mbs), alone_mbs)]
        runs = {"noise_floor": [P.sequence_values(lp, mb)[0] for lp, mb in zip(P.row_logps(c, longer_mbs), longer_mbs)],
                "packed": P.sequence_values(P.row_logps(c, [P.mutate(packed_mb, planted)])[0], packed_mb)}
        for how in ("attention-leak", "rope-offset"):
            runs[how] = P.sequence_values(P.row_logps(c, [P.mutate(packed_mb, how)])[0], packed_mb)
    del c
    out = {"row_tokens": row, "dtype": cfg.train.dtype, "lengths": [s.length for s in seqs],
           "model": {k: getattr(cfg.model, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                          "num_query_groups", "vocab_size")},
           "planted_in_packed": planted}
    for name, got in runs.items():
        rows = P.per_sequence_diffs(got, alone)
        out[name] = {"per_sequence": rows, "worst_rms": max(r["rms"] for r in rows),
                     "worst_max_abs": max(r["max_abs"] for r in rows),
                     "worst_mean_logp_diff": max(abs(r["mean_logp_diff"]) for r in rows)}
    return out


# ----------------------------------------------------------------------------- checks
def checks_for(name: str, r: dict, a, device) -> dict:
    """``{check: {"ok": bool, "detail": str}}`` of one part's result."""
    c = {}

    def put(key, ok, detail):
        c[key] = {"ok": bool(ok), "detail": detail}

    if "error" in r:
        put(f"{name}_ran", False, r["error"].splitlines()[-1][:300])
        return c
    if name == "packed_vs_alone":
        p, leak, rope = r["packed"], r["attention-leak"], r["rope-offset"]
        put("packed_equals_alone", p["worst_rms"] < PACKED_RMS_TOL and p["worst_mean_logp_diff"] < PACKED_MEAN_TOL,
            f"worst per-token RMS {p['worst_rms']:.2e} (< {PACKED_RMS_TOL}), worst mean-logp diff "
            f"{p['worst_mean_logp_diff']:.2e} (< {PACKED_MEAN_TOL}); noise floor (alone in a longer row) "
            f"{r['noise_floor']['worst_rms']:.2e}")
        put("planted_attention_leak_detected", leak["worst_rms"] >= PACKED_RMS_TOL,
            f"worst per-token RMS with the planted leak {leak['worst_rms']:.2e} (must be >= {PACKED_RMS_TOL}; "
            f"the packed row's: {p['worst_rms']:.2e})")
        r["rope_offset_detected"] = rope["worst_rms"] >= PACKED_RMS_TOL  # reported, not a check (docs/gpu.md)
    elif name == "parity_vs_cpu":
        for mode, (loss_tol, grad_tol) in (("fp32", (1e-4, 1e-3)), ("bf16", (2e-2, 5e-2))):
            for loss, x in r[mode].items():
                put(f"parity_{mode}_{loss}", x["loss_abs_diff"] < loss_tol * max(1, abs(x["loss_ref"]))
                    and x["worst_grad_rel_norm_diff"] < grad_tol,
                    f"|loss diff| {x['loss_abs_diff']:.2e}, worst grad rel {x['worst_grad_rel_norm_diff']:.2e} "
                    f"(< {loss_tol} rel, < {grad_tol})")
    elif name.startswith("throughput_"):
        tol = MEM_FLAT_TOL_GIB[device.type]
        put(f"{name}_finite", r["all_finite"], "loss and grad norm finite in every step")
        growth = r["mem_growth_gib"]
        put(f"{name}_memory_flat", growth is not None and growth <= tol,
            f"memory held after the timed steps grew {_fmt(growth, '.4f')} GiB (<= {tol}; "
            f"{'allocator' if device.type == 'cuda' else 'process RSS'})")
    elif name == "fused_head":
        put("fused_head_matches_unfused", r["logp_max_abs_diff"] < HEAD_LOGP_TOL
            and max(r["grad_hidden_rel_diff"], r["grad_weight_rel_diff"]) < HEAD_GRAD_TOL,
            f"logp max |diff| {r['logp_max_abs_diff']:.2e}, grad rel diffs {r['grad_hidden_rel_diff']:.2e} / "
            f"{r['grad_weight_rel_diff']:.2e}")
        if r["fused_peak_gib"] is not None:
            put("fused_head_saves_memory", r["fused_peak_gib"] < r["unfused_peak_gib"],
                f"peak {r['fused_peak_gib']:.2f} GiB fused vs {r['unfused_peak_gib']:.2f} GiB unfused")
    return c


def derive(report: dict, a) -> None:
    """Figures that combine parts: MFU against the datasheet and against the measured matmul ceiling."""
    ceiling = report["parts"].get("matmul_ceiling", {}).get("model_gemms_tflops")
    for loss in ("sft", "redi"):
        t = report["parts"].get(f"throughput_{loss}")
        if not t or "error" in t:
            continue
        t["mfu_datasheet"] = t["model_tflops"] / a.peak_tflops
        t["mfu_measured_ceiling"] = t["model_tflops"] / ceiling if ceiling else None


# ----------------------------------------------------------------------------- running and reporting
def clean(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def meta(a, device) -> dict:
    import megatron.core

    m = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
         "torch": torch.__version__, "cuda": torch.version.cuda, "megatron_core": megatron.core.__version__,
         "python": platform.python_version(), "args": {k: v for k, v in vars(a).items() if k != "cpu_reference"},
         "tf32_matmul_in_training": torch.backends.cuda.matmul.allow_tf32,
         "datasheet_tflops": a.peak_tflops}
    from redi_megatron.models.layer_specs import have_transformer_engine

    m["transformer_engine"] = device.type == "cuda" and have_transformer_engine()
    return m


def write_json(path: str, report: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(P.any_value(report), f, indent=1)
    os.replace(tmp, path)


def run_part(name: str, a, device, ref_job, on_step) -> dict:
    if name == "packed_vs_alone":
        return packed_vs_alone(a, device)
    if name == "matmul_ceiling":
        return P.matmul_ceiling(a, device)
    if name.startswith("throughput_"):
        return P.throughput(name.split("_")[1], a, device, on_step)
    if name == "fused_head":
        return P.fused_head(a, device)
    return parity_vs_cpu(a, device, ref_job)


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer 256-wide model, 512/640-token rows (CPU smoke)")
    p.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    p.add_argument("--skip-parity", action="store_true", help="skip packed_vs_alone and parity_vs_cpu")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per loss (default 6, --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, --quick 1)")
    p.add_argument("--seq-len", type=int, default=None, help="longest sequence in the throughput rows (8192)")
    p.add_argument("--packed-tokens", type=int, default=None, help="packed_vs_alone row (16384; --tiny 512)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for packed_vs_alone (e.g. model.num_layers=4)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 (H100/H200 SXM: 989)")
    # negative controls for the tests: break the thing a check guards and watch it fail
    p.add_argument("--plant", action="append", default=[], choices=("attention-leak", "memory-leak", "keep-model"),
                   help=argparse.SUPPRESS)
    p.add_argument("--leak-mib", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--cpu-reference", metavar="FILE", help=argparse.SUPPRESS)  # internal: the CPU subprocess
    a = p.parse_args(argv)
    a.steps = a.steps if a.steps is not None else (3 if a.quick else 6)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    chosen = [x for x in a.parts.split(",") if x]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    a.part_list = [x for x in PARTS if x in chosen and not (a.skip_parity and x in PARITY_PARTS)]
    if not a.part_list:
        p.error("no part left to run (--parts minus --skip-parity)")
    if a.steps < 2:
        p.error("--steps must be >= 2 (the memory check compares the timed steps)")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.device == "cpu" or a.cpu_reference:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA: Megatron then takes the CPU path
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu --tiny for the CPU smoke run)", file=sys.stderr)
        return 2
    from redi_megatron.parallel.state import destroy_parallel, init_parallel

    if a.cpu_reference:
        init_parallel()
        torch.save(parity_run("fp32"), a.cpu_reference)
        destroy_parallel()
        return 0
    device = torch.device(a.device)
    os.makedirs(a.out, exist_ok=True)
    json_path, steps_path = os.path.join(a.out, "gpu_check.json"), os.path.join(a.out, "gpu_check_steps.jsonl")
    open(steps_path, "w").close()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ref_job = start_cpu_reference(tmp) if device.type == "cuda" and "parity_vs_cpu" in a.part_list else None
        init_parallel()
        report = {"meta": meta(a, device), "parts": {}, "checks": {}, "ok": None}
        clean(device)
        start_mem = P.live_bytes(device)
        if "keep-model" in a.plant:
            P.KEEP_ALIVE = []

        def on_step(rec):
            with open(steps_path, "a") as f:
                f.write(json.dumps(P.any_value(rec)) + "\n")
            print(f"  {rec['part']} step {rec['step']}{' (warmup)' if rec['warmup'] else ''}: "
                  f"{rec['seconds']:.3f} s, {rec['tokens_per_s']:.0f} tokens/s, peak {rec['peak_mem_gib']} GiB, "
                  f"held {rec['mem_after_gib']} GiB, loss {rec['loss']:.4f}", flush=True)

        for name in a.part_list:
            clean(device)
            held = (P.live_bytes(device) - start_mem) / P.GIB
            tol = MEM_RELEASED_TOL_GIB[device.type]
            report["checks"][f"{name}_memory_released"] = {
                "ok": held <= tol, "detail": f"{held:.4f} GiB of tensors alive at the part's start (<= {tol})"}
            print(f"[{time.perf_counter() - t0:6.1f} s] {name}", flush=True)
            start = time.perf_counter()
            try:
                result = run_part(name, a, device, ref_job, on_step)
            except Exception as err:  # one part's failure must not hide the others' figures
                traceback.print_exc()
                result = {"error": "".join(traceback.format_exception_only(type(err), err))[-2000:]}
            result["seconds"] = time.perf_counter() - start
            result["mem_held_at_start_gib"] = held
            report["parts"][name] = result
            report["checks"].update(checks_for(name, result, a, device))
            derive(report, a)
            report["meta"]["total_s"] = time.perf_counter() - t0
            report["meta"]["tf32_matmul_at_end"] = torch.backends.cuda.matmul.allow_tf32
            report["ok"] = all(c["ok"] for c in report["checks"].values())
            write_json(json_path, report)
        if ref_job is not None and ref_job[0].poll() is None:
            ref_job[0].kill()
        destroy_parallel()
    print_summary(report)
    return 0 if report["ok"] else 1


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_summary(r: dict) -> None:
    m = r["meta"]
    print(f"\ndevice {m['device']}, torch {m['torch']}, CUDA {m['cuda']}, megatron-core {m['megatron_core']}, "
          f"TE {m['transformer_engine']}, TF32 in training {m['tf32_matmul_in_training']}, {m['total_s']:.0f} s")
    parts = r["parts"]
    ceiling = parts.get("matmul_ceiling", {})
    if "model_gemms_tflops" in ceiling:
        print(f"matmul ceiling: model GEMMs {ceiling['model_gemms_tflops']:.1f} TFLOP/s, "
              f"{ceiling['square_side']}^3 {ceiling['square_tflops']:.1f} TFLOP/s, datasheet {m['datasheet_tflops']}")
    for loss in ("sft", "redi"):
        t = parts.get(f"throughput_{loss}")
        if t and "error" not in t:
            print(f"{loss:<5} {t['row_tokens']}-token rows, recompute {t['recompute']}: "
                  f"step {t['median_step_s']:.3f} s, {t['tokens_per_s']:.0f} tokens/s, "
                  f"{t['model_tflops']:.1f} TFLOP/s, MFU {_fmt(t.get('mfu_datasheet'))}"
                  f" (datasheet) / {_fmt(t.get('mfu_measured_ceiling'))} (measured ceiling), peak "
                  f"{_fmt(t['peak_mem_gib'])} GiB, held growth {_fmt(t['mem_growth_gib'])} GiB")
    h = parts.get("fused_head")
    if h and "error" not in h:
        print(f"head {h['tokens']} x {h['vocab']}: fused {h['fused_s']:.3f} s / {_fmt(h['fused_peak_gib'])} GiB, "
              f"unfused {h['unfused_s']:.3f} s / {_fmt(h['unfused_peak_gib'])} GiB")
    pv = parts.get("packed_vs_alone")
    if pv and "error" not in pv:
        print(f"packed vs alone ({pv['row_tokens']} tokens): worst per-token RMS: noise floor (alone, longer row) "
              f"{pv['noise_floor']['worst_rms']:.2e}, packed {pv['packed']['worst_rms']:.2e}, "
              f"attention leak {pv['attention-leak']['worst_rms']:.2e}, "
              f"RoPE offset {pv['rope-offset']['worst_rms']:.2e}")
    for name, c in r["checks"].items():
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {name}: {c['detail']}")
    print("GPU_CHECK", "PASS" if r["ok"] else "FAIL")


if __name__ == "__main__":
    sys.exit(main())
