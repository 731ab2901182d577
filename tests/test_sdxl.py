"""SDXL: the U-Net (base and refiner), both text encoders and the tokenizers
against diffusers/transformers on tiny random models saved locally; folder
load/export round trips; original-format single files.

The tiny models have two text encoders (CLIP-L-like, 32 wide, and a
bigG-like one with a projection, 32 wide: the U-Net reads their 64-wide
concatenation), `transformer_layers_per_block` (1, 2) and no attention in
the first down block, as SDXL; the refiner variant has the second encoder
only and five time ids (the aesthetic score).
"""

import dataclasses
import json
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import traverse_util

from t2i_jax.convert import core
from t2i_jax.convert.load import load_components
from t2i_jax.models import unet as unet_lib
from t2i_jax.tokenizer import Tokenizer

PROMPTS = ["a red circle on a blue background", "a small yellow triangle"]
TIME_DIM = 8  # addition_time_embed_dim of the tiny U-Nets (SDXL: 256)


def rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _perturb(model, seed):
    """Random weights with norms and biases off their init values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def tiny_unet(refiner: bool):
    torch.manual_seed(1 if refiner else 0)
    kw = dict(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        transformer_layers_per_block=(1, 2), norm_num_groups=8,
        # base: pooled 32 + 6 ids; the refiner: pooled 32 + 5 ids (aesthetic score)
        cross_attention_dim=32 if refiner else 64,
        projection_class_embeddings_input_dim=32 + (5 if refiner else 6) * TIME_DIM)
    return _perturb(diffusers.UNet2DConditionModel(**kw), 10 + refiner)


def tiny_text(projection: bool, seed: int):
    torch.manual_seed(seed)
    cfg = T.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                           num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                           hidden_act="gelu" if projection else "quick_gelu")
    cls = T.CLIPTextModelWithProjection if projection else T.CLIPTextModel
    return _perturb(cls(cfg), seed + 100)


def tiny_vae():
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        scaling_factor=0.13025, force_upcast=True)
    return vae.eval()


def tiny_scheduler():
    return diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, timestep_spacing="leading")


def build_tiny_sdxl(path, refiner: bool = False):
    """A diffusers StableDiffusionXL(Img2Img)Pipeline with random tiny parts, saved to `path`."""
    tok_2 = Tokenizer.bundled(pad_token="!").hf
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=tiny_vae(), text_encoder=None, text_encoder_2=tiny_text(True, 7), tokenizer=None,
            tokenizer_2=tok_2, unet=tiny_unet(True), scheduler=tiny_scheduler(), requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=tiny_vae(), text_encoder=tiny_text(False, 5), text_encoder_2=tiny_text(True, 6),
            tokenizer=Tokenizer.bundled().hf, tokenizer_2=tok_2, unet=tiny_unet(False), scheduler=tiny_scheduler())
    pipe.save_pretrained(path)
    return pipe


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sdxl")
    ref = build_tiny_sdxl(path)
    return ref, path, load_components(str(path))


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sdxl-refiner")
    ref = build_tiny_sdxl(path, refiner=True)
    return ref, path, load_components(str(path))


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def test_tokenizers_pad_as_diffusers(base):
    ref, _, pipe = base
    for ours, theirs, pad in ((pipe.tokenizer, ref.tokenizer, 49407), (pipe.tokenizer_2, ref.tokenizer_2, 0)):
        ids = ours(PROMPTS)
        want = theirs(PROMPTS, padding="max_length", max_length=theirs.model_max_length, truncation=True,
                      return_tensors="np").input_ids
        np.testing.assert_array_equal(ids, want)
        assert ids[0, -1] == pad  # tokenizer_2 pads with "!" (id 0), tokenizer 1 with <|endoftext|>


def test_text_encoders_match_transformers(base):
    ref, _, pipe = base
    ids = pipe.tokenizer(PROMPTS)
    with torch.no_grad():
        r1 = ref.text_encoder(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
        r2 = ref.text_encoder_2(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    o1 = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, jnp.asarray(ids), output_hidden_states=True)
    o2 = pipe.text_encoder_2.apply({"params": pipe.params["text_encoder_2"]}, jnp.asarray(ids),
                                   output_hidden_states=True)
    errs = {
        "1 penultimate": rel(o1.hidden_states[-2], r1.hidden_states[-2]),
        "2 penultimate": rel(o2.hidden_states[-2], r2.hidden_states[-2]),
        "2 text_embeds": rel(o2.text_embeds, r2.text_embeds),
    }
    assert max(errs.values()) <= 1e-5, errs
    assert pipe.text_encoder_2.with_projection and pipe.text_encoder_2.config.hidden_act == "gelu"


def _unet_inputs(refiner: bool, h=12, w=8):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, h, w, generator=g)
    ctx = torch.randn(2, 7, 32 if refiner else 64, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    ids = torch.tensor([[48.0, 32.0, 0.0, 4.0, 6.0], [64.0, 40.0, 8.0, 0.0, 2.5]]) if refiner else \
        torch.tensor([[48.0, 32.0, 0.0, 4.0, 48.0, 32.0], [64.0, 40.0, 8.0, 0.0, 40.0, 24.0]])
    return x, torch.tensor([999, 17]), ctx, pooled, ids


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_unet_matches_diffusers(base, refiner, which):
    ref, _, pipe = base if which == "base" else refiner
    x, t, ctx, pooled, ids = _unet_inputs(which == "refiner")
    with torch.no_grad():
        want = ref.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample.numpy()
    out = jax.jit(pipe.unet.apply)({"params": pipe.params["unet"]}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                                   jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()),
                                   {"text_embeds": jnp.asarray(pooled.numpy()), "time_ids": jnp.asarray(ids.numpy())})
    assert rel(np.asarray(out).transpose(0, 3, 1, 2), want) <= 1e-5
    cfg = pipe.unet.config
    assert unet_lib.text_time_sizes(cfg, 32) == (5 if which == "refiner" else 6)
    assert cfg.transformer_layers_per_block == (1, 2) and cfg.down_block_types[0] == "DownBlock2D"


def test_unet_needs_its_added_conditions(base):
    _, _, pipe = base
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        pipe.unet.apply({"params": pipe.params["unet"]}, x, jnp.array([1]), jnp.zeros((1, 3, 64)))


def test_sd_unet_params_unchanged():
    """The SD1/SD2 U-Net's params tree has no addition embedding (the SDXL fields default to off)."""
    cfg = unet_lib.UNetConfig.named("tiny")
    shapes = jax.eval_shape(unet_lib.UNet2DConditionModel(cfg).init, jax.random.key(0),
                            *unet_lib.dummy_inputs(cfg))["params"]
    assert "add_embedding" not in shapes and len(unet_lib.dummy_inputs(cfg)) == 3
    with pytest.raises(ValueError, match="addition_embed_type 'text_time' needs"):
        unet_lib.UNetConfig(addition_embed_type="text_time")


