"""The sampling pipeline against diffusers' StableDiffusion(Img2Img)Pipeline
on a tiny random model saved locally, and its sharding/batching invariance."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from t2i_jax import pipeline
from t2i_jax.convert.load import load_components
from t2i_jax.tokenizer import Tokenizer

SIZE = 32  # pixels; the tiny VAE halves each side, so latents are 16x16x4
PROMPTS = ["a red circle on a blue background", "a small yellow triangle"]


def build_tiny_pipeline(path):
    """A diffusers StableDiffusionPipeline with random tiny parts, saved to `path`."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=16)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=SIZE)
    text = T.CLIPTextModel(T.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77))
    sched = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=Tokenizer.bundled().hf, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline(path)
    # Reloaded from disk as a user would: a scheduler swapped in with
    # from_config then reads the saved config (in memory, diffusers would
    # drop keys it had defaulted, such as timestep_spacing).
    ref = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref, path, load_components(str(path))


@pytest.fixture(scope="module")
def sampler(tiny):
    return pipeline.Sampler(tiny[2], mesh=pipeline.make_mesh(devices=jax.devices()[:1]))


DIFFUSERS_SCHEDULERS = {
    "pndm": diffusers.PNDMScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "unipc": diffusers.UniPCMultistepScheduler,
}


