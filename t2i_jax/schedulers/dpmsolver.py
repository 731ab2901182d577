"""DPM-Solver++ multistep (Lu et al. 2022), as diffusers'
DPMSolverMultistepScheduler with algorithm_type="dpmsolver++" ("DPM++ 2M")."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from t2i_jax.schedulers import common
from t2i_jax.schedulers.common import F32

MULTISTEP_FIELDS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    timestep_spacing="linspace",
    steps_offset=0,
    solver_order=2,
    lower_order_final=True,
    use_karras_sigmas=False,
    final_sigmas_type="zero",
)
MULTISTEP_INERT = dict(
    thresholding=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    use_flow_sigmas=False,
    flow_shift=1.0,
    rescale_betas_zero_snr=False,
    use_dynamic_shifting=False,
    time_shift_type="exponential",
)


def multistep_schedule(sched, n, last_timestep=None):
    """(int timesteps, float32 sigmas + final) as DPM-Solver / UniPC lay them out."""
    cfg = sched.config
    T = cfg["num_train_timesteps"]
    last = T if last_timestep is None else last_timestep
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1] + cfg["steps_offset"]
    else:  # trailing
        ts = np.arange(last, 0, -T / n).round() - 1
    ts = ts.astype(np.int64)
    train = common.vp_sigmas(sched.alphas_cumprod)
    if cfg["use_karras_sigmas"]:
        sig = common.karras_sigmas(float(train[0]), float(train[-1]), n)
        ts = common.sigma_to_t(sig, np.log(train))
        if cfg["beta_schedule"] != "squaredcos_cap_v2" or sched.name == "unipc":
            ts = ts.round()
        ts = ts.astype(np.int64)
    else:
        sig = np.interp(ts, np.arange(len(train)), train)
    if cfg["final_sigmas_type"] == "sigma_min":
        if cfg["use_karras_sigmas"] and sched.name == "unipc":
            last_sigma = sig[-1]
        else:
            a0 = sched.alphas_cumprod[0]
            last_sigma = np.sqrt((F32(1) - a0) / a0)
    else:
        last_sigma = 0.0
    return ts, np.concatenate([sig, [last_sigma]]).astype(F32)


def alpha_sigma_lambda(sig):
    """VP alpha_t, sigma_t and log-SNR lambda_t of EDM sigmas (float32)."""
    alpha = F32(1) / np.sqrt(sig**2 + F32(1))
    sigma = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


def vp_x0_from(prediction_type, out, sample, alpha, sigma):
    """x0 from a model output in VP scaling (diffusers' convert_model_output)."""
    if prediction_type == "epsilon":
        return (sample - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * out
    return out


class DPMSolverPP(common.Scheduler):
    """DPM-Solver++ (2M by default; solver_order 1..3, solver_type midpoint/heun)."""

    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    defaults = dict(
        MULTISTEP_FIELDS, algorithm_type="dpmsolver++", solver_type="midpoint",
        euler_at_final=False, lambda_min_clipped=-float("inf"),
    )
    inert = dict(MULTISTEP_INERT, use_lu_lambdas=False, variance_type=None)
    choices = dict(
        algorithm_type=("dpmsolver++",), solver_type=("midpoint", "heun"), solver_order=(1, 2, 3),
        final_sigmas_type=("zero", "sigma_min"), use_karras_sigmas=(False, True),
        lower_order_final=(False, True), euler_at_final=(False, True),
    )

    def _host(self, n, begin):
        cfg = self.config
        T = cfg["num_train_timesteps"]
        abar = self.alphas_cumprod
        lam_train = np.log(np.sqrt(abar)) - np.log(np.sqrt(F32(1) - abar))
        clipped = int(np.searchsorted(lam_train[::-1], cfg["lambda_min_clipped"]))
        ts, sig = multistep_schedule(self, n, T - clipped)
        K = len(ts)
        alpha, sigma, lam = alpha_sigma_lambda(sig)
        rows = {k: np.zeros(K - begin, F32) for k in ("A", "C0", "C1", "C2", "inv_r0", "inv_r1", "q", "p")}
        so = cfg["solver_order"]
        for k in range(begin, K):
            j = k - begin
            lof = k == K - 1 and (cfg["euler_at_final"] or (cfg["lower_order_final"] and K < 15)
                                  or cfg["final_sigmas_type"] == "zero")
            los = k == K - 2 and cfg["lower_order_final"] and K < 15
            done = min(j, so)  # diffusers' lower_order_nums
            if so == 1 or done < 1 or lof:
                order = 1
            elif so == 2 or done < 2 or los:
                order = 2
            else:
                order = 3
            with np.errstate(over="ignore", invalid="ignore"):
                h = lam[k + 1] - lam[k]
                em1 = np.exp(-h) - F32(1)
                rows["A"][j] = sigma[k + 1] / sigma[k]
                rows["C0"][j] = alpha[k + 1] * em1
                if order >= 2:
                    r0 = (lam[k] - lam[k - 1]) / h
                    rows["inv_r0"][j] = F32(1) / r0
                    if order == 3 or cfg["solver_type"] == "heun":
                        rows["C1"][j] = -(alpha[k + 1] * (em1 / h + F32(1)))
                    else:
                        rows["C1"][j] = F32(0.5) * (alpha[k + 1] * em1)
                if order == 3:
                    r1 = (lam[k - 1] - lam[k - 2]) / h
                    rows["inv_r1"][j] = F32(1) / r1
                    rows["q"][j] = r0 / (r0 + r1)
                    rows["p"][j] = F32(1) / (r0 + r1)
                    rows["C2"][j] = alpha[k + 1] * ((em1 + h) / h**2 - F32(0.5))
        tables = dict(rows, alpha=alpha[begin:K], sigma=sigma[begin:K])
        return dict(
            timesteps=ts[begin:],
            tables=tables,
            init_noise_sigma=1.0,
            start=(alpha[begin], sigma[begin]),
        )

    def _history(self, shape, dtype):
        return dict(m1=jnp.zeros(shape, dtype), m2=jnp.zeros(shape, dtype))

    def step(self, state, model_output, i, sample, key=None):
        """Multistep update on the data predictions x0 of the last <= 3 evaluations."""
        tb, h = state.tables, state.history
        m0 = vp_x0_from(self.config["prediction_type"], model_output, sample, tb["alpha"][i], tb["sigma"][i])
        m0 = m0.astype(h["m1"].dtype)
        m1, m2 = h["m1"], h["m2"]
        d10 = tb["inv_r0"][i] * (m0 - m1)
        d11 = tb["inv_r1"][i] * (m1 - m2)
        d1 = d10 + tb["q"][i] * (d10 - d11)
        d2 = tb["p"][i] * (d10 - d11)
        x = sample.astype(m0.dtype)
        prev = tb["A"][i] * x - tb["C0"][i] * m0 - tb["C1"][i] * d1 - tb["C2"][i] * d2
        return prev.astype(sample.dtype), state.replace(history=dict(m1=m0, m2=m1))
