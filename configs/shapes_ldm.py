"""Text-to-image from scratch on synthetic shapes (32 px): stage 3 of VAE -> CLIP -> U-Net.

    # 1. VAE   python -m t2i_jax.train --config configs/shapes_vae.py --workdir runs/shapes_vae
    # 2. CLIP  python -m t2i_jax.train --config configs/clip_shapes.py --workdir runs/clip_shapes
    # 3. U-Net python -m t2i_jax.train --config configs/shapes_ldm.py:vae=runs/shapes_vae/export,text=runs/clip_shapes/export --workdir runs/shapes_ldm
    python -m t2i_jax.sample --model runs/shapes_ldm/export --prompt "a large red circle on a white background" --steps 25 --guidance-scale 3 --out out/

The argument names the frozen parts: `vae=DIR` (a VAE export of shapes_vae),
`text=DIR` (a transformers CLIP folder, e.g. clip_shapes' export: its text tower
is used, 64 wide, 16 tokens). Left out, a random tiny VAE, or a from-scratch
64-wide CLIP text tower with the bundled tokenizer, is frozen at its init
(smoke tests; a random text tower still gives each caption distinct states).

The 512-record training set is encoded once (cache.enabled): batches then come
from the cache by (seed, step), the same for any number of hosts.
"""

import ml_collections

from t2i_jax.train import ldm


def parse_arg(arg) -> dict:
    """"vae=DIR,text=DIR" -> {"vae": DIR, "text": DIR}."""
    out = {}
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in ("vae", "text"):
            raise ValueError(f"config argument {part!r}: use vae=DIR and/or text=DIR, comma-separated")
        out[key] = value
    return out


def get_config(arg=None):
    paths = parse_arg(arg)
    c = ldm.default_config()
    c.vae.path = paths.get("vae", "")
    c.vae.name = "tiny"
    c.text_encoder.path = paths.get("text", "")
    c.text_encoder.name = "tiny"
    # As clip_shapes' text tower: 64 wide, 16 tokens cover every shapes caption.
    c.text_encoder.overrides = ml_collections.ConfigDict({"hidden_size": 64, "intermediate_size": 128,
                                                          "max_position_embeddings": 16})
    c.model.unet = "tiny"
    c.data = ml_collections.ConfigDict({"name": "shapes", "resolution": 32, "split": "train", "seed": 0,
                                        "length": 512})
    c.cache.enabled = True
    c.batch_size = 32
    c.train.steps = 2000
    c.train.log_every = 20
    c.train.checkpoint_every = 500
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.grad_clip = 1.0
    c.ema_decay = 0.999
    c.diffusion.snr_gamma = 5.0
    c.eval.every = 500
    c.eval.prompts = ["a large red circle on a white background", "a medium blue square on a yellow background",
                      "a large green triangle on a black background", "a small white circle on a purple background"]
    c.eval.steps = 25
    c.eval.guidance_scale = 3.0
    return c
