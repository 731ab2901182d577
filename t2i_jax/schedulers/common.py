"""Shared pieces of the samplers: config checking, noise schedules, the state.

Every sampler splits its work in two:

* host side (`set_timesteps`): numpy, float64 where it matters, builds the
  timesteps and one row of scalar constants per model evaluation ("tables").
  Anything that depends on the step count, the img2img start or the position
  in a multistep warm-up is resolved here, so no Python branch depends on the
  loop index later;
* device side (`step`, `scale_model_input`): pure `jnp`, indexes the tables
  with the loop index `i` (a traced int inside `lax.fori_loop`) and combines
  them with the sample and the model output.

The scalar constants mirror the float32 arithmetic of diffusers' PyTorch
schedulers (which the tests compare against to 1e-5 relative).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

F32 = np.float32

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------


@flax.struct.dataclass
class SchedulerState:
    """Everything a sampler needs inside the denoising loop; a pytree of arrays.

    The number of model evaluations of a run is `num_evals`, a static Python
    int (the length of `timesteps`), so a pipeline can write
    `lax.fori_loop(0, state.num_evals, body, carry)`.
    """

    # (K,) float32: the timestep to feed the model at evaluation i.
    timesteps: jax.Array
    # name -> (K, ...) float32 per-evaluation constants (coefficients, sigmas).
    tables: dict
    # name -> array: what multistep / two-stage samplers carry between
    # evaluations (previous model outputs, the sample before a Heun stage).
    history: dict
    # () float32: std of the pure-noise starting sample (txt2img).
    init_noise_sigma: jax.Array
    # (2,) float32: img2img start sample is start_coeffs[0] * x0 +
    # start_coeffs[1] * noise, i.e. x0 noised to the level of evaluation 0.
    start_coeffs: jax.Array

    @property
    def num_evals(self) -> int:
        """Model evaluations in this run (static: read from an array shape)."""
        return self.timesteps.shape[0]


# --------------------------------------------------------------------------
# Noise schedules (host side)
# --------------------------------------------------------------------------


def _linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    return np.linspace(start, end, num, dtype=np.float64).astype(F32)


def make_betas(config: Mapping[str, Any]) -> np.ndarray:
    """float32 betas of a diffusers config (trained_betas / beta_schedule)."""
    n = config["num_train_timesteps"]
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=F32)
    schedule = config["beta_schedule"]
    if schedule == "linear":
        return _linspace_f32(config["beta_start"], config["beta_end"], n)
    if schedule == "scaled_linear":
        return _linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
    if schedule == "squaredcos_cap_v2":
        # Glide's cosine schedule, betas capped at 0.999 (computed in float64).
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
            dtype=F32,
        )
    raise ValueError(f"beta_schedule {schedule!r} is not supported; use one of {BETA_SCHEDULES}")


def make_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """float32 cumulative product of (1 - beta), accumulated in float64 as torch does."""
    return np.cumprod((F32(1.0) - betas).astype(np.float64)).astype(F32)


def vp_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """float32 sigma(t) = sqrt((1 - abar) / abar) for every training timestep."""
    a = alphas_cumprod
    return np.sqrt((F32(1) - a) / a).astype(F32)


def spaced_timesteps(config: Mapping[str, Any], n: int, *, integer: bool, extra: int = 0) -> np.ndarray:
    """Descending inference timesteps for `timestep_spacing` (leading/trailing/linspace).

    `integer`: DDPM-style samplers round linspace to ints, sigma samplers keep
    float32 fractions. `extra=1` reproduces the DPM-Solver/UniPC variant that
    lays out n+1 points and drops the last.
    """
    T = config["num_train_timesteps"]
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        if extra:
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif integer:
            ts = np.linspace(0, T - 1, n).round()[::-1]
        else:
            return np.linspace(0, T - 1, n, dtype=F32)[::-1].copy()
    elif spacing == "leading":
        ratio = T // (n + extra)
        ts = (np.arange(0, n + extra) * ratio).round()[::-1]
        if extra:
            ts = ts[:-1]
        ts = ts + config["steps_offset"]
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(
            f"timestep_spacing {spacing!r} is not supported; use one of {TIMESTEP_SPACINGS}"
        )
    return ts.astype(np.int64) if integer or extra else ts.astype(F32)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose log-sigma interpolates to each sigma."""
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas: uniform in sigma^(1/rho), float64."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def t2img_begin(n: int, strength: float, order: int) -> int:
    """Index of the first model evaluation for img2img `strength` (diffusers' rule)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength {strength} is outside (0, 1]; use e.g. 0.75 for img2img")
    init = min(int(n * strength), n)
    if init < 1:
        raise ValueError(
            f"strength {strength} with {n} steps leaves no denoising step; "
            f"raise strength to at least {1 / n:.3g} or use more steps"
        )
    return (n - init) * order


# --------------------------------------------------------------------------
# Training-time helpers (device side)
# --------------------------------------------------------------------------


def _abar(sched_or_alphas_cumprod) -> jax.Array:
    table = getattr(sched_or_alphas_cumprod, "alphas_cumprod", sched_or_alphas_cumprod)
    return jnp.asarray(table, jnp.float32)


def _per_sample(v: jax.Array, like: jax.Array) -> jax.Array:
    v = jnp.reshape(v, (-1,))
    return v.reshape(v.shape + (1,) * (like.ndim - 1)) if v.shape[0] > 1 else v.reshape(())


def add_noise(sched_or_alphas_cumprod, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward diffusion q(x_t | x0) at integer timesteps `t` (scalar or (B,)).

    `sched_or_alphas_cumprod`: a sampler (its `alphas_cumprod`) or the table
    itself. Used for training targets and DDPM-family img2img.
    """
    abar = _abar(sched_or_alphas_cumprod)[jnp.asarray(t, jnp.int32)]
    a = _per_sample(jnp.sqrt(abar), x0)
    s = _per_sample(jnp.sqrt(1 - abar), x0)
    return (a * x0 + s * noise).astype(x0.dtype)


