"""python -m t2i_jax.bench: the report's figures, the FLOP counts, the
device peak table and the errors for bad settings."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t2i_jax.bench import cli, core, devices, flops
from t2i_jax.models import unet as unet_lib

FIGURES = ("items_per_s", "items_per_s_per_device", "ms_per_iter", "ms_per_iter_median", "ms_per_iter_min",
           "first_call_s", "flops_per_item", "tflops", "tflops_per_device", "utilisation_of_measured_peak")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "out.json"
    argv = ["--model", "tiny", "--modes", "unet,sample,train", "--compare", "diffusers", "--steps", "2",
            "--warmup", "1", "--iters", "2", "--json", str(path)]
    returned = cli.main(argv)
    on_disk = json.loads(path.read_text())
    assert on_disk["results"].keys() == returned["results"].keys()
    return on_disk


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
    assert list(report["results"]) == ["unet", "sample", "train"]
    for mode, res in report["results"].items():
        ours, theirs = res["ours"], res["diffusers"]
        for key in FIGURES:
            assert ours[key] > 0, (mode, key)
            assert theirs[key] > 0, (mode, key)
        assert ours["compile_s"] > 0
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


def test_train_step_learns_something_finite(report):
    ours = report["results"]["train"]["ours"]
    assert math.isfinite(ours["final_loss"]) and 0.1 < ours["final_loss"] < 10
    # Forward + backward is about 3x the forward.
    ratio = ours["flops_per_item"] / report["results"]["unet"]["ours"]["flops_per_item"]
    assert 2.5 < ratio < 3.6


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
    (dict(model="sdxl"), r"unknown model 'sdxl'; choose one of \['sd15', 'sd21', 'tiny'\]"),
    (dict(resolution=500), r"resolution 500 is not a multiple of 8; use 496 or 504"),
    (dict(resolution=0), r"resolution 0 must be a positive integer"),
    (dict(batch_size=0), r"batch size 0 must be a positive integer"),
    (dict(batch_size=2.5), r"batch size 2.5 must be a positive integer"),
    (dict(batch_size=12), r"batch size 12 does not divide over 8 devices; use 8 or 16"),
    (dict(modes=("unet", "infer")), r"unknown mode 'infer'; choose from unet, sample, train"),
    (dict(attention="cudnn", dtype="fp32"), r"attention 'cudnn' needs bf16"),
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
