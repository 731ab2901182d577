"""python -m t2i_jax.bench --model tiny-sdxl / sdxl: the SDXL modes (both text
encoders, pooled text and time ids, the CFG batch) against diffusers'
StableDiffusionXLPipeline, the FLOP counts, and (slow) the full-size U-Net's
XLA FLOPs at 1024x1024 and the full sampler compiled on abstract params."""

import functools
import json
import time

import jax
import jax.numpy as jnp
import pytest

from t2i_jax import parallel
from t2i_jax.bench import cli, core, flops
from t2i_jax.bench import models as bench_models
from t2i_jax.models import unet as unet_lib

FIGURES = ("items_per_s", "items_per_s_per_device", "ms_per_iter", "flops_per_item", "tflops")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_sdxl") / "out.json"
    # One device: sharding is tested elsewhere; SDXL's own pieces are the point here.
    argv = ["--model", "tiny-sdxl", "--devices", "1", "--steps", "2", "--warmup", "1", "--iters", "1",
            "--unet-cfg", "--compare", "diffusers", "--no-measure-peak", "--json", str(path)]
    returned = cli.main(argv)
    on_disk = json.loads(path.read_text())
    assert on_disk["results"].keys() == returned["results"].keys()
    return on_disk


def test_report_runs_ours_and_stable_diffusion_xl_pipeline(report):
    assert report["command"].startswith("python -m t2i_jax.bench --model tiny-sdxl")
    r = report["resolved"]
    assert (r["model"], r["resolution"], r["latent"], r["batch_size"], r["num_devices"], r["scheduler"]) == (
        "tiny-sdxl", 32, 16, 1, 1, "euler")
    # SDXL defaults to the modes the LDM trainer does not exclude.
    assert list(report["results"]) == ["unet", "sample"]
    for mode, res in report["results"].items():
        for side in ("ours", "diffusers"):
            for key in FIGURES:
                assert res[side][key] > 0, (mode, side, key)
        assert res["ratio_ours_over_diffusers_per_device"] == pytest.approx(
            res["ours"]["items_per_s_per_device"] / res["diffusers"]["items_per_s_per_device"])
        # Both sides did the same work: the FLOPs per item are ours for both.
        assert res["diffusers"]["flops_per_item"] == res["ours"]["flops_per_item"]
    unet = report["results"]["unet"]
    assert unet["ours"]["rows"] == 2 and unet["diffusers"]["rows"] == 2  # --unet-cfg: the CFG batch
    sample = report["results"]["sample"]
    assert sample["diffusers"]["loop"] == "diffusers StableDiffusionXLPipeline(output_type='np')"
    assert sample["ours"]["model_evals"] == sample["diffusers"]["model_evals"] == 2  # Euler: one per step
    assert sample["ours"]["scheduler"] == sample["diffusers"]["scheduler"] == "euler"
    assert sample["ours"]["compile_s_loop"] > 0 and sample["ours"]["compile_s_text_encoder"] > 0
    assert report["torch"]["batch_size"] == 1 and report["torch"]["dtype"] == "fp32"
    assert set(report["attention"]["text_encoder"]) == {"8"}  # both tiny encoders: 32 wide, 4 heads


def test_sample_flops_count_both_encoders_once_and_the_cfg_batch(report):
    ours = report["results"]["sample"]["ours"]
    p = ours["flops_pieces"]
    # The base zeros the empty negative prompt (force_zeros_for_empty_prompt): one encoding per call.
    assert p["text_encoder_calls"] == 1 and p["unet_rows"] == 2 and p["model_evals"] == 2
    total = p["text_encoder_per_call"] + 2 * p["unet_per_eval"] + p["vae_decode"]
    assert ours["flops_per_item"] == pytest.approx(total)
    # One encoding is both encoders: more than the second alone.
    parts = bench_models.model_parts("tiny-sdxl")
    params = bench_models.abstract_params(parts)
    ids = jax.ShapeDtypeStruct((1, 77), jnp.int32)

    def enc(name):
        m = parts[name]
        return flops.lowered_flops(jax.jit(functools.partial(m.apply, output_hidden_states=True)).lower(
            {"params": params[name]}, ids))

    # (Less than their sum: the first encoder's last layer feeds only its final hidden state, which SDXL does
    # not read (it takes the penultimate), so XLA drops it from the compiled program.)
    assert enc("text_encoder_2") < p["text_encoder_per_call"] < enc("text_encoder") + enc("text_encoder_2")
    # The U-Net per evaluation is the unet mode's (2 rows, with pooled text and time ids) and the analytic count.
    unet = report["results"]["unet"]["ours"]["flops_per_item"]
    assert p["unet_per_eval"] / 2 == pytest.approx(unet, rel=0.01)
    analytic = flops.unet_matmul_flops(core.MODELS["tiny-sdxl"].unet_config(), 1, 16, 16)
    assert 0.95 < unet / analytic < 1.05
    # XLA counts the fori_loop body once.
    assert ours["loop_xla_flops"] == pytest.approx(p["unet_per_eval"] + p["vae_decode"], rel=0.05)


