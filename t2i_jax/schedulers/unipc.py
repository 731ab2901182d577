"""UniPC multistep (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler
with predict_x0=True (data prediction) and the B(h) solvers bh2 / bh1.

Each model evaluation k first applies the corrector UniC to the sample that
the predictor of evaluation k-1 produced (it needs the model output at k, so
it cannot run earlier), then the predictor UniP from the corrected sample to
the noise level of k+1. Both are linear in the sample before the last
predictor, the current data prediction and the previous ones, so every
coefficient (including the small linear solves for the rho weights) is a
host-side table row; `step` is one fixed expression for every evaluation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from t2i_jax.schedulers import common
from t2i_jax.schedulers.common import F32
from t2i_jax.schedulers.dpmsolver import (
    MULTISTEP_FIELDS,
    MULTISTEP_INERT,
    alpha_sigma_lambda,
    multistep_schedule,
    vp_x0_from,
)

# diffusers accepts the DPM-Solver names and silently runs bh2 for them.
_AS_BH2 = ("midpoint", "heun", "logrho")


def _bh_weights(lam, s, t, order, bh1):
    """Scalar pieces of a UniP/UniC update from lambda index `s` to `t`.

    Mirrors diffusers' float32 arithmetic: returns h_phi_1 = expm1(-h), B(h),
    the ratios r_i = (lambda_{s-i} - lambda_s) / h for i < order, and the
    predictor / corrector rho weights.
    """
    h = lam[t] - lam[s]
    rks = [(lam[s - i] - lam[s]) / h for i in range(1, order)] + [F32(1)]
    hh = -h
    h_phi_1 = np.expm1(hh)
    B_h = hh if bh1 else np.expm1(hh)
    h_phi_k = h_phi_1 / hh - F32(1)
    fact = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * F32(fact) / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - F32(1) / F32(fact)
    R = np.asarray(R, F32)
    b = np.asarray(b, F32)
    if order == 1:
        rho_p = np.zeros(0, F32)
    elif order == 2:
        rho_p = np.array([0.5], F32)
    else:
        rho_p = np.linalg.solve(R[:-1, :-1], b[:-1]).astype(F32)
    rho_c = np.array([0.5], F32) if order == 1 else np.linalg.solve(R, b).astype(F32)
    return h_phi_1, B_h, np.asarray(rks[:-1], F32), rho_p, rho_c


class UniPC(common.Scheduler):
    """UniPC-p with UniC corrector (bh2 by default; solver_order 1..3)."""

    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    defaults = dict(MULTISTEP_FIELDS, solver_type="bh2", disable_corrector=[])
    inert = dict(
        MULTISTEP_INERT, predict_x0=True, solver_p=None, sigma_min=None, sigma_max=None,
        shift_terminal=None,
    )
    choices = dict(
        solver_type=("bh1", "bh2") + _AS_BH2, solver_order=(1, 2, 3),
        final_sigmas_type=("zero", "sigma_min"), use_karras_sigmas=(False, True),
        lower_order_final=(False, True),
    )

    def _check_config(self):
        super()._check_config()
        cfg = self.config
        dc = cfg["disable_corrector"]
        if not isinstance(dc, (list, tuple)) or not all(
            isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in dc
        ):
            raise ValueError(
                f"scheduler config field disable_corrector={dc!r} must be a list of step indices (ints)"
            )
        if cfg["solver_order"] > 1 and not cfg["lower_order_final"] and cfg["final_sigmas_type"] == "zero":
            # The last predictor would divide by lambda_{K} - lambda_{K-1} = inf:
            # diffusers returns inf/nan there.
            raise ValueError(
                "scheduler config field lower_order_final=False with final_sigmas_type='zero' makes "
                "UniPC's last step non-finite (in diffusers too); set lower_order_final=True or "
                "final_sigmas_type='sigma_min'"
            )
        if cfg["solver_type"] == "bh1" and cfg["final_sigmas_type"] == "zero":
            # B(h) = h = -inf on the last step times a zero residual: diffusers
            # returns nan there.
            raise ValueError(
                "scheduler config field solver_type='bh1' with final_sigmas_type='zero' makes "
                "UniPC's last step nan (in diffusers too); use solver_type='bh2' or "
                "final_sigmas_type='sigma_min'"
            )

    def _host(self, n, begin):
        cfg = self.config
        ts, sig = multistep_schedule(self, n)
        K = len(ts)
        alpha, sigma, lam = alpha_sigma_lambda(sig)
        so = cfg["solver_order"]
        bh1 = cfg["solver_type"] == "bh1"
        disabled = set(int(k) for k in cfg["disable_corrector"])
        names = ("pA", "pM", "pB", "p_inv1", "p_inv2", "p_rho1", "p_rho2",
                 "use_c", "cA", "cM", "cB", "c_inv1", "c_inv2", "c_rho1", "c_rho2", "c_rhot")
        rows = {k: np.zeros(K - begin, F32) for k in names}
        prev_order = None
        for k in range(begin, K):
            j = k - begin
            # Corrector at k: redo k-1 -> k with the model output at k, with the
            # order the predictor of k-1 used (diffusers' `this_order`).
            if j > 0 and (k - 1) not in disabled:
                with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                    h_phi_1, B_h, rks, _, rho_c = _bh_weights(lam, k - 1, k, prev_order, bh1)
                rows["use_c"][j] = 1
                rows["cA"][j] = sigma[k] / sigma[k - 1]
                rows["cM"][j] = alpha[k] * h_phi_1
                rows["cB"][j] = alpha[k] * B_h
                for i, r in enumerate(rks):
                    rows[f"c_inv{i + 1}"][j] = F32(1) / r
                    rows[f"c_rho{i + 1}"][j] = rho_c[i]
                rows["c_rhot"][j] = rho_c[-1]
            order = min(so, K - k) if cfg["lower_order_final"] else so
            order = min(order, j + 1)  # warm-up: only j earlier outputs exist
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                h_phi_1, B_h, rks, rho_p, _ = _bh_weights(lam, k, k + 1, order, bh1)
                rows["pA"][j] = sigma[k + 1] / sigma[k]
            rows["pM"][j] = alpha[k + 1] * h_phi_1
            rows["pB"][j] = alpha[k + 1] * B_h
            for i, r in enumerate(rks):
                rows[f"p_inv{i + 1}"][j] = F32(1) / r
                rows[f"p_rho{i + 1}"][j] = rho_p[i]
            prev_order = order
        tables = dict(rows, alpha=alpha[begin:K], sigma=sigma[begin:K])
        return dict(
            timesteps=ts[begin:],
            tables=tables,
            init_noise_sigma=1.0,
            start=(alpha[begin], sigma[begin]),
        )

    def _history(self, shape, dtype):
        z = jnp.zeros(shape, dtype)
        # last: the sample the previous predictor started from; m1..m3: data
        # predictions of the previous three evaluations.
        return dict(last=z, m1=z, m2=z, m3=z)

    def step(self, state, model_output, i, sample, key=None):
        """Corrector (k-1 -> k, using this output), then predictor (k -> k+1)."""
        tb, h = state.tables, state.history
        m = vp_x0_from(self.config["prediction_type"], model_output, sample, tb["alpha"][i], tb["sigma"][i])
        m = m.astype(h["m1"].dtype)
        m1, m2, m3 = h["m1"], h["m2"], h["m3"]

        res_c = tb["c_rho1"][i] * ((m2 - m1) * tb["c_inv1"][i]) + tb["c_rho2"][i] * ((m3 - m1) * tb["c_inv2"][i])
        res_c = res_c + tb["c_rhot"][i] * (m - m1)
        corrected = tb["cA"][i] * h["last"] - tb["cM"][i] * m1 - tb["cB"][i] * res_c
        x = jnp.where(tb["use_c"][i] > 0, corrected, sample.astype(m.dtype))

        res_p = tb["p_rho1"][i] * ((m1 - m) * tb["p_inv1"][i]) + tb["p_rho2"][i] * ((m2 - m) * tb["p_inv2"][i])
        prev = tb["pA"][i] * x - tb["pM"][i] * m - tb["pB"][i] * res_p
        history = dict(last=x, m1=m, m2=m1, m3=m2)
        return prev.astype(sample.dtype), state.replace(history=history)