# --------------------------------------------------------------------------
# Folders: load, export, reload
# --------------------------------------------------------------------------


def flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def assert_params_equal(a, b):
    assert sorted(a) == sorted(b)
    for part in a:
        fa, fb = flat(a[part]), flat(b[part])
        assert sorted(fa) == sorted(fb), part
        for k in fa:
            assert fa[k].shape == fb[k].shape and np.array_equal(fa[k], fb[k]), f"{part}/{k}"


@pytest.mark.parametrize("which", ["base", pytest.param("refiner", marks=pytest.mark.slow)])
def test_folder_export_round_trip(base, refiner, which, tmp_path):
    from t2i_jax.train.export import export_pipeline

    ref, _, pipe = base if which == "base" else refiner
    assert (pipe.text_encoder is None) == (which == "refiner")
    assert pipe.pipeline_options == {"force_zeros_for_empty_prompt": which == "base",
                                     "requires_aesthetics_score": which == "refiner"}
    assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025
    export_pipeline(pipe, tmp_path / "out")
    back = load_components(str(tmp_path / "out"))
    assert_params_equal(pipe.params, back.params)
    assert back.pipeline_options == pipe.pipeline_options
    np.testing.assert_array_equal(back.tokenizer_2(PROMPTS), pipe.tokenizer_2(PROMPTS))
    # diffusers reads the export as the pipeline it came from.
    cls = diffusers.StableDiffusionXLPipeline if which == "base" else diffusers.StableDiffusionXLImg2ImgPipeline
    theirs = cls.from_pretrained(tmp_path / "out")
    for name in ("unet", "text_encoder_2") + (("text_encoder",) if which == "base" else ()):
        a, b = getattr(theirs, name).state_dict(), getattr(ref, name).state_dict()
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert theirs.config.get("requires_aesthetics_score", False) == (which == "refiner")
    assert theirs.config.force_zeros_for_empty_prompt == (which == "base")


