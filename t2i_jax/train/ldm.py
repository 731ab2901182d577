"""Latent-diffusion U-Net training with a frozen VAE and text encoder.

    python -m t2i_jax.train --config configs/shapes_ldm.py --workdir runs/shapes_ldm
    python -m t2i_jax.train --config configs/sd15_finetune.py:/data/captions.jsonl --workdir runs/ft

Per step: images -> VAE posterior sample -> latents z (times the VAE's
scaling factor); captions -> (10% replaced by "") -> text encoder states;
t ~ U{0..T-1}, x_t = sqrt(abar_t) z + sqrt(1 - abar_t) noise; the U-Net
predicts noise ("epsilon") or v = sqrt(abar) noise - sqrt(1 - abar) z
("v_prediction"); loss = MSE, optionally min-SNR-gamma weighted (Hang et
al. 2023) and with offset noise. Only the U-Net is trained: the VAE and
text encoder params are a separate, non-donated argument of the step.

With `cache.enabled` the dataset is encoded once (VAE posterior mean and
std, text states of every caption) and training draws batches from that
cache by (seed, step) alone, so the global batch is the same whatever the
number of hosts; without it each host streams its own shard (grain).

At `eval.every` steps and at the end, sample images from the (EMA) params
go to `workdir/samples/step_N.png`; the result is exported as a diffusers
StableDiffusionPipeline folder in `workdir/export`.

An SDXL base in `model.init_from` is fine-tuned with both text encoders frozen and
per-image time ids (`t2i_jax.train.sdxl_cond`), and exported as a
StableDiffusionXLPipeline folder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from t2i_jax import data as data_lib
from t2i_jax import parallel, schedulers
from t2i_jax.convert import clip as clip_convert
from t2i_jax.convert import diffusers as diffusers_convert
from t2i_jax.convert.load import load_components
from t2i_jax.models import clip as clip_lib
from t2i_jax.models import unet as unet_lib
from t2i_jax.models import vae as vae_lib
from t2i_jax.models.bundle import StableDiffusion
from t2i_jax.schedulers.schedule import SD_SCHEDULER
from t2i_jax.tokenizer import Tokenizer
from t2i_jax.train import config as config_lib
from t2i_jax.train import dreambooth as dreambooth_lib
from t2i_jax.train import export as export_lib
from t2i_jax.train import inputs, sdxl_cond
from t2i_jax.train import loop as loop_lib
from t2i_jax.train import lora as lora_lib
from t2i_jax.train import state as state_lib
from t2i_jax.train import workdir as workdir_lib
from t2i_jax.train.ldm_cache import CacheIterator, build_cache, put_global
from t2i_jax.train.metrics import MetricWriter

log = logging.getLogger(__name__)


# ===========================================================================
# Config
# ===========================================================================

def default_config() -> ml_collections.ConfigDict:
    """Every key this trainer reads, with defaults; a config file changes what it needs."""
    c = config_lib.base_config()  # seed, data, batch_size, train, optim, ema_decay, mesh, export, progress
    c.objective = "ldm"
    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""  # SD pipeline folder / hub id / single file: every component from it
    c.model.vae_from = ""  # with init_from: a diffusers VAE (folder / hub id) replacing its VAE
    c.model.unet = "tiny"  # from scratch: a UNetConfig.named variant ...
    c.model.overrides = ml_collections.ConfigDict()  # ... with these UNetConfig fields changed
    c.model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators); params stay fp32
    c.model.remat = False  # recompute U-Net blocks in the backward pass (less memory)
    c.model.attention_impl = ""  # "" (XLA), "cudnn", or "auto" (cuDNN where it applies)
    c.vae = ml_collections.ConfigDict()
    c.vae.path = ""  # diffusers VAE folder, or a folder with vae/ (a VAE export); "" without init_from:
    c.vae.name = "tiny"  # ... a random VAE of this variant, frozen at init (smoke tests only)
    c.text_encoder = ml_collections.ConfigDict()
    c.text_encoder.path = ""  # transformers CLIP(Text)Model folder (e.g. a clip_shapes export); "": ...
    c.text_encoder.name = "tiny"  # ... a from-scratch CLIP text tower of this variant, frozen at init,
    c.text_encoder.overrides = ml_collections.ConfigDict()  # with these CLIPTextConfig (HF) fields
    c.scheduler = ml_collections.ConfigDict(dict(SD_SCHEDULER))  # noise schedule (init_from brings its own)
    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.prediction_type = "epsilon"  # or "v_prediction"; "" keeps the scheduler config's
    c.diffusion.snr_gamma = 0.0  # min-SNR-gamma loss weighting; 0 off (5.0 is the paper's)
    # A floor under the SNR an example's loss is weighted by (in x0 terms): epsilon's MSE weighs an
    # x0 error by SNR, ~0.005 at t = 999, so what only the noisiest steps decide (layout, colour) is
    # learnt last; with a floor f the weight is max(SNR, f) / SNR (v: / (SNR + 1)). 0 off.
    c.diffusion.snr_floor = 0.0
    c.diffusion.noise_offset = 0.0  # noise += offset * N(0, 1) per (example, channel); 0 off
    # Timesteps drawn uniformly, or with the ones of one part of the schedule `timestep_bias_multiplier`
    # times as likely (diffusers' --timestep_bias_strategy): "later" the noisiest `timestep_bias_portion`
    # of them (where a sample's layout and colours are decided), "earlier" the least noisy, "range"
    # [timestep_bias_begin, timestep_bias_end).
    c.diffusion.timestep_bias = ""  # "", "later", "earlier" or "range"
    c.diffusion.timestep_bias_multiplier = 1.0
    c.diffusion.timestep_bias_portion = 0.25
    c.diffusion.timestep_bias_begin = 0
    c.diffusion.timestep_bias_end = 1000
    c.diffusion.caption_dropout = 0.1  # share of captions replaced by "" (classifier-free guidance)
    c.cache = ml_collections.ConfigDict()
    c.cache.enabled = False  # encode the dataset once through the frozen VAE + text encoder
    c.cache.size = 0  # records to cache; 0: the whole (finite) source
    c.cache.batch_size = 64  # encoding batch
    c.optim.lr = 1e-4
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-2
    c.optim.warmup_steps = 100
    c.optim.end_lr_factor = 1.0  # constant after warm-up, as SD fine-tuning recipes
    c.ema_decay = 0.9999
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # sample images every N steps (0: only at the end)
    c.eval.prompts = ["a photo"]
    c.eval.steps = 25  # sampler steps
    c.eval.scheduler = "ddim"
    c.eval.guidance_scale = 3.0
    c.eval.seed = 0
    c.eval.use_ema = True  # sample and export the EMA params (when ema_decay > 0)
    c.dreambooth = dreambooth_lib.default_config()  # instance + class prompts, prior preservation (off)
    c.lora = lora_lib.default_config()  # rank > 0: train LoRA adapters only (t2i_jax.train.lora)
    return c


# ===========================================================================
# Data
# ===========================================================================

def make_source(config):
    """The training source from `config.data`."""
    dcfg = {k: v for k, v in config.data.to_dict().items() if v != ""}
    dcfg["global_batch_size"] = config.batch_size
    return data_lib.source_from_config(dcfg), dcfg


def make_stream(config, source, dcfg, tokenizer, tokenizer_2=None):
    """The per-host grain loader: images and their captions' token ids (tokenized by the loader's
    workers, not on the train loop's thread). SDXL (`tokenizer_2`): also the second tokenizer's ids
    and each image's original size and crop."""
    return data_lib.make_loader(source, global_batch_size=config.batch_size, resolution=dcfg["resolution"],
                                tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                size_conditioning=tokenizer_2 is not None, **inputs.loader_kwargs(dcfg))


