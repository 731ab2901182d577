"""A rank-4 LoRA on the bundled shapes model that teaches it a colour word it never saw ("teal").

    python scripts/lora_teal_base.py runs/lora_teal/base
    python -m t2i_jax.train --config configs/lora_shapes.py:base=runs/lora_teal/base --workdir runs/lora_teal
    python -m t2i_jax.sample --lora runs/lora_teal/export/pytorch_lora_weights.safetensors \
        --prompt "a large teal circle on a white background" --out out/

The base is the bundled model (t2i_jax/assets/shapes_model: VAE, text encoder
and U-Net frozen), by default as it is; `base=DIR` trains on the folder
`scripts/lora_teal_base.py` writes: the bundled model whose VAE encoder was
taught teal (the bundled encoder turns teal shapes into green latents, so a
U-Net trained on them learns green; sampling uses the unchanged decoder).
The adapters sit on the U-Net's attention projections (to_q, to_k, to_v, to_out.0), feed-forward (ff.net.0.proj, ff.net.2) and 1x1
proj_in / proj_out convs, rank 4, alpha 4: 71.2k trainable parameters in 84 layers against the U-Net's 3.3M
parameters. 1200 steps at lr 3e-3 (LoRA moves little per step: 2e-3 on attention alone had
not learnt the colour after 300 steps; 400 steps at 1e-2 reached teal 30%, and at 1e-2 an
800-step run diverged at step ~560; 1200 at 3e-3 reached 52%). The data: 96 cached shapes images, 50 of them teal
(`shapes.EXTRA_COLORS`; "teal" is named 8 times in `data.colors`, so its 72
combinations weigh 8-fold against the 420 of the train split): the few dozen
teal images come mixed with the colours the model knows, so that the adapters
bind the new colour to its word and do not drift on the others. The argument
overrides the records, steps and base: `configs/lora_shapes.py:records=96,steps=1200,base=DIR`.
CPU-friendly: 32 px, batch 16, cached latents and text states. The export
folder holds the adapters alone, as `pytorch_lora_weights.safetensors`
(diffusers/PEFT) and `lora_kohya.safetensors`. Measured figures: configs/README.md.
"""

import ml_collections

from t2i_jax import sample
from t2i_jax.data.shapes import COLORS
from t2i_jax.train import ldm


def parse_arg(arg) -> dict:
    """"records=N,steps=N,base=DIR" -> {"records": N, "steps": N, "base": DIR}."""
    out = {"records": 96, "steps": 1200, "base": str(sample.BUNDLED_MODEL)}
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in out:
            raise ValueError(f"config argument {part!r}: use records=N, steps=N and/or base=DIR, comma-separated")
        out[key] = value if key == "base" else int(value)
    return out


def get_config(arg=None):
    a = parse_arg(arg)
    c = ldm.default_config()
    c.model.init_from = a["base"]
    c.lora.rank = 4
    c.lora.alpha = 4.0
    c.lora.targets = "to_q|to_k|to_v|to_out|ff.net|proj_in|proj_out"
    c.data = ml_collections.ConfigDict({"name": "shapes", "resolution": 32, "split": "train", "seed": 0,
                                        "length": a["records"], "colors": ("teal",) * len(COLORS) + tuple(COLORS)})
    c.cache.enabled = True
    c.batch_size = 16
    c.train.steps = a["steps"]
    c.train.log_every = 20
    c.train.checkpoint_every = 100
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    c.ema_decay = 0.0
    c.diffusion.snr_gamma = 5.0
    c.eval.every = 0
    c.eval.prompts = ["a large teal circle on a white background", "a medium teal square on a yellow background",
                      "a large teal triangle on a black background", "a large red circle on a white background"]
    c.eval.steps = 25
    c.eval.guidance_scale = 7.5
    c.eval.scheduler = "pndm"
    return c
