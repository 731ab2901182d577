"""DDIM (Song et al. 2021), deterministic for eta=0, as diffusers' DDIMScheduler."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from t2i_jax.schedulers import common
from t2i_jax.schedulers.common import F32
from t2i_jax.schedulers.ddpm import _VP_FIELDS


class DDIM(common.Scheduler):
    """DDIM. Options: `eta` (0 = deterministic; > 0 draws noise, needs `key`),
    `use_clipped_model_output` (recompute eps from the clipped x0)."""

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    defaults = dict(_VP_FIELDS, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True)
    inert = dict(thresholding=False, rescale_betas_zero_snr=False)
    options = dict(eta=0.0, use_clipped_model_output=False)

    def __init__(self, config=None, **options):
        super().__init__(config, **options)
        eta = self.opts["eta"]
        if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)) \
                or not np.isfinite(eta) or eta < 0:
            raise ValueError(f"DDIM eta={eta!r} must be a number >= 0 (0: deterministic, 1: DDPM-like noise)")

    @property
    def needs_key(self):
        return self.opts["eta"] > 0

    def _host(self, n, begin):
        abar = self.alphas_cumprod
        cfg = self.config
        ts = common.spaced_timesteps(cfg, n, integer=True)
        # diffusers steps back by T // n whatever the spacing.
        prev = ts - cfg["num_train_timesteps"] // n
        final = F32(1.0) if cfg["set_alpha_to_one"] else abar[0]
        a_t = abar[ts]
        a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final).astype(F32)
        b_t = F32(1) - a_t
        var = (F32(1) - a_prev) / b_t * (F32(1) - a_t / a_prev)
        std = F32(self.opts["eta"]) * np.sqrt(var)
        tables = dict(
            sqrt_a=np.sqrt(a_t),
            sqrt_b=np.sqrt(b_t),
            sqrt_a_prev=np.sqrt(a_prev),
            c_dir=np.sqrt(F32(1) - a_prev - std**2),
            std=std,
        )
        return dict(
            timesteps=ts[begin:],
            tables={k: v[begin:] for k, v in tables.items()},
            init_noise_sigma=1.0,
            start=common.vp_start(abar, ts[begin]),
        )

    def step(self, state, model_output, i, sample, key=None):
        """x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps (+ std noise)."""
        tb = state.tables
        sa, sb = tb["sqrt_a"][i], tb["sqrt_b"][i]
        pt = self.config["prediction_type"]
        out = model_output
        if pt == "epsilon":
            x0, eps = (sample - sb * out) / sa, out
        elif pt == "sample":
            x0 = out
            eps = (sample - sa * x0) / sb
        else:
            x0, eps = sa * sample - sb * out, sa * out + sb * sample
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = jnp.clip(x0, -r, r)
        if self.opts["use_clipped_model_output"]:
            eps = (sample - sa * x0) / sb
        prev = tb["sqrt_a_prev"][i] * x0 + tb["c_dir"][i] * eps
        if self.opts["eta"] > 0:
            prev = prev + tb["std"][i] * common.normal_like(self._key(key), sample)
        return prev.astype(sample.dtype), state
