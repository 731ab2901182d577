"""python -m t2i_jax.bench.gpu_check and scripts/gpu_check.sh on a CPU: the
--smoke run's table (every section, numbers in its rows, parity under its
thresholds), --help, the refusals without a GPU, and the driver's logic
(sweep stops, time budget, targets, exit status, child processes) on
made-up results."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from t2i_jax.bench import core as bench_core
from t2i_jax.bench import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "scripts" / "gpu_check.sh"


def cpu_env(**extra) -> dict:
    """This environment for a child python: CPU only, one XLA device (the
    8 fake devices of conftest would split every batch 8 ways), torch's
    threads sleeping instead of spinning at barriers (2 shared cores)."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def run_smoke(folder) -> dict:
    """`gpu_check --smoke` in a child python: its stdout, JSON, markdown and wall time."""
    js, md = folder / "out.json", folder / "out.md"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "t2i_jax.bench.gpu_check", "--smoke", "--json", str(js),
                           "--markdown", str(md)], cwd=ROOT, env=cpu_env(), check=False, capture_output=True,
                          text=True, timeout=600)
    wall = time.time() - t0
    print(f"\ngpu_check --smoke: {wall:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"stdout": proc.stdout, "report": json.loads(js.read_text()), "markdown": md.read_text(), "wall": wall}


def rows_of(report, section):
    return [r for r in report["rows"] if r["section"] == section]


def _smoke_table_has_every_section(smoke):
    out = smoke["stdout"]
    for section in ("parity", "attention", "speed", "train", "sdxl", "targets"):
        assert re.search(rf"^{section}\s", out, re.MULTILINE), section
        assert rows_of(smoke["report"], section), section
    assert "exit status 0" in out
    assert smoke["report"]["exit_status"] == 0


def _smoke_parity_passes_its_thresholds(smoke):
    rows = rows_of(smoke["report"], "parity")
    checks = [r["check"] for r in rows]
    for part in ("U-Net", "VAE tiny decode", "VAE tiny encode", "CLIP"):
        for dt in ("fp32", "bf16"):
            assert any(c.startswith(part) and c.endswith(dt) for c in checks), (part, dt)
    for r in rows:
        assert r["status"] == "pass", r
        assert 0 < r["value"] <= r["data"]["threshold"]
        if r["data"]["dtype"] == "fp32":
            assert r["value"] < 1e-5  # fp32 on a CPU: rounding only
        else:
            # ours in bf16 is about as far from fp32 as torch's own bf16 cast
            assert r["value"] < 3 * r["data"]["torch_bf16_rel_err"]


def _smoke_attention_rows_are_skipped_without_gpu(smoke):
    rows = rows_of(smoke["report"], "attention")
    plan = [r for r in rows if r["check"].startswith("auto plan")]
    assert len(plan) == 1 and set(plan[0]["data"]["plan"]) == {"40", "64", "80", "160", "512"}
    cases = [r for r in rows if r not in plan]
    assert {r["data"]["head_dim"] for r in cases} == {40, 64, 80, 160}
    for r in cases:
        assert r["status"] == "skipped" and r["note"].startswith("no GPU"), r


def _smoke_speed_and_train_rows_carry_numbers(smoke):
    report = smoke["report"]
    for section, unit in (("speed", "img/s"), ("train", "samples/s")):
        rows = rows_of(report, section)
        for side in ("ours", "diffusers"):
            got = [r for r in rows if r["data"].get("side") == side]
            assert got, (section, side)
            for r in got:
                assert r["status"] == "ok", r
                assert r["value"] > 0 and r["util"] > 0, r
        best = [r for r in rows if r["data"].get("best")]
        assert {r["data"]["side"] for r in best} == {"ours", "diffusers"}
        assert all(r["unit"] == unit for r in best)
    unet = [r for r in rows_of(report, "speed") if r["data"].get("mode") == "unet"]
    assert {r["data"]["side"] for r in unet} == {"ours", "diffusers"} and all(r["unit"] == "it/s" for r in unet)
    ours = next(r for r in unet if r["data"]["side"] == "ours")
    assert ours["value"] == pytest.approx(1e3 / ours["data"]["figures"]["ms_per_iter"])
    assert ours["vs_ref"].endswith("x diffusers")


def _smoke_targets_give_the_gap(smoke):
    rows = rows_of(smoke["report"], "targets")
    assert len(rows) == 6
    assert {r["data"]["key"] for r in rows} == {"unet_its_b1", "images_per_s_best", "train_samples_per_s",
                                                 "ratio_unet_its_b1", "ratio_images_per_s_best",
                                                 "ratio_train_samples_per_s"}
    for r in rows:
        assert r["status"] in ("met", "MISSED"), r
        assert r["value"] > 0 and r["gap"]
        if r["status"] == "MISSED":
            assert "needs" in r["gap"]


def _smoke_markdown_is_ready_for_benchmarks(smoke):
    md, report = smoke["markdown"], smoke["report"]
    head = md.splitlines()[0]
    assert head.startswith("### gpu_check") and report["date"][:10] in head
    for pkg in ("jax", "torch", "diffusers", "transformers"):
        assert f"{pkg} {report['versions'][pkg]}" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(report["rows"])
    assert "python -m t2i_jax.bench.gpu_check --smoke" in md


# 70 s on 2 cores before the sdxl section (217 s with it, on 2 cores under a load of 9): the whole GPU
# check at tiny size; its parts have fast tests below
@pytest.mark.slow
def test_smoke_run(tmp_path):
    # One test for the whole run: under pytest-xdist a module fixture would
    # run the smoke again in every worker that takes one of its tests.
    smoke = run_smoke(tmp_path)
    _smoke_table_has_every_section(smoke)
    _smoke_parity_passes_its_thresholds(smoke)
    _smoke_attention_rows_are_skipped_without_gpu(smoke)
    _smoke_speed_and_train_rows_carry_numbers(smoke)
    _smoke_targets_give_the_gap(smoke)
    _smoke_markdown_is_ready_for_benchmarks(smoke)


def test_help_exits_0_and_shows_defaults():
    proc = subprocess.run([sys.executable, "-m", "t2i_jax.bench.gpu_check", "--help"], cwd=ROOT, env=cpu_env(),
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for s in ("--smoke", "--sections", "--json", "--markdown", "--budget-s", "default: 600", "1,4,8,16,32",
              "default: fp16", "parity fp32 <= 1e-04", "--sdxl-steps", "default: 30", "--sdxl-batches",
              "default: 1,4,8"):
        assert s in text, s


def test_bad_flags_exit_2():
    proc = subprocess.run([sys.executable, "-m", "t2i_jax.bench.gpu_check", "--sections", "parity,nope"], cwd=ROOT,
                          env=cpu_env(), check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "choose from parity,attention,speed,train" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "t2i_jax.bench.gpu_check", "--steps", "0"], cwd=ROOT,
                          env=cpu_env(), check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--steps 0 must be a positive integer" in proc.stderr


def test_wrapper_refuses_without_gpu(tmp_path):
    proc = subprocess.run(["bash", str(WRAPPER)], cwd=tmp_path, check=False, capture_output=True, text=True,
                          timeout=120, env=cpu_env(NVIDIA_SMI=str(tmp_path / "no-nvidia-smi")))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA GPU" in lines[0] and "--smoke" in lines[0], proc.stderr
    assert not (tmp_path / "gpu_check_out").exists()


def test_wrapper_refuses_when_jax_sees_no_gpu(tmp_path):
    # nvidia-smi lists a GPU, but jax runs on the CPU.
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA Test GPU (UUID: GPU-0)"\n')
    smi.chmod(0o755)
    proc = subprocess.run(["bash", str(WRAPPER)], cwd=tmp_path, check=False, capture_output=True, text=True,
                          timeout=120, env=cpu_env(NVIDIA_SMI=str(smi), PYTHON=sys.executable))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "jax sees no GPU" in lines[0], proc.stderr


def test_module_refuses_without_gpu_from_its_child():
    # Not --smoke: the section's child process finds no GPU, and the run stops with 2.
    proc = subprocess.run([sys.executable, "-m", "t2i_jax.bench.gpu_check", "--sections", "attention"], cwd=ROOT,
                          env=cpu_env(), check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_check: jax sees no GPU" in proc.stderr


# --------------------------------------------------------------------------
# The driver's logic, on made-up figures
# --------------------------------------------------------------------------


def test_isolated_section_runs_in_a_child(monkeypatch):
    for k, v in cpu_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    report = gc.run_all(gc.CheckConfig(smoke=True, sections=("attention",), isolate=True))
    rows = rows_of(report, "attention")
    assert rows and all(r["status"] in ("ok", "skipped") for r in rows)
    assert report["env"]["platform"] == "cpu"


def test_child_timeout_is_a_failed_row():
    cfg = gc.CheckConfig(smoke=True).filled()
    rows = gc.run_section_child("attention", cfg, timeout_s=0.05)
    assert rows[-1]["status"] == "FAILED" and rows[-1]["note"].startswith("timed out after")


def _figures(items_per_s, ms=100.0):
    return {"items_per_s_per_device": items_per_s, "ms_per_iter": ms, "ms_per_iter_median": ms, "iters": 3,
            "warmup": 1, "utilisation_of_measured_peak": 0.4, "items_per_iter": 1}


def _fake_bench(monkeypatch, table):
    """bench_pair and reference_run answering from `table`: batch ->
    (ours items/s or error text, diffusers items/s or error text); each side
    takes 1 s. Returns the calls made, as (side, batch, modes)."""
    calls = []

    def fill(res, side, v):
        if isinstance(v, str):
            res[f"{side}_error"] = v
        else:
            res[side] = _figures(v)
        res[f"{side}_wall_s"] = 1.0

    def fake_reference(s, modes, out, log):
        calls.append(("diffusers", s.batch_size, tuple(modes)))
        for m in modes:
            fill(out[m], "diffusers", table[s.batch_size][1])

    def fake_pair(s, log, *, reference=True):
        out = {m: {"ours": None, "diffusers": None, "ours_error": None, "diffusers_error": None,
                   "ours_wall_s": 0.0, "diffusers_wall_s": 0.0} for m in s.modes}
        if reference:
            fake_reference(s, s.modes, out, log)
        calls.append(("ours", s.batch_size, s.modes))
        for m in s.modes:
            fill(out[m], "ours", table[s.batch_size][0])
            gc.add_reference_figures(out[m])
        return out

    monkeypatch.setattr(gc, "bench_pair", fake_pair)
    monkeypatch.setattr(gc, "reference_run", fake_reference)
    # The made-up figures are final: no recomputing them from their ms.
    monkeypatch.setattr(bench_core, "figures", lambda *a, **k: {})
    return calls


INFO = {"platform": "gpu", "device_count": 1}


def _sweep(cfg, batches, monkeypatch, table, reference_each=False):
    calls = _fake_bench(monkeypatch, table)
    rows = []
    gc._sweep(cfg, "speed", "sample", batches, INFO, rows.append, lambda m: None, "img/s", "sample",
              first_extra=("unet",), reference_each=reference_each)
    return rows, calls


def test_sweep_stops_when_images_per_s_stop_rising(monkeypatch):
    cfg = gc.CheckConfig().filled()
    rows, calls = _sweep(cfg, (1, 4, 8, 16), monkeypatch, {1: (2.0, 1.0), 4: (5.0, 2.0), 8: (5.1, 2.5), 16: (9, 9)})
    # diffusers at batch 1, then once more at ours' best batch (8), after the sweep.
    assert calls == [("diffusers", 1, ("unet", "sample")), ("ours", 1, ("unet", "sample")),
                     ("ours", 4, ("sample",)), ("ours", 8, ("sample",)), ("diffusers", 8, ("sample",))]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(skipped) == 1 and "rose under 3%" in skipped[0]["note"] and skipped[0]["data"]["batch"] == 16
    best = {r["data"]["side"]: r for r in rows if r["data"].get("best")}
    assert best["ours"]["value"] == 5.1 and best["ours"]["data"]["batch"] == 8
    assert best["diffusers"]["value"] == 2.5 and best["diffusers"]["data"]["batch"] == 8
    assert best["ours"]["vs_ref"] == "2.04x diffusers"
    assert rows[0]["data"]["mode"] == "unet" and rows[0]["unit"] == "it/s"
    # No diffusers rows at the batches it did not run.
    assert {r["data"]["batch"] for r in rows if r["data"].get("side") == "diffusers"} == {1, 8}


def test_sweep_with_diffusers_at_every_batch(monkeypatch):
    cfg = gc.CheckConfig().filled()
    rows, calls = _sweep(cfg, (1, 4), monkeypatch, {1: (2.0, 1.0), 4: (5.0, 4.0)}, reference_each=True)
    assert [c[:2] for c in calls] == [("diffusers", 1), ("ours", 1), ("diffusers", 4), ("ours", 4)]
    best = {r["data"]["side"]: r for r in rows if r["data"].get("best")}
    assert best["diffusers"]["data"]["batch"] == 4 and best["ours"]["vs_ref"] == "1.25x diffusers"


def test_sweep_stops_at_oom_and_keeps_a_failed_diffusers_row(monkeypatch):
    cfg = gc.CheckConfig().filled()
    oom = "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB"
    rows, calls = _sweep(cfg, (1, 4, 8), monkeypatch, {1: (2.0, 3.0), 4: (oom, 3.0), 8: (1.0, 1.0)},
                         reference_each=True)
    assert [c[:2] for c in calls] == [("diffusers", 1), ("ours", 1), ("diffusers", 4), ("ours", 4)]
    failed = [r for r in rows if r["status"] == "FAILED"]
    assert [r["data"]["side"] for r in failed] == ["ours"] and "RESOURCE_EXHAUSTED" in failed[0]["note"]
    assert [r["note"] for r in rows if r["status"] == "skipped"] == ["stopped: ours ran out of memory at batch 4"]
    best = {r["data"]["side"]: r for r in rows if r["data"].get("best")}
    assert best["ours"]["data"]["batch"] == 1


def test_a_failed_diffusers_is_its_own_failed_row(monkeypatch):
    cfg = gc.CheckConfig().filled()
    rows, _ = _sweep(cfg, (1,), monkeypatch, {1: (2.0, "OutOfMemoryError: CUDA out of memory.")})
    failed = [r for r in rows if r["status"] == "FAILED"]
    assert {r["data"]["side"] for r in failed} == {"diffusers"}
    assert any("CUDA out of memory" in r["note"] for r in failed)
    assert all(r["status"] == "ok" for r in rows if r["data"].get("side") == "ours")


def test_sweep_skips_what_the_time_budget_cannot_fit(monkeypatch):
    cfg = gc.CheckConfig(deadline=time.time() + 1.5).filled()
    rows, calls = _sweep(cfg, (1, 4, 8), monkeypatch, {1: (2.0, 1.0), 4: (5.0, 2.0), 8: (9.0, 4.0)})
    assert [c[:2] for c in calls] == [("diffusers", 1), ("ours", 1)]
    notes = [r["note"] for r in rows if r["status"] == "skipped"]
    assert len(notes) == 2 and all(n.startswith("time budget") for n in notes)


def test_predicted_time_scales_the_timed_calls_only():
    res = {"ours": _figures(1.0, ms=1000.0), "ours_wall_s": 20.0}
    # 4 calls: 4 s timed, 16 s builds and compiles; at 4x the batch: 16 + 16.
    assert gc.predict_s(res, "ours", 1, 4) == pytest.approx(32.0)
    assert gc.predict_s({"diffusers_wall_s": 5.0}, "diffusers", 1, 4) == 5.0


def _speed_row(side, value, **data):
    return gc.row("speed", f"x: {side}", value=value, side=side, **data)


def test_targets_from_rows_and_failed_figures():
    rows = [_speed_row("ours", 120.0, metric="unet_b1", mode="unet"),
            _speed_row("diffusers", 60.0, metric="unet_b1", mode="unet"),
            _speed_row("ours", 4.0, best=True, mode="sample"),
            gc.failed("speed", "best: diffusers", "no diffusers run succeeded", side="diffusers", best=True,
                      mode="sample")]
    got = {r["data"]["key"]: r for r in gc.target_rows(rows)}
    assert set(got) == {"unet_its_b1", "ratio_unet_its_b1", "images_per_s_best", "ratio_images_per_s_best"}
    assert got["unet_its_b1"]["status"] == "met" and got["unet_its_b1"]["gap"] == "+20%"
    assert got["ratio_unet_its_b1"]["value"] == 2.0 and got["ratio_unet_its_b1"]["status"] == "met"
    assert got["images_per_s_best"]["status"] == "MISSED" and got["images_per_s_best"]["gap"] == "-33% (needs 1.50x)"
    assert got["ratio_images_per_s_best"]["status"] == "FAILED"


def test_exit_status_follows_parity_and_attention():
    ok = gc.row("parity", "a fp32", value=1e-6, status="pass")
    assert gc.exit_status([ok]) == 0
    assert gc.exit_status([ok, gc.row("parity", "b bf16", value=1.0, status="FAIL")]) == 1
    assert gc.exit_status([ok, gc.failed("parity", "c fp32", "ModuleNotFoundError: No module named 'diffusers'")]) == 1
    assert gc.exit_status([ok, gc.row("attention", "d", value=0.5, status="FAIL")]) == 1
    assert gc.exit_status([ok, gc.failed("attention", "e", "cuDNN refused"), gc.row("speed", "f", status="FAILED"),
                           gc.row("targets", "g", status="MISSED")]) == 0


def test_strict_fp32_turns_tf32_off_and_back_on():
    import jax
    import torch

    b = torch.backends
    before = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    with gc.strict_fp32():
        assert (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32) == (False, False)
        assert b.cuda.matmul.fp32_precision == "ieee"  # the new API's reading agrees
        assert jax.config.jax_default_matmul_precision == "highest"
    assert (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32) == before
    assert jax.config.jax_default_matmul_precision != "highest"


def test_attention_cases_are_sd15s_shapes():
    cases = gc.attention_cases()
    got = {(c["head_dim"], c["q"], c["kv"], c["causal"]) for c in cases}
    assert got == {(40, 4096, 4096, False), (40, 4096, 77, False), (80, 1024, 1024, False), (80, 1024, 77, False),
                   (160, 256, 256, False), (160, 256, 77, False), (160, 64, 64, False), (160, 64, 77, False),
                   (64, 77, 77, True)}


def test_one_line_names_the_error_and_the_fix():
    e = ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
    s = gc.one_line(e)
    assert s.startswith("ModuleNotFoundError: No module named 'diffusers'") and "carry its wheel" in s
    assert gc.one_line(RuntimeError("first\nsecond")) == "RuntimeError: first"
    assert len(gc.one_line(RuntimeError("x" * 1000))) == 220
    assert gc.is_oom("RESOURCE_EXHAUSTED: Out of memory") and gc.is_oom("CUDA out of memory.")


def test_attention_rows_on_a_faked_gpu(monkeypatch):
    # CI has no GPU: run the GPU branch with "cudnn" answered by XLA, on
    # small shapes, so that its arithmetic and rows are still checked.
    from t2i_jax.models import layers

    real = layers.dot_product_attention

    def fake(q, k, v, heads, *, impl=None, **kw):
        return real(q, k, v, heads, impl=None if impl == "cudnn" else impl, **kw)

    monkeypatch.setattr(layers, "dot_product_attention", fake)
    monkeypatch.setattr(gc, "require_gpu", lambda cfg: {"platform": "gpu", "device_count": 1, "device_kind": "fake"})
    monkeypatch.setattr(gc, "attention_cases", lambda latent=64: [
        {"where": "self", "head_dim": 8, "heads": 2, "q": 16, "kv": 16, "causal": False},
        {"where": "causal", "head_dim": 8, "heads": 2, "q": 12, "kv": 12, "causal": True}])
    rows = []
    gc.section_attention(gc.CheckConfig(smoke=True).filled(), rows.append, lambda m: None)
    rows = [r for r in rows if r["section"] == "attention"]
    assert rows[0]["check"].startswith("auto plan") and "8: xla" in rows[0]["note"]
    for r in rows[1:]:
        assert r["status"] == "pass" and r["value"] == 0.0, r  # the same implementation twice
        d = r["data"]
        assert 0 < d["xla_vs_fp32"] < 1e-2 and d["ms_cudnn"] > 0 and d["ms_xla"] > 0
        assert r["vs_ref"].startswith("cudnn ") and r["vs_ref"].endswith("x faster")


def test_parity_failure_is_a_failed_row_per_part_and_dtype():
    def boom():
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported later")

    parts = [gc._Part("U-Net x", lambda m, dt: None, lambda mod, p: None),
             gc._Part("VAE y", lambda m, dt: None, lambda mod, p: None)]
    rows = []
    gc._parity_model("parity", "x", boom, None, parts, rows.append, lambda m: None)
    assert [(r["check"], r["status"]) for r in rows] == [
        ("U-Net x fp32", "FAILED"), ("U-Net x bf16", "FAILED"), ("VAE y fp32", "FAILED"), ("VAE y bf16", "FAILED")]
    assert rows[0]["note"] == "RuntimeError: CUDA error: out of memory"
    assert gc.exit_status(rows) == 1


def test_bf16_parity_limit_follows_the_torch_yardstick():
    assert gc.parity_limit("fp32") == 1e-4
    assert gc.parity_limit("bf16", 1.4e-2) == pytest.approx(2.8e-2)
    assert gc.parity_limit("bf16", 1e-3) == 1e-2  # floor
    assert gc.parity_limit("bf16", 0.2) == 5e-2  # cap
    assert gc.parity_limit("bf16", None) == 5e-2


def test_one_failing_output_fails_its_own_rows_only():
    import numpy as np
    import torch

    model = torch.nn.Linear(3, 3)

    def bad_jax(mod, p):
        raise ValueError("shape mismatch")

    parts = [gc._Part("good", lambda m, dt: m(torch.ones(2, 3, dtype=dt)),
                      lambda mod, p: np.asarray(mod(torch.ones(2, 3)).detach().numpy())),
             gc._Part("bad", lambda m, dt: m(torch.ones(2, 3, dtype=dt)), bad_jax)]
    fresh = torch.nn.Linear(3, 3)
    fresh.load_state_dict(model.state_dict())
    rows = []
    gc._parity_model("parity", "lin", lambda: model, lambda state: ((lambda dt: fresh), {}), parts, rows.append,
                     lambda m: None)
    status = {r["check"]: r["status"] for r in rows}
    assert status == {"good fp32": "pass", "good bf16": "pass", "bad fp32": "FAILED", "bad bf16": "FAILED"}
    assert next(r for r in rows if r["check"] == "bad fp32")["note"] == "ours: ValueError: shape mismatch"


# --------------------------------------------------------------------------
# The SDXL line
# --------------------------------------------------------------------------


def test_sdxl_section_sweeps_sdxl_and_sets_the_anchor_beside_it(monkeypatch):
    import jax

    calls = _fake_bench(monkeypatch, {1: (0.5, 0.3), 4: (0.8, 0.4), 8: (0.81, 0.45)})
    fake_pair, settings = gc.bench_pair, []
    monkeypatch.setattr(gc, "bench_pair", lambda s, log, **kw: settings.append(s) or fake_pair(s, log, **kw))
    monkeypatch.setattr(gc, "require_gpu", lambda cfg: {"platform": "gpu", "device_count": 1,
                                                        "device_kind": "NVIDIA H200"})
    rows = []
    gc.section_sdxl(gc.CheckConfig().filled(), rows.append, lambda m: None)
    rows = [r for r in rows if r["section"] == "sdxl"]
    # SDXL base at 30 steps, batch 1 then the sweep (stopped at 8: under 3% more than 4), diffusers at 1 and at 8.
    assert {(s.model, s.steps, s.modes, s.scheduler) for s in settings} == {("sdxl", 30, ("sample",), None)}
    assert bench_core.resolve(settings[0], jax.devices()[:1]).scheduler == "euler"  # SDXL's pipeline default
    assert calls == [("diffusers", 1, ("sample",)), ("ours", 1, ("sample",)), ("ours", 4, ("sample",)),
                     ("ours", 8, ("sample",)), ("diffusers", 8, ("sample",))]
    assert rows[0]["check"] == "SDXL 1024x1024 30 steps CFG 7.5, images/s per GPU, batch 1: ours"
    best = {r["data"]["side"]: r for r in rows if r["data"].get("best")}
    assert best["ours"]["value"] == 0.81 and best["ours"]["data"]["batch"] == 8
    assert best["diffusers"]["value"] == 0.45 and best["ours"]["vs_ref"] == "1.80x diffusers"
    anchor = rows[-1]
    assert anchor["check"] == "anchor: MLPerf TensorRT SDXL, 20 steps, images/s per H100"
    assert anchor["value"] == 2.03 and anchor["unit"] == "img/s"
    # ours' best at 30 steps scaled to the anchor's 20: 0.81 x 1.5.
    assert anchor["data"]["ours_at_anchor_steps"] == pytest.approx(1.215)
    assert anchor["vs_ref"] == "ours 0.60x" and "on NVIDIA H200" in anchor["note"]


def test_sdxl_anchor_without_a_figure_of_ours():
    r = gc.sdxl_anchor_row(None, 30, {})
    assert r["value"] == 2.03 and r["vs_ref"] == "" and "no figure of ours" in r["note"]


def test_sweep_sections_share_the_budget(monkeypatch):
    seen = {}

    def fake_section(section, sub):
        seen[section] = sub.deadline - time.time()
        return []

    monkeypatch.setattr(gc, "run_section_here", fake_section)
    gc.run_all(gc.CheckConfig(sections=("speed", "train", "sdxl"), budget_s=700.0, isolate=False))
    # speed 3/7 of the budget; train 2/4 and sdxl all of what is left (the fakes take no time).
    assert seen["speed"] == pytest.approx(300, abs=5) and seen["train"] == pytest.approx(350, abs=5)
    assert seen["sdxl"] == pytest.approx(700, abs=5)
    gc.run_all(gc.CheckConfig(sections=("speed", "train"), budget_s=700.0, isolate=False))
    assert seen["speed"] == pytest.approx(420, abs=5)  # 60% with train after it, as before SDXL


def test_sdxl_config_defaults_and_flags():
    cfg = gc.CheckConfig().filled()
    assert (cfg.sdxl_model, cfg.sdxl_steps, cfg.sdxl_batches) == ("sdxl", 30, (1, 4, 8))
    smoke = gc.CheckConfig(smoke=True).filled()
    assert (smoke.sdxl_model, smoke.sdxl_steps, smoke.sdxl_batches) == ("tiny-sdxl", 2, (1,))
    args = gc.parser().parse_args(["--sdxl-steps", "20", "--sdxl-batches", "2,4", "--sections", "sdxl"])
    got = gc.config_from_args(args)
    assert (got.sdxl_steps, got.sdxl_batches, got.sections) == (20, (2, 4), ("sdxl",))
    assert gc.CheckConfig.from_json(json.loads(json.dumps(got.to_json()))) == got
    with pytest.raises(ValueError, match="--sdxl-steps 0 must be a positive integer"):
        gc.config_from_args(gc.parser().parse_args(["--sdxl-steps", "0"]))
    report = {"env": {"platform": "gpu", "device_kind": "NVIDIA H200"}, "versions": {}, "command": "c", "wall_s": 1.0,
              "date": "2026-12-01T00:00:00+00:00", "config": cfg.to_json(), "exit_status": 0,
              "rows": [gc.sdxl_anchor_row(None, 30, {})]}
    md = gc.format_markdown(report)
    assert "SDXL: base, 1024x1024, 30 Euler steps, batches 1,4,8 per GPU." in md
    assert "| sdxl | anchor: MLPerf TensorRT SDXL, 20 steps, images/s per H100 | 2.03 | img/s |" in md


@pytest.mark.slow  # the tiny SDXL through the bench, ours and diffusers, on a CPU
def test_sdxl_section_smoke_runs_ours_and_diffusers():
    rows = []
    gc.section_sdxl(gc.CheckConfig(smoke=True).filled(), rows.append, lambda m: None)
    rows = [r for r in rows if r["section"] == "sdxl"]
    for side in ("ours", "diffusers"):
        got = [r for r in rows if r["data"].get("side") == side]
        assert got and all(r["status"] == "ok" and r["value"] > 0 for r in got), got
    assert rows[0]["check"].startswith("tiny SDXL 2 steps")
    assert rows[-1]["data"]["ours_at_anchor_steps"] == pytest.approx(
        next(r for r in rows if r["data"].get("best") and r["data"]["side"] == "ours")["value"] * 2 / 20)
