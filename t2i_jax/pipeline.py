"""Text -> latents -> image: txt2img and img2img, one jit per shape.

The text encoder runs in one jitted call; the denoising loop (a
`lax.fori_loop` over the sampler's model evaluations, with both
classifier-free-guidance halves in one U-Net call) and the VAE decode run in
another. The batch is sharded over every device on a one-axis `Mesh`
(`data`); parameters are replicated.

Randomness is per image: image b's starting noise and any sampler noise come
from `jax.random.key(seeds[b])` alone, so an image depends on its prompt, seed
and settings, never on the batch size or the device count.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t2i_jax import schedulers
from t2i_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class StableDiffusion:
    """The parts of a Stable Diffusion model and their params.

    `params` holds `text_encoder`, `unet` and `vae` param trees.
    `scheduler_config` is the diffusers `scheduler_config.json` dict, from
    which any sampler is built (`scheduler` names one of
    `schedulers.SCHEDULERS`).
    """

    tokenizer: Tokenizer
    text_encoder: Any  # t2i_jax.models.clip.CLIPTextModel
    unet: Any  # t2i_jax.models.unet.UNet2DConditionModel
    vae: Any  # t2i_jax.models.vae.AutoencoderKL
    params: dict
    scheduler_config: dict
    source: str = ""  # where it was loaded from, for messages and metadata

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return self.vae.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def dtype(self):
        """The U-Net's compute dtype."""
        return self.unet.dtype

    def with_compute(self, dtype=None, attention_impl: str | None = None) -> StableDiffusion:
        """The same model and params with its modules' compute `dtype` and/or
        attention implementation (None/"xla", "cudnn", "auto"; the VAE's
        attention always runs on XLA) replaced; None keeps what they have.
        Params are not touched: fp32 params in bf16 compute is the usual
        setting."""
        if dtype is None and attention_impl is None:
            return self
        kw = {} if dtype is None else {"dtype": dtype}
        attn = {} if attention_impl is None else {"attention_impl": attention_impl}
        return dataclasses.replace(self, text_encoder=self.text_encoder.clone(**kw, **attn),
                                   unet=self.unet.clone(**kw, **attn), vae=self.vae.clone(**kw))


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def check_size(name: str, value: int, multiple: int) -> None:
    """Raises a ValueError suggesting the nearest valid sizes."""
    if value <= 0:
        raise ValueError(f"{name} {value} must be positive; use e.g. {8 * multiple}")
    if value % multiple:
        lo = value // multiple * multiple
        hi = lo + multiple
        suggestion = f"{lo} or {hi}" if lo > 0 else f"{hi}"
        raise ValueError(f"{name} {value} is not a multiple of {multiple}; use {suggestion}")


def check_settings(steps: int, guidance_scale: float, strength: float | None = None) -> None:
    """Validates the sampling settings with messages that say how to fix them."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps {steps!r} must be an integer >= 1; SD is usually sampled with 20-50")
    if guidance_scale < 1.0:
        raise ValueError(f"guidance scale {guidance_scale} is below 1; use 1.0 (no guidance) or more (7.5 is usual)")
    if strength is not None and not 0.0 < strength <= 1.0:
        raise ValueError(f"strength {strength} is outside (0, 1]; use e.g. 0.75 (1.0 ignores the init image)")


# --------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh `("data",)` over `devices` (default: all)."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), ("data",))


def _batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# --------------------------------------------------------------------------
# The jitted pieces
# --------------------------------------------------------------------------


def _encode_text(text_encoder, params, ids):
    return text_encoder.apply({"params": params}, ids).last_hidden_state


# Independent random streams per image, all derived from the image's seed.
NOISE, SAMPLER, ENCODER = 0, 1, 2


def stream_keys(seeds, stream: int):
    """One PRNG key per image for `stream` (NOISE, SAMPLER or ENCODER)."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), stream))(jnp.asarray(seeds, jnp.uint32))


def seeded_normal(seeds, shape, stream: int = NOISE):
    """Standard normal noise [n, *shape] where row b depends only on seeds[b].

    The starting latents of image b are `seeded_normal(seeds, latent_shape)[b]`.
    """
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(stream_keys(seeds, stream))


def _to_latents(vae, z):
    c = vae.config
    return (z - (c.shift_factor or 0.0)) * c.scaling_factor


def _from_latents(vae, x):
    c = vae.config
    return x / c.scaling_factor + (c.shift_factor or 0.0)


def _denoise(unet, vae, sched, use_cfg, has_latents, img2img, dtype,
             params, cond, uncond, guidance_scale, seeds, latents, init_images, state):
    """The whole loop and the decode; the static arguments come first (partial'd).

    `latents`: the starting noise when `has_latents`, else a zero placeholder
    whose shape is that of the latents. `init_images`: [-1, 1] NHWC for
    img2img, else None.
    """
    step_keys = stream_keys(seeds, SAMPLER)
    noise = latents.astype(jnp.float32) if has_latents else seeded_normal(seeds, latents.shape[1:])
    if img2img:
        posterior = vae.apply({"params": params["vae"]}, init_images.astype(dtype), method=vae.encode)
        mean = posterior.mean.astype(jnp.float32)
        z = mean + posterior.std.astype(jnp.float32) * seeded_normal(seeds, mean.shape[1:], ENCODER)
        x = sched.add_noise_start(state, _to_latents(vae, z), noise)
    else:
        x = noise * state.init_noise_sigma
    context = (jnp.concatenate([uncond, cond]) if use_cfg else cond).astype(dtype)

    def body(i, carry):
        x, st = carry
        xin = sched.scale_model_input(st, x, i).astype(dtype)
        if use_cfg:
            xin = jnp.concatenate([xin, xin])
        t = jnp.broadcast_to(st.timesteps[i], (xin.shape[0],))
        out = unet.apply({"params": params["unet"]}, xin, t, context).astype(jnp.float32)
        if use_cfg:
            out_u, out_c = jnp.split(out, 2)
            out = out_u + guidance_scale * (out_c - out_u)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(step_keys)
        return sched.step(st, out, i, x, key=keys)

    x, _ = jax.lax.fori_loop(0, state.num_evals, body, (x, state))
    images = vae.apply({"params": params["vae"]}, _from_latents(vae, x).astype(dtype), method=vae.decode)
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


