"""Inpainting against diffusers' StableDiffusionInpaintPipeline on tiny random
models saved locally: a 9-channel inpainting U-Net and the ordinary 4-channel
one of test_pipeline, same noises and mask; the per-evaluation re-noise
levels of every sampler against diffusers' add_noise; keep-unmasked
exactness; the mask checks; a 9-channel single file; the CLI once."""

import json

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import PROMPTS, SIZE, _unsaturated, build_tiny_pipeline

from t2i_jax import inpaint, pipeline, sample, schedulers
from t2i_jax.convert.load import load_components

LAT = SIZE // 2  # the tiny VAE halves each side


def build_tiny_inpaint_pipeline(path):
    """test_pipeline's tiny model with a 9-channel U-Net, saved as a
    diffusers StableDiffusionInpaintPipeline folder."""
    base = build_tiny_pipeline(path)
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=LAT, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=16)
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return pipe


def _reference(path):
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(path, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"9": (diffusers pipeline, folder, sampler), "4": ...} on one device."""
    mesh = pipeline.make_mesh(devices=jax.devices()[:1])
    out = {}
    for kind, build in (("9", build_tiny_inpaint_pipeline), ("4", build_tiny_pipeline)):
        path = tmp_path_factory.mktemp(f"tiny-inpaint-{kind}")
        build(path)
        out[kind] = (_reference(path), path, pipeline.Sampler(load_components(str(path)), mesh=mesh))
    return out


def _masks(n=len(PROMPTS)):
    """Different masks per image: a rectangle and a disc, white = repaint,
    with soft (grey) edges that binarise at 0.5."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    rect = ((xx >= 6) & (xx < 22) & (yy >= 4) & (yy < 20)).astype(np.float32)
    disc = np.clip(9.5 - np.hypot(xx - 18, yy - 16), 0, 1)
    return np.stack([rect, disc][:n])


def _init(seed=3):
    return np.random.RandomState(seed).rand(len(PROMPTS), SIZE, SIZE, 3).astype(np.float32)


def _nchw(x):
    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


def _noises(seed):
    rs = np.random.RandomState(seed)
    return [rs.randn(len(PROMPTS), LAT, LAT, 4).astype(np.float32) for _ in range(3)]


DIFFUSERS = {"euler": diffusers.EulerDiscreteScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
             "pndm": diffusers.PNDMScheduler, "ddim": diffusers.DDIMScheduler}


STEPS, GUIDANCE = 4, 5.0


def _run_both(models, kind, name, strength, monkeypatch, steps=STEPS, guidance=GUIDANCE):
    """(ours, diffusers') images for one setting. diffusers draws the init
    image's posterior noise (4-channel U-Nets, or strength < 1), then the
    start noise, then the masked image's posterior noise from its
    generator; at strength 1 the start noise is its `latents=`."""
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inp_mod

    ref, _, ours = models[kind]
    enc, noise, masked_enc = _noises(7)
    posterior = iter([enc, masked_enc] if kind == "4" or strength < 1 else [masked_enc])
    monkeypatch.setattr(vae_mod, "randn_tensor", lambda shape, **kw: _nchw(next(posterior)))
    monkeypatch.setattr(inp_mod, "randn_tensor", lambda shape, **kw: _nchw(noise))
    ref.scheduler = DIFFUSERS[name].from_config(ref.scheduler.config)
    init, masks = _init(), _masks()
    out = ref(PROMPTS, image=_nchw(init), mask_image=torch.tensor(masks[:, None]), strength=strength,
              num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE, output_type="np",
              latents=_nchw(noise) if strength == 1.0 else None).images
    mine = ours(PROMPTS, seeds=[0, 1], steps=steps, guidance_scale=guidance, scheduler=name, height=SIZE,
                width=SIZE, init_images=init, mask_images=masks, strength=strength, noise=noise,
                encoder_noise=enc, masked_encoder_noise=masked_enc)
    return mine, out


# One 9-channel and one 4-channel case in the fast suite (a sigma sampler
# from pure noise, a DDPM-family one from a strength < 1 start); the two
# others behind --slow (each compiles its own loop).
@pytest.mark.parametrize("kind,name,strength", [
    ("9", "euler", 1.0), ("4", "pndm", 0.6),
    pytest.param("9", "dpmpp_2m", 0.7, marks=pytest.mark.slow),
    pytest.param("4", "euler", 1.0, marks=pytest.mark.slow)])
def test_matches_diffusers(models, monkeypatch, kind, name, strength):
    mine, out = _run_both(models, kind, name, strength, monkeypatch)
    assert mine.shape == out.shape == (2, SIZE, SIZE, 3)
    assert _unsaturated(out) > 0.5
    assert np.abs(mine - out).max() <= 1 / 255


