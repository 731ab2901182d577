"""ControlNet: the Flax ControlNetModel against diffusers', its converters
(diffusers folders, original single files), and sampling with one or two
ControlNets against diffusers' StableDiffusionControlNetPipeline."""

import json

import diffusers
import jax
import numpy as np
import pytest
import torch
from test_pipeline import PROMPTS, SIZE, build_tiny_pipeline

from t2i_jax import pipeline
from t2i_jax.convert import core
from t2i_jax.convert.controlnet import load_controlnet, save_controlnet
from t2i_jax.convert.load import load_components
from t2i_jax.models import controlnet as controlnet_lib

# The tiny VAE downsamples by 2, so the control image encoder has one stride-2 conv.
EMBED = (8, 16)


def build_controlnet(unet, seed):
    """A ControlNetModel copied from `unet`, every weight (zero convs included) random,
    so that every residual is non-zero."""
    torch.manual_seed(seed)
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBED)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_", "controlnet_cond_embedding")):
                p.copy_(torch.randn_like(p) * 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-cn")
    build_tiny_pipeline(root / "sd")
    # From disk, as test_pipeline: the saved scheduler config is what users get.
    ref = diffusers.StableDiffusionPipeline.from_pretrained(root / "sd", safety_checker=None,
                                                            requires_safety_checker=False)
    nets = [build_controlnet(ref.unet, seed) for seed in (1, 2)]
    for k, net in enumerate(nets):
        net.save_pretrained(root / f"cn{k}")
    loaded = [load_controlnet(str(root / f"cn{k}")) for k in range(2)]
    return {"root": root, "ref": ref, "nets": nets, "loaded": loaded, "pipe": load_components(str(root / "sd"))}


def _control_image(seed, n=1):
    return np.random.RandomState(seed).rand(n, SIZE, SIZE, 3).astype(np.float32)


def _torch(x):
    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


# One jit for every apply of the file (modules of equal configs are equal, so
# they share a compile); op-by-op dispatch of whole nets costs more.
_apply = jax.jit(lambda module, params, *args, **kw: module.apply({"params": params}, *args, **kw),
                 static_argnums=0, static_argnames="guess_mode")


def _residual_error(net, module, params, guess_mode=False, scale=0.7):
    rs = np.random.RandomState(0)
    x = rs.randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    ctx = rs.randn(2, 7, 32).astype(np.float32)
    img = _control_image(3, 2)
    t = np.array([999, 421])
    with torch.no_grad():
        d_ref, m_ref = net(_torch(x), torch.tensor(t), torch.tensor(ctx), _torch(img), conditioning_scale=scale,
                           guess_mode=guess_mode, return_dict=False)
    d, m = _apply(module, params, x, t, ctx, img, scale, guess_mode=guess_mode)
    refs = [r.numpy().transpose(0, 2, 3, 1) for r in (*d_ref, m_ref)]
    assert len(d) == len(d_ref) and all(np.abs(r).mean() > 1e-3 for r in refs)
    return max(np.linalg.norm(np.asarray(a) - r) / np.linalg.norm(r) for a, r in zip((*d, m), refs))


@pytest.mark.parametrize("guess_mode", [False, True])
def test_residuals_match_diffusers(tiny, guess_mode):
    module, params = tiny["loaded"][0]
    assert _residual_error(tiny["nets"][0], module, params, guess_mode) < 1e-5


@pytest.mark.slow  # the sampling tests cover it at 1/255; this one compiles the whole U-Net again
def test_unet_with_residuals_matches_diffusers(tiny):
    # The U-Net adds the residuals where diffusers does.
    pipe = tiny["pipe"]
    rs = np.random.RandomState(1)
    x = rs.randn(1, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    ctx = rs.randn(1, 7, 32).astype(np.float32)
    module, params = tiny["loaded"][0]
    down, mid = _apply(module, params, x, 500, ctx, _control_image(4), 1.3)
    ours = _apply(pipe.unet, pipe.params["unet"], x, 500, ctx, down_block_additional_residuals=down,
                  mid_block_additional_residual=mid)
    with torch.no_grad():
        ref, plain = (tiny["ref"].unet(_torch(x), 500, torch.tensor(ctx), **kw).sample.numpy().transpose(0, 2, 3, 1)
                      for kw in (dict(down_block_additional_residuals=[_torch(np.asarray(d)) for d in down],
                                      mid_block_additional_residual=_torch(np.asarray(mid))), {}))
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5
    assert np.linalg.norm(plain - ref) / np.linalg.norm(ref) > 1e-2  # the residuals matter


def test_save_controlnet_round_trip(tiny, tmp_path):
    module, params = tiny["loaded"][1]
    save_controlnet(params, module.config, tmp_path / "out")
    back = diffusers.ControlNetModel.from_pretrained(tmp_path / "out")
    assert _residual_error(back, module, params) < 1e-5
    # An fp16 variant folder, as the hub's `*.fp16.safetensors`.
    save_controlnet(params, module.config, tmp_path / "half", dtype=np.float16)
    weights = tmp_path / "half" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".fp16.safetensors"))
    _, half = load_controlnet(str(tmp_path / "half"), variant="fp16")
    assert 1e-6 < _residual_error(back, module, half) < 1e-2
    # A folder of another model is named as such.
    with pytest.raises(ValueError, match="describes a UNet2DConditionModel, not a ControlNetModel"):
        load_controlnet(str(tiny["root"] / "sd" / "unet"))


