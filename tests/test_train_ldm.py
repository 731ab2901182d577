"""U-Net (latent diffusion) training on synthetic shapes: the loss against numpy, learning, samples,
diffusers export, resume, FSDP on 8 devices."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import celeba_ldm, sd15_finetune, shapes_ldm  # noqa: E402
from t2i_jax.train import ldm  # noqa: E402
from t2i_jax.train import metrics as metrics_lib  # noqa: E402
from t2i_jax.train.checkpoint import Checkpointer  # noqa: E402

STEPS = 40  # every run has the same schedule (a compiled constant), so the compilation cache serves them all


def tiny_config(stop_at=STEPS, **train):
    """shapes_ldm at 16 px (8x8x4 latents) with a 64-record cache; sampling and export off.
    The run stops at `stop_at` (as a preemption would) when that is before STEPS."""
    c = shapes_ldm.get_config()
    c.data.resolution = 16
    c.data.length = 64
    c.batch_size = 16
    c.progress = False
    c.export = False
    c.eval.prompts = []
    c.eval.every = 0
    c.eval.steps = 2
    c.mesh.num_devices = 1
    c.optim.warmup_steps = 5
    c.train.steps = STEPS
    c.train.preempt_at_step = stop_at if stop_at < STEPS else 0
    c.train.log_every = 1
    c.train.update(train)
    return c


pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest: one persistent cache per module


# ---------------------------------------------------------------------------
# The loss against numpy.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_loss_matches_numpy(prediction_type, gamma):
    rng = np.random.default_rng(0)
    out, x0, noise = (rng.normal(size=(4, 3, 3, 2)).astype(np.float32) for _ in range(3))
    t = np.array([0, 10, 400, 999])
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas).astype(np.float32)
    got = float(ldm.diffusion_loss(jnp.asarray(out), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t),
                                   abar, prediction_type=prediction_type, snr_gamma=gamma))
    a = abar[t].astype(np.float64)[:, None, None, None]
    target = noise if prediction_type == "epsilon" else np.sqrt(a) * noise - np.sqrt(1 - a) * x0
    mse = ((out - target) ** 2).mean(axis=(1, 2, 3))
    snr = abar[t].astype(np.float64) / (1 - abar[t])
    w = np.ones(4) if not gamma else np.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    if gamma:
        assert w[0] < 1 and w[-1] == pytest.approx(1.0 if prediction_type == "epsilon" else snr[-1] / (snr[-1] + 1))
    np.testing.assert_allclose(got, (w * mse).mean(), rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_snr_floor_weights(prediction_type):
    rng = np.random.default_rng(1)
    out, x0, noise = (rng.normal(size=(4, 3, 3, 2)).astype(np.float32) for _ in range(3))
    t = np.array([0, 400, 800, 999])
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas).astype(np.float32)
    args = (jnp.asarray(out), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), abar)
    got = np.asarray(ldm.diffusion_loss(*args, prediction_type=prediction_type, snr_gamma=5.0, snr_floor=0.1,
                                        per_example=True))
    plain = np.asarray(ldm.diffusion_loss(*args, prediction_type=prediction_type, per_example=True))
    snr = abar[t].astype(np.float64) / (1 - abar[t])
    w = np.clip(snr, 0.1, 5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    assert snr[-1] < 0.01 and snr[0] > 5  # both clips act: t = 999 raised to 0.1, t = 0 cut to 5
    np.testing.assert_allclose(got, w * plain, rtol=1e-5)


def test_timestep_bias_weights_and_draws():
    import ml_collections

    dc = ldm.default_config().diffusion
    assert ldm.timestep_weights(1000, dc) is None  # uniform by default
    dc.timestep_bias, dc.timestep_bias_multiplier, dc.timestep_bias_portion = "later", 10.0, 0.3
    w = ldm.timestep_weights(1000, dc)
    # 300 later timesteps 10x as likely as the first 700: 3000 / 3700 of the draws.
    np.testing.assert_allclose(w[:700], 1 / 3700, rtol=1e-6)
    np.testing.assert_allclose(w[700:], 10 / 3700, rtol=1e-6)
    # The trainer's own augment draws them: 81% at t >= 700 with the bias, 30% without.
    from t2i_jax.bench.models import model_parts

    c = tiny_config()
    parts = model_parts("tiny")  # modules only: augment reads no params
    n = 5000
    batch = {"mean": jnp.zeros((n, 1, 1, 4)), "std": jnp.zeros((n, 1, 1, 4)), "context": jnp.zeros((n, 1, 1))}
    for bias, share in (("", 0.3), ("later", 3000 / 3700)):
        c.diffusion.timestep_bias, c.diffusion.timestep_bias_multiplier = bias, 10.0
        c.diffusion.timestep_bias_portion = 0.3
        objective = ldm.make_objective(parts, c, True, None, np.zeros((77, 16), np.float32))
        t = objective.augment(None, batch, jax.random.key(0))["t"]
        assert t.dtype == jnp.int32 and abs(float(jnp.mean(t >= 700)) - share) < 0.02, bias
    r = ldm.timestep_weights(1000, ml_collections.ConfigDict(
        {"timestep_bias": "range", "timestep_bias_multiplier": 3.0, "timestep_bias_begin": 100,
         "timestep_bias_end": 200}))
    assert r[150] == pytest.approx(3 * r[50]) and r[250] == pytest.approx(r[50])
    for bad, match in (({"timestep_bias": "late"}, "use ''"), ({"timestep_bias_multiplier": 0.0}, "> 0"),
                       ({"timestep_bias_portion": 1.5}, r"\(0, 1\]")):
        c = ldm.default_config().diffusion
        c.timestep_bias = "later"
        c.update(bad)
        with pytest.raises(ValueError, match=match):
            ldm.timestep_weights(1000, c)


# ---------------------------------------------------------------------------
# A real run: learning, samples, export.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shapes_ldm")
    c = tiny_config()
    c.export = True
    c.eval.every = 20
    c.eval.prompts = ["a large red circle on a white background", "a small blue square on a black background"]
    return workdir, ldm.train_and_evaluate(c, workdir)


def test_loss_falls(shapes_run):
    workdir, result = shapes_run
    losses = np.array([r["loss"] for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl")])
    assert len(losses) == 40 and result["step"] == 40
    ratio = losses[-5:].mean() / losses[:3].mean()
    assert ratio < 0.5, (ratio, losses)


def test_sample_grids(shapes_run):
    from PIL import Image

    workdir, result = shapes_run
    assert sorted(p.name for p in (workdir / "samples").iterdir()) == ["step_20.png", "step_40.png"]
    assert Image.open(workdir / "samples" / "step_40.png").size == (32, 16)  # 2 prompts side by side
    assert result["samples"].shape == (2, 16, 16, 3)


def test_export_loads_in_diffusers_and_sample_cli(shapes_run, tmp_path):
    import diffusers
    import torch

    from t2i_jax import sample
    from t2i_jax.convert import diffusers as diffusers_convert

    workdir, result = shapes_run
    export = workdir / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["text_encoder"] == ["transformers",
                                                                                          "CLIPTextModel"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(export, safety_checker=None,
                                                             requires_safety_checker=False)
    assert pipe.tokenizer.model_max_length == 16 and pipe.unet.config.sample_size == 8
    # The exported U-Net is the EMA params, as trained.
    unet, params = diffusers_convert.load_unet(export)
    ema = jax.device_get(result["state"].ema_params)
    np.testing.assert_array_equal(params["conv_in"]["kernel"], ema["conv_in"]["kernel"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    t = np.array([10, 700])
    ctx = rng.normal(size=(2, 16, 64)).astype(np.float32)
    ours = np.asarray(unet.apply({"params": ema}, x, t, ctx))
    with torch.no_grad():
        ref = pipe.unet(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t), torch.tensor(ctx)).sample
    ref = ref.numpy().transpose(0, 2, 3, 1)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5
    images = pipe(["a red circle"], num_inference_steps=2, height=16, width=16, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    out = tmp_path / "samples"
    assert sample.main(["--model", str(export), "--prompt", "a red circle", "--steps", "2", "--out", str(out),
                        "--no-compilation-cache"]) in (0, None)
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 1
    from PIL import Image
    assert Image.open(pngs[0]).size == (16, 16)


# ---------------------------------------------------------------------------
# Loop mechanics.
# ---------------------------------------------------------------------------

def _params(state):
    return jax.tree_util.tree_leaves(jax.device_get(state.params))


def _losses(d):
    return [r["loss"] for r in metrics_lib.read_jsonl(d / "metrics.jsonl")]


# Behind --slow (~85 s): the LDM trainer's exact resume is also checked fast in LoRA mode
# (test_lora_train.py), through this loop (DreamBooth's own resume test is behind --slow too).
@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    full = ldm.train_and_evaluate(tiny_config(6), tmp_path / "full")
    first = ldm.train_and_evaluate(tiny_config(3), tmp_path / "split")
    assert first["stopped"] == "preempt_at_step" and first["step"] == 3
    assert Checkpointer(tmp_path / "split" / "checkpoints").all_steps() == [3]
    second = ldm.train_and_evaluate(tiny_config(6), tmp_path / "split")
    assert second["step"] == 6
    for a, b in zip(_params(full["state"]), _params(second["state"])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    np.testing.assert_allclose(_losses(tmp_path / "split"), _losses(tmp_path / "full"), rtol=1e-6)


@pytest.mark.slow  # 75 s on 2 cores; the CLIP trainer's 8-device FSDP test stays in the fast suite
def test_fsdp_on_8_devices_matches_one_device(tmp_path):
    assert jax.device_count() == 8
    one, eight = tiny_config(3), tiny_config(3)
    eight.mesh.num_devices = 0
    eight.mesh.data, eight.mesh.fsdp = 2, 4
    eight.mesh.fsdp_min_size = 1024
    r1 = ldm.train_and_evaluate(one, tmp_path / "one")
    r8 = ldm.train_and_evaluate(eight, tmp_path / "eight")
    kernel = r8["state"].params["up_blocks_1"]["resnets_0"]["conv1"]["kernel"]
    assert "fsdp" in kernel.sharding.spec and len(kernel.sharding.device_set) == 8
    l1, l8 = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert len(l1) == 3 and l1[0] != l1[2]
    np.testing.assert_allclose(l8, l1, atol=1e-5, rtol=0)
    for a, b in zip(_params(r1["state"]), _params(r8["state"])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


# Slow (about 50 s on 2 cores): in the fast suite the streaming step runs in test_bench (mode
# train_stream), the v-prediction and min-SNR loss in test_loss_matches_numpy, remat in
# test_unet.test_remat_same_values_and_grads and accumulation in test_train_loop.
@pytest.mark.slow
def test_streaming_v_prediction_options(tmp_path):
    """No cache (VAE + text encoder inside the step), v-prediction with min-SNR, offset noise,
    remat and gradient accumulation."""
    c = tiny_config(2, grad_accum=2)
    c.cache.enabled = False
    c.diffusion.prediction_type = "v_prediction"
    c.diffusion.noise_offset = 0.1
    c.model.remat = True
    r = ldm.train_and_evaluate(c, tmp_path / "stream")
    rows = metrics_lib.read_jsonl(tmp_path / "stream" / "metrics.jsonl")
    assert r["step"] == 2 and all(np.isfinite([x["loss"], x["grad_norm"]]).all() for x in rows)
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["diffusion"]["prediction_type"] == \
        "v_prediction"
    assert rows[0]["loss"] != rows[1]["loss"]


@pytest.mark.slow
def test_caption_dropout(tmp_path):
    # Caption dropout 1.0 replaces every caption by "": the first step (same latents, noise and
    # timesteps) then differs from one that keeps every caption only through the text states.
    losses = {}
    for p in (0.0, 1.0):
        cfg = tiny_config(1)
        cfg.train.steps = 1
        cfg.diffusion.caption_dropout = p
        ldm.train_and_evaluate(cfg, tmp_path / f"drop{p}")
        losses[p] = _losses(tmp_path / f"drop{p}")[0]
    assert np.isfinite(list(losses.values())).all() and abs(losses[0.0] - losses[1.0]) > 1e-4, losses


@pytest.mark.slow
def test_nan_stops(tmp_path):
    c = tiny_config(4, checkpoint_every=2, debug_nan_step=3)
    with pytest.raises(FloatingPointError, match=r"step 3: loss is nan.*last good checkpoint \(step 2\)"):
        ldm.train_and_evaluate(c, tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [2]
    raw = ckpt.manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(raw["params"]))


# ---------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------

def test_configs():
    c = sd15_finetune.get_config("/data/captions.jsonl")
    assert c.model.init_from == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (c.data.name, c.data.path, c.data.resolution) == ("jsonl", "/data/captions.jsonl", 512)
    assert c.objective == "ldm" and c.model.remat and c.diffusion.caption_dropout == 0.1
    s = shapes_ldm.get_config("vae=runs/v/export,text=runs/c/export")
    assert (s.vae.path, s.text_encoder.path) == ("runs/v/export", "runs/c/export")
    with pytest.raises(ValueError, match="vae=DIR"):
        shapes_ldm.get_config("unet=x")
    f = celeba_ldm.get_config("vae=/v")
    assert f.data.dataset == "celeb_a" and f.vae.path == "/v" and f.cache.enabled is False