def _latents(seed, n=len(PROMPTS)):
    return np.random.RandomState(seed).randn(n, SIZE // 2, SIZE // 2, 4).astype(np.float32)


def _unsaturated(images):
    return float(((images > 0.02) & (images < 0.98)).mean())


@pytest.mark.parametrize("name", list(DIFFUSERS_SCHEDULERS))
def test_txt2img_matches_diffusers(tiny, sampler, name):
    ref, _, _ = tiny
    ref.scheduler = DIFFUSERS_SCHEDULERS[name].from_config(ref.scheduler.config)
    latents = _latents(1)
    out = ref(PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=10, guidance_scale=6.0,
              latents=torch.tensor(latents.transpose(0, 3, 1, 2)), height=SIZE, width=SIZE,
              output_type="np").images
    ours = sampler(PROMPTS, seeds=[0, 0], negative_prompts=["blurry", ""], steps=10, guidance_scale=6.0,
                   scheduler=name, height=SIZE, width=SIZE, latents=latents)
    assert ours.shape == out.shape == (2, SIZE, SIZE, 3)
    # The check must not pass on saturated pixels alone.
    assert _unsaturated(out) > 0.5
    assert np.abs(ours - out).max() <= 1 / 255


def _matmul_input_dtypes(fn, *args):
    """The input dtypes of every dot_general / convolution in fn's program."""
    found = set()

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name in ("dot_general", "conv_general_dilated"):
                found.add(str(e.invars[0].aval.dtype))
            for v in e.params.values():
                for j in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(j, "jaxpr", None)
                    if inner is not None:
                        walk(getattr(inner, "jaxpr", inner))
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_sampler_dtype_sets_the_modules_compute_dtype(tiny, sampler):
    # A model loaded with fp32 modules samples in bf16 when the Sampler asks:
    # every matmul and convolution of the denoising loop then takes bf16
    # inputs (casting only the loop's inputs would leave fp32 modules
    # promoting them back).
    fp32 = tiny[2]
    assert fp32.dtype == np.float32
    bf16 = pipeline.Sampler(fp32, mesh=sampler.mesh, dtype=jnp.bfloat16, attention_impl="auto")
    assert bf16.pipe.unet.dtype == bf16.pipe.vae.dtype == bf16.pipe.text_encoder.dtype == jnp.bfloat16
    assert bf16.pipe.unet.attention_impl == "auto" and bf16.pipe.params is fp32.params
    assert sampler.pipe.unet.dtype == np.float32  # None keeps the modules as loaded
    lat = (1, SIZE // 2, SIZE // 2, 4)
    state = bf16.scheduler("euler").set_timesteps(2, lat)
    cond = jnp.zeros((1, 77, 32), jnp.float32)
    args = (bf16.params, cond, cond, jnp.float32(6.0), jnp.zeros((1,), jnp.uint32), jnp.zeros(lat), None, state)
    assert _matmul_input_dtypes(bf16.loop("euler", True, False, False), *args) == {"bfloat16"}
    assert _matmul_input_dtypes(sampler.loop("euler", True, False, False), *args) == {"float32"}
    # And the bf16 images stay close to the fp32 ones.
    kw = dict(seeds=[0, 1], steps=5, guidance_scale=6.0, scheduler="euler", height=SIZE, width=SIZE)
    a, b = sampler(PROMPTS, **kw), bf16(PROMPTS, **kw)
    # (measured: mean 0.002, max 0.016, on images with std 0.17)
    assert a.std() > 0.05 and np.abs(a - b).mean() < 0.01 and np.abs(a - b).max() < 0.1


@pytest.mark.slow  # 13 s; test_attention.py::test_chunked_matches_xla_forward_and_gradient keeps it fast
def test_chunked_attention_gives_the_same_images(tiny, sampler):
    # The memory-saving attention (query chunks, exact softmax) through the whole sampler, as
    # `python -m t2i_jax.sample --attention chunked` runs it; chunks smaller than the latent's tokens.
    chunked = pipeline.Sampler(tiny[2], mesh=sampler.mesh, attention_impl="chunked:24")
    assert chunked.pipe.unet.attention_impl == "chunked:24"
    kw = dict(seeds=[0, 1], steps=3, guidance_scale=6.0, scheduler="euler", height=SIZE, width=SIZE)
    a, b = sampler(PROMPTS, **kw), chunked(PROMPTS, **kw)
    assert _unsaturated(a) > 0.5 and np.abs(a - b).max() < 1e-5


def test_no_guidance_matches_diffusers(tiny, sampler):
    ref, _, _ = tiny
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    latents = _latents(2)
    out = ref(PROMPTS, num_inference_steps=5, guidance_scale=1.0, height=SIZE, width=SIZE,
              latents=torch.tensor(latents.transpose(0, 3, 1, 2)), output_type="np").images
    ours = sampler(PROMPTS, seeds=[0, 1], steps=5, guidance_scale=1.0, scheduler="euler", height=SIZE,
                   width=SIZE, latents=latents)
    assert np.abs(ours - out).max() <= 1 / 255


@pytest.mark.parametrize("name", ["pndm", "dpmpp_2m"])
def test_img2img_matches_diffusers(tiny, sampler, monkeypatch, name):
    """Same init image, strength and noise: diffusers draws its two noises
    (posterior sample, then forward-noise) through `randn_tensor`; we hand it
    ours in that order."""
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as i2i_mod

    ref, path, _ = tiny
    seeds = [5, 9]
    lat = (SIZE // 2, SIZE // 2, 4)
    enc_noise = np.asarray(pipeline.seeded_normal(seeds, lat, pipeline.ENCODER)).transpose(0, 3, 1, 2)
    noise = np.asarray(pipeline.seeded_normal(seeds, lat, pipeline.NOISE)).transpose(0, 3, 1, 2)
    monkeypatch.setattr(vae_mod, "randn_tensor", lambda shape, **kw: torch.tensor(enc_noise))
    monkeypatch.setattr(i2i_mod, "randn_tensor", lambda shape, **kw: torch.tensor(noise))
    i2i = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(path, safety_checker=None,
                                                                  requires_safety_checker=False)
    i2i.set_progress_bar_config(disable=True)
    i2i.scheduler = DIFFUSERS_SCHEDULERS[name].from_config(i2i.scheduler.config)
    init = np.random.RandomState(3).rand(2, SIZE, SIZE, 3).astype(np.float32)
    out = i2i(PROMPTS, image=torch.tensor(init.transpose(0, 3, 1, 2)), strength=0.6, num_inference_steps=10,
              guidance_scale=5.0, output_type="np").images
    ours = sampler(PROMPTS, seeds=seeds, steps=10, guidance_scale=5.0, scheduler=name, height=SIZE, width=SIZE,
                   init_images=init, strength=0.6)
    assert _unsaturated(out) > 0.5
    assert np.abs(ours - out).max() <= 1 / 255


# Behind --slow (~30 s): 8 devices against one are checked fast per scheduler in
# test_sampler_layout.test_eight_devices_match_one, and an image alone against the same image in a
# batch of 8 in test_serve.test_same_image_as_the_cli_alone_and_batched_with_7_others.
@pytest.mark.slow
def test_same_images_any_batch_and_device_count(tiny):
    """Image b depends on (prompt, seed, settings) only: 1 device x batch 1,
    1 device x batch 4 and 8 devices x batch 8 agree (euler_a: its sampler
    noise is per image too)."""
    pipe = tiny[2]
    prompts = ["a red circle", "a blue square", "a green triangle", "a cat"]
    seeds = [11, 12, 13, 14]
    kw = dict(steps=4, guidance_scale=4.0, scheduler="euler_a", height=SIZE, width=SIZE)
    one = pipeline.Sampler(pipe, mesh=pipeline.make_mesh(devices=jax.devices()[:1]))
    singles = np.concatenate([one([p], seeds=[s], **kw) for p, s in zip(prompts, seeds)])
    batch4 = one(prompts, seeds=seeds, **kw)
    eight = pipeline.Sampler(pipe, mesh=pipeline.make_mesh(devices=jax.devices()[:8]))
    assert eight.num_devices == 8
    batch8 = eight(prompts * 2, seeds=seeds * 2, **kw)
    np.testing.assert_allclose(batch4, singles, atol=1e-5)
    np.testing.assert_allclose(batch8[:4], batch4, atol=1e-5)
    np.testing.assert_allclose(batch8[4:], batch4, atol=1e-5)
    assert np.abs(batch4[0] - batch4[1]).max() > 0.05  # different seeds and prompts differ


def test_compiles_once_per_shape(tiny):
    pipe = tiny[2]
    s = pipeline.Sampler(pipe, mesh=pipeline.make_mesh(devices=jax.devices()[:2]))
    kw = dict(steps=3, scheduler="ddim", height=SIZE, width=SIZE)
    s(["a", "b"], seeds=[1, 2], guidance_scale=3.0, **kw)
    loop = s.loop("ddim", True, False, False)
    assert loop._cache_size() == 1 and s._encode._cache_size() == 1
    s(["other prompt", "and another"], seeds=[7, 8], negative_prompts=["x", "y"], guidance_scale=9.0, **kw)
    assert loop._cache_size() == 1 and s._encode._cache_size() == 1
    s(["a", "b", "c", "d"], seeds=[1, 2, 3, 4], guidance_scale=3.0, **kw)  # a new shape compiles once more
    assert loop._cache_size() == 2


@pytest.mark.parametrize("kw,match", [
    (dict(height=31), r"height 31 is not a multiple of 2; use 30 or 32"),
    (dict(steps=0), r"steps 0 must be an integer >= 1"),
    (dict(init_images=np.zeros((2, SIZE, SIZE, 3), np.float32), strength=1.5), r"strength 1.5 is outside \(0, 1\]"),
    (dict(scheduler="nope"), r"unknown scheduler 'nope'.*euler"),
    (dict(seeds=[1]), r"got 1 seeds for 2 prompts"),
])
def test_bad_settings(sampler, kw, match):
    args = dict(seeds=[0, 1], steps=2, height=SIZE, width=SIZE)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        sampler(PROMPTS, **args)


def test_check_size_suggests_neighbours():
    with pytest.raises(ValueError, match=r"height 500 is not a multiple of 8; use 496 or 504"):
        pipeline.check_size("height", 500, 8)
    with pytest.raises(ValueError, match=r"width 5 is not a multiple of 8; use 8"):
        pipeline.check_size("width", 5, 8)


# Behind --slow (~21 s): the single-file conversion's parity with diffusers' keys is checked fast in test_single_file.
@pytest.mark.slow
def test_single_file_gives_the_same_images(tiny, sampler, tmp_path):
    """The tiny model written as one original-layout checkpoint loads through
    load_components and generates what the diffusers folder generates."""
    from safetensors.torch import save_file
    from test_single_file import unet_to_original, vae_to_original

    ref = tiny[0]
    sd = {}
    sd.update(unet_to_original(ref.unet.state_dict(), ref.unet.config))
    sd.update(vae_to_original(ref.vae.state_dict(), ref.vae.config))
    sd.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in ref.text_encoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "tiny.safetensors")
    # Group counts and head counts are not in the tensors' shapes: given explicitly.
    single = load_components(str(tmp_path / "tiny.safetensors"), config={
        "unet": {"norm_num_groups": 16, "attention_head_dim": 4}, "vae": {"norm_num_groups": 16},
        "text_encoder": {"num_attention_heads": 4}})
    kw = dict(seeds=[3, 4], steps=4, guidance_scale=5.0, scheduler="pndm", height=SIZE, width=SIZE)
    a = sampler(PROMPTS, **kw)
    b = pipeline.Sampler(single, mesh=sampler.mesh)(PROMPTS, **kw)
    np.testing.assert_allclose(b, a, atol=1e-6)


# --------------------------------------------------------------------------
# PNDM's Runge-Kutta warm-up, per-call scheduler options, given noises
# --------------------------------------------------------------------------


def _count_unet_calls(unet):
    calls = []
    handle = unet.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_pndm_without_skip_prk_steps_matches_diffusers(tiny, sampler):
    """A model whose scheduler config lacks skip_prk_steps (e.g. one shipping a
    DDIM config) sampled as pndm: diffusers' default Runge-Kutta warm-up, 19
    U-Net calls for 10 steps, the same images."""
    import dataclasses

    ref, _, pipe = tiny
    cfg = {k: v for k, v in ref.scheduler.config.items() if k != "skip_prk_steps"}
    ref.scheduler = diffusers.PNDMScheduler.from_config(cfg)
    assert ref.scheduler.config.skip_prk_steps is False  # diffusers' default
    latents = _latents(4)
    calls, handle = _count_unet_calls(ref.unet)
    try:
        out = ref(PROMPTS, num_inference_steps=10, guidance_scale=6.0, height=SIZE, width=SIZE,
                  latents=torch.tensor(latents.transpose(0, 3, 1, 2)), output_type="np").images
    finally:
        handle.remove()
    ours_pipe = dataclasses.replace(pipe, scheduler_config=dict(cfg))
    s = pipeline.Sampler(ours_pipe, mesh=sampler.mesh)
    assert s.scheduler("pndm").set_timesteps(10, (2, 16, 16, 4)).num_evals == len(calls) == 19
    ours = s(PROMPTS, seeds=[0, 1], steps=10, guidance_scale=6.0, scheduler="pndm", height=SIZE, width=SIZE,
             latents=latents)
    assert _unsaturated(out) > 0.5
    assert np.abs(ours - out).max() <= 1 / 255
    # The same model with PLMS alone (what the old default did) is another image
    # (measured 0.012 = 3/255 here), so the check above tells them apart.
    plms = sampler(PROMPTS, seeds=[0, 1], steps=10, guidance_scale=6.0, scheduler="pndm", height=SIZE,
                   width=SIZE, latents=latents)
    assert np.abs(plms - out).max() > 2 / 255


def _sampler_noise(seeds, shape, num_evals):
    """What the Sampler's stochastic steps draw at each evaluation, NCHW for diffusers."""
    keys = pipeline.stream_keys(seeds, pipeline.SAMPLER)
    return [np.asarray(jax.vmap(lambda k, i=i: jax.random.normal(jax.random.fold_in(k, i), shape))(keys))
            .transpose(0, 3, 1, 2) for i in range(num_evals)]


@pytest.mark.slow
def test_karras_option_matches_diffusers(tiny, sampler):
    """scheduler_options={"use_karras_sigmas": True} on a model whose config
    lacks it matches diffusers' pipeline with a Karras Euler scheduler; the
    final latents match its output_type="latent"."""
    ref, _, _ = tiny
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config, use_karras_sigmas=True)
    latents = _latents(5)
    ref_lat = ref(PROMPTS, num_inference_steps=8, guidance_scale=6.0, height=SIZE, width=SIZE,
                  latents=torch.tensor(latents.transpose(0, 3, 1, 2)), output_type="latent").images
    with torch.no_grad():
        decoded = ref.vae.decode(ref_lat / ref.vae.config.scaling_factor).sample
    out = ref.image_processor.postprocess(decoded, output_type="np")
    ours, ours_lat = sampler(PROMPTS, seeds=[3, 4], steps=8, guidance_scale=6.0, scheduler="euler", height=SIZE,
                             width=SIZE, latents=latents, scheduler_options={"use_karras_sigmas": True},
                             return_latents=True)
    want = ref_lat.numpy().transpose(0, 2, 3, 1)
    assert ours_lat.shape == want.shape
    assert np.linalg.norm(ours_lat - want) / np.linalg.norm(want) < 1e-4
    assert _unsaturated(out) > 0.5
    assert np.abs(ours - out).max() <= 1 / 255


def test_scheduler_options_cache_and_errors(sampler):
    """New options build a new sampler and loop; the same options (or the
    defaults spelled out) reuse them; unsupported ones name the sampler."""
    base = sampler.loop("euler", True, True, False)
    same = sampler.loop("euler", True, True, False, scheduler_options={"use_karras_sigmas": False})
    karras = sampler.loop("euler", True, True, False, scheduler_options={"use_karras_sigmas": True})
    again = sampler.loop("euler", True, True, False, scheduler_options=dict(use_karras_sigmas=True))
    assert same is base and again is karras and karras is not base
    assert sampler.scheduler("euler", {"use_karras_sigmas": True}).config["use_karras_sigmas"] is True
    assert sampler.scheduler("euler").config["use_karras_sigmas"] is False
    assert sampler.loop("euler", True, True, False, return_latents=True) is not base
    kw = dict(seeds=[0, 1], steps=2, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match=r"use_karras_sigmas=True is not supported by the 'ddim' sampler.*"
                                         r"\['dpmpp_2m', 'euler', 'heun', 'lms', 'unipc'\]"):
        sampler(PROMPTS, scheduler="ddim", scheduler_options={"use_karras_sigmas": True}, **kw)
    with pytest.raises(ValueError, match=r"eta=0.5 is not supported by the 'euler_a' sampler.*\['ddim'\]"):
        sampler(PROMPTS, scheduler="euler_a", scheduler_options={"eta": 0.5}, **kw)
    with pytest.raises(ValueError, match=r"final_sigmas_type='max'.*'euler'.*\('zero', 'sigma_min'\)"):
        sampler(PROMPTS, scheduler="euler", scheduler_options={"final_sigmas_type": "max"}, **kw)
    with pytest.raises(ValueError, match=r"timestep_spacing='uniform'"):
        sampler(PROMPTS, scheduler="dpmpp_2m", scheduler_options={"timestep_spacing": "uniform"}, **kw)
    with pytest.raises(ValueError, match=r"noise= and encoder_noise= are img2img's"):
        sampler(PROMPTS, scheduler="euler", noise=_latents(0), **kw)
    with pytest.raises(ValueError, match=r"for img2img pass the noise added to the init latents as noise="):
        sampler(PROMPTS, scheduler="euler", latents=_latents(0), init_images=np.zeros((2, SIZE, SIZE, 3)), **kw)
    with pytest.raises(ValueError, match=r"latents have shape \(2, 8, 8, 4\); expected \(2, 16, 16, 4\).*f = 2"):
        sampler(PROMPTS, scheduler="euler", latents=np.zeros((2, 8, 8, 4)), **kw)


def test_img2img_ddim_eta_given_noises_match_diffusers(tiny, sampler, monkeypatch):
    """Per-call DDIM options (eta as diffusers' pipeline eta=, trailing
    spacing) on img2img with given noises, against diffusers'
    StableDiffusionImg2ImgPipeline with the same settings.

    diffusers draws the VAE posterior's noise, then the noise it adds to the
    init latents, from its generator: drawn the same way on host and passed
    as encoder_noise= and noise=, they reproduce its run with no patching
    (the tiny VAE's posterior std is large, so the encoder noise matters,
    checked below). DDIM's per-step noise is ours, handed to diffusers. The
    final latents match diffusers' output_type="latent"."""
    import diffusers.schedulers.scheduling_ddim as ddim_mod

    ref, path, _ = tiny
    i2i = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(path, safety_checker=None,
                                                                  requires_safety_checker=False)
    i2i.set_progress_bar_config(disable=True)
    i2i.scheduler = diffusers.DDIMScheduler.from_config(i2i.scheduler.config, timestep_spacing="trailing")
    seeds, steps, strength = [3, 4], 8, 0.7
    init = np.random.RandomState(8).rand(2, SIZE, SIZE, 3).astype(np.float32)
    image = torch.tensor(init.transpose(0, 3, 1, 2))

    def reference(eta):
        noises = iter(_sampler_noise(seeds, (SIZE // 2, SIZE // 2, 4), steps))
        monkeypatch.setattr(ddim_mod, "randn_tensor", lambda shape, **kw: torch.tensor(next(noises)))
        lat = i2i(PROMPTS, image=image, strength=strength, num_inference_steps=steps, guidance_scale=5.0, eta=eta,
                  generator=torch.Generator().manual_seed(7), output_type="latent").images
        with torch.no_grad():
            decoded = i2i.vae.decode(lat / i2i.vae.config.scaling_factor).sample
        return lat.numpy().transpose(0, 2, 3, 1), i2i.image_processor.postprocess(decoded, output_type="np")

    want_lat, out = reference(0.7)
    gen = torch.Generator().manual_seed(7)
    shape = (2, 4, SIZE // 2, SIZE // 2)
    enc, noise = (torch.randn(shape, generator=gen).numpy().transpose(0, 2, 3, 1) for _ in range(2))
    ours, ours_lat = sampler(PROMPTS, seeds=seeds, steps=steps, guidance_scale=5.0, scheduler="ddim", height=SIZE,
                             width=SIZE, init_images=init, strength=strength, noise=noise, encoder_noise=enc,
                             scheduler_options={"eta": 0.7, "timestep_spacing": "trailing"}, return_latents=True)
    assert ours_lat.shape == (2, SIZE // sampler.pipe.vae_scale, SIZE // sampler.pipe.vae_scale, 4)
    assert np.linalg.norm(ours_lat - want_lat) / np.linalg.norm(want_lat) < 1e-4
    assert _unsaturated(out) > 0.5
    assert np.abs(ours - out).max() <= 1 / 255
    # What the check can tell apart: eta's noise and the encoder's noise.
    assert np.abs(reference(0.0)[1] - out).max() > 2 / 255
    with torch.no_grad():
        std = i2i.vae.encode(image * 2 - 1).latent_dist.std
    assert float(std.mean()) * i2i.vae.config.scaling_factor > 0.05
