"""DDPM (Ho et al. 2020) ancestral sampling, as diffusers' DDPMScheduler."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from t2i_jax.schedulers import common
from t2i_jax.schedulers.common import F32

_VP_FIELDS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=0,
)


def vp_x0(prediction_type, out, sample, sqrt_a, sqrt_b):
    """x0 from a model output, VP parameterisation (same op order as diffusers)."""
    if prediction_type == "epsilon":
        return (sample - sqrt_b * out) / sqrt_a
    if prediction_type == "v_prediction":
        return sqrt_a * sample - sqrt_b * out
    return out  # "sample"


class DDPM(common.Scheduler):
    """Ancestral DDPM sampler; draws fresh noise every step (needs `key`)."""

    name = "ddpm"
    diffusers_class = "DDPMScheduler"
    defaults = dict(_VP_FIELDS, variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0)
    inert = dict(thresholding=False, rescale_betas_zero_snr=False)
    choices = dict(variance_type=("fixed_small", "fixed_small_log", "fixed_large"))

    @property
    def needs_key(self):
        return True

    def _host(self, n, begin):
        abar = self.alphas_cumprod
        ts = common.spaced_timesteps(self.config, n, integer=True)
        prev = np.concatenate([ts[1:], [-1]])
        a_t = abar[ts]
        a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], F32(1.0)).astype(F32)
        b_t = F32(1) - a_t
        b_prev = F32(1) - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = F32(1) - cur_alpha
        var = np.maximum(b_prev / b_t * cur_beta, F32(1e-20))
        vt = self.config["variance_type"]
        if vt == "fixed_small":
            std = np.sqrt(var)
        elif vt == "fixed_small_log":
            std = np.exp(F32(0.5) * np.log(var))
        else:  # fixed_large
            std = np.sqrt(cur_beta)
        std = np.where(ts > 0, std, F32(0))  # no noise when stepping to x_0
        tables = dict(
            sqrt_a=np.sqrt(a_t),
            sqrt_b=np.sqrt(b_t),
            c_x0=(np.sqrt(a_prev) * cur_beta) / b_t,
            c_s=np.sqrt(cur_alpha) * b_prev / b_t,
            std=std,
        )
        return dict(
            timesteps=ts[begin:],
            tables={k: v[begin:] for k, v in tables.items()},
            init_noise_sigma=1.0,
            start=common.vp_start(abar, ts[begin]),
        )

    def step(self, state, model_output, i, sample, key=None):
        """x_{t_prev} = c_x0 * x0 + c_s * x_t + std * noise; needs `key`."""
        tb = state.tables
        x0 = vp_x0(self.config["prediction_type"], model_output, sample, tb["sqrt_a"][i], tb["sqrt_b"][i])
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = jnp.clip(x0, -r, r)
        prev = tb["c_x0"][i] * x0 + tb["c_s"][i] * sample
        prev = prev + tb["std"][i] * common.normal_like(self._key(key), sample)
        return prev.astype(sample.dtype), state
