"""Euler (Karras et al. 2022, Algorithm 2 without churn), as diffusers'
EulerDiscreteScheduler."""

from __future__ import annotations

from t2i_jax.schedulers import common
from t2i_jax.schedulers import sigmas as S


class Euler(common.Scheduler):
    """First-order ODE step in sigma; optional Karras sigmas."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    defaults = dict(
        S.SIGMA_FIELDS, use_karras_sigmas=False, sigma_min=None, sigma_max=None, final_sigmas_type="zero"
    )
    inert = dict(
        interpolation_type="linear",
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        timestep_type="discrete",
        rescale_betas_zero_snr=False,
    )
    choices = dict(final_sigmas_type=("zero", "sigma_min"), use_karras_sigmas=(False, True))

    def _host(self, n, begin):
        c = self.config
        ts, sig = S.discrete_sigmas(
            self, n, karras=c["use_karras_sigmas"], sigma_min=c["sigma_min"],
            sigma_max=c["sigma_max"], final=c["final_sigmas_type"],
        )
        tables = S.model_tables(sig[:-1])
        tables["dt"] = sig[1:] - sig[:-1]
        return dict(
            timesteps=ts[begin:],
            tables={k: v[begin:] for k, v in tables.items()},
            init_noise_sigma=S.init_noise_sigma(self, sig),
            start=common.sigma_start(sig[begin]),
        )

    def step(self, state, model_output, i, sample, key=None):
        """x_next = x + (x - x0) / sigma * (sigma_next - sigma)."""
        tb = state.tables
        x = sample.astype("float32")
        x0 = S.sigma_x0(self.config["prediction_type"], model_output, x, tb, i)
        d = (x - x0) / tb["sigma"][i]
        return (x + d * tb["dt"][i]).astype(sample.dtype), state