def get_velocity(sched_or_alphas_cumprod, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v-prediction target sqrt(abar) * noise - sqrt(1 - abar) * x0 at timesteps `t`."""
    abar = _abar(sched_or_alphas_cumprod)[jnp.asarray(t, jnp.int32)]
    a = _per_sample(jnp.sqrt(abar), x0)
    s = _per_sample(jnp.sqrt(1 - abar), x0)
    return (a * noise - s * x0).astype(x0.dtype)


def normal_like(key: jax.Array, like: jax.Array) -> jax.Array:
    """Standard normal noise shaped like `like` (float32).

    `key` is one PRNG key, or one key per batch element (raw `(B, 2)` uint32 or
    typed `(B,)`), in which case image b's noise depends only on its own key,
    not on the batch size.
    """
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    batched = key.ndim == (1 if typed else 2)
    if batched:
        if key.shape[0] != like.shape[0]:
            raise ValueError(f"got {key.shape[0]} keys for a batch of {like.shape[0]}; pass one key per image")
        return jax.vmap(lambda k: jax.random.normal(k, like.shape[1:], jnp.float32))(key)
    return jax.random.normal(key, like.shape, jnp.float32)


# --------------------------------------------------------------------------
# Base sampler
# --------------------------------------------------------------------------


class Scheduler:
    """Base of every sampler: a static config plus host precompute.

    Subclasses set the class attributes below and implement `_host(n, begin)`
    (the per-evaluation tables), `_history(shape, dtype)` and `step`.
    """

    name: ClassVar[str]
    # diffusers' class this sampler reproduces (named in error messages).
    diffusers_class: ClassVar[str]
    # diffusers' defaults for every config field this sampler implements.
    defaults: ClassVar[dict]
    # Fields diffusers' class has that are only accepted at these values.
    inert: ClassVar[dict] = {}
    # Accepted values of enumerated fields (beyond the shared ones).
    choices: ClassVar[dict] = {}
    prediction_types: ClassVar[tuple] = ("epsilon", "v_prediction", "sample")
    # Sampler knobs that are step arguments in diffusers (e.g. DDIM's eta).
    options: ClassVar[dict] = {}
    # Model evaluations per step (diffusers' `order`): img2img skips
    # `order * t_start` evaluations.
    order: ClassVar[int] = 1

    def __init__(self, config: Mapping[str, Any] | None = None, **options):
        cfg = dict(self.defaults)
        cfg.update(self.inert)
        for key, value in (config or {}).items():
            if key.startswith("_"):
                continue  # _class_name, _diffusers_version
            if key in self.inert:
                if value != self.inert[key] and not (value is None and self.inert[key] is None):
                    raise ValueError(
                        f"scheduler config field {key}={value!r} is not supported by the "
                        f"{self.name!r} sampler; only {self.inert[key]!r} (diffusers' default) is"
                    )
                continue
            if key in self.defaults:
                cfg[key] = value
            # Else the field belongs to another diffusers scheduler (e.g.
            # skip_prk_steps in SD's PNDM config read as Euler): diffusers'
            # from_config ignores those too. Fields no scheduler knows are
            # rejected by `from_config`.
        self.config = cfg
        self._check_config()
        for key in options:
            if key not in self.options:
                raise ValueError(
                    f"unknown option {key!r} for the {self.name!r} sampler; "
                    f"options are {sorted(self.options) or 'none'}"
                )
        self.opts = {**self.options, **options}
        self.betas = make_betas(cfg)
        if self.betas.shape != (cfg["num_train_timesteps"],):
            raise ValueError(
                f"trained_betas has {self.betas.shape[0]} entries, num_train_timesteps is "
                f"{cfg['num_train_timesteps']}; they must agree"
            )
        # float32 numpy; device code turns it into a jnp constant.
        self.alphas_cumprod = make_alphas_cumprod(self.betas)

    def _check_config(self):
        cfg = self.config
        checks = {
            "beta_schedule": BETA_SCHEDULES,
            "timestep_spacing": TIMESTEP_SPACINGS,
            "prediction_type": self.prediction_types,
            **self.choices,
        }
        for key, allowed in checks.items():
            if key in cfg and cfg[key] not in allowed:
                raise ValueError(
                    f"scheduler config field {key}={cfg[key]!r} is not supported by the "
                    f"{self.name!r} sampler; use one of {tuple(allowed)}"
                )
        n = cfg["num_train_timesteps"]
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"num_train_timesteps={n!r} must be an int >= 2")

    def __repr__(self):
        return f"{type(self).__name__}({self.config}, {self.opts})"

    # -- host side ---------------------------------------------------------

    @property
    def needs_key(self) -> bool:
        """Whether `step` draws noise (then it needs `key`)."""
        return False

    def set_timesteps(self, num_inference_steps: int, shape, *, strength: float = 1.0,
                      dtype=jnp.float32, begin: int | None = None) -> SchedulerState:
        """Precompute a run of `num_inference_steps` steps for samples of `shape`.

        `strength` < 1 starts img2img-style at a later timestep (diffusers'
        `strength`): the state then only holds the evaluations that run, and
        `add_noise_start` noises the init image to the first one. `begin`
        names that first evaluation directly instead (SDXL's
        `denoising_start`, `t2i_jax.sdxl.timestep_window`).
        """
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_inference_steps={n!r}; it must be an int >= 1")
        T = self.config["num_train_timesteps"]
        if n > T:
            raise ValueError(f"num_inference_steps={n} exceeds num_train_timesteps={T}; use at most {T}")
        if begin is None:
            begin = t2img_begin(int(n), float(strength), self.order)
        host = self._host(int(n), begin)
        tables = {k: jnp.asarray(np.asarray(v, F32)) for k, v in host["tables"].items()}
        return SchedulerState(
            timesteps=jnp.asarray(np.asarray(host["timesteps"], F32)),
            tables=tables,
            history=self._history(tuple(shape), dtype),
            init_noise_sigma=jnp.asarray(F32(host["init_noise_sigma"])),
            start_coeffs=jnp.asarray(np.asarray(host["start"], F32)),
        )

    def _host(self, n: int, begin: int) -> dict:
        raise NotImplementedError

    def _history(self, shape, dtype) -> dict:
        return {}

    # -- device side -------------------------------------------------------

    def scale_model_input(self, state: SchedulerState, sample: jax.Array, i) -> jax.Array:
        """The model's input at evaluation `i` (sigma samplers divide by sqrt(sigma^2+1))."""
        denom = state.tables.get("in_denom")
        if denom is None:
            return sample
        return (sample / denom[i]).astype(sample.dtype)

    def add_noise_start(self, state: SchedulerState, x0: jax.Array, noise: jax.Array) -> jax.Array:
        """img2img: `x0` noised to the level of the state's first evaluation."""
        c = state.start_coeffs
        return (c[0] * x0 + c[1] * noise).astype(x0.dtype)

    def noise_levels(self, state: SchedulerState) -> jax.Array:
        """(K, 2) float32: row i holds (a_i, s_i) such that `a_i * x0 + s_i * noise`
        is `x0` at the noise level of the sample evaluation i starts from, as
        diffusers' `add_noise` computes it during a run (inpainting re-noises
        the known latents to the next evaluation's level after every step).

        Row 0 is `start_coeffs`. The sample's parametrisation decides the
        formula: DPM-Solver and UniPC keep VP `alpha`, `sigma` tables (their
        add_noise is alpha_t x0 + sigma_t noise); the sigma samplers (Euler,
        Euler ancestral, Heun, LMS) a `sigma` table (x0 + sigma noise, Heun's
        interleaved sigmas included); the DDPM family (DDPM, DDIM, PNDM)
        noises to the timestep fed at i: sqrt(abar_t), sqrt(1 - abar_t).
        """
        tb = state.tables
        if "alpha" in tb and "sigma" in tb:
            return jnp.stack([tb["alpha"], tb["sigma"]], axis=-1)
        if "sigma" in tb:
            return jnp.stack([jnp.ones_like(tb["sigma"]), tb["sigma"]], axis=-1)
        abar = jnp.asarray(self.alphas_cumprod)[state.timesteps.astype(jnp.int32)]
        return jnp.stack([jnp.sqrt(abar), jnp.sqrt(1 - abar)], axis=-1)

    def step(self, state: SchedulerState, model_output: jax.Array, i, sample: jax.Array, key=None):
        """One model evaluation's update: returns `(next_sample, new_state)`."""
        raise NotImplementedError

    def _key(self, key):
        if key is None:
            raise ValueError(f"the {self.name!r} sampler draws noise; pass key= to step()")
        return key


def vp_start(alphas_cumprod: np.ndarray, t: int) -> tuple:
    """img2img coefficients sqrt(abar_t), sqrt(1 - abar_t) (float32 as torch)."""
    a = alphas_cumprod[int(t)]
    return (np.sqrt(a), np.sqrt(F32(1) - a))


def sigma_start(sigma) -> tuple:
    """img2img coefficients for sigma samplers: x0 + sigma * noise."""
    return (F32(1.0), F32(sigma))
