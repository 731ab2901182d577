"""The noise schedule Stable Diffusion 1.x/2.x were trained with, as a diffusers scheduler config.

Training draws timesteps from it (`alphas_cumprod`, `add_noise`); a checkpoint
without a `scheduler_config.json` (original single files, some folders) is
sampled with it.
"""

from __future__ import annotations

# "scaled_linear": betas = linspace(sqrt(b0), sqrt(b1), n) ** 2; as SD's own
# scheduler_config.json: PNDM without its Runge-Kutta warm-up (skip_prk_steps,
# whose diffusers default is False: 9 more U-Net calls).
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "skip_prk_steps": True,
}