# ===========================================================================
# Model
# ===========================================================================

def _text_encoder(config, kw):
    tc = config.text_encoder
    if tc.path:
        te, te_params = export_lib.text_encoder_for_export(*clip_convert.load_clip(tc.path, tower="text", **kw))
        folder = Path(tc.path)
        max_len = te.config.max_position_embeddings
        tok = (Tokenizer.from_pretrained(folder, max_length=max_len) if (folder / "vocab.json").exists()
               else Tokenizer.bundled(max_length=max_len))
        return tok, te, te_params
    hf = config_lib.merge_dicts(clip_lib.named_config(tc.name).text.to_hf(), tc.overrides.to_dict())
    te = clip_lib.CLIPTextModel(clip_lib.CLIPTextConfig.from_hf(hf), False, **kw)
    log.warning("no text_encoder.path: a from-scratch %s CLIP text tower, frozen at its random init", tc.name)
    params = jax.jit(te.init)(jax.random.PRNGKey(config.seed + 1), *clip_lib.dummy_inputs(te))["params"]
    return Tokenizer.bundled(max_length=te.config.max_position_embeddings), te, jax.device_get(params)


def make_parts(config) -> dict:
    """{"tokenizer", "text_encoder", "vae", "unet", "scheduler_config", "params": {text_encoder, vae, unet
    (host params or None: from scratch)}}; an SDXL `init_from` adds "tokenizer_2", "text_encoder_2"
    (params too) and "pipeline_options"."""
    m = config.model
    dtype = jnp.dtype(m.dtype)
    kw = dict(dtype=dtype, attention_impl=m.attention_impl or None)
    if m.init_from:
        pipe = load_components(m.init_from, dtype=dtype, attention_impl=m.attention_impl or None,
                               vae=m.get("vae_from") or None)
        return parts_from_pipeline(pipe, config)
    if m.get("vae_from"):
        raise ValueError(f"model.vae_from {m.vae_from!r} replaces the VAE of model.init_from, which is not set; "
                         "set model.init_from, or vae.path for a from-scratch U-Net")
    tokenizer, te, te_params = _text_encoder(config, kw)
    if config.vae.path:
        vae, vae_params = diffusers_convert.load_vae(config.vae.path, dtype=dtype)
    else:
        log.warning("no vae.path: a random %s VAE, frozen at init (train one with configs/shapes_vae.py)",
                    config.vae.name)
        vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig.named(config.vae.name), dtype=dtype)
        side = vae.config.downsample_factor
        vae_params = jax.device_get(jax.jit(vae.init)(jax.random.PRNGKey(config.seed + 2),
                                                      jnp.zeros((1, side, side, 3)))["params"])
    ucfg = unet_lib.UNetConfig.named(m.unet)
    # The U-Net's text width and latent channels follow the frozen parts.
    fields = {"cross_attention_dim": te.config.hidden_size, "in_channels": vae.config.latent_channels,
              "out_channels": vae.config.latent_channels,
              "sample_size": config.data.resolution // vae.config.downsample_factor, **m.overrides.to_dict()}
    ucfg = dataclasses.replace(ucfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    unet = unet_lib.UNet2DConditionModel(ucfg, remat=m.remat, **kw)
    sched = config.scheduler.to_dict()
    if config.diffusion.prediction_type:
        sched["prediction_type"] = config.diffusion.prediction_type
    return {"tokenizer": tokenizer, "text_encoder": te, "vae": vae, "unet": unet, "scheduler_config": sched,
            "params": {"text_encoder": te_params, "vae": vae_params, "unet": None}}


def to_latents(vae_config, z):
    """VAE sample -> U-Net latent space: (z - shift) * scaling_factor."""
    return (z - (vae_config.shift_factor or 0.0)) * vae_config.scaling_factor


def diffusion_loss(model_output, x0, noise, timesteps, alphas_cumprod, *, prediction_type: str = "epsilon",
                   snr_gamma: float = 0.0, snr_floor: float = 0.0, per_example: bool = False):
    """Mean over the batch of (weighted) per-example MSE between the U-Net output and its target
    (`per_example`: the [B] values, not their mean).

    target: `noise` ("epsilon") or v = sqrt(abar) noise - sqrt(1 - abar) x0 ("v_prediction").
    With `snr_gamma` > 0, example b is weighted by min(SNR_b, gamma) / SNR_b (epsilon) or
    min(SNR_b, gamma) / (SNR_b + 1) (v), SNR = abar / (1 - abar) at its timestep (min-SNR-gamma).
    With `snr_floor` > 0 the SNR in the numerator is first raised to at least `snr_floor`.
    """
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = schedulers.get_velocity(alphas_cumprod, x0, noise, timesteps)
    else:
        raise ValueError(f"prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'")
    err = jnp.mean(jnp.square(model_output.astype(jnp.float32) - target.astype(jnp.float32)),
                   axis=tuple(range(1, x0.ndim)))
    if (snr_gamma and snr_gamma > 0) or (snr_floor and snr_floor > 0):
        abar = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps]
        snr = abar / (1.0 - abar)
        clipped = jnp.minimum(snr, snr_gamma) if snr_gamma and snr_gamma > 0 else snr
        if snr_floor and snr_floor > 0:
            clipped = jnp.maximum(clipped, snr_floor)
        err = err * (clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0))
    return err if per_example else jnp.mean(err)