class Sampler:
    """Compiled txt2img / img2img for one model on one mesh.

    Compiled functions are cached per (shapes, sampler, settings that change
    the program); new prompts, seeds and guidance scales reuse them.
    """

    def __init__(self, pipe: StableDiffusion, *, mesh: Mesh | None = None, dtype=None,
                 attention_impl: str | None = None):
        """`dtype` (e.g. jnp.bfloat16) and `attention_impl` replace the
        modules' compute dtype and attention (`StableDiffusion.with_compute`);
        None keeps the ones `pipe` was built with."""
        pipe = pipe.with_compute(dtype, attention_impl)
        self.pipe = pipe
        self.mesh = mesh or make_mesh()
        self.dtype = pipe.dtype
        repl = _replicated(self.mesh)
        self.params = jax.device_put(pipe.params, repl)
        self._encode = jax.jit(functools.partial(_encode_text, pipe.text_encoder),
                               out_shardings=_batch_sharding(self.mesh))
        self._loops: dict = {}
        self._schedulers: dict = {}

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def scheduler(self, name: str):
        """The named sampler built from the model's scheduler config (cached)."""
        if name not in self._schedulers:
            self._schedulers[name] = schedulers.from_config(name, self.pipe.scheduler_config)
        return self._schedulers[name]

    def loop(self, name: str, use_cfg: bool, has_latents: bool, img2img: bool):
        """The jitted denoise+decode function for these static choices (cached)."""
        key = (name, use_cfg, has_latents, img2img)
        if key not in self._loops:
            p = self.pipe
            fn = functools.partial(_denoise, p.unet, p.vae, self.scheduler(name), use_cfg, has_latents,
                                   img2img, self.dtype)
            self._loops[key] = jax.jit(fn, out_shardings=_batch_sharding(self.mesh))
        return self._loops[key]

    def encode(self, prompts: Sequence[str]) -> jax.Array:
        """Prompt embeddings [n, 77, D], sharded over the batch."""
        ids = self.pipe.tokenizer(list(prompts))
        return self._encode(self.params["text_encoder"], jax.device_put(ids, _batch_sharding(self.mesh)))

    def __call__(self, prompts: Sequence[str], *, seeds: Sequence[int],
                 negative_prompts: Sequence[str] | None = None, steps: int = 50,
                 guidance_scale: float = 7.5, scheduler: str = "pndm", height: int = 512,
                 width: int = 512, init_images: np.ndarray | None = None, strength: float = 0.8,
                 latents: np.ndarray | None = None) -> np.ndarray:
        """Generates one image per prompt; returns float32 [n, H, W, 3] in [0, 1].

        `seeds[b]` fixes image b. `negative_prompts` replace the empty
        unconditional prompt. `guidance_scale` 1.0 skips the unconditional
        half. `init_images` (float [n, H, W, 3] in [0, 1]) switch to img2img
        with `strength`. `latents` ([n, H/8, W/8, C]) replace the seeded
        starting noise. The batch must divide by the device count (pad it).
        """
        prompts = list(prompts)
        n = len(prompts)
        check_settings(steps, guidance_scale, strength if init_images is not None else None)
        f = self.pipe.vae_scale
        check_size("height", height, f)
        check_size("width", width, f)
        if n % self.num_devices:
            raise ValueError(f"batch of {n} does not divide over {self.num_devices} devices; "
                             f"pad it to {-(-n // self.num_devices) * self.num_devices}")
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} prompts; pass one seed per prompt")
        if negative_prompts is not None and len(negative_prompts) != n:
            raise ValueError(f"got {len(negative_prompts)} negative prompts for {n} prompts")
        use_cfg = guidance_scale > 1.0
        sched = self.scheduler(scheduler)
        img2img = init_images is not None
        batch = _batch_sharding(self.mesh)
        cond = self.encode(prompts)
        uncond = self.encode(negative_prompts or [""] * n) if use_cfg else cond
        lat_shape = (n, height // f, width // f, self.pipe.latent_channels)
        state = sched.set_timesteps(steps, lat_shape, strength=strength if img2img else 1.0)
        if latents is not None:
            if tuple(latents.shape) != lat_shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {lat_shape}")
            lat = np.asarray(latents, np.float32)
        else:
            lat = np.zeros(lat_shape, np.float32)
        init = None
        if img2img:
            init_images = np.asarray(init_images, np.float32)
            if init_images.shape != (n, height, width, 3):
                raise ValueError(f"init images have shape {init_images.shape}; expected {(n, height, width, 3)}")
            init = jax.device_put(init_images * 2.0 - 1.0, batch)
        fn = self.loop(scheduler, use_cfg, latents is not None, img2img)
        out = fn(self.params, cond, uncond, jnp.float32(guidance_scale),
                 jax.device_put(np.asarray(seeds, np.uint32), batch), jax.device_put(lat, batch), init,
                 state)
        return np.asarray(jax.device_get(out))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] float images -> uint8, rounded as diffusers' `numpy_to_pil`."""
    return (np.asarray(images) * 255).round().astype(np.uint8)
