"""Throughput of the U-Net forward, the whole sampler and the latent-diffusion trainer's step.

Each mode builds a named model (`tiny`, `sd15`, `sd21`, `sdxl`, `tiny-sdxl`;
SDXL with both text encoders, its pooled text and time ids, modes unet and
sample only) with random weights, shards the batch over every device (or the
first `num_devices`) of `parallel.make_mesh()` (the mesh
the sampler and the trainers use; params replicated), compiles once (timed), warms up,
then times `iters` calls, each ended by `block_until_ready` (or the host copy
of the images, for sampling). What runs is the product's code: the sampler
mode calls `pipeline.Sampler` itself.

FLOPs come from XLA's cost analysis:
  unet, train, train_stream: the compiled program (one device's share of
               the batch) / the per-device batch. train and train_stream time
               `t2i_jax.train.ldm`'s own jitted step, on cached latents and on
               images + token ids (frozen VAE encoder and text encoder inside).
  sample:      assembled, because XLA counts a `fori_loop` body once:
               text encoder x (2 with CFG; 1 for SDXL's base, which zeros
               the empty negative prompt) + model evaluations x U-Net at the
               CFG batch + VAE decode, from separately lowered (global)
               pieces, / the global batch. The loop program's own count is
               kept as `loop_xla_flops` (one body + decode) for reference.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from t2i_jax import parallel, pipeline, schedulers
from t2i_jax import sdxl as sdxl_lib
from t2i_jax.bench import devices as devices_lib
from t2i_jax.bench import flops as flops_lib
from t2i_jax.bench import profile as profile_lib
from t2i_jax.bench.models import (  # noqa: F401  (MODELS and ModelSpec have long been core's)
    HOST_DRAW_MAX,
    MODELS,
    ModelSpec,
    abstract_params,
    lower_sample_loop,
    model_parts,
    random_params,
)
from t2i_jax.models import clip as clip_lib
from t2i_jax.models import layers
from t2i_jax.models import unet as unet_lib

MODES = ("unet", "sample", "train", "train_stream")
# Modes the diffusers reference also runs (train_stream has no counterpart there).
REFERENCE_MODES = ("unet", "sample", "train")
SDXL_MODES = ("unet", "sample")  # the LDM trainer has no SDXL step (yet)
ATTENTION = ("auto", "xla", "cudnn")
PROMPT = "a photograph of an astronaut riding a horse on the moon"

# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """One benchmark run. None means "the usual value for this model/device"."""

    model: str = "tiny"  # one of MODELS
    resolution: int | None = None  # image side in pixels (default: the model's native size)
    steps: int = 50  # sampler steps (PNDM runs steps + 1 model evaluations)
    num_devices: int | None = None  # use the first N devices (default: all)
    batch_size: int | None = None  # global batch (default: one per device)
    dtype: str | None = None  # compute dtype "bf16"/"fp32" (default: bf16 on GPU/TPU, fp32 on CPU)
    modes: tuple[str, ...] = MODES
    attention: str = "auto"  # "auto" (cuDNN flash attention where it applies, else XLA), "xla" or "cudnn"
    warmup: int = 2  # untimed calls after compilation
    iters: int = 10  # timed calls
    scheduler: str | None = None  # sampler (default: the model's pipeline's, PNDM for SD, Euler for SDXL)
    guidance_scale: float = 7.5  # > 1: classifier-free guidance, the U-Net runs on 2x the batch
    unet_cfg: bool = False  # unet mode: run the CFG-sized batch (2x), as sampling does
    remat: bool = False  # train mode: recompute block activations in the backward pass
    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    compare: str | None = None  # "diffusers": the same work in PyTorch in the same run
    torch_compile: bool = False
    torch_dtype: str | None = None  # fp16/bf16/fp32 (default: ours on CUDA, fp32 on CPU)
    peak_tflops: float | None = None  # override the datasheet peak per device
    measure_peak: bool = True  # time a dense matmul for a measured ceiling
    seed: int = 0
    profile: str | None = None  # folder: a profiler trace of `profile_iters` more calls of each mode
    profile_iters: int = 3


def _is_positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def validate(s: BenchSettings, num_devices: int) -> None:
    """Raises ValueError naming the bad setting, its value and the fix."""
    if s.model not in MODELS:
        raise ValueError(f"unknown model {s.model!r}; choose one of {sorted(MODELS)}")
    if s.resolution is not None:
        if not _is_positive_int(s.resolution):
            raise ValueError(f"resolution {s.resolution!r} must be a positive integer multiple of 8, e.g. 512")
        pipeline.check_size("resolution", s.resolution, 8)
    if s.batch_size is not None:
        if not _is_positive_int(s.batch_size):
            raise ValueError(f"batch size {s.batch_size!r} must be a positive integer, e.g. {num_devices}")
        if s.batch_size % num_devices:
            lo = s.batch_size // num_devices * num_devices
            hint = f"{lo} or {lo + num_devices}" if lo else f"{num_devices}"
            raise ValueError(f"batch size {s.batch_size} does not divide over {num_devices} devices; use {hint}")
    if not s.modes:
        raise ValueError(f"no modes given; choose from {', '.join(MODES)}")
    for m in s.modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if MODELS[s.model].is_sdxl:
        train = [m for m in s.modes if m not in SDXL_MODES]
        if train:
            raise ValueError(f"mode {train[0]!r} is not available for {s.model}: the bench's train modes build "
                             "SD 1.x/2.x steps only (SDXL trains with configs/sdxl_finetune.py); "
                             f"use --modes {','.join(SDXL_MODES)}")
    if s.dtype not in (None, "bf16", "fp32"):
        raise ValueError(f"dtype {s.dtype!r} is not bf16 or fp32")
    if s.attention not in ATTENTION:
        raise ValueError(f"attention {s.attention!r} is not one of {', '.join(ATTENTION)}")
    if s.attention == "cudnn" and s.dtype == "fp32":
        raise ValueError("attention 'cudnn' needs bf16 compute; use --dtype bf16, or --attention auto "
                         "(cuDNN where it applies) or xla")
    for name in ("steps", "iters", "profile_iters"):
        if not _is_positive_int(getattr(s, name)):
            raise ValueError(f"{name} {getattr(s, name)!r} must be a positive integer")
    if not isinstance(s.warmup, int) or s.warmup < 0:
        raise ValueError(f"warmup {s.warmup!r} must be an integer >= 0")
    if s.compare not in (None, "diffusers"):
        raise ValueError(f"--compare {s.compare!r}: only 'diffusers' is supported")
    if s.torch_dtype not in (None, "fp16", "bf16", "fp32"):
        raise ValueError(f"torch dtype {s.torch_dtype!r} is not fp16, bf16 or fp32")
    if s.scheduler is not None and s.scheduler not in schedulers.SCHEDULERS:
        raise ValueError(f"unknown scheduler {s.scheduler!r}; choose one of {sorted(schedulers.SCHEDULERS)}")
    pipeline.check_settings(s.steps, s.guidance_scale)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The settings with every default filled in for this model and device set."""

    model: str
    resolution: int
    latent: int  # latent side
    batch_size: int
    per_device_batch: int
    num_devices: int
    dtype: str
    platform: str
    scheduler: str  # the sampler of the sample mode


