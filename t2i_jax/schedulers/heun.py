"""Heun's 2nd-order method (Karras et al. 2022, Algorithm 1 without churn), as
diffusers' HeunDiscreteScheduler."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from t2i_jax.schedulers import common
from t2i_jax.schedulers import sigmas as S
from t2i_jax.schedulers.common import F32


class Heun(common.Scheduler):
    """Two model evaluations per step (Euler predictor, trapezoid corrector) except
    the last: n steps = 2n - 1 evaluations. Evaluation i is a predictor when i is
    even, a corrector when odd; `step` handles both, so the pipeline's loop body
    is the same for every evaluation."""

    name = "heun"
    diffusers_class = "HeunDiscreteScheduler"
    defaults = dict(
        S.SIGMA_FIELDS, beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False,
        clip_sample=False, clip_sample_range=1.0,
    )
    inert = dict(use_exponential_sigmas=False, use_beta_sigmas=False)
    choices = dict(use_karras_sigmas=(False, True))
    order = 2

    def _host(self, n, begin):
        ts, sig = S.discrete_sigmas(self, n, karras=self.config["use_karras_sigmas"])
        # Interleaved like diffusers: [s0, s1, s1, s2, s2, ..., s_{n-1}, s_{n-1}, 0].
        sig_i = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])
        ts_i = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
        K = len(ts_i)
        k = np.arange(K)
        first = k % 2 == 0
        # Predictor at k: sigma_k -> sigma_{k+1}. Corrector at k: re-evaluates at
        # the predictor's target sig_i[k] and reuses the predictor's dt.
        dt_first = sig_i[1:] - sig_i[:-1]
        dt = np.where(first, dt_first, np.roll(dt_first, 1)).astype(F32)
        sig_in = sig_i[:-1]  # sigma_hat (predictor) or sigma_next (corrector)
        tables = S.model_tables(sig_in)
        tables["in_denom"] = np.sqrt(sig_i[:-1] ** 2 + F32(1))
        tables.update(dt=dt, first=first.astype(F32))
        return dict(
            timesteps=ts_i[begin:],
            tables={name: v[begin:] for name, v in tables.items()},
            init_noise_sigma=S.init_noise_sigma(self, sig_i),
            start=common.sigma_start(sig_i[begin]),
        )

    def _history(self, shape, dtype):
        return dict(derivative=jnp.zeros(shape, dtype), sample=jnp.zeros(shape, dtype))

    def step(self, state, model_output, i, sample, key=None):
        """Predictor: x + d dt (remembers d, x). Corrector: x_saved + (d_saved + d)/2 dt."""
        tb, h = state.tables, state.history
        x0 = S.sigma_x0(self.config["prediction_type"], model_output, sample, tb, i)
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = jnp.clip(x0, -r, r)
        d = (sample - x0) / tb["sigma"][i]
        first = tb["first"][i] > 0
        d_use = jnp.where(first, d, (h["derivative"] + d) / 2)
        base = jnp.where(first, sample, h["sample"])
        prev = base + d_use * tb["dt"][i]
        new_h = dict(
            derivative=jnp.where(first, d, h["derivative"]).astype(h["derivative"].dtype),
            sample=jnp.where(first, sample, h["sample"]).astype(h["sample"].dtype),
        )
        return prev.astype(sample.dtype), state.replace(history=new_h)