# The original (lllyasviel) key layout, written from the LDM numbering: per
# level, layers_per_block (resnet, attention) input blocks and a downsampler
# (not at the last level); the hint Sequential's convs at 0, 2, 4, ...; one
# zero conv per input block. Checked against diffusers' own converter below.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _original_prefixes(levels, lpb, hint_blocks):
    table = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "mid_block.resnets.0.": "middle_block.0.",
             "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.1.": "middle_block.2.",
             "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
             "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * hint_blocks + 2}.",
             "controlnet_mid_block.": "middle_block_out.0."}
    for b in range(levels):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            table[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{i}.0."
            table[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{i}.1."
        table[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op."
    table.update({f"controlnet_cond_embedding.blocks.{k}.": f"input_hint_block.{2 * k + 2}."
                  for k in range(hint_blocks)})
    table.update({f"controlnet_down_blocks.{i}.": f"zero_convs.{i}.0." for i in range(levels * (lpb + 1))})
    return table


def _original_layout(net):
    c = net.config
    prefixes = _original_prefixes(len(c.block_out_channels), c.layers_per_block,
                                  2 * len(c.conditioning_embedding_out_channels) - 2)
    out = {}
    for key, value in net.state_dict().items():
        prefix = max((p for p in prefixes if key.startswith(p)), key=len)
        rest = key[len(prefix):]
        if "resnets" in prefix:
            name, leaf = rest.split(".")
            rest = f"{_RESNET[name]}.{leaf}"
        out[prefixes[prefix] + rest] = value.numpy()
    if len(c.conditioning_embedding_out_channels) == 4:
        # The layout is the one diffusers' single-file converter reads (which
        # knows only SD's 4-level hint encoder: conv_out at 14).
        from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

        back = convert_controlnet_checkpoint(dict(out), dict(c))
        assert sorted(back) == sorted(net.state_dict()) and all(
            np.array_equal(back[k], v.numpy()) for k, v in net.state_dict().items())
    return out


@pytest.mark.parametrize("prefix", ["", "control_model."])
def test_single_file_matches_diffusers(tiny, tmp_path, prefix):
    net = tiny["nets"][0]
    state = {prefix + k: v for k, v in _original_layout(net).items()}
    if prefix:  # the v1.0 files also carry the SD model; it is skipped
        state["model.diffusion_model.out.2.weight"] = np.zeros((4, 32, 3, 3), np.float32)
    path = tmp_path / "control_tiny.safetensors"
    core.write_safetensors(state, path)
    overrides = {"attention_head_dim": 4, "norm_num_groups": 16}
    module, params = load_controlnet(str(path), config=overrides)
    assert module.config.conditioning_embedding_out_channels == EMBED
    assert _residual_error(net, module, params) < 1e-5
    # Strict: a stray key is named.
    core.write_safetensors({**state, prefix + "zero_convs.9.0.weight": np.zeros((1,), np.float32)}, path)
    with pytest.raises(core.ConversionError, match=r"zero_convs\.9\.0\.weight"):
        load_controlnet(str(path), config=overrides)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_sd_layouts(tmp_path, family):
    """The SD 1.5 / 2.1 ControlNet layout (4 levels, 2 layers per block, the
    8-conv hint encoder, SD's heads and 32 groups, inferred with no override),
    narrow: the params equal those of the diffusers folder, exactly."""
    sd2 = family == "sd2"
    torch.manual_seed(0)
    net = diffusers.ControlNetModel(block_out_channels=(32, 64, 64, 64), cross_attention_dim=1024 if sd2 else 768,
                                    attention_head_dim=(1, 1, 1, 1) if sd2 else 8, use_linear_projection=sd2)
    net.save_pretrained(tmp_path / "folder")
    core.write_safetensors({"control_model." + k: v for k, v in _original_layout(net).items()},
                           tmp_path / "control.safetensors")
    a, pa = load_controlnet(str(tmp_path / "control.safetensors"))
    b, pb = load_controlnet(str(tmp_path / "folder"))
    assert a.config == b.config
    flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(p)[0] for p in (pa, pb))
    assert len(flat_a) == len(flat_b) > 100
    assert all(ka == kb and np.array_equal(x, y) for (ka, x), (kb, y) in zip(flat_a, flat_b))


# --------------------------------------------------------------------------
# Sampling against StableDiffusionControlNetPipeline
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler(tiny):
    return pipeline.Sampler(tiny["pipe"], mesh=pipeline.make_mesh(devices=jax.devices()[:1]),
                            controlnets=tiny["loaded"])


@pytest.fixture(scope="module")
def sampler1(tiny):
    return pipeline.Sampler(tiny["pipe"], mesh=pipeline.make_mesh(devices=jax.devices()[:1]),
                            controlnets=tiny["loaded"][:1])


def _reference(tiny, nets, images, steps, scheduler=diffusers.EulerDiscreteScheduler, **kw):
    r = tiny["ref"]
    controlnet = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    ref = diffusers.StableDiffusionControlNetPipeline(
        vae=r.vae, text_encoder=r.text_encoder, tokenizer=r.tokenizer, unet=r.unet, controlnet=controlnet,
        scheduler=scheduler.from_config(r.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    image = [_torch(im) for im in images] if len(nets) > 1 else _torch(images[0])
    return ref(PROMPTS, image=image, num_inference_steps=steps, height=SIZE, width=SIZE, output_type="np",
               **kw).images


def _latents(seeds):
    # Our seeded starting noise, handed to diffusers: our calls then run the
    # program the CLI runs (no latents input).
    return np.asarray(pipeline.seeded_normal(seeds, (SIZE // 2, SIZE // 2, 4)))


SCHEDULERS = {"euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler,
              "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
CASES = [
    # (nets, scheduler, diffusers kwargs, our kwargs). Heun evaluates the U-Net
    # 2 * steps - 1 times; diffusers' keep flags count those evaluations (its
    # loop over `timesteps`), and so do ours.
    pytest.param(1, "heun", dict(control_guidance_start=0.2, control_guidance_end=0.8),
                 dict(control_guidance_start=0.2, control_guidance_end=0.8), id="one-heun-start-end"),
    pytest.param(2, "euler", dict(controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.4],
                                  control_guidance_end=[0.7, 1.0]),
                 dict(control_scales=[0.7, 1.3], control_guidance_start=[0.0, 0.4], control_guidance_end=[0.7, 1.0]),
                 id="two-scaled-start-end"),
    pytest.param(1, "dpmpp_2m", dict(controlnet_conditioning_scale=0.8, guess_mode=True),
                 dict(control_scales=0.8, guess_mode=True), id="one-guess-mode", marks=pytest.mark.slow),
    pytest.param(2, "euler", dict(guess_mode=True, guidance_scale=1.0), dict(guess_mode=True, guidance_scale=1.0),
                 id="two-guess-mode-no-cfg", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("n", "scheduler", "ref_kw", "our_kw"), CASES)
def test_sampling_matches_diffusers(tiny, sampler, sampler1, compilation_cache, n, scheduler, ref_kw, our_kw):
    images = [_control_image(10 + k, len(PROMPTS)) for k in range(n)]
    seeds = [0, 1000]
    latents = _latents(seeds)
    kw = dict(guidance_scale=6.0)
    out = _reference(tiny, tiny["nets"][:n], images, 3, scheduler=SCHEDULERS[scheduler],
                     negative_prompt=["blurry", ""], latents=_torch(latents), **{**kw, **ref_kw})
    s = sampler1 if n == 1 else sampler
    kw = dict(seeds=seeds, negative_prompts=["blurry", ""], steps=3, scheduler=scheduler, height=SIZE, width=SIZE,
              control_images=images, **{**kw, **our_kw})
    ours = s(PROMPTS, **kw)
    # Scales are inputs of the compiled loop: zero scales rerun it with no control.
    plain = s(PROMPTS, **{**kw, "control_scales": 0.0})
    assert ((out > 0.02) & (out < 0.98)).mean() > 0.5
    assert np.abs(ours - out).max() <= 1 / 255
    assert np.abs(plain - out).max() > 10 / 255  # the ControlNets changed the images


def test_keep_mask_matches_diffusers_indexing():
    # diffusers: keep[i] = 1 - (i / N < start or (i + 1) / N > end) over its
    # loop index i, N = len(timesteps) (Heun: 2 * steps - 1 evaluations).
    keep = controlnet_lib.keep_mask(7, [0.2, 0.0], [0.8, 0.5])
    assert keep[:, 0].tolist() == [0, 0, 1, 1, 1, 0, 0]
    assert keep[:, 1].tolist() == [1, 1, 1, 0, 0, 0, 0]


def test_bad_inputs_are_named(tiny, sampler, sampler1):
    kw = dict(seeds=[0, 1], steps=2, scheduler="euler", height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match=r"control image 0 is 48x32 \(height x width\).*32x32 images; resize"):
        sampler1.prepare(PROMPTS, control_images=[np.zeros((1, 48, 32, 3), np.float32)], **kw)
    with pytest.raises(ValueError, match="got 1 control images for 2 ControlNets"):
        sampler.prepare(PROMPTS, control_images=[_control_image(0)], **kw)
    with pytest.raises(ValueError, match="start 0.9 and end 0.5"):
        sampler1.prepare(PROMPTS, control_images=[_control_image(0)], control_guidance_start=0.9,
                         control_guidance_end=0.5, **kw)
    plain = pipeline.Sampler(tiny["pipe"], mesh=sampler.mesh)
    with pytest.raises(ValueError, match="has no ControlNets"):
        plain.prepare(PROMPTS, control_images=[_control_image(0)], **kw)
    # A ControlNet for another text encoder width (SD2's 1024 vs this model's 32).
    module, params = tiny["loaded"][0]
    wide = controlnet_lib.ControlNetModel(
        controlnet_lib.ControlNetConfig(**{**module.config.__dict__, "cross_attention_dim": 48}))
    with pytest.raises(ValueError, match="ControlNet 0 has cross_attention_dim 48, the model's U-Net 32"):
        pipeline.Sampler(tiny["pipe"], mesh=sampler.mesh, controlnets=[(wide, params)])


def test_cli_end_to_end(tiny, sampler1, tmp_path, monkeypatch, compilation_cache):
    from PIL import Image

    from t2i_jax import sample

    # One device: the CLI's batch is then one image (it pads to the device count).
    make_mesh = pipeline.make_mesh
    monkeypatch.setattr(pipeline, "make_mesh", lambda devices=None: make_mesh(devices=jax.devices()[:1]))
    hint = (np.random.RandomState(5).rand(40, 24, 3) * 255).astype(np.uint8)  # resized to 32x32
    Image.fromarray(hint).save(tmp_path / "hint.png")
    out = tmp_path / "out"
    # The program of the Heun sampling test above (two prompts, 3 steps, one
    # net, guidance): the CLI reads its compile from the module's cache.
    argv = ["--model", str(tiny["root"] / "sd"), "--out", str(out), "--height", str(SIZE), "--width", str(SIZE),
            "--steps", "3", "--scheduler", "heun", "--guidance-scale", "6", "--batch-size", "2",
            "--no-compilation-cache", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--controlnet", str(tiny["root"] / "cn0"), "--control-image", str(tmp_path / "hint.png"),
            "--control-scale", "0.7", "--control-guidance-end", "0.9"]
    resized = np.asarray(Image.fromarray(hint).resize((SIZE, SIZE), Image.LANCZOS), np.float32)[None] / 255.0
    want = pipeline.to_uint8(sampler1(PROMPTS, seeds=[0, 1000], steps=3, scheduler="heun", guidance_scale=6.0,
                                      height=SIZE, width=SIZE, control_images=[resized], control_scales=0.7,
                                      control_guidance_end=0.9))
    assert sample.main(argv) == 0
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    got = np.stack([np.asarray(Image.open(out / e["file"])) for e in entries])
    assert np.abs(got.astype(int) - want).max() <= 1
    entry = entries[0]
    cn = entry["controlnet"]
    assert cn["models"] == [str(tiny["root"] / "cn0")] and len(cn["images"][0]) == 16
    assert cn["control_scales"] == [0.7] and cn["control_guidance_end"] == [0.9] and cn["guess_mode"] is False
    assert entry["control_image_paths"] == [str(tmp_path / "hint.png")]
    # Flags that do not add up are named before anything loads.
    for extra, message in [(["--control-image", str(tmp_path / "hint.png")], "1 --controlnet but 2 --control-image"),
                           (["--control-scale", "1", "--control-scale", "2"], "--control-scale given 3 times")]:
        with pytest.raises(ValueError, match=message):
            sample.run(sample.parse_args(argv + extra))


@pytest.mark.slow  # compiles the loop for 8 devices (and runs it on 1 for the images)
@pytest.mark.parametrize("guess_mode", [False, True])
def test_eight_devices_no_collectives_same_images(tiny, sampler, guess_mode):
    """Batch 8 over 8 devices, two ControlNets, guidance: each device runs its
    images' nets and U-Net alone (guess mode's conditional-half slicing
    included), and the images are the 1-device ones."""
    from test_sampler_layout import while_body_collectives, while_body_computations

    eight = pipeline.Sampler(tiny["pipe"], mesh=pipeline.make_mesh(devices=jax.devices()[:8]),
                             controlnets=tiny["loaded"])
    prompts = [PROMPTS[k % 2] for k in range(8)]
    images = [_control_image(20 + k, 8) for k in range(2)]
    kw = dict(seeds=list(range(8)), steps=2, guidance_scale=5.0, scheduler="euler", height=SIZE, width=SIZE,
              control_images=images, control_scales=[0.6, 1.2], control_guidance_start=[0.0, 0.5],
              guess_mode=guess_mode)
    fn, args = eight.prepare(prompts, **kw)
    compiled = fn.lower(*args).compile()
    text = compiled.as_text()
    bodies, counts = while_body_collectives(text)
    _, reached = while_body_computations(text)
    assert any(" convolution(" in line for lines in reached.values() for line in lines), bodies
    assert not counts, f"collectives in the while bodies {bodies}: {dict(counts)}"
    a = np.asarray(compiled(*args))
    b = sampler(prompts, **kw)
    assert np.abs(a - b).max() < 1e-4


@pytest.mark.slow
def test_img2img_matches_diffusers(tiny, sampler, monkeypatch):
    """ControlNet img2img against StableDiffusionControlNetImg2ImgPipeline: its
    keep flags count the evaluations left after `strength`, as ours do."""
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.controlnet.pipeline_controlnet_img2img as i2i_mod

    seeds = [5, 9]
    lat = (SIZE // 2, SIZE // 2, 4)
    enc_noise = np.asarray(pipeline.seeded_normal(seeds, lat, pipeline.ENCODER)).transpose(0, 3, 1, 2)
    noise = np.asarray(pipeline.seeded_normal(seeds, lat, pipeline.NOISE)).transpose(0, 3, 1, 2)
    monkeypatch.setattr(vae_mod, "randn_tensor", lambda shape, **kw: torch.tensor(enc_noise))
    monkeypatch.setattr(i2i_mod, "randn_tensor", lambda shape, **kw: torch.tensor(noise))
    r = tiny["ref"]
    ref = diffusers.StableDiffusionControlNetImg2ImgPipeline(
        vae=r.vae, text_encoder=r.text_encoder, tokenizer=r.tokenizer, unet=r.unet,
        controlnet=diffusers.MultiControlNetModel(tiny["nets"]),
        scheduler=diffusers.DPMSolverMultistepScheduler.from_config(r.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    init = np.random.RandomState(3).rand(2, SIZE, SIZE, 3).astype(np.float32)
    images = [_control_image(30 + k, 2) for k in range(2)]
    kw = dict(controlnet_conditioning_scale=[1.1, 0.5], control_guidance_start=[0.0, 0.3],
              control_guidance_end=[0.6, 1.0])
    out = ref(PROMPTS, image=_torch(init), control_image=[_torch(im) for im in images], strength=0.7,
              num_inference_steps=6, guidance_scale=5.0, height=SIZE, width=SIZE, output_type="np", **kw).images
    ours = sampler(PROMPTS, seeds=seeds, steps=6, guidance_scale=5.0, scheduler="dpmpp_2m", height=SIZE, width=SIZE,
                   init_images=init, strength=0.7, control_images=images, control_scales=[1.1, 0.5],
                   control_guidance_start=[0.0, 0.3], control_guidance_end=[0.6, 1.0])
    assert ((out > 0.02) & (out < 0.98)).mean() > 0.5
    assert np.abs(ours - out).max() <= 1 / 255


def test_bf16_sampler_casts_controlnet_params(tiny, sampler):
    import jax.numpy as jnp

    s = pipeline.Sampler(tiny["pipe"], mesh=sampler.mesh, dtype=jnp.bfloat16, controlnets=tiny["loaded"])
    assert [net.dtype for net in s.controlnets] == [jnp.bfloat16] * 2
    for tree in s.params["controlnet"]:
        for leaf in jax.tree.leaves(tree):
            assert leaf.dtype == (jnp.bfloat16 if leaf.ndim >= 2 else jnp.float32), leaf.shape
    # The loaded params are left as they were.
    assert {x.dtype for x in jax.tree.leaves(tiny["loaded"][0][1])} == {np.dtype(np.float32)}


def test_with_inpainting_matches_diffusers(tiny, sampler1, monkeypatch):
    """A ControlNet steering a 4-channel model's inpainting against
    StableDiffusionControlNetInpaintPipeline: both extras of the loop at once.
    diffusers draws the init image's posterior noise, the start noise, then
    the masked image's posterior noise from its generator."""
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.controlnet.pipeline_controlnet_inpaint as inp_mod

    seeds = [4, 8]
    lat = (SIZE // 2, SIZE // 2, 4)
    enc, masked_enc = (np.asarray(pipeline.seeded_normal(seeds, lat, s)) for s in (pipeline.ENCODER,
                                                                                   pipeline.MASKED_ENCODER))
    noise = np.asarray(pipeline.seeded_normal(seeds, lat, pipeline.NOISE))
    posterior = iter([enc, masked_enc])
    monkeypatch.setattr(vae_mod, "randn_tensor", lambda shape, **kw: _torch(next(posterior)))
    monkeypatch.setattr(inp_mod, "randn_tensor", lambda shape, **kw: _torch(noise))
    r = tiny["ref"]
    ref = diffusers.StableDiffusionControlNetInpaintPipeline(
        vae=r.vae, text_encoder=r.text_encoder, tokenizer=r.tokenizer, unet=r.unet, controlnet=tiny["nets"][0],
        scheduler=diffusers.EulerDiscreteScheduler.from_config(r.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    init = np.random.RandomState(5).rand(2, SIZE, SIZE, 3).astype(np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    masks = np.stack([(xx >= 8) & (xx < 24), yy < 14]).astype(np.float32)
    control = _control_image(40, 2)
    out = ref(PROMPTS, image=_torch(init), mask_image=torch.tensor(masks[:, None]), control_image=_torch(control),
              strength=0.75, num_inference_steps=4, guidance_scale=5.0, controlnet_conditioning_scale=0.8,
              height=SIZE, width=SIZE, output_type="np").images
    ours = sampler1(PROMPTS, seeds=seeds, steps=4, guidance_scale=5.0, scheduler="euler", height=SIZE, width=SIZE,
                    init_images=init, strength=0.75, mask_images=masks, control_images=[control], control_scales=0.8)
    assert ((out > 0.02) & (out < 0.98)).mean() > 0.5
    assert np.abs(ours - out).max() <= 1 / 255
