"""Host-side sigma schedules shared by the k-diffusion style samplers
(LMS, Euler, Euler ancestral, Heun): x = x0 + sigma * noise."""

from __future__ import annotations

import numpy as np

from t2i_jax.schedulers import common
from t2i_jax.schedulers.common import F32

SIGMA_FIELDS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    timestep_spacing="linspace",
    steps_offset=0,
)


def discrete_sigmas(sched, n, *, karras=False, sigma_min=None, sigma_max=None, final="zero"):
    """(timesteps float, sigmas float32 with the final sigma appended)."""
    train = common.vp_sigmas(sched.alphas_cumprod)
    ts = common.spaced_timesteps(sched.config, n, integer=False)
    sig = np.interp(ts, np.arange(len(train)), train)
    if karras:
        lo = sigma_min if sigma_min is not None else float(F32(sig[-1]))
        hi = sigma_max if sigma_max is not None else float(F32(sig[0]))
        sig = common.karras_sigmas(lo, hi, n)
        ts = common.sigma_to_t(sig, np.log(train))
    if final == "sigma_min":
        a0 = sched.alphas_cumprod[0]
        last = np.sqrt((F32(1) - a0) / a0)
    else:
        last = 0.0
    return np.asarray(ts, F32), np.concatenate([sig, [last]]).astype(F32)


def init_noise_sigma(sched, sigmas):
    """diffusers: max sigma, or sqrt(max^2 + 1) for 'leading' spacing."""
    m = sigmas.max()
    if sched.config["timestep_spacing"] in ("linspace", "trailing"):
        return m
    return np.sqrt(m**2 + F32(1))


def model_tables(sigma):
    """Per-evaluation constants for converting model outputs at `sigma`."""
    s2p1 = sigma**2 + F32(1)
    return dict(
        in_denom=np.sqrt(s2p1),
        sigma=sigma,
        s2p1=s2p1,
        v_coef=-sigma / np.sqrt(s2p1),
    )


def sigma_x0(prediction_type, out, sample, tb, i, sigma_key="sigma"):
    """x0 from a model output at noise level sigma (diffusers' formulas)."""
    if prediction_type == "epsilon":
        return sample - tb[sigma_key][i] * out
    if prediction_type == "v_prediction":
        return out * tb["v_coef"][i] + sample / tb["s2p1"][i]
    return out