def resolve(s: BenchSettings, devices: Sequence[jax.Device]) -> Resolved:
    """Fills the defaults (validating first); `s.num_devices` keeps the first N of `devices`."""
    if s.num_devices is not None:
        if not _is_positive_int(s.num_devices) or s.num_devices > len(devices):
            raise ValueError(f"num_devices {s.num_devices!r} must be a positive integer up to the {len(devices)} "
                             f"devices here, e.g. 1")
        devices = list(devices)[:s.num_devices]
    n = len(devices)
    validate(s, n)
    spec = MODELS[s.model]
    ucfg = spec.unet_config()
    factor = spec.vae_config().downsample_factor
    res = s.resolution or ucfg.sample_size * factor  # 512 sd15, 768 sd21, 1024 sdxl
    bs = s.batch_size or n
    platform = devices[0].platform
    dtype = s.dtype or ("fp32" if platform == "cpu" else "bf16")
    return Resolved(s.model, res, res // factor, bs, bs // n, n, dtype, platform, s.scheduler or spec.scheduler)


# --------------------------------------------------------------------------
# Model with random weights
# --------------------------------------------------------------------------


def build_model(s: BenchSettings, r: Resolved, mesh, *, remat: bool = False) -> pipeline.StableDiffusion:
    """A StableDiffusion of the named configs with random replicated params."""
    parts = model_parts(s.model, devices_lib.dtype_of(r.dtype), s.attention, remat=remat)
    repl = NamedSharding(mesh, P())
    key = jax.random.key(s.seed)
    vae = parts["vae"]
    side = 8 * vae.config.downsample_factor
    params = {
        "unet": random_params(parts["unet"], unet_lib.dummy_inputs(parts["unet"].config), jax.random.fold_in(key, 0),
                              repl),
        "vae": random_params(vae, (jnp.zeros((1, side, side, vae.config.in_channels)),), jax.random.fold_in(key, 1),
                             repl),
        "text_encoder": random_params(parts["text_encoder"], clip_lib.dummy_inputs(parts["text_encoder"]),
                                      jax.random.fold_in(key, 2), repl),
    }
    if "text_encoder_2" in parts:
        te2 = parts["text_encoder_2"]
        params["text_encoder_2"] = random_params(te2, clip_lib.dummy_inputs(te2), jax.random.fold_in(key, 3), repl)
    return pipeline.StableDiffusion(params=params, **parts)


def attention_plan(s: BenchSettings, r: Resolved) -> dict:
    """Which implementation each attention head size of the model runs with
    ("cudnn" or "xla"), as `layers.resolve_attention_impl` decides it on the
    default device, and why not cuDNN where it is XLA under "auto"."""
    spec = MODELS[s.model]
    ucfg = spec.unet_config()
    texts = [spec.text_config()] + ([spec.text_2_config()] if spec.is_sdxl else [])
    sizes = {"unet": sorted({ch // h for ch, h in zip(ucfg.block_out_channels, ucfg.per_block("attention_head_dim"))}),
             "text_encoder": sorted({t.hidden_size // t.num_attention_heads for t in texts})}
    dtype = devices_lib.dtype_of(r.dtype)
    plan = {}
    for part, dims in sizes.items():
        plan[part] = {}
        for d in dims:
            impl = layers.resolve_attention_impl(s.attention, d, dtype)
            row = {"impl": impl or "xla"}
            if s.attention == "auto" and impl is None:
                row["why_not_cudnn"] = layers.why_not_cudnn_here(d, dtype)
            plan[part][str(d)] = row
    plan["vae"] = {"impl": "xla", "why_not_cudnn": "the VAE's one-head 512-wide attention is past cuDNN's head sizes"}
    return plan


def text_width(pipe: pipeline.StableDiffusion) -> int:
    """The width of the U-Net's text context (SDXL: both encoders' side by side)."""
    return pipe.unet.config.per_block("cross_attention_dim")[0]


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def time_calls(call: Callable[[], Any], warmup: int, iters: int, sync: Callable[[Any], Any]) -> dict:
    """Runs `call` warmup + iters times, `sync`ing each result; returns the
    first call's seconds and the timed calls' mean/median/min ms."""
    t0 = time.perf_counter()
    sync(call())
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        sync(call())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return {"first_call_s": first, "ms_per_iter": float(ms.mean()), "ms_per_iter_median": float(np.median(ms)),
            "ms_per_iter_min": float(ms.min()), "iters": iters, "warmup": warmup}


def _block(x):
    return jax.block_until_ready(x)


def figures(timing: dict, items_per_iter: int, num_devices: int, flops_per_item: float | None,
            peak: float | None, measured_peak: float | None) -> dict:
    """Throughput, achieved TFLOP/s and utilisation from one timing."""
    s = timing["ms_per_iter"] / 1e3
    out = dict(timing)
    out["items_per_iter"] = items_per_iter
    out["items_per_s"] = items_per_iter / s
    out["items_per_s_per_device"] = items_per_iter / s / num_devices
    out["flops_per_item"] = flops_per_item
    if flops_per_item:
        tf = flops_per_item * items_per_iter / s / 1e12
        out["tflops"] = tf
        out["tflops_per_device"] = tf / num_devices
        out["utilisation"] = tf / num_devices / peak if peak else None
        out["utilisation_of_measured_peak"] = tf / num_devices / measured_peak if measured_peak else None
    else:
        out.update(tflops=None, tflops_per_device=None, utilisation=None, utilisation_of_measured_peak=None)
    return out


def _maybe_profile(s: BenchSettings, mode: str, call, sync, out: dict) -> None:
    """With `s.profile`: traces `s.profile_iters` more calls into
    `s.profile/mode` (after the timed ones, so they time nothing extra)."""
    if s.profile:
        out["profile"] = profile_lib.capture(call, sync, s.profile_iters, f"{s.profile}/{mode}")


def _compile(jitted, *args):
    """(compiled, lowered, lower+compile seconds)."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    return compiled, lowered, time.perf_counter() - t0


# --------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------


def _unet_apply(unet, params, x, t, ctx, added=None):
    return unet.apply({"params": params}, x, t, ctx, added)


def _unet_inputs(pipe, rows: int, latent: int, key, sharding):
    """(latents, timesteps, text context) for `rows` U-Net rows, and for SDXL
    its added conditions: a pooled text embedding and the time ids of a
    square image of the latents' size, uncropped (the sampler's defaults)."""
    c = pipe.latent_channels
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x = jax.device_put(jax.random.normal(k1, (rows, latent, latent, c)), sharding)
    t = jax.device_put(jax.random.randint(k2, (rows,), 0, 1000), sharding)
    ctx = jax.device_put(jax.random.normal(k3, (rows, pipe.tokenizer.max_length, text_width(pipe))), sharding)
    if not pipe.is_sdxl:
        return x, t, ctx
    pooled = pipe.text_encoder_2.config.projection_dim
    side = latent * pipe.vae_scale
    ids, _ = sdxl_lib.time_ids(sdxl_lib.Conditions(), side, side, aesthetic=False, img2img=False,
                               num_ids=unet_lib.text_time_sizes(pipe.unet.config, pooled))
    added = {"text_embeds": jax.device_put(jax.random.normal(k4, (rows, pooled)), sharding),
             "time_ids": jax.device_put(np.broadcast_to(ids, (rows, ids.size)).copy(), sharding)}
    return x, t, ctx, added


def bench_unet(s: BenchSettings, r: Resolved, pipe, mesh, peaks) -> dict:
    """U-Net forward at the (optionally CFG-doubled) batch."""
    batch = parallel.batch_sharding(mesh)
    rows = r.batch_size * (2 if s.unet_cfg else 1)
    fwd = jax.jit(functools.partial(_unet_apply, pipe.unet), out_shardings=batch)
    args = (pipe.params["unet"], *_unet_inputs(pipe, rows, r.latent, jax.random.key(s.seed + 1), batch))
    compiled, _, compile_s = _compile(fwd, *args)
    per_dev = flops_lib.compiled_flops(compiled)
    fpi = per_dev / (rows // r.num_devices) if per_dev else None
    timing = time_calls(lambda: compiled(*args), s.warmup, s.iters, _block)
    out = figures(timing, rows, r.num_devices, fpi, *peaks)
    _maybe_profile(s, "unet", lambda: compiled(*args), _block, out)
    out.update(item="sample", rows=rows, compile_s=compile_s, flops_method="compiled cost analysis / per-device rows",
               compiled_memory=devices_lib.compiled_memory(compiled), peak_bytes_in_use=devices_lib.peak_bytes_in_use())
    return out


def bench_sample(s: BenchSettings, r: Resolved, pipe, mesh, peaks) -> dict:
    """The whole txt2img call of `pipeline.Sampler`: tokenize, encode the
    prompt (and the empty prompt for CFG; SDXL's base zeros it instead, as
    diffusers), the denoising loop, VAE decode, images back on the host."""
    batch = parallel.batch_sharding(mesh)
    dtype = devices_lib.dtype_of(r.dtype)
    sampler = pipeline.Sampler(pipe, mesh=mesh, dtype=dtype)
    n = r.batch_size
    prompts = [PROMPT] * n
    seeds = list(range(n))
    use_cfg = s.guidance_scale > 1.0
    sched = sampler.scheduler(r.scheduler)
    lat_shape = (n, r.latent, r.latent, pipe.latent_channels)
    state = sched.set_timesteps(s.steps, lat_shape)
    evals = state.num_evals
    rows = 2 * n if use_cfg else n

    # Compile the Sampler's own jitted functions with the arguments its
    # __call__ builds, so the timed calls below reuse these executables.
    ids = jax.device_put(pipe.tokenizer(prompts), batch)
    if pipe.is_sdxl:
        ids_2 = jax.device_put(pipe.tokenizer_2(prompts), batch)
        enc_c, _, enc_s = _compile(sampler._encode_xl, sampler.params["text_encoder"],
                                   sampler.params["text_encoder_2"], ids, ids_2)
        # The call's own program and arguments (both encoders' states, pooled text, time ids).
        loop, loop_args = sampler.prepare(prompts, seeds=seeds, steps=s.steps, guidance_scale=s.guidance_scale,
                                          scheduler=r.scheduler, height=r.resolution, width=r.resolution)
        zeros = pipe.pipeline_options.get("force_zeros_for_empty_prompt", True)
        text_calls = 2 if use_cfg and not zeros else 1
    else:
        enc_c, _, enc_s = _compile(sampler._encode, sampler.params["text_encoder"], ids)
        cond = sampler.encode(prompts)
        loop = sampler.loop(r.scheduler, use_cfg, False, False)
        loop_args = (sampler.params, cond, cond, jnp.float32(s.guidance_scale),
                     jax.device_put(np.asarray(seeds, np.uint32), batch),
                     jax.device_put(np.zeros(lat_shape, np.float32), batch), None, state)
        text_calls = 2 if use_cfg else 1
    loop_c, _, loop_s = _compile(loop, *loop_args)

    # FLOPs from the pieces (global programs, lowered only).
    text_f = flops_lib.compiled_flops(enc_c)
    text_f = text_f * r.num_devices if text_f else None  # compiled = one device's share
    unet_f = flops_lib.lowered_flops(jax.jit(functools.partial(_unet_apply, pipe.unet)).lower(
        pipe.params["unet"], *_unet_inputs(pipe, rows, r.latent, jax.random.key(0), batch)))
    vae_f = flops_lib.lowered_flops(jax.jit(
        lambda p, z: pipe.vae.apply({"params": p}, z, method=pipe.vae.decode)).lower(
        pipe.params["vae"], jax.ShapeDtypeStruct(lat_shape, jnp.float32, sharding=batch)))
    pieces = {"text_encoder_per_call": text_f, "text_encoder_calls": text_calls,
              "unet_per_eval": unet_f, "unet_rows": rows, "model_evals": evals, "vae_decode": vae_f}
    fpi = None
    if text_f and unet_f and vae_f:
        fpi = (pieces["text_encoder_calls"] * text_f + evals * unet_f + vae_f) / n
    loop_xla = flops_lib.compiled_flops(loop_c)

    call = functools.partial(sampler, prompts, seeds=seeds, steps=s.steps, guidance_scale=s.guidance_scale,
                             scheduler=r.scheduler, height=r.resolution, width=r.resolution)
    timing = time_calls(call, s.warmup, s.iters, lambda x: x)  # returns host numpy: already synced
    out = figures(timing, n, r.num_devices, fpi, *peaks)
    _maybe_profile(s, "sample", call, lambda x: x, out)
    out.update(item="image", model_evals=evals, ms_per_unet_step=timing["ms_per_iter"] / evals,
               scheduler=r.scheduler, compile_s=enc_s + loop_s, compile_s_text_encoder=enc_s, compile_s_loop=loop_s,
               flops_pieces=pieces, loop_xla_flops=loop_xla * r.num_devices if loop_xla else None,
               flops_method=("(text encoder x calls + U-Net x model evals + VAE decode) / batch, "
                             "from separately lowered programs (XLA counts a fori_loop body once)"),
               compiled_memory=devices_lib.compiled_memory(loop_c),
               peak_bytes_in_use=devices_lib.peak_bytes_in_use())
    return out


def bench_train(s: BenchSettings, r: Resolved, mesh, peaks, *, cached: bool = True) -> dict:
    """The latent-diffusion trainer's own step (`t2i_jax.train.ldm.setup_step`: the function the
    trainer jits, with its donation, shardings, guard, EMA and metrics accumulator) at the trainer's
    default optimizer settings. `cached`: on cached VAE posteriors and text states (the
    trainer's `cache.enabled`); otherwise on images and token ids, with the frozen VAE encoder
    and text encoder inside the step."""
    from t2i_jax.train import ldm
    from t2i_jax.train import loop as loop_lib

    pipe = build_model(s, r, mesh, remat=s.remat)  # fresh params: the step donates them
    config = ldm.default_config()
    config.batch_size = r.batch_size
    config.seed = s.seed
    config.model.remat = s.remat
    config.optim.lr = s.learning_rate
    config.optim.weight_decay = s.weight_decay
    config.diffusion.prediction_type = ""
    parts = ldm.parts_from_pipeline(pipe, config)
    te, tok = parts["text_encoder"], parts["tokenizer"]
    empty = te.apply({"params": pipe.params["text_encoder"]}, tok([""])).last_hidden_state[0] if cached else None
    run = ldm.setup_step(parts, config, mesh, cached=cached, total_steps=10**6, empty_context=empty)
    sh = run["shardings"]
    state = jax.jit(run["init"], in_shardings=(sh.params,), out_shardings=sh, donate_argnums=(0,))(
        jax.device_put(pipe.params["unet"], sh.params))
    frozen = jax.device_put({k: pipe.params[k] for k in ("vae", "text_encoder")}, run["frozen_shardings"])
    rng = np.random.default_rng(s.seed + 2)
    b, lat = r.batch_size, r.latent
    if cached:
        ctx_shape = (b, tok.max_length, te.config.hidden_size)
        host = {"mean": rng.standard_normal((b, lat, lat, pipe.latent_channels), np.float32),
                "std": np.full((b, lat, lat, pipe.latent_channels), 0.1, np.float32),
                "context": rng.standard_normal(ctx_shape, np.float32)}
    else:
        side = r.resolution
        host = {"image": rng.uniform(-1, 1, (b, side, side, 3)).astype(np.float32),
                "input_ids": tok([PROMPT] * b)}
    batch = parallel.host_to_global(host, mesh)
    acc = loop_lib.new_train_accumulator(run["step_fn"], state, frozen, batch, mesh)
    compiled, _, compile_s = _compile(run["step_fn"], state, acc, frozen, batch)
    per_dev = flops_lib.compiled_flops(compiled)
    fpi = per_dev / r.per_device_batch if per_dev else None
    holder = {"state": state, "acc": acc}

    def call():
        holder["state"], holder["acc"] = compiled(holder["state"], holder["acc"], frozen, batch)
        return holder["acc"]["last"]["loss"]

    timing = time_calls(call, s.warmup, s.iters, _block)
    loss = float(call())
    out = figures(timing, r.batch_size, r.num_devices, fpi, *peaks)
    _maybe_profile(s, "train" if cached else "train_stream", call, _block, out)
    out.update(item="sample", compile_s=compile_s, remat=s.remat, final_loss=loss, cached=cached,
               ema_decay=config.ema_decay, grad_clip=config.optim.grad_clip,
               step="t2i_jax.train.ldm.setup_step (the trainer's jitted step)",
               flops_method=("compiled cost analysis (forward + backward + AdamW + EMA"
                             + ("" if cached else " + frozen VAE encoder and text encoder") + ") / per-device batch"),
               compiled_memory=devices_lib.compiled_memory(compiled),
               peak_bytes_in_use=devices_lib.peak_bytes_in_use())
    return out


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def device_info(s: BenchSettings, r: Resolved) -> dict:
    """Device kind/count and the peaks utilisation is measured against."""
    dev = jax.devices()[0]
    name, peak = devices_lib.datasheet_peak(dev.device_kind, r.dtype)
    if s.peak_tflops:
        name, peak = "--peak-tflops", s.peak_tflops
    measured = devices_lib.measure_matmul_tflops(devices_lib.dtype_of(r.dtype)) if s.measure_peak else None
    return {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
            "peak_source": name, "peak_tflops_per_device": peak, "measured_matmul_tflops_per_device": measured}


def run(s: BenchSettings, log: Callable[[str], None] = lambda m: None) -> dict:
    """Runs every requested mode (and its PyTorch counterpart with
    `compare="diffusers"`); returns all figures as one JSON-able dict."""
    r = resolve(s, jax.devices())
    mesh = parallel.make_mesh(num_devices=r.num_devices)
    dev = device_info(s, r)
    peaks = (dev["peak_tflops_per_device"], dev["measured_matmul_tflops_per_device"])
    results: dict = {}
    pipe = None
    ref = None
    t0 = time.perf_counter()
    if s.compare == "diffusers":
        from t2i_jax.bench import reference

        ref = reference.DiffusersBench(s, r)
    setup_s = time.perf_counter() - t0
    for mode in s.modes:
        log(f"{mode}: ours ...")
        t0 = time.perf_counter()
        if mode in ("train", "train_stream"):
            ours = bench_train(s, r, mesh, peaks, cached=mode == "train")
        else:
            pipe = pipe or build_model(s, r, mesh)
            ours = (bench_unet if mode == "unet" else bench_sample)(s, r, pipe, mesh, peaks)
        ours["wall_s"] = time.perf_counter() - t0
        results[mode] = {"ours": ours}
        if ref is not None and mode in REFERENCE_MODES:
            log(f"{mode}: diffusers ...")
            t0 = time.perf_counter()
            theirs = ref.run(mode, ours.get("flops_per_item"), peaks)
            theirs["wall_s"] = time.perf_counter() - t0
            results[mode]["diffusers"] = theirs
            # Per device: diffusers runs on one device with our per-device batch.
            results[mode]["ratio_ours_over_diffusers_per_device"] = (
                ours["items_per_s_per_device"] / theirs["items_per_s_per_device"])
            # The same from median and from minimum times: steadier on a
            # shared machine, where other processes' load lands in the mean.
            for stat in ("median", "min"):
                results[mode][f"ratio_ours_over_diffusers_per_device_{stat}"] = (
                    theirs[f"ms_per_iter_{stat}"] / ours[f"ms_per_iter_{stat}"] * ours["items_per_iter"]
                    / r.num_devices / theirs["items_per_iter"])
    return {"settings": dataclasses.asdict(s) | {"modes": list(s.modes)}, "resolved": dataclasses.asdict(r),
            "device": dev, "attention": attention_plan(s, r), "results": results, "reference_setup_s": setup_s,
            **({"torch": ref.info()} if ref is not None else {})}