def timestep_weights(num_t: int, dc) -> np.ndarray | None:
    """The probability of each of `num_t` training timesteps under `dc` (config.diffusion)'s timestep
    bias, or None when they are drawn uniformly."""
    strategy = dc.get("timestep_bias", "") or ""
    if strategy in ("", "none"):
        return None
    mult = float(dc.get("timestep_bias_multiplier", 1.0))
    if mult <= 0:
        raise ValueError(f"diffusion.timestep_bias_multiplier {mult} must be > 0 (1.0: no bias; 5.0: five times "
                         "as likely)")
    if strategy in ("later", "earlier"):
        portion = float(dc.get("timestep_bias_portion", 0.25))
        if not 0.0 < portion <= 1.0:
            raise ValueError(f"diffusion.timestep_bias_portion {portion} must be in (0, 1]: the share of the "
                             f"{num_t} timesteps biased")
        n = max(1, int(portion * num_t))
        lo, hi = (num_t - n, num_t) if strategy == "later" else (0, n)
    elif strategy == "range":
        lo, hi = int(dc.get("timestep_bias_begin", 0)), int(dc.get("timestep_bias_end", num_t))
        if not 0 <= lo < hi <= num_t:
            raise ValueError(f"diffusion.timestep_bias_begin/end {lo}/{hi}: need 0 <= begin < end <= {num_t}")
    else:
        raise ValueError(f"diffusion.timestep_bias {strategy!r}: use '', 'later', 'earlier' or 'range'")
    w = np.ones(num_t, np.float64)
    w[lo:hi] *= mult
    return (w / w.sum()).astype(np.float32)


