"""Faces from scratch (CelebA 64 px, captions from its 40 attributes): stage 3 of VAE -> CLIP -> U-Net.

    # 1. VAE:  python -m t2i_jax.train --config configs/shapes_vae.py --workdir runs/celeba_vae \
    #            --config.data.name=tfds --config.data.dataset=celeb_a --config.data.resolution=64 ...
    # 2. CLIP: python -m t2i_jax.train --config configs/clip_shapes.py --workdir runs/celeba_clip \
    #            --config.data.name=tfds --config.data.dataset=celeb_a ...   (contrastive text tower)
    # 3. U-Net:
    python -m t2i_jax.train --config configs/celeba_ldm.py:vae=runs/celeba_vae/export,text=runs/celeba_clip/export \
        --workdir runs/celeba_ldm --config.data.path=~/tensorflow_datasets

The dataset is the prepared tfds `celeb_a` (array_record; see t2i_jax.data).
`vae=` and `text=` name the frozen parts as in shapes_ldm; left out, a random
VAE / a from-scratch 64-wide CLIP text tower with the bundled tokenizer is
frozen at init. The U-Net is SD-shaped at a small width (64/128/256, two
attention levels); 160k records stream (no cache) with random flips.
"""

import ml_collections

from configs import shapes_ldm
from t2i_jax.train import ldm


def get_config(arg=None):
    paths = shapes_ldm.parse_arg(arg)
    c = ldm.default_config()
    c.vae.path = paths.get("vae", "")
    c.text_encoder.path = paths.get("text", "")
    c.text_encoder.name = "tiny"
    c.text_encoder.overrides = ml_collections.ConfigDict({"hidden_size": 64, "intermediate_size": 256,
                                                          "max_position_embeddings": 32})
    c.model.unet = "tiny"
    c.model.overrides = ml_collections.ConfigDict({
        "block_out_channels": [64, 128, 256], "layers_per_block": 2, "norm_num_groups": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 4})
    c.data = ml_collections.ConfigDict({"name": "tfds", "dataset": "celeb_a", "split": "train", "path": "",
                                        "resolution": 64, "seed": 0, "random_flip": True, "worker_count": 4})
    c.cache.enabled = False
    c.batch_size = 128
    c.train.steps = 100_000
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 1000
    c.ema_decay = 0.9999
    c.diffusion.snr_gamma = 5.0
    c.eval.every = 5000
    c.eval.prompts = ["a smiling woman with blond hair", "a man with a beard and eyeglasses",
                      "a young woman with black hair and bangs", "a bald man"]
    c.eval.steps = 50
    c.eval.guidance_scale = 3.0
    return c
