"""PNDM (Liu et al. 2022), as diffusers' PNDMScheduler: a Runge-Kutta warm-up
(PRK, diffusers' default `skip_prk_steps=False`) then pseudo linear multistep
(PLMS); or PLMS alone with `skip_prk_steps=True` (Stable Diffusion's config).

Evaluation counts, as diffusers' `len(scheduler.timesteps)`:

* PRK + PLMS: n + 9 for n >= 4 steps. The three largest timestep gaps are
  each crossed by one 4-stage Runge-Kutta step (4 model evaluations at t,
  t - h, t - h, t - 2h with h = T // n // 2), the remaining n - 3 steps by
  4th-order Adams-Bashforth on the saved outputs of those stages.
* PLMS alone: n + 1 (the second timestep runs twice: PLMS's Heun-like restart).

Every evaluation is one fixed expression: the model output is combined with up
to three saved outputs and a running Runge-Kutta sum with per-evaluation
weights, then moved from timestep `t_a` to `t_prev` by PNDM's transfer
(formula 9 of the paper) from either the current sample or the one saved at
the start of the step. The weights, which buffer to push, which sample to use
and the two timesteps are resolved on host by replaying diffusers' `counter`
logic (`_replay`).
"""

from __future__ import annotations

import jax.numpy as jnp
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
# Runge-Kutta stage r = counter % 4: (weight of this output in the running sum
# before it, weight of the running sum kept) -- RK4's 1/6, 1/3, 1/3, 1/6.
_RK_SUM = {0: (1 / 6, 0.0), 1: (1 / 3, 1.0), 2: (1 / 3, 1.0), 3: (0.0, 0.0)}
# diffusers' PRK covers the top pndm_order = 4 timesteps: 3 steps x 4 stages.
_PRK_EVALS = 12