def test_mask_matters(models, monkeypatch):
    """What the 9-channel parity check can tell apart: the output depends on
    the mask input (the same compiled loop, the masks swapped)."""
    nine, _ = _run_both(models, "9", "euler", 1.0, monkeypatch)
    flipped = models["9"][2](PROMPTS, seeds=[0, 1], steps=STEPS, guidance_scale=GUIDANCE, scheduler="euler",
                             height=SIZE, width=SIZE, init_images=_init(), mask_images=_masks()[::-1],
                             strength=1.0, noise=_noises(7)[1], encoder_noise=_noises(7)[0],
                             masked_encoder_noise=_noises(7)[2])
    assert np.abs(nine - flipped).max() > 2 / 255
    assert models["9"][2].loop("euler", True, True, True, inpaint=inpaint.Mode(True, True))._cache_size() == 1


@pytest.mark.slow
def test_blend_matters(models, monkeypatch):
    """And the 4-channel blend: the image differs from txt2img from the same noise."""
    four, _ = _run_both(models, "4", "euler", 1.0, monkeypatch)
    plain = models["4"][2](PROMPTS, seeds=[0, 1], steps=STEPS, guidance_scale=GUIDANCE, scheduler="euler",
                           height=SIZE, width=SIZE, latents=_noises(7)[1])
    assert np.abs(four - plain).max() > 0.1


def test_keep_unmasked_is_exact(models):
    """With keep_unmasked the pixels where the mask is 0 are the input's, to
    the uint8 bit; inside they are the model's."""
    _, _, ours = models["9"]
    init = pipeline.to_uint8(_init(5)).astype(np.float32) / 255  # as the CLI reads a PNG
    masks = inpaint.prepare_mask(_masks()[0], blur=1)[None].repeat(2, 0)
    # The settings of the 9-channel parity case: its compiled loop again.
    _, noise, masked_enc = _noises(2)
    kw = dict(seeds=[3, 4], steps=STEPS, guidance_scale=GUIDANCE, scheduler="euler", height=SIZE, width=SIZE,
              init_images=init, mask_images=masks, strength=1.0, noise=noise, encoder_noise=noise,
              masked_encoder_noise=masked_enc)
    plain, kept = ours(PROMPTS, **kw), ours(PROMPTS, keep_unmasked=True, **kw)
    out, want = pipeline.to_uint8(kept), pipeline.to_uint8(init)
    outside, inside = masks == 0, masks == 1
    assert outside.sum() > 100 and inside.sum() > 100
    np.testing.assert_array_equal(out[outside], want[outside])
    assert np.abs(pipeline.to_uint8(plain)[outside].astype(int) - want[outside]).max() > 10  # not so without
    np.testing.assert_array_equal(out[inside], pipeline.to_uint8(plain)[inside])
    soft = (masks > 0) & (masks < 1)  # the blurred seam: in between
    assert soft.sum() > 20


@pytest.mark.parametrize("name", sorted(schedulers.SCHEDULERS))
def test_noise_levels_match_diffusers_add_noise(name):
    """Row i of `noise_levels` is what diffusers' add_noise applies during a
    run before evaluation i (inpainting's re-noise: timesteps[i] for the
    DDPM family, the scheduler's step index for the sigma samplers), for an
    img2img start; row 0 is the img2img start."""
    cls = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler, "pndm": diffusers.PNDMScheduler,
           "lms": diffusers.LMSDiscreteScheduler, "euler": diffusers.EulerDiscreteScheduler,
           "euler_a": diffusers.EulerAncestralDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler,
           "dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "unipc": diffusers.UniPCMultistepScheduler}[name]
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  skip_prk_steps=True)
    ours = schedulers.from_config(name, config)
    ref = cls.from_config(config)
    steps, strength = 10, 0.7
    state = ours.set_timesteps(steps, (1, 2, 2, 1), strength=strength)
    levels = np.asarray(ours.noise_levels(state))
    np.testing.assert_array_equal(levels[0], np.asarray(state.start_coeffs))
    ref.set_timesteps(steps)
    begin = (steps - int(steps * strength)) * ref.order
    timesteps = ref.timesteps[begin:]
    assert len(timesteps) == state.num_evals
    x0, noise = torch.tensor([[[[1.0]]]]), torch.tensor([[[[0.0]]]])
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)
    for i, t in enumerate(timesteps):
        if hasattr(ref, "_step_index"):
            ref._step_index = begin + i  # where it stands after i steps of the run
        a = float(ref.add_noise(x0, noise, t.reshape(1)))
        s = float(ref.add_noise(torch.zeros_like(x0), torch.ones_like(x0), t.reshape(1)))
        np.testing.assert_allclose(levels[i], [a, s], rtol=1e-6, err_msg=f"evaluation {i}")


