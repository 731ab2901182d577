"""Stage 3 of the bundled model (t2i_jax/assets/shapes_model): the text-conditional U-Net.

    python -m t2i_jax.train --config configs/bundled_ldm.py:vae=runs/bundled/vae/export,text=runs/bundled/clip/export --workdir runs/bundled/ldm

configs/shapes_ldm.py (U-Net from scratch on the frozen bundled_vae VAE and
bundled_clip text tower, 32 px, eps-prediction, min-SNR 5, EMA) with:
- a larger U-Net than "tiny": three levels (48, 96, 96) on the 16x16 latents,
  cross-attention at 16x16, 8x8 and in the 4x4 middle block, 3.3M parameters
  (tiny: two levels (32, 64), cross-attention at 16x16 only, 0.8M). On 2 CPU
  cores a training step costs ~1.7x tiny's;
- a larger cached training set (4096 records instead of 512, so every one of the
  420 training attribute combinations is seen in several positions);
- 8000 steps at a constant lr 1e-3 after warm-up (~80 min on 2 CPU cores, 1.65 steps/s),
  no intermediate sample grids.
Measured on the 100 prompts of scripts/train_bundled_model.sh (PNDM, 50 steps, guidance 7.5),
EMA weights, background / shape colour / kind / size accuracy: step 2000 76/58/54/55%,
3000 90/84/78/82%, 4000 98/91/91/85%, 8000 (shipped) 100/99/94/97%.
The whole recipe is scripts/train_bundled_model.sh.
"""

import importlib.util
from pathlib import Path

import ml_collections


def _base():
    spec = importlib.util.spec_from_file_location("shapes_ldm", Path(__file__).with_name("shapes_ldm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg=None):
    c = _base().get_config(arg)
    c.model.overrides = ml_collections.ConfigDict({
        "block_out_channels": (48, 96, 96),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "norm_num_groups": 16,
    })
    c.data.length = 4096
    c.train.steps = 8000
    c.train.checkpoint_every = 1000
    c.eval.every = 0
    return c