@pytest.mark.slow
def test_fp16_variant_and_vae_override(base, tmp_path):
    """`variant="fp16"` reads the *.fp16 weights of every part (text encoders too); `vae=` swaps the VAE
    (the fp16-fix VAE's config says force_upcast false)."""
    ref, _, pipe = base
    ref.save_pretrained(tmp_path / "fp16", variant="fp16")
    for f in (tmp_path / "fp16").glob("*/*.fp16.safetensors"):  # saved as fp32 under the fp16 names
        core.write_safetensors({k: v.astype(np.float16) for k, v in core.read_safetensors(f).items()}, f,
                               metadata={"format": "pt"})
    assert not list((tmp_path / "fp16").glob("text_encoder*/model.safetensors"))
    half = load_components(str(tmp_path / "fp16"), variant="fp16")
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        for k, v in flat(pipe.params[part]).items():
            np.testing.assert_array_equal(flat(half.params[part])[k], v.astype(np.float16).astype(np.float32),
                                          err_msg=f"{part}/{k}")
    vae = tiny_vae()
    vae.register_to_config(force_upcast=False)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)
    vae.save_pretrained(tmp_path / "vae-fix")
    fixed = load_components(str(tmp_path / "fp16"), variant="fp16", vae=str(tmp_path / "vae-fix"))
    assert not fixed.vae.config.force_upcast
    np.testing.assert_allclose(fixed.params["vae"]["decoder"]["conv_out"]["bias"],
                               vae.decoder.conv_out.bias.detach().numpy())


# --------------------------------------------------------------------------
# Original single files (Stability's sgm layout), written by hand from the
# published key layout and checked against diffusers' own converters
# --------------------------------------------------------------------------


def open_clip_layout(model, prefix: str) -> dict:
    """A transformers CLIPTextModelWithProjection's weights in OpenCLIP's names (fused q/k/v,
    `text_projection` as the [width, proj] matrix OpenCLIP multiplies by)."""
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T.contiguous(),
           "logit_scale": torch.tensor(4.6), "attn_mask": torch.full((77, 77), float("-inf")).triu(1)}
    for i in range(model.config.num_hidden_layers):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}attn.in_proj_{kind}"] = torch.cat([sd[f"{a}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            out[f"{b}attn.out_proj.{kind}"] = sd[f"{a}self_attn.out_proj.{kind}"]
            for new, old in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                             ("mlp.c_proj", "mlp.fc2")):
                out[f"{b}{new}.{kind}"] = sd[f"{a}{old}.{kind}"]
    return {prefix + k: v for k, v in out.items()}


def sgm_state(ref) -> dict:
    """An SDXL base (two text encoders) or refiner (bigG only, as embedder 0) single file's state dict."""
    from test_single_file import unet_to_original, vae_to_original

    unet_sd = ref.unet.state_dict()
    add = {k: unet_sd.pop(k) for k in list(unet_sd) if k.startswith("add_embedding.")}
    out = unet_to_original(unet_sd, ref.unet.config)
    for k, v in add.items():  # add_embedding.linear_{1,2} -> label_emb.0.{0,2}
        out["model.diffusion_model.label_emb.0." + ("0" if ".linear_1." in k else "2") + "." + k.split(".")[-1]] = v
    out.update(vae_to_original(ref.vae.state_dict(), ref.vae.config))
    n = 0
    if ref.text_encoder is not None:
        out.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                    for k, v in ref.text_encoder.state_dict().items()})
        n = 1
    out.update(open_clip_layout(ref.text_encoder_2, f"conditioner.embedders.{n}.model."))
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def sgm_files(base, refiner, tmp_path_factory):
    root = tmp_path_factory.mktemp("sgm")
    out = {}
    for which, (ref, _, _) in (("base", base), ("refiner", refiner)):
        state = sgm_state(ref)
        core.write_safetensors({k: v.numpy() for k, v in state.items()}, root / f"sd_xl_{which}.safetensors")
        out[which] = (root / f"sd_xl_{which}.safetensors", state)
    return out