def test_mask_errors(models, tmp_path):
    _, _, ours = models["4"]
    kw = dict(seeds=[0, 1], steps=2, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match=r"mask_images= need init_images="):
        ours(PROMPTS, mask_images=_masks(), **kw)
    with pytest.raises(ValueError, match=r"mask images have shape \(2, 16, 16\); expected \(2, 32, 32\)"):
        ours(PROMPTS, init_images=_init(), mask_images=_masks()[:, ::2, ::2], **kw)
    with pytest.raises(ValueError, match=r"mask images must lie in \[0, 1\].*\[0, 255\]"):
        ours(PROMPTS, init_images=_init(), mask_images=_masks() * 255, **kw)
    with pytest.raises(ValueError, match=r"takes 9 input channels \(an inpainting model\); pass init_images="):
        models["9"][2](PROMPTS, **kw)
    path = tmp_path / "mask.png"
    Image.fromarray(np.zeros((24, 40), np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"--mask is 40x24 pixels but the init image is 48x32; .*resize it to 48x32"):
        inpaint.read_mask(path, (48, 32))
    assert inpaint.read_mask(path, (40, 24)).shape == (24, 40)


def test_prepare_mask_padding_and_blur():
    m = np.zeros((20, 20), np.float32)
    m[8:12, 8:12] = 1
    grown = inpaint.prepare_mask(m, padding=2)
    assert grown.sum() == 8 * 8 and grown[6:14, 6:14].min() == 1  # 2 pixels more on every side
    soft = inpaint.prepare_mask(m, blur=1.5)
    assert 0 < soft[7, 10] < 1 and soft[0, 0] == 0 and soft.max() < 1 + 1e-6
    assert inpaint.prepare_mask(m, size=(10, 10)).shape == (10, 10)


def test_single_file_inpainting_checkpoint(models, tmp_path):
    """The 9-channel model written as one original-layout checkpoint (as
    sd-v1-5-inpainting.ckpt): recognised from conv_in's 9 input channels, the
    same params as the diffusers folder."""
    from safetensors.torch import save_file
    from test_single_file import unet_to_original, vae_to_original

    ref, _, ours = models["9"]
    sd = {}
    sd.update(unet_to_original(ref.unet.state_dict(), ref.unet.config))
    sd.update(vae_to_original(ref.vae.state_dict(), ref.vae.config))
    sd.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in ref.text_encoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "tiny-inpainting.safetensors")
    single = load_components(str(tmp_path / "tiny-inpainting.safetensors"), config={
        "unet": {"norm_num_groups": 16, "attention_head_dim": 4}, "vae": {"norm_num_groups": 16},
        "text_encoder": {"num_attention_heads": 4}})
    assert single.unet.config.in_channels == 9 and single.latent_channels == 4
    want = jax.tree.leaves_with_path(ours.pipe.params["unet"])
    got = dict(jax.tree.leaves_with_path(single.params["unet"]))
    assert len(got) == len(want)
    for path, leaf in want:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(leaf), err_msg=jax.tree_util.keystr(path))


