"""Text -> latents -> image: txt2img, img2img and inpainting (`t2i_jax.inpaint`), one jit per shape;
SD 1.x/2.x and SDXL (base and refiner, its text and time ids in `t2i_jax.sdxl`).

The text encoder runs in one jitted call; the denoising loop (a
`lax.fori_loop` over the sampler's model evaluations, with both
classifier-free-guidance halves in one U-Net call) and the VAE decode run in
another. The batch is split over every device of the package's
`("data", "fsdp")` mesh (`t2i_jax.parallel`, the one the trainers use);
parameters, the guidance scale and the scheduler state are replicated. Every
jitted input and output has an explicit sharding, and the two guidance halves
of an image are interleaved (rows 2b, 2b + 1) so that they sit on that
image's device: the loop runs without any cross-device exchange.

Randomness is per image: image b's starting noise and any sampler noise come
from `jax.random.key(seeds[b])` alone, so an image depends on its prompt, seed
and settings, never on the batch size or the device count.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from t2i_jax import inpaint as inpaint_lib
from t2i_jax import parallel, schedulers
from t2i_jax import prompts as prompt_lib
from t2i_jax import sdxl as sdxl_lib
from t2i_jax.models import controlnet as controlnet_lib
from t2i_jax.models import unet as unet_lib
from t2i_jax.models.bundle import StableDiffusion  # re-exported: the Sampler's input
from t2i_jax.parallel import make_mesh  # re-exported: the Sampler's default mesh

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


# Batch split over every device of the mesh (both axes); a full copy everywhere.
_batch_sharding = parallel.batch_sharding
_replicated = parallel.replicated


def _shard_batch_axis(x: jax.Array, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
    """`x` constrained to be split over every device along `batch_axis`."""
    spec = P(*([None] * batch_axis), parallel.BATCH_AXES)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _shard_history(history, mesh: Mesh, sample_shape: tuple):
    """History leaves that end in the sample's shape (previous model outputs,
    saved samples: per image), split over the devices along their batch axis;
    others left to the compiler.

    The state comes in replicated (it is mostly small tables); pinning the
    per-image buffers to the batch layout makes the loop carry them split
    like the sample, so no step has to gather or exchange them.
    """
    k = len(sample_shape)

    def one(h):
        if h.ndim >= k and tuple(h.shape[h.ndim - k:]) == tuple(sample_shape):
            return _shard_batch_axis(h, mesh, h.ndim - k)
        return h

    return jax.tree.map(one, history)


# --------------------------------------------------------------------------
# Compute-dtype params
# --------------------------------------------------------------------------

# The parts whose cast copy the Sampler keeps: what the denoising loop reads.
# The text encoder runs once per call, outside the loop, and sums its
# embedding tables in fp32 by design (clip.CLIPTextEmbeddings); it keeps its
# params as loaded.
CAST_PARTS = ("unet", "vae")
# Besides a model's parts, the Sampler holds its ControlNets' params (a list,
# run in the loop like the U-Net's), cast the same way.
_SAMPLER_CAST_PARTS = CAST_PARTS + ("controlnet",)


def _cast_dtype(x, dtype):
    """The dtype `cast_kernels` gives leaf `x`."""
    if jnp.issubdtype(x.dtype, jnp.floating) and len(x.shape) >= 2:
        return jnp.dtype(dtype)
    return jnp.dtype(x.dtype)


def cast_kernels(params, dtype):
    """`params` with every floating leaf of 2 or more dims (conv and dense
    kernels, embedding tables: nearly all the bytes) in `dtype`; 1-D leaves
    (biases, norm scales) and integer leaves keep their dtype.

    This is the cast flax's Dense/Conv apply to their kernels on every call
    when the compute dtype differs from the params': done once, it leaves the
    denoising loop reading half the bytes and converting nothing.
    """
    return jax.tree.map(lambda x: x.astype(_cast_dtype(x, dtype)), params)


def _needs_cast(params, dtype) -> bool:
    return any(_cast_dtype(x, dtype) != x.dtype for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------
# Classifier-free guidance layout
# --------------------------------------------------------------------------


def cfg_interleave(uncond: jax.Array, cond: jax.Array) -> jax.Array:
    """[n, ...] twice -> [2n, ...] with rows 2b, 2b + 1 = uncond[b], cond[b].

    Concatenating the halves instead ([uncond; cond]) would put image b's two
    rows n rows apart, i.e. on different devices once the batch axis is split
    in contiguous blocks; interleaved, a device's block holds both halves of
    its images and the guidance combine needs no exchange.
    """
    return jnp.stack([uncond, cond], axis=1).reshape((2 * cond.shape[0],) + cond.shape[1:])


def cfg_split(out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of `cfg_interleave`: [2n, ...] -> (uncond [n, ...], cond [n, ...])."""
    pairs = out.reshape((out.shape[0] // 2, 2) + out.shape[1:])
    return pairs[:, 0], pairs[:, 1]


# --------------------------------------------------------------------------
# The jitted pieces
# --------------------------------------------------------------------------


def _encode_text(text_encoder, params, ids):
    return text_encoder.apply({"params": params}, ids).last_hidden_state


def _weight_chunks(z, weights):
    """A1111 emphasis on encoded chunks, then each prompt's chunks joined:
    z [n * k, L, D] (the text encoder's output, prompt b's chunks in rows
    b * k ... b * k + k - 1), weights [n, k, L] -> [n, k * L, D].

    Each chunk is scaled per token and rescaled to its own mean (see
    `t2i_jax.prompts`); a chunk whose weights are all 1 passes as encoded,
    bit for bit.
    """
    n, k, length = weights.shape
    w = weights.reshape(n * k, length)
    zf = z.astype(jnp.float32)
    scaled = zf * w[..., None]
    scaled = scaled * (zf.mean(axis=(1, 2), keepdims=True) / scaled.mean(axis=(1, 2), keepdims=True))
    z = jnp.where(jnp.all(w == 1.0, axis=1)[:, None, None], z, scaled.astype(z.dtype))
    return z.reshape(n, k * length, z.shape[-1])


# Independent random streams per image, all derived from the image's seed.
NOISE, SAMPLER, ENCODER = 0, 1, 2
MASKED_ENCODER = 3  # inpainting: the masked image's VAE posterior sample


def stream_keys(seeds, stream: int):
    """One PRNG key per image for `stream` (NOISE, SAMPLER, ENCODER or MASKED_ENCODER)."""
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


def _encode_images(vae, params, images, eps, *, seeds, stream, dtype):
    """Scaled latents of VAE posterior samples mean + std * eps of `images`
    ([-1, 1] NHWC); `eps` None: the seeded noise of `stream`."""
    posterior = vae.apply({"params": params}, images.astype(dtype), method=vae.encode)
    mean = posterior.mean.astype(jnp.float32)
    eps = seeded_normal(seeds, mean.shape[1:], stream) if eps is None else eps.astype(jnp.float32)
    return _to_latents(vae, mean + posterior.std.astype(jnp.float32) * eps)


@dataclasses.dataclass(frozen=True, eq=False)
class Preview:
    """A host hook into the denoising loop, for a server's progress and previews.

    `on_step(i)` runs on the host after every model evaluation i (0-based);
    `on_images(i, images)` every `every` evaluations (not the last, whose
    image the call returns) with float32 [n, H, W, 3] in [0, 1]: the VAE
    decode of the model's current estimate of the clean latents. The hooks
    are `jax.debug.callback`s in a program of their own (the loop's cache key
    holds the Preview): a call without one runs the CLI's program unchanged.
    They only read the loop's values, so the images are those of the same call
    without a Preview. Compared by identity: keep one per server.
    """

    on_step: Callable[[Any], None]
    on_images: Callable[[Any, Any], None]
    every: int = 4


def _emit_preview(preview: Preview, sched, vae, vae_params, st, x_in, out, i, num_evals, dtype):
    """The Preview's callbacks at evaluation i. The clean estimate is the
    DDPM-form one, x0 = (x_in - sqrt(1 - abar) eps) / sqrt(abar) (or its
    v-prediction form), from the scaled model input at the step's timestep:
    every sampler's `scale_model_input` gives that form, so one formula
    serves them all (abar interpolated at fractional timesteps)."""
    jax.debug.callback(preview.on_step, i)
    table = jnp.asarray(sched.alphas_cumprod, jnp.float32)
    abar = jnp.interp(st.timesteps[i].astype(jnp.float32), jnp.arange(table.shape[0], dtype=jnp.float32), table)
    xf = x_in.astype(jnp.float32)
    kind = sched.config.get("prediction_type", "epsilon")
    if kind == "v_prediction":
        x0 = jnp.sqrt(abar) * xf - jnp.sqrt(1.0 - abar) * out
    elif kind == "sample":
        x0 = out
    else:
        x0 = (xf - jnp.sqrt(1.0 - abar) * out) / jnp.sqrt(abar)

    def show():
        images = vae.apply({"params": vae_params}, _from_latents(vae, x0).astype(dtype), method=vae.decode)
        jax.debug.callback(preview.on_images, i, jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0))

    jax.lax.cond(((i + 1) % preview.every == 0) & (i + 1 < num_evals), show, lambda: None)


def _denoise(unet, vae, sched, use_cfg, has_latents, img2img, return_latents, dtype, mesh,
             params, cond, uncond, guidance_scale, seeds, latents, init_images, state, inpaint=None,
             control=None, *, inpaint_mode=None, vae_dtype=None, handoff=False, preview=None):
    """The whole loop and the decode; the static arguments come first (partial'd).

    `latents`: the starting noise (txt2img) or the noise added to the init
    latents (img2img) when `has_latents`, else a zero placeholder whose shape
    is that of the latents. `init_images`: None for txt2img; for img2img a
    dict with `images` ([-1, 1] NHWC) and `encoder_noise` (the VAE
    posterior's sampling noise, latent-shaped, or None for the seeded one).
    `inpaint` (with the static `inpaint_mode`, an `inpaint.Mode`): None, or
    the dict of `inpaint.host_inputs` plus `masked_encoder_noise`.
    `mesh`: the batch is split over all its devices; the sample, the
    scheduler's per-image history and both guidance halves of an image stay
    on that image's device throughout. `control`: None, or a
    `controlnet.Control` (control images, scales, per-evaluation keep flags;
    its nets run with `params["controlnet"]` at every evaluation, inside the
    loop). `preview`: None, or a `Preview` whose host hooks the loop calls.
    Returns the images, and the final latents too when `return_latents`.

    SDXL: `cond` / `uncond` are dicts of `context`, `text_embeds` (pooled)
    and `time_ids`, the last two fed to the U-Net's add_embedding;
    `init_images` may hold `latents` (the base's output for the refiner)
    instead of `images`; `handoff` starts from the init latents as they are,
    not noised (diffusers' `denoising_start`). `vae_dtype`: the VAE's compute
    dtype (fp32 for an SDXL VAE that says `force_upcast` under fp16), else `dtype`.
    """
    vae_dtype = vae_dtype or dtype
    added = None
    if isinstance(cond, Mapping):
        added = {k: _shard_batch_axis(cfg_interleave(uncond[k], cond[k]) if use_cfg else cond[k], mesh)
                 for k in ("text_embeds", "time_ids")}
        cond, uncond = cond["context"], uncond["context"]
    step_keys = stream_keys(seeds, SAMPLER)
    noise = latents.astype(jnp.float32) if has_latents else seeded_normal(seeds, latents.shape[1:])
    x0 = None
    if img2img:
        if "latents" in init_images:
            x0 = init_images["latents"].astype(jnp.float32)
        else:
            x0 = _encode_images(vae, params["vae"], init_images["images"], init_images["encoder_noise"],
                                seeds=seeds, stream=ENCODER, dtype=vae_dtype)
        x = x0 if handoff else sched.add_noise_start(state, x0, noise)
    else:
        x = noise * state.init_noise_sigma
    if inpaint_mode is not None:
        encode = functools.partial(_encode_images, vae, params["vae"], seeds=seeds, stream=MASKED_ENCODER,
                                   dtype=dtype)
        x, inpaint = inpaint_lib.loop_inputs(inpaint_mode, sched, state, encode, inpaint, x0, noise, x)
    x = _shard_batch_axis(x, mesh)
    state = state.replace(history=_shard_history(state.history, mesh, x.shape))
    context = (cfg_interleave(uncond, cond) if use_cfg else cond).astype(dtype)
    context = _shard_batch_axis(context, mesh)
    control_embeds = None if control is None else controlnet_lib.embed_images(
        control, params["controlnet"], use_cfg=use_cfg, interleave=cfg_interleave)

    def body(i, carry):
        x, st = carry
        x1 = sched.scale_model_input(st, x, i).astype(dtype)  # what a ControlNet reads
        xin = inpaint_lib.model_input(inpaint, x1)
        if use_cfg:
            xin = _shard_batch_axis(cfg_interleave(xin, xin), mesh)
        t = jnp.broadcast_to(st.timesteps[i], (xin.shape[0],))
        res = {} if control is None else controlnet_lib.run_controlnets(
            control, params["controlnet"], control_embeds, x1, xin, t, context, i, use_cfg=use_cfg,
            split=cfg_split, interleave=cfg_interleave)
        out = unet.apply({"params": params["unet"]}, xin, t, context, added, **res).astype(jnp.float32)
        if use_cfg:
            out_u, out_c = cfg_split(_shard_batch_axis(out, mesh))
            out = out_u + guidance_scale * (out_c - out_u)
        if preview is not None:
            _emit_preview(preview, sched, vae, params["vae"], st, x1, out, i, state.num_evals, vae_dtype)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(step_keys)
        x, st = sched.step(st, out, i, x, key=keys)
        x = inpaint_lib.blend(inpaint, x, i)
        # The carry leaves the body in the layout it entered with, so the
        # while loop never reshards it between steps.
        return _shard_batch_axis(x, mesh), st.replace(history=_shard_history(st.history, mesh, x.shape))

    x, _ = jax.lax.fori_loop(0, state.num_evals, body, (x, state))
    images = vae.apply({"params": params["vae"]}, _from_latents(vae, x).astype(vae_dtype), method=vae.decode)
    images = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return (images, x) if return_latents else images


def _with_extras(denoise, has_inpaint: bool, has_control: bool):
    """`denoise` (the partial'd `_denoise`) taking the eight common arguments
    and then only the extras this program has, in the order (inpaint inputs,
    `controlnet.Control`): a plain txt2img/img2img loop keeps eight."""
    def fn(*args):
        common, extra = args[:8], list(args[8:])
        inpaint = extra.pop(0) if has_inpaint else None
        control = extra.pop(0) if has_control else None
        return denoise(*common, inpaint, control)

    return fn


def _frozen(value):
    """A hashable stand-in for a config value (lists, dicts) for cache keys."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


class Sampler:
    """Compiled txt2img / img2img for one model on one mesh.

    Compiled functions are cached per (shapes, sampler and its effective
    config after per-call `scheduler_options`, settings that change the
    program); new prompts, seeds, guidance scales and params
    (`update_params`) reuse them.

    `params` holds the params the compiled functions run with: replicated on
    the mesh, with the U-Net's and the VAE's kernels in the compute dtype
    (`cast_kernels`) unless `cast_params=False`. `pipe.params` keeps the ones
    the Sampler was built with.
    """

    def __init__(self, pipe: StableDiffusion, *, mesh: Mesh | None = None, dtype=None,
                 attention_impl: str | None = None, cast_params: bool = True,
                 controlnets: Sequence[tuple[Any, Any]] = ()):
        """`dtype` (e.g. jnp.bfloat16) and `attention_impl` replace the
        modules' compute dtype and attention (`StableDiffusion.with_compute`);
        None keeps the ones `pipe` was built with. `cast_params` keeps a copy
        of the U-Net and VAE params with their kernels in the compute dtype
        when it differs from theirs (fp32 params, bf16 compute): the loop then
        reads half the bytes per step and casts nothing; False keeps the
        params as loaded, cast by the modules at every step.

        `controlnets`: (ControlNetModel, params) pairs (`convert.controlnet.
        load_controlnet`), checked against the U-Net (text width, residual
        shapes, control image size) and held as the params part
        "controlnet" (a list, replicated and cast like the U-Net's); a call
        given `control_images` runs all of them."""
        pipe = pipe.with_compute(dtype, attention_impl)
        if pipe.is_sdxl and controlnets:
            raise ValueError("ControlNets are not supported with SDXL models yet; build the Sampler without them")
        # diffusers runs an SDXL VAE whose config says force_upcast in fp32 when the pipeline is fp16.
        self._vae_upcast = bool(pipe.is_sdxl and pipe.vae.config.force_upcast
                                and jnp.dtype(pipe.dtype) == jnp.float16)
        self.vae_dtype = jnp.float32 if self._vae_upcast else pipe.dtype
        if self._vae_upcast:
            pipe = dataclasses.replace(pipe, vae=pipe.vae.clone(dtype=jnp.float32))
        for k, (net, _) in enumerate(controlnets):
            controlnet_lib.check_fits(net.config, pipe.unet.config, pipe.vae_scale, name=f"ControlNet {k}",
                                      latent_channels=pipe.latent_channels)
        # The nets compute like the U-Net (the dtype and attention it now has).
        self.controlnets = tuple(net.clone(dtype=pipe.unet.dtype, attention_impl=pipe.unet.attention_impl)
                                 for net, _ in controlnets)
        self.pipe = pipe
        self.mesh = mesh or make_mesh()
        self.dtype = pipe.dtype
        self.cast_params = bool(cast_params)
        repl, batch = _replicated(self.mesh), _batch_sharding(self.mesh)
        # Params, ids, embeddings: every input and output of both jits has a
        # sharding, so no call depends on where its arguments happen to live
        # and no program decides a layout of its own.
        self._encode = jax.jit(functools.partial(_encode_text, pipe.text_encoder),
                               in_shardings=(repl, batch), out_shardings=batch)
        self._weigh = jax.jit(_weight_chunks, in_shardings=(batch, batch), out_shardings=batch)
        if pipe.is_sdxl:
            self._encode_xl = jax.jit(functools.partial(sdxl_lib.encode_text, pipe.text_encoder, pipe.text_encoder_2),
                                      in_shardings=(repl, repl, batch, batch), out_shardings=(batch, batch))
        self._cast = jax.jit(functools.partial(cast_kernels, dtype=self.dtype), out_shardings=repl)
        self._loops: dict = {}
        self._schedulers: dict = {}
        self.params: dict = {}
        self._place(pipe.params)
        if controlnets:
            self._place({"controlnet": [p for _, p in controlnets]})

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def _place(self, params, copy: bool = False) -> None:
        """Puts `params` (parts of a `StableDiffusion.params` tree) on the mesh,
        replicated, casting the `CAST_PARTS` when `cast_params`. `copy`: never
        share a buffer with the arrays passed in."""
        repl = _replicated(self.mesh)
        placed = dict(self.params)
        for part, tree in params.items():
            # Arrays already laid out like this would otherwise be shared, not
            # copied; a trainer that donates its params to its next step would
            # then delete the Sampler's.
            tree = jax.device_put(tree, repl, may_alias=False if copy else None)
            upcast = part == "vae" and self._vae_upcast  # an SDXL VAE kept in fp32
            if self.cast_params and part in _SAMPLER_CAST_PARTS and not upcast and _needs_cast(tree, self.dtype):
                # One part at a time: at most one part is held twice (as
                # loaded and cast) while this runs.
                tree = self._cast(tree)
            placed[part] = tree
        self.params = placed

    def update_params(self, params: dict) -> None:
        """Replaces the params the compiled functions run with; nothing recompiles.

        `params` is a tree like `pipe.params` or a subset of its parts, e.g.
        `{"unet": new_unet_params}` from a trainer's eval (host or device
        arrays, on any devices). Each part must have the structure and shapes
        of the one it replaces, and dtypes that become its dtypes once cast
        (cast parts are cast again), so the compiled loops see the same
        inputs; a ValueError names the first leaf that differs. The Sampler
        keeps its own copy: the caller may donate or delete its arrays after.
        """
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(f"update_params got parts {unknown} this model does not have; "
                             f"pass a subset of {sorted(self.params)}")
        checked = {}
        for part, tree in params.items():
            cast = self.cast_params and part in _SAMPLER_CAST_PARTS and not (part == "vae" and self._vae_upcast)
            old = jax.tree_util.tree_flatten_with_path(self.params[part])
            new = jax.tree_util.tree_flatten_with_path(tree)
            old_paths = [jax.tree_util.keystr(p) for p, _ in old[0]]
            new_paths = [jax.tree_util.keystr(p) for p, _ in new[0]]
            if old_paths != new_paths:
                missing = sorted(set(old_paths) - set(new_paths))
                extra = sorted(set(new_paths) - set(old_paths))
                raise ValueError(f"update_params: {part} params do not match the model's "
                                 f"(missing {missing[:3]}, unexpected {extra[:3]}); pass the whole {part} "
                                 f"tree of the same model, or build a new Sampler for another model")
            for path, (_, o), (_, n) in zip(old_paths, old[0], new[0]):
                dt = _cast_dtype(n, self.dtype) if cast else jnp.dtype(n.dtype)
                if tuple(n.shape) != tuple(o.shape) or dt != o.dtype:
                    raise ValueError(f"update_params: {part}{path} is {n.dtype}{list(n.shape)}, the sampler runs "
                                     f"with {o.dtype}{list(o.shape)}; pass params of the same model in the "
                                     f"dtype it was loaded in, or build a new Sampler")
            # The Sampler's own container types (dict vs FrozenDict flatten to
            # the same leaves but are different pytrees to jit's cache).
            checked[part] = jax.tree.unflatten(old[1], [leaf for _, leaf in new[0]])
        self._place(checked, copy=True)

    def scheduler(self, name: str, scheduler_options: Mapping[str, Any] | None = None):
        """The named sampler built from the model's scheduler config, with
        `scheduler_options` overriding it (see `schedulers.build`); cached per
        (name, options)."""
        key = (name, _frozen(dict(scheduler_options or {})))
        if key not in self._schedulers:
            self._schedulers[key] = schedulers.build(name, self.pipe.scheduler_config, scheduler_options)
        return self._schedulers[key]

    def loop(self, name: str, use_cfg: bool, has_latents: bool, img2img: bool, *,
             scheduler_options: Mapping[str, Any] | None = None, return_latents: bool = False,
             inpaint: inpaint_lib.Mode | None = None, guess_mode: bool | None = None, handoff: bool = False,
             preview: Preview | None = None):
        """The jitted denoise+decode function for these static choices (cached).

        Its arguments: (params, cond, uncond, guidance_scale, seeds, latents,
        init_images, state), as `prepare` builds them, then the inpainting
        inputs with an `inpaint` mode and the `controlnet.Control` with a
        `guess_mode` (see `_with_extras`); it returns the images,
        or (images, final latents) when `return_latents`. Options that leave
        the sampler's effective config the same (e.g. a default passed
        explicitly) share one compiled function. `guess_mode`: None for a
        call without ControlNets, else the program runs all of the Sampler's
        ControlNets and takes a `controlnet.Control` as a last argument.
        `handoff` (SDXL `denoising_start`): img2img from the init latents as
        they are, without noising them. `preview`: a `Preview` (a program of
        its own, with host callbacks).
        """
        sched = self.scheduler(name, scheduler_options)
        key = (name, _frozen(sched.config), _frozen(sched.opts), use_cfg, has_latents, img2img,
               bool(return_latents), inpaint, guess_mode, bool(handoff)) + ((preview,) if preview is not None else ())
        if key not in self._loops:
            p = self.pipe
            fn = _with_extras(functools.partial(_denoise, p.unet, p.vae, sched, use_cfg, has_latents, img2img,
                                                bool(return_latents), self.dtype, self.mesh, inpaint_mode=inpaint,
                                                vae_dtype=self.vae_dtype, handoff=bool(handoff), preview=preview),
                              inpaint is not None, guess_mode is not None)
            repl, batch = _replicated(self.mesh), _batch_sharding(self.mesh)
            # Replicated: params, guidance scale and the scheduler state (its
            # per-image history buffers are split inside, see _denoise). Split
            # over the batch: embeddings, seeds, latents, init images and
            # encoder noise (None for txt2img: an empty pytree, any prefix
            # fits it), and the outputs.
            in_shardings = (repl, batch, batch, repl, batch, batch, batch, repl)
            if inpaint is not None:
                in_shardings += (batch,)  # masks, masked images, their encoder noise
            if guess_mode is not None:  # control images split, scales and keep flags replicated
                in_shardings += (controlnet_lib.Control(batch, repl, repl, self.controlnets, guess_mode),)
            self._loops[key] = jax.jit(fn, in_shardings=in_shardings, out_shardings=batch)
        return self._loops[key]

    def encode(self, prompts: Sequence[str], *, prompt_syntax: str = "a1111",
               num_chunks: int | None = None) -> jax.Array:
        """Prompt embeddings [n, k * L, D] (L the text context, 77 for SD),
        sharded over the batch.

        `prompt_syntax` "a1111": emphasis weights, and prompts longer than
        L - 2 tokens in k chunks of L (`t2i_jax.prompts`); every prompt is
        padded with empty chunks to the longest one's k, or to `num_chunks`.
        "none": the prompts as written, cut to L (k = 1).
        """
        tok = self.pipe.tokenizer
        return self._encode_chunks(*prompt_lib.stack(tok, prompt_lib.tokenize(tok, prompts, prompt_syntax),
                                                     num_chunks))

    def _encode_chunks(self, ids: np.ndarray, weights: np.ndarray) -> jax.Array:
        """(ids, weights) [n, k, L] from `prompts.stack` -> embeddings [n, k * L, D]."""
        n, k, length = ids.shape
        batch = _batch_sharding(self.mesh)
        z = self._encode(self.params["text_encoder"], jax.device_put(ids.reshape(n * k, length), batch))
        if k == 1 and (weights == 1).all():
            return z  # nothing to weight: the plain encoding, one program fewer
        return self._weigh(z, jax.device_put(weights, batch))

    def _encode_pair(self, prompts: list[str], negative_prompts: Sequence[str], use_cfg: bool,
                     prompt_syntax: str) -> tuple[jax.Array, jax.Array]:
        """(cond, uncond) embeddings; uncond is cond without guidance. Prompts
        and negative prompts in the same number of chunks (empty ones added),
        the most any of them needs."""
        tok = self.pipe.tokenizer
        chunked = prompt_lib.tokenize(tok, prompts, prompt_syntax)
        negative = prompt_lib.tokenize(tok, negative_prompts, prompt_syntax) if use_cfg else []
        k = max(len(ids) for ids, _ in chunked + negative)
        cond = self._encode_chunks(*prompt_lib.stack(tok, chunked, k))
        return cond, self._encode_chunks(*prompt_lib.stack(tok, negative, k)) if use_cfg else cond

    def prepare(self, prompts: Sequence[str], *, seeds: Sequence[int],
                negative_prompts: Sequence[str] | None = None, steps: int = 50,
                guidance_scale: float = 7.5, scheduler: str = "pndm", height: int = 512,
                width: int = 512, init_images: np.ndarray | None = None, strength: float = 0.8,
                latents: np.ndarray | None = None, noise: np.ndarray | None = None,
                encoder_noise: np.ndarray | None = None,
                scheduler_options: Mapping[str, Any] | None = None,
                return_latents: bool = False, mask_images: np.ndarray | None = None,
                masked_encoder_noise: np.ndarray | None = None,
                prompt_syntax: str = "a1111", control_images: Sequence[np.ndarray] | None = None,
                control_scales: float | Sequence[float] = 1.0,
                control_guidance_start: float | Sequence[float] = 0.0,
                control_guidance_end: float | Sequence[float] = 1.0, guess_mode: bool = False,
                sdxl: sdxl_lib.Conditions | None = None, denoising_start: float | None = None,
                denoising_end: float | None = None, init_latents: np.ndarray | None = None,
                preview: Preview | None = None) -> tuple[Any, tuple]:
        """The jitted loop of this call and its arguments, checked and placed on
        the mesh (the prompts already encoded): `fn(*args)` is the call's
        images (with `return_latents`, the pair (images, final latents) as
        device arrays). `__call__` takes the same arguments; this is for
        lowering, compiling or inspecting the exact program it runs.
        `preview` (a `Preview`) picks the loop variant with host hooks (the server's).
        """
        prompts = list(prompts)
        n = len(prompts)
        prompt_lib.check_syntax(prompt_syntax)
        xl = self.pipe.is_sdxl
        if not xl and (sdxl is not None or denoising_start is not None or denoising_end is not None
                       or init_latents is not None):
            raise ValueError("sdxl=, denoising_start=, denoising_end= and init_latents= are SDXL settings; "
                             f"{self.pipe.source or 'this model'} is an SD 1.x/2.x model")
        if xl and mask_images is not None:
            raise ValueError("inpainting (mask_images=) is not supported for SDXL models yet")
        if init_latents is not None and init_images is not None:
            raise ValueError("pass init_images= (pixels) or init_latents= (the base's latents), not both")
        check_settings(steps, guidance_scale,
                       strength if (init_images is not None or init_latents is not None) and denoising_start is None
                       else None)
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
        if scheduler_options is not None and not isinstance(scheduler_options, Mapping):
            raise ValueError(f"scheduler_options must be a dict of diffusers scheduler settings, "
                             f"e.g. {{'use_karras_sigmas': True}}; got {type(scheduler_options).__name__}")
        img2img = init_images is not None or init_latents is not None
        if denoising_start is not None and not img2img:
            raise ValueError("denoising_start= continues a run: pass the base's latents as init_latents= "
                             "(its return_latents output) or init_images=")
        if mask_images is None and masked_encoder_noise is not None:
            raise ValueError("masked_encoder_noise= is inpainting's; pass it with mask_images= and init_images=")
        if mask_images is not None and not img2img:
            raise ValueError("mask_images= need init_images=: inpainting repaints the white part of the mask "
                             "over an init image; pass both")
        vae_c, unet_c = self.pipe.latent_channels, self.pipe.unet.config.in_channels
        mode = inpaint_lib.mode_for(unet_c, vae_c, strength) if mask_images is not None else None
        if mode is None and unet_c != vae_c:
            raise ValueError(f"this U-Net takes {unet_c} input channels (an inpainting model); pass init_images= "
                             f"and mask_images= (CLI: --init-image and --mask)")
        if img2img and latents is not None:
            raise ValueError("latents= is txt2img's starting noise; for img2img pass the noise added to the "
                             "init latents as noise=")
        if not img2img and (noise is not None or encoder_noise is not None):
            raise ValueError("noise= and encoder_noise= are img2img's (they need init_images); for txt2img "
                             "pass the starting noise as latents=")
        use_cfg = guidance_scale > 1.0
        sched = self.scheduler(scheduler, scheduler_options)
        batch, repl = _batch_sharding(self.mesh), _replicated(self.mesh)
        lat_shape = (n, height // f, width // f, self.pipe.latent_channels)
        if denoising_start is not None or denoising_end is not None:
            state = self._window(sched, steps, lat_shape, denoising_start, denoising_end)
        else:
            state = sched.set_timesteps(steps, lat_shape, strength=strength if img2img else 1.0)
        given = latents if not img2img else noise

        def latent_array(name, x):
            if tuple(np.shape(x)) != lat_shape:
                raise ValueError(f"{name} have shape {tuple(np.shape(x))}; expected {lat_shape} "
                                 f"([n, H/f, W/f, C] with f = {f}, the VAE's downsampling factor)")
            return jax.device_put(np.asarray(x, np.float32), batch)

        lat = latent_array("latents" if not img2img else "noise", given) if given is not None else \
            jax.device_put(np.zeros(lat_shape, np.float32), batch)
        init = None
        if init_latents is not None:
            init = {"latents": latent_array("init_latents", init_latents)}
        elif img2img:
            init_images = np.asarray(init_images, np.float32)
            if init_images.shape != (n, height, width, 3):
                raise ValueError(f"init images have shape {init_images.shape}; expected {(n, height, width, 3)}")
            init = {"images": jax.device_put(init_images * 2.0 - 1.0, batch),
                    "encoder_noise": None if encoder_noise is None else latent_array("encoder_noise", encoder_noise)}
        inp = None
        if mode is not None:
            masks = inpaint_lib.check_masks(mask_images, n, height, width)
            inp = jax.device_put(inpaint_lib.host_inputs(mode, masks, init_images * 2.0 - 1.0, f), batch)
            inp["masked_encoder_noise"] = None if masked_encoder_noise is None else \
                latent_array("masked_encoder_noise", masked_encoder_noise)
        control = self._control(control_images, control_scales, control_guidance_start, control_guidance_end,
                                guess_mode, n, height, width, state.num_evals)
        if xl:
            cond, uncond = self._encode_xl_pair(prompts, negative_prompts, use_cfg, height, width,
                                                sdxl or sdxl_lib.Conditions(), img2img)
        else:
            cond, uncond = self._encode_pair(prompts, negative_prompts or [""] * n, use_cfg, prompt_syntax)
        fn = self.loop(scheduler, use_cfg, given is not None, img2img, scheduler_options=scheduler_options,
                       return_latents=return_latents, inpaint=mode,
                       guess_mode=None if control is None else control.guess_mode,
                       handoff=denoising_start is not None, preview=preview)
        args = (self.params, cond, uncond, jax.device_put(np.float32(guidance_scale), repl),
                jax.device_put(np.asarray(seeds, np.uint32), batch), lat, init,
                jax.device_put(state, repl))
        return fn, args + (() if mode is None else (inp,)) + (() if control is None else (control,))

    @staticmethod
    def _window(sched, steps, shape, denoising_start, denoising_end):
        """The scheduler state of the evaluations SDXL's `denoising_start` / `denoising_end` keep."""
        full = sched.set_timesteps(steps, shape)
        begin, end = sdxl_lib.timestep_window(np.asarray(full.timesteps), sched.config["num_train_timesteps"],
                                              sched.order, denoising_start=denoising_start,
                                              denoising_end=denoising_end)
        state = sched.set_timesteps(steps, shape, begin=begin) if begin else full
        keep = end - begin
        # Every table is per evaluation (leading axis K): the first `keep` rows are this run's.
        return state.replace(timesteps=state.timesteps[:keep],
                             tables={k: v[:keep] for k, v in state.tables.items()})

    def _encode_xl_pair(self, prompts, negative_prompts, use_cfg, height, width, cond: sdxl_lib.Conditions,
                        img2img: bool):
        """SDXL's (cond, uncond): dicts of `context` (both encoders' penultimate states), `text_embeds`
        (the pooled projection) and `time_ids`, each [n, ...] split over the batch."""
        p, n = self.pipe, len(prompts)
        for name in ("original_size", "target_size", "negative_original_size", "negative_target_size",
                     "crops_coords_top_left", "negative_crops_coords_top_left"):
            sdxl_lib.check_sizes(name, getattr(cond, name))
        batch = _batch_sharding(self.mesh)
        num_ids = unet_lib.text_time_sizes(p.unet.config, p.text_encoder_2.config.projection_dim)
        aesthetic = bool(p.pipeline_options.get("requires_aesthetics_score", False))
        pos_ids, neg_ids = sdxl_lib.time_ids(cond, height, width, aesthetic=aesthetic, img2img=img2img,
                                             num_ids=num_ids)

        def encode(texts):
            ids1 = None if p.text_encoder is None else jax.device_put(p.tokenizer(texts), batch)
            states, pooled = self._encode_xl(self.params.get("text_encoder"), self.params["text_encoder_2"], ids1,
                                             jax.device_put(p.tokenizer_2(texts), batch))
            return states, pooled

        def pack(states, pooled, ids):
            return {"context": states, "text_embeds": pooled,
                    "time_ids": jax.device_put(np.ascontiguousarray(np.broadcast_to(ids, (n, ids.size))), batch)}

        states, pooled = encode(prompts)
        pos = pack(states, pooled, pos_ids)
        if not use_cfg:
            return pos, pos
        # diffusers: no negative prompt on a force_zeros_for_empty_prompt model (the base) is zeros.
        if negative_prompts is None and p.pipeline_options.get("force_zeros_for_empty_prompt", True):
            zeros = [jax.device_put(np.zeros(a.shape, a.dtype), batch) for a in (states, pooled)]
            return pos, pack(*zeros, neg_ids)
        return pos, pack(*encode(list(negative_prompts or [""] * n)), neg_ids)

    def _control(self, images, scales, starts, ends, guess_mode, n, height, width, num_evals):
        """The call's `controlnet.Control` (placed on the mesh), or None
        without control images; checks them with diffusers' rules."""
        if images is None:
            if guess_mode:
                raise ValueError("guess_mode=True needs control_images (it is a ControlNet setting)")
            return None
        nets = self.controlnets
        if not nets:
            raise ValueError("control_images were given, but this Sampler has no ControlNets; build it with "
                             "Sampler(pipe, controlnets=[convert.controlnet.load_controlnet(...)])")
        images = [images] if isinstance(images, np.ndarray) or hasattr(images, "shape") else list(images)
        if len(images) != len(nets):
            raise ValueError(f"got {len(images)} control images for {len(nets)} ControlNets; pass one per "
                             "ControlNet, in the order the Sampler holds them")

        def per_net(name, v):
            v = [float(v)] * len(nets) if np.ndim(v) == 0 else [float(x) for x in v]
            if len(v) != len(nets):
                raise ValueError(f"{name} has {len(v)} values for {len(nets)} ControlNets; pass one, or one per net")
            return v

        scales, starts = per_net("control_scales", scales), per_net("control_guidance_start", starts)
        ends = per_net("control_guidance_end", ends)
        for k, (s, e) in enumerate(zip(starts, ends)):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(f"ControlNet {k}: control guidance start {s} and end {e} must satisfy "
                                 "0 <= start < end <= 1 (fractions of the sampling steps), e.g. 0.0 and 1.0")
        placed = []
        for k, (net, im) in enumerate(zip(nets, images)):
            im = np.asarray(im, np.float32)
            im = im[None] if im.ndim == 3 else im
            c = net.config.conditioning_channels
            if im.ndim != 4 or im.shape[-1] != c or im.shape[0] not in (1, n):
                raise ValueError(f"control image {k} has shape {im.shape}; expected [{n} or 1, {height}, {width}, "
                                 f"{c}] (float in [0, 1], one per prompt or one for all)")
            if im.shape[1:3] != (height, width):
                raise ValueError(f"control image {k} is {im.shape[1]}x{im.shape[2]} (height x width), but this call "
                                 f"makes {height}x{width} images; resize it to {height}x{width} (the CLI does)")
            placed.append(jax.device_put(np.ascontiguousarray(np.broadcast_to(im, (n,) + im.shape[1:])),
                                         _batch_sharding(self.mesh)))
        repl = _replicated(self.mesh)
        # diffusers reads guess mode from its first net when one pools its residuals.
        guess = bool(guess_mode or nets[0].config.global_pool_conditions)
        return controlnet_lib.Control(tuple(placed), jax.device_put(np.asarray(scales, np.float32), repl),
                                      jax.device_put(controlnet_lib.keep_mask(num_evals, starts, ends), repl),
                                      nets, guess)

    def __call__(self, prompts: Sequence[str], *, seeds: Sequence[int],
                 negative_prompts: Sequence[str] | None = None, steps: int = 50,
                 guidance_scale: float = 7.5, scheduler: str = "pndm", height: int = 512,
                 width: int = 512, init_images: np.ndarray | None = None, strength: float = 0.8,
                 latents: np.ndarray | None = None, noise: np.ndarray | None = None,
                 encoder_noise: np.ndarray | None = None,
                 scheduler_options: Mapping[str, Any] | None = None,
                 return_latents: bool = False, mask_images: np.ndarray | None = None,
                 masked_encoder_noise: np.ndarray | None = None, keep_unmasked: bool = False,
                 prompt_syntax: str = "a1111", control_images: Sequence[np.ndarray] | None = None,
                 control_scales: float | Sequence[float] = 1.0,
                 control_guidance_start: float | Sequence[float] = 0.0,
                 control_guidance_end: float | Sequence[float] = 1.0, guess_mode: bool = False,
                 sdxl: sdxl_lib.Conditions | None = None, denoising_start: float | None = None,
                 denoising_end: float | None = None, init_latents: np.ndarray | None = None):
        """Generates one image per prompt; returns float32 [n, H, W, 3] in [0, 1]
        (with `return_latents`, the pair (images, final latents)).

        `seeds[b]` fixes image b. `negative_prompts` replace the empty
        unconditional prompt. `guidance_scale` 1.0 skips the unconditional
        half. `init_images` (float [n, H, W, 3] in [0, 1]) switch to img2img
        with `strength`. Latent-shaped arrays are [n, H/f, W/f, C] with f the
        VAE's downsampling factor (`pipe.vae_scale`) and C its latent
        channels: `latents` replace txt2img's seeded starting noise (scaled
        by the sampler's `init_noise_sigma`, as diffusers' `latents=`);
        img2img's `noise` replaces the seeded noise added to the init latents
        and `encoder_noise` the seeded noise of the VAE posterior's sample
        (diffusers draws both from its generator: passing both reproduces
        its img2img exactly). `scheduler_options` override the model's
        scheduler config for this call (diffusers config keys such as
        `use_karras_sigmas`, `timestep_spacing`, `final_sigmas_type`,
        `skip_prk_steps`, and DDIM's `eta`; see `schedulers.build`): a new
        set compiles once, the same set again reuses it. `return_latents`
        also returns the final latents (before the VAE decode, scaled as the
        U-Net sees them; diffusers' `output_type="latent"`), numpy
        [n, H/f, W/f, C]. `prompt_syntax` "a1111" (the default) reads
        AUTOMATIC1111's emphasis, `(word:1.3)`, and encodes prompts longer
        than the text context in chunks; "none" takes them as written and cuts
        them (`t2i_jax.prompts`). Prompts of one call, and their negative
        prompts, are padded to the same number of chunks: an image whose
        prompt fits one chunk is only the same as when made alone if its
        batch needs one chunk too (the CLI groups jobs by chunk count). The
        batch must divide by the device count (pad it).

        Inpainting: `mask_images` (float [n, H, W] or [n, H, W, 1] in [0, 1],
        white = repaint; binarised at 0.5 as diffusers does) with
        `init_images`, as diffusers' StableDiffusionInpaintPipeline, for a
        9-channel inpainting U-Net or an ordinary one (`t2i_jax.inpaint`).
        `strength` 1.0 starts from pure noise (`noise` scaled by the
        sampler's init_noise_sigma, diffusers' `latents=`); below 1 from the
        init latents noised as img2img. `masked_encoder_noise` replaces the
        seeded noise of the masked image's VAE posterior sample (9-channel
        U-Nets; diffusers draws it from its generator after `noise`).
        `keep_unmasked` pastes the init images back with `mask_images` as
        alpha (`inpaint.composite`): where a mask is 0 the pixels are the
        init image's exactly.

        ControlNet (a Sampler built with `controlnets=`): `control_images`,
        one per net, float [n or 1, H, W, C] in [0, 1] (diffusers' control
        image, not normalised to [-1, 1]); `control_scales` (diffusers'
        `controlnet_conditioning_scale`), `control_guidance_start`/`_end`
        (fractions of the evaluations the net acts in) each one value or one
        per net; `guess_mode` runs the nets on the conditional half only,
        with residuals weighted 0.1 .. 1.0 from the top block down.

        SDXL (`pipe.is_sdxl`; `t2i_jax.sdxl`): `sdxl` holds the
        micro-conditioning (`sdxl.Conditions`: original size, crop, target
        size, their negative variants, the refiner's aesthetic scores;
        default: the call's size, no crop); prompts are taken as written
        (cut to 77 tokens, no A1111 emphasis). No `negative_prompts` on the
        base means zeros for the unconditional text, as diffusers. The base +
        refiner hand-off: the base with `denoising_end=0.8` and
        `return_latents=True`, then the refiner with `init_latents=` those
        latents and `denoising_start=0.8` (diffusers' `denoising_end` /
        `denoising_start`, same steps and sampler on both).
        """
        fn, args = self.prepare(prompts, seeds=seeds, negative_prompts=negative_prompts, steps=steps,
                                guidance_scale=guidance_scale, scheduler=scheduler, height=height, width=width,
                                init_images=init_images, strength=strength, latents=latents, noise=noise,
                                encoder_noise=encoder_noise, scheduler_options=scheduler_options,
                                return_latents=return_latents, mask_images=mask_images,
                                masked_encoder_noise=masked_encoder_noise,
                                prompt_syntax=prompt_syntax, control_images=control_images,
                                control_scales=control_scales, control_guidance_start=control_guidance_start,
                                control_guidance_end=control_guidance_end, guess_mode=guess_mode, sdxl=sdxl,
                                denoising_start=denoising_start, denoising_end=denoising_end,
                                init_latents=init_latents)
        if keep_unmasked and mask_images is None:
            raise ValueError("keep_unmasked=True needs mask_images= (and init_images=)")
        out = jax.device_get(fn(*args))
        images = np.asarray(out[0] if return_latents else out)
        if keep_unmasked:
            images = inpaint_lib.composite(images, init_images, inpaint_lib.check_masks(mask_images, *images.shape[:3]))
        return (images, np.asarray(out[1])) if return_latents else images


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] float images -> uint8, rounded as diffusers' `numpy_to_pil`."""
    return (np.asarray(images) * 255).round().astype(np.uint8)