def _replay(ts, prk_ts, ratio, prk):
    """One row per evaluation of diffusers' step(), run from counter 0 over `ts`.

    Returns a dict of lists: the alpha timestep `t_a`, the target `t_prev`,
    the output weights `w` (on the current output and the 3 saved ones),
    `w_div`, `w_acc` (the running RK sum's weight in the output), `acc_e` and
    `acc_keep` (the running sum's update), `push` (save this output),
    `use_saved` (start from the sample saved at the step's start) and `save`
    (save this sample).
    """
    half = ratio // 2
    rows = {k: [] for k in ("t_a", "t_prev", "w", "w_div", "w_acc", "acc_e", "acc_keep", "push",
                            "use_saved", "save")}
    n_ets = 0  # len(diffusers' ets list)
    for counter, t in enumerate(int(x) for x in ts):
        if prk and counter < len(prk_ts):
            stage = counter % 4
            t_a = int(prk_ts[counter // 4 * 4])  # the RK step's own start timestep
            t_prev = t - (0 if counter % 2 else half)
            last = stage == 3
            w, w_div, w_acc = ([1 / 6, 0, 0, 0], 1, 1.0) if last else ([1, 0, 0, 0], 1, 0.0)
            acc_e, acc_keep = _RK_SUM[stage]
            push, use_saved, save = stage == 0, stage != 0, stage == 0
            n_ets += push
        else:
            restart = counter == 1  # only reachable without PRK
            t_a, t_prev = (t + ratio, t) if restart else (t, t - ratio)
            push = not restart
            n_ets += push
            if n_ets == 1:
                key = 1 if restart else 0
            else:
                key = min(n_ets, 4)
            w, w_div = _AB[key]
            w_acc, acc_e, acc_keep = 0.0, 0.0, 0.0
            use_saved, save = restart, n_ets == 1 and counter == 0
        for k, v in (("t_a", t_a), ("t_prev", t_prev), ("w", w), ("w_div", w_div), ("w_acc", w_acc),
                     ("acc_e", acc_e), ("acc_keep", acc_keep), ("push", push), ("use_saved", use_saved),
                     ("save", save)):
            rows[k].append(v)
    return rows


class PNDM(common.Scheduler):
    """PNDM: PRK warm-up + PLMS (n + 9 evaluations, n >= 4), or PLMS alone with
    `skip_prk_steps=True` (n + 1 evaluations)."""

    name = "pndm"
    diffusers_class = "PNDMScheduler"
    defaults = dict(_VP_FIELDS, set_alpha_to_one=False, skip_prk_steps=False)
    choices = dict(skip_prk_steps=(False, True))
    prediction_types = ("epsilon", "v_prediction")

    @property
    def _prk(self) -> bool:
        return not self.config["skip_prk_steps"]

    def _host(self, n, begin):
        cfg = self.config
        T = cfg["num_train_timesteps"]
        abar = self.alphas_cumprod
        asc = common.spaced_timesteps(cfg, n, integer=True)[::-1].astype(np.int64)  # ascending
        ratio = T // n
        if self._prk:
            if n < 4:
                raise ValueError(
                    f"the 'pndm' sampler's Runge-Kutta warm-up (skip_prk_steps=False, diffusers' "
                    f"default) needs at least 4 steps, got {n} (diffusers' PNDMScheduler fails there too); "
                    f"use 4 or more steps, or skip the warm-up with skip_prk_steps=True "
                    f"(scheduler_options={{'skip_prk_steps': True}})"
                )
            if begin:
                # diffusers' img2img would start its counter at 0 in the middle
                # of the warm-up and use the alphas of the skipped top timesteps
                # for a sample at a lower noise level: a wrong image.
                raise ValueError(
                    "the 'pndm' sampler's Runge-Kutta warm-up (skip_prk_steps=False, diffusers' default) "
                    "cannot start from an img2img strength < 1 (diffusers' PNDMScheduler then runs the "
                    "warm-up at the wrong noise levels); set skip_prk_steps=True "
                    "(scheduler_options={'skip_prk_steps': True}) or use another scheduler"
                )
            top = asc[-4:]
            pairs = np.stack([top, top + ratio // 2], axis=1).reshape(-1)  # a, a+h, b, b+h, ...
            prk_ts = pairs[:-1].repeat(2)[1:-1][::-1]
            ts = np.concatenate([prk_ts, asc[:-3][::-1]])
        else:
            prk_ts = np.zeros(0, np.int64)
            ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1]
        ts = ts.astype(np.int64)[begin:]
        r = _replay(ts, prk_ts, ratio, self._prk)
        final = F32(1.0) if cfg["set_alpha_to_one"] else abar[0]
        t = np.clip(np.asarray(r["t_a"]), 0, T - 1)
        prev = np.asarray(r["t_prev"])
        a_t = abar[t]
        a_prev = np.where(prev >= 0, abar[np.clip(prev, 0, T - 1)], final).astype(F32)
        b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
        tables = dict(
            w=np.asarray(r["w"], F32).reshape(-1, 4),
            **{k: np.asarray(r[k], F32) for k in ("w_div", "w_acc", "acc_e", "acc_keep", "push",
                                                   "use_saved", "save")},
            sqrt_a=np.sqrt(a_t),
            sqrt_b=np.sqrt(b_t),
            c_s=np.sqrt(a_prev / a_t),
            c_diff=a_prev - a_t,
            c_den=a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev),
        )
        return dict(timesteps=ts, tables=tables, init_noise_sigma=1.0, start=common.vp_start(abar, ts[0]))

    def _history(self, shape, dtype):
        h = dict(ets=jnp.zeros((3,) + shape, dtype), cur_sample=jnp.zeros(shape, dtype))
        if self._prk:
            h["acc"] = jnp.zeros(shape, dtype)  # the running Runge-Kutta sum of outputs
        return h

    def step(self, state, model_output, i, sample, key=None):
        """Combine this output with the saved ones (RK stage or Adams-Bashforth),
        then PNDM's transfer from timestep t_a to t_prev."""
        tb, h = state.tables, state.history
        ets = h["ets"]
        w = tb["w"][i]
        e = model_output.astype(ets.dtype)
        out = w[0] * e + w[1] * ets[0] + w[2] * ets[1] + w[3] * ets[2]
        if self._prk:
            out = out + tb["w_acc"][i] * h["acc"]
        out = out / tb["w_div"][i]
        x = jnp.where(tb["use_saved"][i] > 0, h["cur_sample"], sample.astype(ets.dtype))
        if self.config["prediction_type"] == "v_prediction":
            out = tb["sqrt_a"][i] * out + tb["sqrt_b"][i] * x
        prev = tb["c_s"][i] * x - tb["c_diff"][i] * out / tb["c_den"][i]
        pushed = jnp.concatenate([e[None], ets[:2]], axis=0)
        new_h = dict(
            ets=jnp.where(tb["push"][i] > 0, pushed, ets),
            cur_sample=jnp.where(tb["save"][i] > 0, sample.astype(ets.dtype), h["cur_sample"]),
        )
        if self._prk:
            new_h["acc"] = tb["acc_keep"][i] * h["acc"] + tb["acc_e"][i] * e
        return prev.astype(sample.dtype), state.replace(history=new_h)