def draw_timesteps(key, b: int, num_t: int, weights: np.ndarray | None = None) -> jax.Array:
    """[b] int32 training timesteps: uniform over `num_t`, or drawn with `timestep_weights`' `weights`."""
    if weights is None:
        return jax.random.randint(key, (b,), 0, num_t)
    return jax.random.categorical(key, jnp.log(jnp.asarray(weights)), shape=(b,)).astype(jnp.int32)


# ===========================================================================
# Step (the shared tail is t2i_jax.train.loop)
# ===========================================================================

def batch_keys(cached: bool, xl: bool = False) -> tuple[str, ...]:
    """The host arrays of a train batch: cached posteriors and text states, or images and token ids
    (`xl`: SDXL's, `sdxl_cond.batch_keys`)."""
    if xl:
        return sdxl_cond.batch_keys(cached)
    return ("mean", "std", "context") if cached else ("image", "input_ids")


def make_objective(parts, config, cached: bool, empty_ids, empty_context, empty_pooled=None) -> loop_lib.Objective:
    """The diffusion loss of the U-Net on (micro-)batches conditioned by the frozen VAE and text encoder
    (SDXL: both encoders and time ids; `empty_ids` is then `sdxl_cond.empty_ids`' pair)."""
    dc = config.diffusion
    unet, vae, te = parts["unet"], parts["vae"], parts["text_encoder"]
    abar = jnp.asarray(schedulers.from_config("ddpm", parts["scheduler_config"]).alphas_cumprod)
    num_t = abar.shape[0]
    prediction = parts["scheduler_config"]["prediction_type"]
    lo = lora_lib.enabled(config)  # params are then {"unet": adapters[, "text_encoder": adapters]}
    lora_kw = dict(lora_scale=lora_lib.scale(config), dropout=float(config.lora.dropout)) if lo else {}
    xl = sdxl_cond.is_sdxl(unet)
    t_weights = timestep_weights(num_t, dc)

    def augment(frozen, batch, key):
        """The step's randomness for the whole batch: timesteps, noise, posterior noise, caption dropout."""
        del frozen
        k_t, k_noise, k_off, k_drop, k_z = jax.random.split(key, 5)
        b = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if cached:
            lat_shape = batch["mean"].shape
        else:
            f = vae.config.downsample_factor
            lat_shape = (b, batch["image"].shape[1] // f, batch["image"].shape[2] // f, vae.config.latent_channels)
        rnd = {"t": draw_timesteps(k_t, b, num_t, t_weights), "noise": jax.random.normal(k_noise, lat_shape),
               "eps_z": jax.random.normal(k_z, lat_shape),
               "drop": jax.random.uniform(k_drop, (b,)) < dc.caption_dropout}
        if dc.noise_offset:
            rnd["noise"] = rnd["noise"] + dc.noise_offset * jax.random.normal(k_off, (b, 1, 1, lat_shape[-1]))
        if lo and lora_kw["dropout"]:  # per-example keys: micro-batches draw what the whole batch does
            rnd["lora_rng"] = jax.random.split(jax.random.fold_in(key, 7), b)
        return {**batch, **rnd}

    def condition(frozen, mb, te_adapters=None):
        """(latents, text states, SDXL's added_cond_kwargs or None) of a micro-batch, with its caption
        dropout applied (and the text encoder's LoRA adapters, whose gradients then flow through it)."""
        drop = mb["drop"]
        z = mb["mean"] + mb["std"] * mb["eps_z"] if cached else None
        if z is None:
            post = vae.apply({"params": frozen["vae"]}, mb["image"], method=vae.encode)
            z = post.mean + post.std * mb["eps_z"]
        x0 = jax.lax.stop_gradient(to_latents(vae.config, z))
        if xl:
            ctx, added = sdxl_cond.condition(parts, frozen, mb, cached=cached,
                                             empty=empty_context if cached else empty_ids, empty_pooled=empty_pooled)
            return x0, jax.lax.stop_gradient(ctx), jax.lax.stop_gradient(added)
        if cached:
            ctx = jnp.where(drop[:, None, None], jnp.asarray(empty_context)[None].astype(mb["context"].dtype),
                            mb["context"])
        else:
            ids = jnp.where(drop[:, None], jnp.asarray(empty_ids)[None], mb["input_ids"])
            ctx = lora_lib.apply(te, {"params": frozen["text_encoder"]}, te_adapters, ids, rng=mb.get("lora_rng"),
                                 **lora_kw).last_hidden_state
        return x0, ctx if te_adapters else jax.lax.stop_gradient(ctx), None

    def loss_fn(params, frozen, mb, step):
        del step
        x0, ctx, added = condition(frozen, mb, params.get("text_encoder") if lo else None)
        xt = schedulers.add_noise(abar, x0, mb["noise"], mb["t"])
        args = (xt, mb["t"], ctx) + ((added,) if added is not None else ())
        if lo:
            out = lora_lib.apply(unet, {"params": frozen["unet"]}, params.get("unet"), *args, rng=mb.get("lora_rng"),
                                 **lora_kw)
        else:
            out = unet.apply({"params": params}, *args)
        errors = lambda gamma: diffusion_loss(out, x0, mb["noise"], mb["t"], abar, prediction_type=prediction,  # noqa: E731
                                              snr_gamma=gamma, snr_floor=dc.get("snr_floor", 0.0),
                                              per_example=True)
        if config.dreambooth.enabled:  # instance + prior_loss_weight * class loss
            loss, aux = dreambooth_lib.prior_preservation_loss(errors(dc.snr_gamma), errors(0.0), mb["is_class"],
                                                               config)
        else:
            loss, aux = jnp.mean(errors(dc.snr_gamma)), {}
        return loss, {"latent_std": jnp.std(x0), **aux}

    return loop_lib.Objective("ldm", loss_fn, batch_keys(cached, xl) + dreambooth_lib.batch_keys(config),
                              augment=augment)


def make_optimizer(config, total_steps: int):
    """(tx, schedule) from `config.optim` over `total_steps`."""
    return state_lib.make_optimizer(ml_collections.ConfigDict({**config.optim.to_dict(), "total_steps": total_steps}))


def setup_step(parts, config, mesh, *, cached: bool, total_steps: int, empty_context=None, empty_pooled=None
               ) -> dict:
    """The trainer's step and the layout around it, for `train_and_evaluate` and the benchmark.

    Returns {"step_fn" (jitted `(state, acc, frozen, batch) -> (state, acc)`, state and accumulator
    donated), "objective", "tx", "schedule", "init" (params -> fresh state, traceable),
    "abstract_state", "shardings" (of the state), "frozen_shardings", "empty_ids", "lora_targets"
    (None without LoRA)}. With LoRA, frozen holds "unet" too (`lora.frozen_base`); with SDXL
    "text_encoder_2" too, and cached runs take the "" caption's pooled embedding (`empty_pooled`).
    """
    unet = parts["unet"]
    tx, schedule = make_optimizer(config, total_steps)
    init = lambda params: state_lib.create_state(params, tx, ema=config.ema_decay > 0, seed=config.seed)  # noqa: E731
    if lora_lib.enabled(config):  # the adapters are the params; the base U-Net is frozen
        targets, abstract_params = lora_lib.abstract_adapters(parts["params"], config)
    else:
        targets, abstract_params = None, jax.eval_shape(unet.init, jax.random.PRNGKey(0),
                                                        *unet_lib.dummy_inputs(unet.config))["params"]
    xl = sdxl_cond.is_sdxl(unet)
    frozen_keys = ("vae", "text_encoder") + (("text_encoder_2",) if xl else ()) + (("unet",) if targets else ())
    abstract_state = jax.eval_shape(init, abstract_params)
    shardings = state_lib.state_shardings(abstract_state, parallel.DEFAULT_RULES, mesh, config.mesh.fsdp_min_size)
    frozen_sh = {k: jax.tree_util.tree_map(lambda _: parallel.replicated(mesh), parts["params"][k])
                 for k in frozen_keys}
    empty_ids = sdxl_cond.empty_ids(parts) if xl else parts["tokenizer"]([""])[0]
    objective = make_objective(parts, config, cached, empty_ids, empty_context, empty_pooled)
    step_fn = loop_lib.make_train_step(objective, tx, schedule, config, mesh, shardings, frozen_sh)
    return {"step_fn": step_fn, "objective": objective, "tx": tx, "schedule": schedule, "init": init,
            "abstract_state": abstract_state, "shardings": shardings, "frozen_shardings": frozen_sh,
            "empty_ids": empty_ids, "lora_targets": targets}


def parts_from_pipeline(pipe: StableDiffusion, config) -> dict:
    """`make_parts`'s dict for a loaded `StableDiffusion` (the benchmark's model)."""
    sched = dict(pipe.scheduler_config)
    if config.diffusion.prediction_type:
        sched["prediction_type"] = config.diffusion.prediction_type
    parts = {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder, "vae": pipe.vae,
             "unet": pipe.unet.clone(remat=config.model.remat), "scheduler_config": sched, "params": dict(pipe.params)}
    if pipe.is_sdxl:
        parts.update(tokenizer_2=pipe.tokenizer_2, text_encoder_2=pipe.text_encoder_2,
                     pipeline_options=dict(pipe.pipeline_options))
    return parts


# ===========================================================================
# Eval: sample images; export
# ===========================================================================

def build_pipeline(parts, unet_params, source: str = "") -> StableDiffusion:
    """A `StableDiffusion` of the frozen parts and these U-Net params (host arrays)."""
    return StableDiffusion(parts["tokenizer"], parts["text_encoder"], parts["unet"].clone(remat=False),
                           parts["vae"], {**parts["params"], "unet": unet_params}, parts["scheduler_config"],
                           source=source, tokenizer_2=parts.get("tokenizer_2"),
                           text_encoder_2=parts.get("text_encoder_2"),
                           pipeline_options=dict(parts.get("pipeline_options", {})))


class SampleWriter:
    """Samples one image per `eval.prompts` on this host's first device and writes a PNG grid.

    One `pipeline.Sampler` serves every eval of a run: new U-Net params replace the old ones in
    it, so the sampling loop compiles once, at the first eval.
    """

    def __init__(self, parts, config):
        self.parts, self.config, self.sampler = parts, config, None

    def __call__(self, unet_params, path: Path, text_encoder_params=None) -> np.ndarray:
        from PIL import Image

        from t2i_jax import pipeline

        params = {**self.parts["params"], "unet": unet_params}
        if text_encoder_params is not None:  # a text encoder with LoRA merged in
            params["text_encoder"] = text_encoder_params
        if self.sampler is None:
            pipe = build_pipeline(self.parts, unet_params)
            pipe.params = params
            self.sampler = pipeline.Sampler(pipe, mesh=parallel.make_mesh(devices=jax.local_devices()[:1]))
        else:
            self.sampler.update_params(params)
        config = self.config
        prompts = list(config.eval.prompts)
        side = int(config.data.resolution)
        images = self.sampler(prompts, seeds=[config.eval.seed + i for i in range(len(prompts))],
                              steps=config.eval.steps, guidance_scale=config.eval.guidance_scale,
                              scheduler=config.eval.scheduler, height=side, width=side)
        cols = min(len(prompts), 8)
        rows = -(-len(prompts) // cols)
        grid = np.ones((rows * side, cols * side, 3), np.float32)
        for i, img in enumerate(images):
            r, c = divmod(i, cols)
            grid[r * side:(r + 1) * side, c * side:(c + 1) * side] = img
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(pipeline.to_uint8(grid)).save(tmp)
        os.replace(tmp, path)
        return images


# ===========================================================================
# Loop
# ===========================================================================

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains the U-Net per `config` in `workdir` (resuming from its latest checkpoint), samples, exports.

    Returns {"step", "stopped" (None | "signal" | "preempt_at_step"), "state", "samples" (the last
    sample images or None), "skipped_images", "compile_seconds"}. Raises FloatingPointError on a
    non-finite loss, gradient norm or update.
    """
    dream = dreambooth_lib.DreamBooth(config) if config.dreambooth.enabled else None  # checked before anything loads
    workdir, is_main, ckpt, start = workdir_lib.open_run(config, workdir)

    # --- model, data -------------------------------------------------------
    parts = make_parts(config)
    unet, vae, tokenizer = parts["unet"], parts["vae"], parts["tokenizer"]
    xl = sdxl_cond.is_sdxl(unet)
    if xl:
        sdxl_cond.check(config, parts)
    res = int(config.data.resolution)
    if res % (vae.config.downsample_factor * 2 ** (len(unet.config.block_out_channels) - 1)):
        raise ValueError(f"data.resolution {res} must be a multiple of the VAE factor {vae.config.downsample_factor}"
                         f" times the U-Net's {2 ** (len(unet.config.block_out_channels) - 1)}")
    if dream is None:
        source, dcfg = make_source(config)
    else:  # class images made once by the model before training, then instance + class records
        source, dcfg = dream.prepare(workdir, build_pipeline(parts, parts["params"]["unet"]), is_main=is_main)
    total_steps = int(config.train.steps)
    if total_steps <= 0:
        total_steps = math.ceil(config.train.epochs * (dream.epoch_size if dream else len(source)) / config.batch_size)

    # --- sharding ----------------------------------------------------------
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, num_devices=config.mesh.num_devices)
    n_dev = mesh.devices.size
    if config.batch_size % n_dev or (config.batch_size // config.train.grad_accum) % n_dev:
        raise ValueError(f"batch_size {config.batch_size} / grad_accum {config.train.grad_accum} must be a multiple "
                         f"of the {n_dev} devices")
    lo = lora_lib.enabled(config)
    frozen_host = {k: parts["params"][k] for k in ("vae", "text_encoder") + (("text_encoder_2",) if xl else ())}
    if lo and parts["params"]["unet"] is not None:  # the base weights, frozen in the compute dtype
        frozen_host = lora_lib.frozen_params(parts["params"], config)
    frozen = put_global(frozen_host, jax.tree_util.tree_map(lambda _: parallel.replicated(mesh), frozen_host))

    cached = bool(config.cache.enabled)
    if cached and lo and config.lora.text_encoder_targets:
        log.warning("cache.enabled with lora.text_encoder_targets %r: the text encoder is trained, so its states "
                    "cannot be cached; streaming images and captions instead (cache off)",
                    config.lora.text_encoder_targets)
        cached = False
    if cached:
        cache = build_cache(config, source, res, parts, tokenizer, frozen, mesh)
        it = CacheIterator(cache, config.batch_size, int(dcfg.get("seed", 0))) if dream is None else \
            dream.cached_iterator(cache)
        empty_context, skipped = cache["empty"], (lambda n=len(cache["skipped"]): n)
    elif dream is not None:
        it, empty_context, skipped = dream.stream_iterator(tokenizer), None, (lambda: 0)
    else:
        loader = make_stream(config, source, dcfg, tokenizer, parts.get("tokenizer_2"))
        it, empty_context, skipped = iter(loader), None, loader.skipped_count
    prepare = sdxl_cond.stream_prepare(res, sdxl_cond.num_time_ids(parts)) if xl and not cached else None
    run = setup_step(parts, config, mesh, cached=cached, total_steps=total_steps, empty_context=empty_context,
                     empty_pooled=cache.get("empty_pooled") if cached else None)
    shardings, init = run["shardings"], run["init"]

    # --- checkpoint: resume or start -------------------------------------------
    def fresh():
        host_params = parts["params"]["unet"]
        if lo:
            return jax.jit(lambda k: init(lora_lib.init_adapters(k, run["lora_targets"], int(config.lora.rank))),
                           out_shardings=shardings)(jax.random.PRNGKey(config.seed))
        if host_params is None:
            return jax.jit(lambda k: init(unet.init(k, *unet_lib.dummy_inputs(unet.config))["params"]),
                           out_shardings=shardings)(jax.random.PRNGKey(config.seed))
        return jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=(0,))(
            put_global(host_params, shardings.params))

    state, start = loop_lib.init_or_resume(ckpt, start, fresh, run["abstract_state"], shardings, it)
    base = dict(parts["params"]) if lo else None  # LoRA: the host base weights, merged with the adapters to sample
    parts["params"]["unet"] = None

    def eval_params(trained) -> dict:
        """(host) trained params -> {"unet", "text_encoder"} host params to sample and export."""
        merged = lora_lib.merged_params(base, trained, run["lora_targets"], lora_lib.scale(config)) if lo else None
        return merged or {"unet": trained, "text_encoder": None}

    # --- loop --------------------------------------------------------------
    writer = MetricWriter(workdir, enabled=is_main, start=start)
    use_ema = config.ema_decay > 0 and config.eval.use_ema
    sample_writer = SampleWriter(parts, config)
    samples = None

    def sample(step, state):
        nonlocal samples
        host = eval_params(parallel.to_host(state.ema_params if use_ema else state.params))  # a collective
        if is_main:
            samples = sample_writer(host["unet"], workdir / "samples" / f"step_{step}.png", host["text_encoder"])

    evals = [(int(config.eval.every), sample)] if config.eval.prompts else []
    try:
        state, stopped, loop = loop_lib.fit(
            run["objective"], config, tx=run["tx"], schedule=run["schedule"], mesh=mesh, ckpt=ckpt, writer=writer,
            is_main=is_main, state=state, state_shardings=shardings, frozen=frozen,
            frozen_shardings=run["frozen_shardings"], data_iter=it, start=start, total_steps=total_steps,
            prepare=prepare, evals=evals, skipped=skipped)
    finally:
        writer.close()
        ckpt.close()
    final_step = int(jax.device_get(state.step))

    # --- eval after, export ----------------------------------------------------
    if stopped is None and (config.eval.prompts or config.export):
        trained = parallel.to_host(state.ema_params if use_ema else state.params)
        host = eval_params(trained)
        if is_main:
            if config.eval.prompts:
                samples = sample_writer(host["unet"], workdir / "samples" / f"step_{final_step}.png",
                                        host["text_encoder"])
            if config.export and lo:  # the adapters alone, as diffusers/PEFT and kohya files
                export_lib.export_lora(lora_lib.to_layers(trained, run["lora_targets"], lora_lib.scale(config)),
                                       workdir / "export")
            elif config.export:
                pipe = build_pipeline(parts, host["unet"], source=str(workdir / "export"))
                pipe.unet = pipe.unet.clone(config=export_lib.with_sample_size(unet.config,
                                                                               res // vae.config.downsample_factor))
                export_lib.export_pipeline(pipe, workdir / "export")
    return {"step": final_step, "stopped": stopped, "state": state, "samples": samples,
            "skipped_images": skipped(), "compile_seconds": loop.compile_seconds}
