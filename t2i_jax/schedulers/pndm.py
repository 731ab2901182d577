"""PNDM's pseudo linear multistep (PLMS) sampler, as diffusers' PNDMScheduler
with `skip_prk_steps=True` (Stable Diffusion's default scheduler)."""

from __future__ import annotations

import numpy as np

from t2i_jax.schedulers import common
from t2i_jax.schedulers.common import F32
from t2i_jax.schedulers.ddpm import _VP_FIELDS

# Adams-Bashforth weights on (current, previous, ...) outputs, and divisor,
# by how many outputs are in the history; slot 1 is PLMS's Heun-like restart.
_AB = {
    0: ([1, 0, 0, 0], 1),
    1: ([1, 1, 0, 0], 2),
    2: ([3, -1, 0, 0], 2),
    3: ([23, -16, 5, 0], 12),
    4: ([55, -59, 37, -9], 24),
}


class PNDM(common.Scheduler):
    """PLMS: n steps cost n + 1 model evaluations (the second timestep runs twice)."""

    name = "pndm"
    diffusers_class = "PNDMScheduler"
    defaults = dict(_VP_FIELDS, set_alpha_to_one=False)
    # The Runge-Kutta warm-up (skip_prk_steps=False) is not implemented.
    inert = dict(skip_prk_steps=True)
    prediction_types = ("epsilon", "v_prediction")

    def _host(self, n, begin):
        cfg = self.config
        T = cfg["num_train_timesteps"]
        abar = self.alphas_cumprod
        asc = common.spaced_timesteps(cfg, n, integer=True)[::-1]  # ascending
        ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].astype(np.int64)
        ts = ts[begin:]
        ratio = T // n
        final = F32(1.0) if cfg["set_alpha_to_one"] else abar[0]
        j = np.arange(len(ts))  # evaluations since the start of this run
        restart = j == 1  # diffusers' `counter == 1`: redo the first step
        t = np.where(restart, ts + ratio, ts).clip(max=T - 1)
        prev = np.where(restart, ts, ts - ratio)
        a_t = abar[t]
        a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final).astype(F32)
        b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
        nhist = np.where(j == 0, 0, np.where(j == 1, 1, np.minimum(j, 4)))
        w = np.array([_AB[int(k)][0] for k in nhist], F32).reshape(-1, 4)
        tables = dict(
            w=w,
            w_div=np.array([_AB[int(k)][1] for k in nhist], F32),
            push=(~restart).astype(F32),
            restart=restart.astype(F32),
            sqrt_a=np.sqrt(a_t),
            sqrt_b=np.sqrt(b_t),
            c_s=np.sqrt(a_prev / a_t),
            c_diff=a_prev - a_t,
            c_den=a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev),
        )
        return dict(timesteps=ts, tables=tables, init_noise_sigma=1.0, start=common.vp_start(abar, ts[0]))

    def _history(self, shape, dtype):
        import jax.numpy as jnp

        return dict(ets=jnp.zeros((3,) + shape, dtype), cur_sample=jnp.zeros(shape, dtype))

    def step(self, state, model_output, i, sample, key=None):
        """Linear multistep on the last <= 4 model outputs, then DDIM-like transfer."""
        import jax.numpy as jnp

        tb, h = state.tables, state.history
        ets = h["ets"]
        w = tb["w"][i]
        e = model_output.astype(ets.dtype)
        out = (w[0] * e + w[1] * ets[0] + w[2] * ets[1] + w[3] * ets[2]) / tb["w_div"][i]
        restart = tb["restart"][i] > 0
        x = jnp.where(restart, h["cur_sample"], sample)
        if self.config["prediction_type"] == "v_prediction":
            out = tb["sqrt_a"][i] * out + tb["sqrt_b"][i] * x
        prev = tb["c_s"][i] * x - tb["c_diff"][i] * out / tb["c_den"][i]
        pushed = jnp.concatenate([e[None], ets[:2]], axis=0)
        new_h = dict(
            ets=jnp.where(tb["push"][i] > 0, pushed, ets),
            cur_sample=jnp.where(i == 0, sample.astype(ets.dtype), h["cur_sample"]),
        )
        return prev.astype(sample.dtype), state.replace(history=new_h)