def test_hand_written_file_is_what_diffusers_reads(base, sgm_files):
    """The fake file is right: diffusers' own converters give back the folder's weights from it."""
    from diffusers.loaders import single_file_utils as dsf

    ref, _, _ = base
    _, state = sgm_files["base"]
    for name, got in (
        ("unet", dsf.convert_ldm_unet_checkpoint(state, ref.unet.config)),
        ("text_encoder_2", dsf.convert_open_clip_checkpoint(ref.text_encoder_2, state,
                                                            prefix="conditioner.embedders.1.model.")),
    ):
        want = {k.removeprefix("text_model.") if name == "unet" else k: v
                for k, v in getattr(ref, name).state_dict().items()}
        assert sorted(got) == sorted(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


@pytest.mark.parametrize("which", ["base", pytest.param("refiner", marks=pytest.mark.slow)])
def test_single_file_loads_the_folder_params(base, refiner, sgm_files, which):
    from t2i_jax.convert import single_file as sf

    _, _, pipe = base if which == "base" else refiner
    path, _ = sgm_files[which]
    parts = sf.load_single_file(path)
    assert parts["family"] == ("sdxl" if which == "base" else "sdxl_refiner")
    assert parts["report"].unexpected == [] and any("attn_mask" in k for k in parts["ignored"])
    ucfg = parts["unet"]["config"]
    assert ucfg["addition_time_embed_dim"] == TIME_DIM and ucfg["attention_head_dim"] == [1, 1]
    from_file = load_components(str(path))
    assert_params_equal(pipe.params, from_file.params)
    assert from_file.pipeline_options == pipe.pipeline_options
    assert from_file.unet.config.transformer_layers_per_block == 2 and from_file.vae.config.scaling_factor == 0.13025
    np.testing.assert_array_equal(from_file.tokenizer_2(PROMPTS), pipe.tokenizer_2(PROMPTS))


def test_truncated_single_file_is_named(sgm_files, tmp_path):
    path, _ = sgm_files["base"]
    cut = tmp_path / "sd_xl_base_cut.safetensors"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(core.ConversionError, match=r"sd_xl_base_cut.safetensors is truncated: tensor '.*' needs"):
        load_components(str(cut))


def test_mismatched_single_file_is_named(sgm_files, tmp_path):
    from t2i_jax.convert import single_file as sf

    _, state = sgm_files["base"]
    state = {k: v.numpy() for k, v in state.items()}
    stray = "model.diffusion_model.label_emb.0.9.weight"
    with pytest.raises(core.ConversionError, match=rf"no SDXL table uses[\s\S]*unexpected[\s\S]*{re.escape(stray)}"):
        sf.split_checkpoint({**state, stray: np.zeros((3, 3), np.float32)}, source="x.safetensors")
    gone = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    path = tmp_path / "missing.safetensors"
    core.write_safetensors({k: v for k, v in state.items() if k != gone}, path)
    with pytest.raises(core.ConversionError, match=r"missing from the checkpoint[\s\S]*text_model\.encoder\."
                                                   r"layers\.1\.self_attn\.q_proj\.weight"):
        load_components(str(path))
    # The base's U-Net without its CLIP-L reads as a refiner: 6 time ids do not fit 5.
    no_clip = {k.replace("embedders.1.", "embedders.0."): v for k, v in state.items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(core.ConversionError, match=r"takes 80 inputs, which is not the pooled text width 32 "
                                                   r"plus 5 time ids"):
        sf.split_checkpoint(no_clip, source="x.safetensors")


# --------------------------------------------------------------------------
# Sampling against StableDiffusionXL(Img2Img)Pipeline
# --------------------------------------------------------------------------

H, W = 48, 32  # pixels, non-square; the tiny VAE halves each side
LAT = (H // 2, W // 2, 4)
XL_SCHEDULERS = {"euler": diffusers.EulerDiscreteScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def samplers(base, refiner):
    from t2i_jax import pipeline

    mesh = pipeline.make_mesh(devices=jax.devices()[:1])
    return pipeline.Sampler(base[2], mesh=mesh), pipeline.Sampler(refiner[2], mesh=mesh)


def _torch_pipe(ref, name):
    ref.scheduler = XL_SCHEDULERS[name].from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _latents(seed, n=2):
    return np.random.RandomState(seed).randn(n, *LAT).astype(np.float32)


def _nchw(x):
    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


@pytest.mark.parametrize("name", ["euler", pytest.param("dpmpp_2m", marks=pytest.mark.slow)])
def test_txt2img_matches_diffusers(base, samplers, name):
    ref = _torch_pipe(base[0], name)
    lat = _latents(4)
    cond = dict(original_size=(64, 40), crops_coords_top_left=(4, 2))
    from t2i_jax.sdxl import Conditions

    want = ref(PROMPTS, height=H, width=W, num_inference_steps=4, guidance_scale=5.0, latents=_nchw(lat),
               output_type="np", **cond).images
    ours = samplers[0](PROMPTS, seeds=[1, 2], steps=4, guidance_scale=5.0, scheduler=name, height=H, width=W,
                       latents=lat, sdxl=Conditions(**cond))
    assert float(((want > 0.02) & (want < 0.98)).mean()) > 0.5
    assert np.abs(ours - want).max() <= 1 / 255
    # The micro-conditioning is read: another original size changes the image.
    other = samplers[0](PROMPTS, seeds=[1, 2], steps=4, guidance_scale=5.0, scheduler=name, height=H, width=W,
                        latents=lat)
    assert np.abs(other - ours).max() > 4 / 255


@pytest.mark.slow
def test_negative_prompt_and_sizes(base, samplers):
    """An explicit negative prompt is encoded (the zeros are for none at all); negative sizes condition
    the unconditional half. One prompt: for a batch, diffusers' txt2img repeats the [negative, positive]
    time-id pair per image, so the rows stop lining up with its prompt rows (its bug, not copied)."""
    from t2i_jax.sdxl import Conditions

    ref = _torch_pipe(base[0], "euler")
    lat = _latents(5, n=1)
    cond = dict(negative_original_size=(32, 32), negative_target_size=(40, 24), negative_crops_coords_top_left=(2, 2))
    want = ref(PROMPTS[:1], negative_prompt=["blurry"], height=H, width=W, num_inference_steps=3,
               guidance_scale=4.0, latents=_nchw(lat), output_type="np", **cond).images
    ours = samplers[0](PROMPTS[:1], negative_prompts=["blurry"], seeds=[1], steps=3, guidance_scale=4.0,
                       scheduler="euler", height=H, width=W, latents=lat, sdxl=Conditions(**cond))
    assert np.abs(ours - want).max() <= 1 / 255
    zeros = samplers[0](PROMPTS[:1], seeds=[1], steps=3, guidance_scale=4.0, scheduler="euler", height=H, width=W,
                        latents=lat, sdxl=Conditions(**cond))
    assert np.abs(zeros - ours).max() > 4 / 255


@pytest.mark.slow
def test_refiner_img2img_matches_diffusers(refiner, samplers, monkeypatch):
    """The refiner (bigG only, aesthetic-score time ids) as StableDiffusionXLImg2ImgPipeline, with our
    two noises handed to diffusers' draws (posterior sample, then forward noise)."""
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as i2i_mod

    from t2i_jax import pipeline
    from t2i_jax.sdxl import Conditions

    seeds = [5, 9]
    enc = np.asarray(pipeline.seeded_normal(seeds, LAT, pipeline.ENCODER))
    noise = np.asarray(pipeline.seeded_normal(seeds, LAT, pipeline.NOISE))
    monkeypatch.setattr(vae_mod, "randn_tensor", lambda shape, **kw: _nchw(enc))
    monkeypatch.setattr(i2i_mod, "randn_tensor", lambda shape, **kw: _nchw(noise))
    ref = _torch_pipe(refiner[0], "dpmpp_2m")
    init = np.random.RandomState(3).rand(2, H, W, 3).astype(np.float32)
    want = ref(PROMPTS, image=_nchw(init), strength=0.6, num_inference_steps=6, guidance_scale=5.0,
               aesthetic_score=7.0, negative_aesthetic_score=2.0, output_type="np").images
    ours = samplers[1](PROMPTS, seeds=seeds, steps=6, guidance_scale=5.0, scheduler="dpmpp_2m", height=H, width=W,
                       init_images=init, strength=0.6, sdxl=Conditions(aesthetic_score=7.0,
                                                                       negative_aesthetic_score=2.0))
    assert float(((want > 0.02) & (want < 0.98)).mean()) > 0.5
    assert np.abs(ours - want).max() <= 1 / 255


@pytest.mark.parametrize("name", ["euler", pytest.param("dpmpp_2m", marks=pytest.mark.slow)])
def test_base_refiner_handoff_matches_diffusers(base, refiner, samplers, name):
    """Base with denoising_end=0.75 -> latents -> refiner with denoising_start=0.75, as diffusers."""
    ref_base, ref_refiner = _torch_pipe(base[0], name), _torch_pipe(refiner[0], name)
    lat = _latents(6)
    kw = dict(num_inference_steps=8, guidance_scale=5.0)
    mid = ref_base(PROMPTS, height=H, width=W, latents=_nchw(lat), denoising_end=0.75, output_type="latent",
                   **kw).images
    want = ref_refiner(PROMPTS, image=mid, denoising_start=0.75, output_type="np", **kw).images
    ours_kw = dict(seeds=[1, 2], steps=8, guidance_scale=5.0, scheduler=name, height=H, width=W)
    _, ours_mid = samplers[0](PROMPTS, latents=lat, denoising_end=0.75, return_latents=True, **ours_kw)
    assert rel(ours_mid, mid.numpy().transpose(0, 2, 3, 1)) <= 1e-4
    ours = samplers[1](PROMPTS, init_latents=ours_mid, denoising_start=0.75, **ours_kw)
    assert np.abs(ours - want).max() <= 1 / 255


# --------------------------------------------------------------------------
# The sampling CLI
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_base_and_refiner(base, refiner, samplers, tmp_path):
    """`--model BASE --refiner REFINER --high-noise-frac F`: the images of the Sampler hand-off,
    seeds and metadata as for SD1."""
    from PIL import Image

    from t2i_jax import sample

    argv = ["--model", str(base[1]), "--refiner", str(refiner[1]), "--high-noise-frac", "0.75",
            "--prompt", PROMPTS[0], "--steps", "4", "--scheduler", "euler", "--guidance-scale", "5",
            "--height", str(H), "--width", str(W), "--seed", "3", "--dtype", "fp32", "--attention", "xla",
            "--no-compilation-cache", "--out", str(tmp_path / "out")]
    assert sample.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["refiner"] == str(refiner[1]) and rows[0]["high_noise_frac"] == 0.75
    got = np.asarray(Image.open(tmp_path / "out" / rows[0]["file"]).convert("RGB"))
    kw = dict(seeds=[rows[0]["seed"]], steps=4, guidance_scale=5.0, scheduler="euler", height=H, width=W)
    _, lat = samplers[0](PROMPTS[:1], denoising_end=0.75, return_latents=True, **kw)
    want = samplers[1](PROMPTS[:1], init_latents=lat, denoising_start=0.75, **kw)
    assert np.abs(got.astype(int) - sample_to_uint8(want)[0].astype(int)).max() <= 1
    # A usage error before anything loads or is written.
    assert sample.main(argv[:-2] + ["--high-noise-frac", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def sample_to_uint8(images):
    from t2i_jax import pipeline

    return pipeline.to_uint8(images)


# --------------------------------------------------------------------------
# Full size (slow): the named configs, diffusers' layout, the single-file inference
# --------------------------------------------------------------------------

BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_full_size_layout(name):
    """unet.UNetConfig.named(name) has diffusers' SDXL parameters (keys and sizes; 2.57B for the base), and a
    full-size sgm single file (shapes only) is read back to the same config."""
    from test_single_file import shapes_only, unet_to_original

    from t2i_jax.convert import sdxl_file

    cfg = unet_lib.UNetConfig.named(name)
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items()
                                               if not k.startswith("_")})
        bigg = T.CLIPTextModelWithProjection(T.CLIPTextConfig(**BIGG))
        clip_l = T.CLIPTextModel(T.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12))
    shapes = jax.eval_shape(unet_lib.UNet2DConditionModel(cfg).init, jax.random.key(0),
                            *unet_lib.dummy_inputs(cfg))["params"]
    ours = {core.flax_path_to_torch_key(p, len(v.shape))[0]: v.shape
            for p, v in traverse_util.flatten_dict(shapes).items()}
    want = ref.state_dict()
    assert sorted(ours) == sorted(want)
    # Same sizes (Flax kernels are the torch weights transposed / permuted).
    assert all(int(np.prod(ours[k])) == int(np.prod(want[k].shape)) for k in want)
    if name == "sdxl":  # SDXL 1.0 base's published U-Net size
        assert sum(int(np.prod(v.shape)) for v in want.values()) == 2_567_463_684
    sd = dict(want)
    add = {k: sd.pop(k) for k in list(sd) if k.startswith("add_embedding.")}
    orig = unet_to_original(sd, ref.config)
    for k, v in add.items():
        orig["model.diffusion_model.label_emb.0." + ("0" if ".linear_1." in k else "2") + "." + k.split(".")[-1]] = v
    n = 0
    if name == "sdxl":
        orig.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                     for k, v in clip_l.state_dict().items()})
        n = 1
    orig.update(open_clip_layout(bigg, f"conditioner.embedders.{n}.model."))
    parts = sdxl_file.split_sdxl(shapes_only(orig), {}, strict=True, source=name)
    got = unet_lib.UNetConfig.from_diffusers(parts["unet"]["config"])
    assert dataclasses.replace(got, sample_size=cfg.sample_size) == cfg
    for k, v in parts["unet"]["state_dict"].items():
        assert tuple(v.shape) == tuple(want[k].shape), k
    te2 = parts["text_encoder_2"]["config"]
    assert {f: te2[f] for f in ("hidden_size", "num_hidden_layers", "projection_dim", "hidden_act")} == \
        {"hidden_size": 1280, "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu"}


def test_fp16_sampler_keeps_a_force_upcast_vae_in_fp32(base):
    """As diffusers' SDXL pipelines: under fp16 the VAE (force_upcast) computes and keeps its kernels in
    fp32 while the U-Net's are cast to fp16; a VAE that says force_upcast false follows the U-Net."""
    from t2i_jax import pipeline

    mesh = pipeline.make_mesh(devices=jax.devices()[:1])
    s = pipeline.Sampler(base[2], mesh=mesh, dtype=jnp.float16)
    assert s.pipe.vae.dtype == jnp.float32 and s.pipe.unet.dtype == jnp.float16
    assert s.params["vae"]["decoder"]["conv_in"]["kernel"].dtype == jnp.float32
    assert s.params["unet"]["conv_in"]["kernel"].dtype == jnp.float16
    fixed = dataclasses.replace(base[2], vae=base[2].vae.clone(config=dataclasses.replace(
        base[2].vae.config, force_upcast=False)))
    s = pipeline.Sampler(fixed, mesh=mesh, dtype=jnp.float16)
    assert s.pipe.vae.dtype == jnp.float16 and s.params["vae"]["decoder"]["conv_in"]["kernel"].dtype == jnp.float16
