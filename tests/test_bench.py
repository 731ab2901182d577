"""python -m t2i_jax.bench: the report's figures, the FLOP counts, the
device peak table and the errors for bad settings."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from t2i_jax.bench import cli, core, devices, flops, profile
from t2i_jax.models import unet as unet_lib

FIGURES = ("items_per_s", "items_per_s_per_device", "ms_per_iter", "ms_per_iter_median", "ms_per_iter_min",
           "first_call_s", "flops_per_item", "tflops", "tflops_per_device", "utilisation_of_measured_peak")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    path = folder / "out.json"
    argv = ["--model", "tiny", "--modes", "unet,sample,train,train_stream", "--compare", "diffusers", "--steps", "2",
            "--warmup", "1", "--iters", "2", "--json", str(path), "--profile", str(folder / "prof"),
            "--profile-iters", "2"]
    returned = cli.main(argv)
    on_disk = json.loads(path.read_text())
    assert on_disk["results"].keys() == returned["results"].keys()
    return on_disk


# Behind --slow: the four-mode report against diffusers took ~220 s of the fast suite (its fixture). The FLOP
# counts, the peak table and the settings errors below stay fast.
@pytest.mark.slow
def test_report_holds_every_figure(report):
    assert report["command"].startswith("python -m t2i_jax.bench --model tiny")
    for pkg in ("jax", "jaxlib", "flax", "torch", "diffusers"):
        assert report["versions"][pkg]
    assert report["date"][:2] == "20"
    dev = report["device"]
    assert dev["device_kind"] == "cpu" and dev["device_count"] == jax.device_count() == 8
    # No datasheet peak for a CPU: utilisation against it is null, not a made-up number.
    assert dev["peak_tflops_per_device"] is None and dev["measured_matmul_tflops_per_device"] > 0
    r = report["resolved"]
    assert (r["resolution"], r["latent"], r["batch_size"], r["per_device_batch"], r["dtype"]) == (32, 16, 8, 1, "fp32")
    assert list(report["results"]) == ["unet", "sample", "train", "train_stream"]
    for mode, res in report["results"].items():
        ours, theirs = res["ours"], res.get("diffusers")
        for key in FIGURES:
            assert ours[key] > 0, (mode, key)
        assert ours["compile_s"] > 0
        assert ours["items_per_s_per_device"] == pytest.approx(ours["items_per_s"] / 8)
        if mode == "train_stream":
            continue
        for key in FIGURES:
            assert theirs[key] > 0, (mode, key)
        assert ours["utilisation"] is None
        assert "peak_bytes_in_use" in ours and "peak_bytes_in_use" in theirs
        assert ours["compiled_memory"]["argument_bytes"] > 0
        assert ours["items_per_s_per_device"] == pytest.approx(ours["items_per_s"] / 8)
        assert ours["items_per_s"] == pytest.approx(ours["items_per_iter"] / ours["ms_per_iter"] * 1e3)
        assert res["ratio_ours_over_diffusers_per_device_min"] > 0
        assert res["ratio_ours_over_diffusers_per_device"] == pytest.approx(
            ours["items_per_s_per_device"] / theirs["items_per_s_per_device"])
        # The reference runs our per-device batch on one device.
        assert theirs["items_per_iter"] * 8 == ours["items_per_iter"]
    assert report["torch"]["batch_size"] == 1 and report["torch"]["dtype"] == "fp32"


@pytest.mark.slow
def test_sample_counts_the_same_work_as_diffusers(report):
    ours, theirs = report["results"]["sample"]["ours"], report["results"]["sample"]["diffusers"]
    assert ours["model_evals"] == theirs["model_evals"] == 3  # PNDM (PLMS): steps + 1
    assert ours["ms_per_unet_step"] == pytest.approx(ours["ms_per_iter"] / 3)
    p = ours["flops_pieces"]
    total = p["text_encoder_calls"] * p["text_encoder_per_call"] + 3 * p["unet_per_eval"] + p["vae_decode"]
    assert p["text_encoder_calls"] == 2 and p["unet_rows"] == 16
    assert ours["flops_per_item"] == pytest.approx(total / 8)
    # XLA counts the fori_loop body once: the loop program costs one U-Net
    # evaluation plus the decode, which is why the pieces are added up.
    assert ours["loop_xla_flops"] == pytest.approx(p["unet_per_eval"] + p["vae_decode"], rel=0.05)
    # The U-Net forward per sample equals the unet mode's.
    assert p["unet_per_eval"] / 16 == pytest.approx(report["results"]["unet"]["ours"]["flops_per_item"], rel=0.01)


@pytest.mark.slow
def test_profile_traces_each_mode(report):
    for mode, res in report["results"].items():
        prof = res["ours"]["profile"]
        assert prof["log_dir"].endswith(f"prof/{mode}") and prof["iters"] == 2
        # The XSpace (for XProf/TensorBoard) and the Chrome trace (for Perfetto) are both on disk.
        assert any(f.endswith(".xplane.pb") for f in prof["files"]), prof["files"]
        assert prof["trace"].endswith(".trace.json.gz")
        # XLA:CPU has no device lanes: the summary says so instead of inventing a busy fraction.
        assert prof["summary"]["device"] is None and "no device lanes" in prof["summary"]["note"]
        assert "/host:CPU" in prof["summary"]["processes"]


@pytest.mark.slow
def test_attention_plan_on_cpu_is_xla_everywhere(report):
    plan = report["attention"]
    assert report["settings"]["attention"] == "auto"
    # tiny: 32/64-channel blocks with 4 heads -> head sizes 8 and 16; CLIP 64 wide, 4 heads.
    assert set(plan["unet"]) == {"8", "16"} and set(plan["text_encoder"]) == {"16"}
    for part in ("unet", "text_encoder"):
        for row in plan[part].values():
            assert row["impl"] == "xla" and "not an NVIDIA GPU" in row["why_not_cudnn"]


def _trace(events_by_thread, device="/device:GPU:0 (pid 3)"):
    """A Chrome trace with one host process and one device process."""
    ev = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
          {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": device}},
          {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 1000, "name": "PjitFunction(step)"}]
    for tid, (thread, spans) in enumerate(events_by_thread.items(), start=10):
        ev.append({"ph": "M", "pid": 7, "tid": tid, "name": "thread_name", "args": {"name": thread}})
        for ts, dur, name, args in spans:
            ev.append({"ph": "X", "pid": 7, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args})
    return {"traceEvents": ev}


def test_profile_summary_adds_up_one_line_of_the_device():
    # Kernels on a stream, and the same time again on the derived "XLA Ops" line.
    kernels = [(0, 30, "sm90_xmma_gemm", {"hlo_op": "dot.1"}), (40, 20, "flash_fprop", {"hlo_op": "custom-call.2"}),
               (60, 10, "sm90_xmma_gemm", {"hlo_op": "dot.1"}), (90, 10, "loop_fusion", {})]
    ops = [(0, 30, "dot.1", {}), (40, 20, "custom-call.2", {}), (60, 10, "dot.1", {}), (90, 10, "loop_fusion", {})]
    s = profile.summarize(_trace({"Stream #13(Compute)": kernels, "XLA Ops": ops}), iters=2)
    assert s["lines"] == "XLA Ops" and s["events"] == 4
    assert s["span_ms_per_iter"] == pytest.approx(0.100 / 2)
    assert s["busy_ms_per_iter"] == pytest.approx(0.070 / 2) and s["busy_fraction"] == pytest.approx(0.7)
    top = {r["op"]: r for r in s["top"]}
    assert top["dot.1"]["ms_per_iter"] == pytest.approx(0.040 / 2) and top["dot.1"]["calls_per_iter"] == 1
    assert top["dot.1"]["share"] == pytest.approx(40 / 70)
    assert [r["op"] for r in s["top"]] == ["dot.1", "custom-call.2", "loop_fusion"]
    # Without a derived line, the streams' kernels are added up, named by their HLO op where given;
    # overlapping kernels on two streams count once towards busy time.
    two_streams = {"Stream #13(Compute)": kernels, "Stream #14(MemcpyD2H)": [(5, 10, "memcpy", {})]}
    s = profile.summarize(_trace(two_streams), iters=1)
    assert s["lines"] == "streams" and s["events"] == 5
    assert s["busy_ms_per_iter"] == pytest.approx(0.070)
    assert {r["op"] for r in s["top"]} == {"dot.1", "custom-call.2", "loop_fusion", "memcpy"}


def test_profile_summary_without_device_events():
    s = profile.summarize(_trace({}, device="/host:CPU other"))
    assert s["device"] is None and "no device lanes" in s["note"]
    s = profile.summarize(_trace({"Stream #1": []}))
    assert s["device"].startswith("/device:GPU:0") and "no timed events" in s["note"]


@pytest.mark.slow
def test_train_step_learns_something_finite(report):
    ours = report["results"]["train"]["ours"]
    assert math.isfinite(ours["final_loss"]) and 0.1 < ours["final_loss"] < 10
    # Forward + backward is about 3x the forward.
    ratio = ours["flops_per_item"] / report["results"]["unet"]["ours"]["flops_per_item"]
    assert 2.5 < ratio < 3.6
    assert ours["cached"] and ours["step"].startswith("t2i_jax.train.ldm.setup_step")


@pytest.mark.slow
def test_train_stream_times_the_step_with_the_frozen_encoders(report):
    stream = report["results"]["train_stream"]
    assert "diffusers" not in stream  # no counterpart in the reference
    ours, cached = stream["ours"], report["results"]["train"]["ours"]
    assert not ours["cached"] and math.isfinite(ours["final_loss"])
    # The VAE encoder and text encoder forward add work on top of the cached step.
    assert ours["flops_per_item"] > 1.05 * cached["flops_per_item"]


# --------------------------------------------------------------------------
# FLOP counts
# --------------------------------------------------------------------------


def _unet_program(batch, mesh=None):
    cfg = unet_lib.UNetConfig.named("tiny")
    m = unet_lib.UNet2DConditionModel(cfg)
    params = jax.eval_shape(m.init, jax.random.key(0), *unet_lib.dummy_inputs(cfg))["params"]
    sharding = NamedSharding(mesh, P("data")) if mesh is not None else None
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in
            (((batch, 16, 16, 4), jnp.float32), ((batch,), jnp.int32), ((batch, 77, 64), jnp.float32))]
    fn = jax.jit(lambda p, x, t, c: m.apply({"params": p}, x, t, c))
    return cfg, fn.lower(params, *args)


def test_unet_flops_match_the_analytic_count_and_scale_with_batch():
    cfg, low1 = _unet_program(1)
    _, low2 = _unet_program(2)
    f1 = flops.compiled_flops(low1.compile())
    f2 = flops.compiled_flops(low2.compile())
    analytic = flops.unet_matmul_flops(cfg, 1, 16, 16)
    # Convs and matmuls are nearly all of it; XLA adds norms/activations and
    # skips the zero padding of edge convolutions.
    assert 0.9 < f1 / analytic < 1.1
    assert f2 == pytest.approx(2 * f1, rel=0.05)
    # The pre-compilation (lowered) count agrees with the compiled one.
    assert flops.lowered_flops(low1) == pytest.approx(f1, rel=0.01)


def test_compiled_flops_are_per_device_when_sharded():
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    _, low = _unet_program(8, mesh)
    per_device = flops.compiled_flops(low.compile())
    assert flops.lowered_flops(low) == pytest.approx(8 * per_device, rel=0.01)
    _, single = _unet_program(1)
    assert per_device == pytest.approx(flops.lowered_flops(single), rel=0.01)


def test_analytic_count_of_sd15_is_the_known_figure():
    # SD1.5's U-Net at 64x64 latents: about 0.4 T multiply-adds per sample.
    f = flops.unet_matmul_flops(unet_lib.UNetConfig.named("sd15"), 1, 64, 64)
    assert 0.75e12 < f < 0.85e12


def test_flops_of_reads_every_cost_analysis_shape():
    assert flops.flops_of({"flops": 10.0, "bytes accessed": 3.0}) == 10.0
    assert flops.flops_of([{"flops": 10.0}, {"flops": 5.0}]) == 15.0
    assert flops.flops_of(None) is None
    assert flops.flops_of([]) is None
    assert flops.flops_of({"flops": 0.0}) is None


# --------------------------------------------------------------------------
# Device peaks
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind,dtype,name,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", "H100 SXM", 989.4),
    ("NVIDIA H100 80GB HBM3", "fp32", "H100 SXM", 494.7),
    ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "bf16", "H100 NVL", 835.5),
    ("NVIDIA H200", "bf16", "H200 SXM", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bf16", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", "A100", 156.0),
    ("NVIDIA A10", "bf16", "A10", 125.0),
    ("NVIDIA L4", "bf16", "L4", 121.0),
    ("TPU v4", "bf16", "TPU v4", 275.0),
    ("TPU v5 lite", "bf16", "TPU v5e", 197.0),
    ("TPU v5p", "bf16", "TPU v5p", 459.0),
    ("TPU v6 lite", "bf16", "TPU v6e", 918.0),
    ("TPU v5 lite", "fp32", "TPU v5e", None),
    ("cpu", "fp32", None, None),
])
def test_datasheet_peaks(kind, dtype, name, peak):
    assert devices.datasheet_peak(kind, dtype) == (name, peak)


# --------------------------------------------------------------------------
# Settings and output
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    (dict(model="sd3"), r"unknown model 'sd3'; choose one of \['sd15', 'sd21', 'sdxl', 'tiny', 'tiny-sdxl'\]"),
    (dict(resolution=500), r"resolution 500 is not a multiple of 8; use 496 or 504"),
    (dict(resolution=0), r"resolution 0 must be a positive integer"),
    (dict(batch_size=0), r"batch size 0 must be a positive integer"),
    (dict(batch_size=2.5), r"batch size 2.5 must be a positive integer"),
    (dict(batch_size=12), r"batch size 12 does not divide over 8 devices; use 8 or 16"),
    (dict(modes=("unet", "infer")), r"unknown mode 'infer'; choose from unet, sample, train"),
    (dict(attention="cudnn", dtype="fp32"), r"attention 'cudnn' needs bf16"),
    (dict(attention="flash"), r"attention 'flash' is not one of auto, xla, cudnn"),
    (dict(profile_iters=0), r"profile_iters 0 must be a positive integer"),
    (dict(steps=0), r"steps 0 must be a positive integer"),
    (dict(scheduler="foo"), r"unknown scheduler 'foo'"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        core.resolve(core.BenchSettings(**kw), jax.devices())


def test_bad_flags_fail_with_the_flag_named(capsys):
    for argv, match in ((["--batch-size", "abc"], "batch size 'abc' must be a positive integer"),
                        (["--batch-size", "-2"], "batch size '-2' must be a positive integer"),
                        (["--dtype", "fp8"], "invalid choice: 'fp8'")):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(argv)
        assert match in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"resolution 100 is not a multiple of 8; use 96 or 104"):
        cli.main(["--resolution", "100", "--no-measure-peak"])


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "r.json"
    cli.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        cli.write_json(path, {"a": object()})  # fails half-way through serialising
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
