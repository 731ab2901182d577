"""Linear multistep in sigma (k-diffusion's sample_lms), as diffusers'
LMSDiscreteScheduler."""

from __future__ import annotations

import numpy as np

from t2i_jax.schedulers import common
from t2i_jax.schedulers import sigmas as S


def _lms_coeff(sig, k, order, cur):
    """Integral over [sigma_k, sigma_{k+1}] of the Lagrange basis polynomial
    through sigma_k, ..., sigma_{k-order+1} that is 1 at sigma_{k-cur}.
    Degree <= 3, so 4-point Gauss-Legendre is exact."""
    x, w = np.polynomial.legendre.leggauss(4)
    a, b = float(sig[k]), float(sig[k + 1])
    tau = (b - a) / 2 * x + (a + b) / 2
    prod = np.ones_like(tau)
    for m in range(order):
        if m != cur:
            prod *= (tau - float(sig[k - m])) / (float(sig[k - cur]) - float(sig[k - m]))
    return (b - a) / 2 * np.sum(w * prod)


class LMS(common.Scheduler):
    """Adams-style multistep on derivatives d = (x - x0) / sigma. Option `lms_order`
    (diffusers' step(order=)), default 4; coefficients are integrated on host."""

    name = "lms"
    diffusers_class = "LMSDiscreteScheduler"
    defaults = dict(S.SIGMA_FIELDS, use_karras_sigmas=False)
    inert = dict(use_exponential_sigmas=False, use_beta_sigmas=False)
    choices = dict(use_karras_sigmas=(False, True))
    options = dict(lms_order=4)

    def _host(self, n, begin):
        order = int(self.opts["lms_order"])
        if not 1 <= order <= 4:
            raise ValueError(f"lms_order={order} must be in 1..4")
        ts, sig = S.discrete_sigmas(self, n, karras=self.config["use_karras_sigmas"])
        coeffs = np.zeros((n - begin, 4))
        for k in range(begin, n):
            j = k - begin  # derivatives collected so far, minus one
            # diffusers sizes the polynomial by the absolute step index but only
            # has j + 1 derivatives after an img2img start; zip() truncates.
            o = min(k + 1, order)
            for cur in range(min(o, j + 1, order)):
                coeffs[j, cur] = _lms_coeff(sig, k, o, cur)
        tables = {k: v[begin:] for k, v in S.model_tables(sig[:-1]).items()}
        tables["coeffs"] = coeffs
        return dict(
            timesteps=ts[begin:],
            tables=tables,
            init_noise_sigma=S.init_noise_sigma(self, sig),
            start=common.sigma_start(sig[begin]),
        )

    def _history(self, shape, dtype):
        import jax.numpy as jnp

        return dict(derivatives=jnp.zeros((3,) + shape, dtype))

    def step(self, state, model_output, i, sample, key=None):
        """x_next = x + sum_k c_k d_{i-k} over the last <= 4 derivatives."""
        import jax.numpy as jnp

        tb, past = state.tables, state.history["derivatives"]
        x0 = S.sigma_x0(self.config["prediction_type"], model_output, sample, tb, i)
        d = ((sample - x0) / tb["sigma"][i]).astype(past.dtype)
        c = tb["coeffs"][i]
        prev = sample + (c[0] * d + c[1] * past[0] + c[2] * past[1] + c[3] * past[2])
        new = jnp.concatenate([d[None], past[:2]], axis=0)
        return prev.astype(sample.dtype), state.replace(history=dict(derivatives=new))