def test_cli_inpaints_and_keeps_the_unmasked_pixels(models, tmp_path, capsys):
    _, path, _ = models["9"]
    init = tmp_path / "init.png"
    pixels = np.random.RandomState(0).randint(0, 255, (SIZE, SIZE, 3), np.uint8)
    Image.fromarray(pixels).save(init)
    mask = tmp_path / "mask.png"
    Image.fromarray((_masks()[0] * 255).astype(np.uint8)).save(mask)
    out = tmp_path / "out"
    argv = ["--model", str(path), "--out", str(out), "--no-compilation-cache", "--prompt", "a cat", "--steps", "2",
            "--scheduler", "euler", "--height", str(SIZE), "--width", str(SIZE), "--init-image", str(init),
            "--mask", str(mask), "--keep-unmasked"]
    assert sample.main(argv) == 0
    (entry,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert entry["mask_path"] == str(mask) and len(entry["mask"]) == 16 and entry["strength"] == 0.8
    assert entry["keep_unmasked"] is True and entry["mask_blur"] == 0
    image = np.asarray(Image.open(out / entry["file"]).convert("RGB"))
    keep = _masks()[0] == 0
    np.testing.assert_array_equal(image[keep], pixels[keep])
    assert np.abs(image[~keep].astype(int) - pixels[~keep]).mean() > 10
    # The same run again is a resume: nothing is made (and nothing compiles).
    capsys.readouterr()
    assert sample.main(argv) == 0
    assert "skipping 1 image(s)" in capsys.readouterr().err
    # Another mask is another input: its pixels' hash is part of the key.
    Image.fromarray((_masks()[1] * 255).astype(np.uint8)).save(tmp_path / "other.png")
    ns = sample.parse_args(argv[:-2] + [str(tmp_path / "other.png"), "--keep-unmasked"])
    assert sample.read_mask_flags(ns, Image.open(init))[1] != entry["mask"]


@pytest.mark.parametrize("extra,message", [
    (["--mask", "m.png"], "--mask needs --init-image IMG"),
    (["--keep-unmasked"], "--keep-unmasked need --mask MASK"),
    (["--mask-blur", "3", "--mask-padding", "2"], "--mask-blur and --mask-padding need --mask MASK"),
])
def test_cli_mask_flag_errors(tmp_path, capsys, extra, message):
    argv = ["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--prompt", "x", *extra]
    assert sample.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_mask_size_error(tmp_path, capsys):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(init)
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(mask)
    argv = ["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--prompt", "x",
            "--init-image", str(init), "--mask", str(mask)]
    assert sample.main(argv) == 2
    err = capsys.readouterr().err
    assert "--mask is 40x30 pixels but the init image is 48x32" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("kind,name,strength", [("9", "dpmpp_2m", 0.7), ("4", "euler_a", 1.0)])
def test_eight_devices_match_one_and_no_collectives(models, kind, name, strength):
    """Per-image masks and seeds (every noise seeded: start, posteriors,
    euler_a's steps) split over 8 devices give the images of one device, one
    image per call, and the loop body exchanges nothing between devices."""
    from test_sampler_layout import while_body_collectives

    pipe = models[kind][2].pipe
    eight = pipeline.Sampler(pipe, mesh=pipeline.make_mesh(devices=jax.devices()[:8]))
    one = models[kind][2]
    prompts = ["a red circle", "a blue square", "a cat", "a dog"] * 2
    seeds = list(range(20, 28))
    rs = np.random.RandomState(0)
    init = rs.rand(8, SIZE, SIZE, 3).astype(np.float32)
    masks = np.stack([np.roll(_masks()[k % 2], 3 * k, axis=1) for k in range(8)])
    kw = dict(steps=STEPS, guidance_scale=GUIDANCE, scheduler=name, height=SIZE, width=SIZE, strength=strength)
    fn, args = eight.prepare(prompts, seeds=seeds, init_images=init, mask_images=masks, **kw)
    bodies, counts = while_body_collectives(fn.lower(*args).compile().as_text())
    assert not counts, f"collectives in the while bodies {bodies}: {dict(counts)}"
    a = eight(prompts, seeds=seeds, init_images=init, mask_images=masks, **kw)
    b = np.concatenate([one([p], seeds=[s], init_images=init[k:k + 1], mask_images=masks[k:k + 1], **kw)
                        for k, (p, s) in enumerate(zip(prompts, seeds))])
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(a[0] - a[2]).max() > 0.05


def test_sd2_layout_inpainting_single_file_splits():
    """An SD2-layout checkpoint (OpenCLIP text tower, linear projections) with
    a 9-channel conv_in, as 512-inpainting-ema.safetensors: SD2, 9 inputs,
    every U-Net tensor where diffusers has it."""
    from diffusers import UNet2DConditionModel
    from test_single_file import OPEN_CLIP, UNET, OpenCLIPText, assert_same, randomize, unet_to_original

    from t2i_jax.convert import single_file as sf

    torch.manual_seed(0)
    unet = randomize(UNet2DConditionModel(**{**UNET["sd2"], "in_channels": 9}), 5)
    orig = unet_to_original(unet.state_dict(), unet.config)
    orig.update({"cond_stage_model.model." + k: v for k, v in randomize(OpenCLIPText(**OPEN_CLIP), 6)
                 .state_dict().items()})
    parts = sf.split_checkpoint({k: v.contiguous().numpy() for k, v in orig.items()})
    assert parts["family"] == "sd2"
    cfg = parts["unet"]["config"]
    assert cfg["in_channels"] == 9 and cfg["out_channels"] == 4 and cfg["use_linear_projection"]
    assert_same(parts["unet"]["state_dict"], unet.state_dict())
    assert parts["scheduler"]["config"]["prediction_type"] == "epsilon"  # the 512 inpainting model's
