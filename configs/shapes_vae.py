"""A tiny VAE from scratch on synthetic shapes at 32 px: stage 1 of VAE -> CLIP -> U-Net (shapes_ldm).

    python -m t2i_jax.train --config configs/shapes_vae.py --workdir runs/shapes_vae
    python -m t2i_jax.train --config configs/shapes_vae.py --workdir runs/x --config.disc.enabled=True

The "tiny" AutoencoderKL (32/64 channels, 2x down: 32 px -> 16x16x4 latents),
L1 reconstruction + 1e-6 KL; the PatchGAN (hinge loss) is off by default (flat
shapes need no texture) and switches on at `disc.start` when enabled.
Held-out reconstruction PSNR (128 "eval" images) is measured before and
after; the export (`workdir/export/vae`) is what shapes_ldm's `vae=` takes.
"""

import ml_collections

from t2i_jax.train import vae


def get_config(arg=None):
    del arg
    c = vae.default_config()
    c.model.name = "tiny"
    c.data = ml_collections.ConfigDict({"name": "shapes", "resolution": 32, "split": "train", "seed": 0})
    c.batch_size = 32
    c.train.steps = 1000
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 20
    c.loss.reconstruction = "l1"
    c.loss.kl_weight = 1e-6
    c.disc.enabled = False
    c.disc.start = 500
    c.disc.weight = 0.1
    c.eval.data = ml_collections.ConfigDict({"name": "shapes", "split": "eval", "length": 128})
    c.eval.num_images = 128
    c.eval.batch_size = 64
    return c
