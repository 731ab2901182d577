"""Euler ancestral (k-diffusion's sample_euler_ancestral, eta=1), as diffusers'
EulerAncestralDiscreteScheduler."""

from __future__ import annotations

import numpy as np

from t2i_jax.schedulers import common
from t2i_jax.schedulers import sigmas as S


class EulerAncestral(common.Scheduler):
    """Euler step to sigma_down, then fresh noise of std sigma_up (needs `key`)."""

    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    defaults = dict(S.SIGMA_FIELDS)
    inert = dict(rescale_betas_zero_snr=False)
    prediction_types = ("epsilon", "v_prediction")

    @property
    def needs_key(self):
        return True

    def _host(self, n, begin):
        ts, sig = S.discrete_sigmas(self, n)
        s_from, s_to = sig[:-1], sig[1:]
        up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        down = np.sqrt(s_to**2 - up**2)
        tables = S.model_tables(s_from)
        tables.update(dt=down - s_from, sigma_up=up)
        return dict(
            timesteps=ts[begin:],
            tables={k: v[begin:] for k, v in tables.items()},
            init_noise_sigma=S.init_noise_sigma(self, sig),
            start=common.sigma_start(sig[begin]),
        )

    def step(self, state, model_output, i, sample, key=None):
        """x_next = x + d * (sigma_down - sigma) + sigma_up * noise."""
        tb = state.tables
        x = sample.astype("float32")
        x0 = S.sigma_x0(self.config["prediction_type"], model_output, x, tb, i)
        d = (x - x0) / tb["sigma"][i]
        prev = x + d * tb["dt"][i]
        prev = prev + common.normal_like(self._key(key), sample) * tb["sigma_up"][i]
        return prev.astype(sample.dtype), state