def test_sdxl_configs_are_sdxl_base():
    spec = core.MODELS["sdxl"]
    u = spec.unet_config()
    assert u == unet_lib.UNetConfig.named("sdxl")
    t1, t2 = spec.text_config(), spec.text_2_config()
    # diffusers' stabilityai/stable-diffusion-xl-base-1.0 text_encoder(_2)/config.json
    assert (t1.hidden_size, t1.num_hidden_layers, t1.num_attention_heads, t1.hidden_act) == (768, 12, 12, "quick_gelu")
    assert (t2.hidden_size, t2.intermediate_size, t2.num_hidden_layers, t2.num_attention_heads, t2.hidden_act,
            t2.projection_dim) == (1280, 5120, 32, 20, "gelu", 1280)
    assert t1.hidden_size + t2.hidden_size == u.cross_attention_dim == 2048
    assert unet_lib.text_time_sizes(u, t2.projection_dim) == 6
    assert spec.vae_config().scaling_factor == 0.13025
    r = core.resolve(core.BenchSettings(model="sdxl", modes=("unet", "sample")), jax.devices())
    assert (r.resolution, r.latent, r.scheduler) == (1024, 128, "euler")
    assert cli.settings_from_args(cli.parser().parse_args(["--model", "sdxl"])).modes == ("unet", "sample")
    plan = core.attention_plan(core.BenchSettings(model="sdxl"), r)
    assert set(plan["unet"]) == {"64"} and set(plan["text_encoder"]) == {"64"}  # 640/10, 1280/20; 768/12, 1280/20


@pytest.mark.parametrize("kw,match", [
    (dict(model="sdxl", modes=("unet", "train")),
     r"mode 'train' is not available for sdxl: the bench's train modes build SD 1.x/2.x steps only "
     r"\(SDXL trains with configs/sdxl_finetune.py\); use --modes unet,sample"),
    (dict(model="tiny-sdxl", num_devices=0), r"num_devices 0 must be a positive integer up to the 8 devices here"),
    (dict(model="tiny-sdxl", num_devices=9), r"num_devices 9 must be a positive integer up to the 8 devices here"),
])
def test_bad_sdxl_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        core.resolve(core.BenchSettings(**kw), jax.devices())


# --aot / --plan with SDXL models: tests/test_aot_sdxl.py (it needs libtpu).


# --------------------------------------------------------------------------
# Full size (slow): abstract params only, never the 2.6 B weights
# --------------------------------------------------------------------------

SDXL_UNET_TFLOP = 6.76  # one 1024x1024 evaluation at batch 1 (the count MaxDiffusion's recipes imply)


@pytest.mark.slow
def test_full_size_sdxl_unet_flops_at_1024():
    cfg = unet_lib.UNetConfig.named("sdxl")
    m = unet_lib.UNet2DConditionModel(cfg)
    params = jax.eval_shape(m.init, jax.random.key(0), *unet_lib.dummy_inputs(cfg))["params"]
    # diffusers' UNet2DConditionModel for SDXL base has 2,567,463,684 params.
    assert sum(x.size for x in jax.tree.leaves(params)) == 2_567_463_684
    S = jax.ShapeDtypeStruct
    args = (S((1, 128, 128, 4), jnp.float32), S((1,), jnp.int32), S((1, 77, 2048), jnp.float32),
            {"text_embeds": S((1, 1280), jnp.float32), "time_ids": S((1, 6), jnp.float32)})
    lowered = jax.jit(lambda p, x, t, c, a: m.apply({"params": p}, x, t, c, a)).lower(params, *args)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    xla = flops.compiled_flops(compiled)
    analytic = flops.unet_matmul_flops(cfg, 1, 128, 128)
    print(f"\nSDXL U-Net 1024x1024 batch 1: XLA (compiled, CPU) {xla / 1e12:.4f} TFLOP, "
          f"lowered {flops.lowered_flops(lowered) / 1e12:.4f}, analytic {analytic / 1e12:.4f}; "
          f"compile {compile_s:.1f} s")
    assert xla == pytest.approx(SDXL_UNET_TFLOP * 1e12, rel=0.05)
    assert analytic == pytest.approx(SDXL_UNET_TFLOP * 1e12, rel=0.05)
    assert flops.lowered_flops(lowered) == pytest.approx(xla, rel=0.01)


@pytest.mark.slow
def test_full_size_sdxl_sampler_compiles_on_abstract_params():
    mesh = parallel.make_mesh(num_devices=1)
    t0 = time.perf_counter()
    lowered, state = bench_models.lower_sample_loop("sdxl", batch=1, steps=30, mesh=mesh)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    loop = flops.compiled_flops(compiled)
    print(f"\nSDXL sampler (30 Euler steps, CFG, 1024x1024, batch 1, fp32, CPU): lower {lower_s:.1f} s, "
          f"compile {compile_s:.1f} s, loop program {loop / 1e12:.2f} TFLOP")
    assert state.num_evals == 30
    # The loop body (one U-Net evaluation at the CFG batch of 2) counted once, plus the 1024x1024 decode.
    vae = bench_models.model_parts("sdxl")["vae"]
    decode = flops.lowered_flops(jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode)).lower(
        bench_models.abstract_params({"vae": vae})["vae"],
        jax.ShapeDtypeStruct((1, 128, 128, 4), jnp.float32)))
    assert loop == pytest.approx(2 * SDXL_UNET_TFLOP * 1e12 + decode, rel=0.05)
