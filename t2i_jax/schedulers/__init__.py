"""Pure-JAX diffusion samplers with a pytree state.

Usage (the same for every sampler)::

    sched = from_config("dpmpp_2m", scheduler_config_json_dict)   # host, once
    state = sched.set_timesteps(num_steps, latents.shape)          # host, numpy
    x = noise * state.init_noise_sigma                             # txt2img
    # img2img: state = sched.set_timesteps(n, shape, strength=0.6)
    #          x = sched.add_noise_start(state, x0, noise)

    def body(i, carry):                     # i: traced loop index
        x, state = carry
        x_in = sched.scale_model_input(state, x, i)
        out = unet(x_in, state.timesteps[i], text)
        key_i = jax.random.fold_in(key, i)  # only stochastic samplers use it
        return sched.step(state, out, i, x, key=key_i)

    x, state = jax.lax.fori_loop(0, state.num_evals, body, (x, state))

* `sched` is a plain Python object holding the (static) config; close over it
  in `jax.jit`. `sched.alphas_cumprod` is its float32 training table.
* `state` (`SchedulerState`) is a pytree: `timesteps` (K,), per-evaluation
  constant `tables`, `history` buffers of multistep / two-stage samplers,
  `init_noise_sigma`, `start_coeffs`. `state.num_evals` = K is a static int,
  the number of model evaluations, diffusers' `len(scheduler.timesteps)`
  (Heun: 2n - 1; PNDM: n + 9 with its Runge-Kutta warm-up, diffusers'
  default, n + 1 with `skip_prk_steps=True`; others n).
* `step(state, model_output, i, sample, key=None) -> (next_sample, state)`
  handles every evaluation, including Heun's corrector stage and UniPC's
  corrector (applied at evaluation i with the output at i, before its
  predictor), with no Python branch on `i`. Samplers with `sched.needs_key`
  (ddpm, euler_a, ddim with eta > 0) draw `jax.random.normal(key,
  sample.shape)`; pass one key, or one per image (shape (B, 2) or typed
  (B,)) for batch-size-independent noise.
* Training helpers: `add_noise(sched, x0, noise, t)` and
  `get_velocity(sched, x0, noise, t)` at integer timesteps `t`.
* Sampler knobs that diffusers takes as step() arguments are options:
  `from_config("ddim", cfg, eta=0.3)`, `from_config("lms", cfg, lms_order=4)`.
* Per-call settings over a model's config, config fields and options alike,
  checked against what the sampler accepts:
  `build("euler", cfg, {"use_karras_sigmas": True, "timestep_spacing": "trailing"})`,
  `build("ddim", cfg, {"eta": 0.5})`.

Each sampler reproduces the diffusers PyTorch scheduler named in its
`diffusers_class` (tests/test_schedulers.py compares every intermediate
sample to 1e-5 relative).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from t2i_jax.schedulers.common import Scheduler, SchedulerState, add_noise, get_velocity  # noqa: F401
from t2i_jax.schedulers.ddim import DDIM
from t2i_jax.schedulers.ddpm import DDPM
from t2i_jax.schedulers.dpmsolver import DPMSolverPP
from t2i_jax.schedulers.euler import Euler
from t2i_jax.schedulers.euler_ancestral import EulerAncestral
from t2i_jax.schedulers.heun import Heun
from t2i_jax.schedulers.lms import LMS
from t2i_jax.schedulers.pndm import PNDM
from t2i_jax.schedulers.unipc import UniPC

SCHEDULERS = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "pndm": PNDM,
    "lms": LMS,
    "euler": Euler,
    "euler_a": EulerAncestral,
    "heun": Heun,
    "dpmpp_2m": DPMSolverPP,
    "unipc": UniPC,
}

# Fields of diffusers' schedulers that no sampler here reads and that only
# matter together with a field we reject when set (thresholding).
_HARMLESS = {"dynamic_thresholding_ratio", "sample_max_value"}


def _known_fields() -> set:
    known = set(_HARMLESS)
    for cls in SCHEDULERS.values():
        known |= set(cls.defaults) | set(cls.inert)
    return known


def from_config(name: str, config: Mapping[str, Any] | None = None, **options) -> Scheduler:
    """Build sampler `name` from a diffusers `scheduler_config.json` dict.

    Fields of other diffusers schedulers (e.g. PNDM's `skip_prk_steps` when
    SD's config is read as "euler") are ignored, as diffusers does; a field
    no diffusers scheduler has, or a feature this sampler does not implement
    set to a non-default value, raises ValueError naming the field.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    known = _known_fields()
    for key in config or {}:
        if not key.startswith("_") and key not in known:
            raise ValueError(
                f"scheduler config field {key!r} is unknown (not a field of any supported "
                f"diffusers scheduler); remove it"
            )
    return SCHEDULERS[name](config, **options)


def accepting(key: str) -> list[str]:
    """Names of the samplers that take `key` as a per-call option of `build`."""
    return sorted(n for n, cls in SCHEDULERS.items() if key in cls.defaults or key in cls.options)


def build(name: str, config: Mapping[str, Any] | None = None,
          scheduler_options: Mapping[str, Any] | None = None) -> Scheduler:
    """Sampler `name` from a model's scheduler config with per-call overrides.

    `scheduler_options` holds diffusers scheduler config keys that replace the
    model's for this sampler (e.g. `use_karras_sigmas`, `timestep_spacing`,
    `final_sigmas_type`, `skip_prk_steps`) and the sampler's step options
    (DDIM's `eta`, as diffusers' pipeline `eta=` argument; LMS's
    `lms_order`). Unlike a model's config, where fields of other schedulers
    are ignored, an option this sampler does not take raises a ValueError
    that names it and lists the samplers that do.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls = SCHEDULERS[name]
    overrides, options = {}, {}
    for key, value in (scheduler_options or {}).items():
        if key in cls.options:
            options[key] = value
        elif key in cls.defaults or key in cls.inert:
            overrides[key] = value  # inert fields: only their one value passes
        else:
            who = accepting(key)
            why = ""
            if key == "eta":
                # diffusers' pipelines hand `eta` only to a step() that takes it.
                why = (f" (diffusers' pipelines pass eta only to schedulers whose step() takes it, and "
                       f"{cls.diffusers_class}'s does not)")
            raise ValueError(
                f"scheduler option {key}={value!r} is not supported by the {name!r} sampler{why}; "
                + (f"samplers that accept {key}: {who}" if who else
                   f"no sampler here accepts {key!r}; remove it")
            )
    return from_config(name, {**(config or {}), **overrides}, **options)


__all__ = [
    "SCHEDULERS",
    "Scheduler",
    "SchedulerState",
    "accepting",
    "add_noise",
    "build",
    "from_config",
    "get_velocity",
    *[cls.__name__ for cls in SCHEDULERS.values()],
]
