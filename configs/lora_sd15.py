"""A LoRA (rank 8, alpha 8) on Stable Diffusion 1.5's U-Net attention from your own captioned images.

    python -m t2i_jax.train --config configs/lora_sd15.py:/data/pokemon/captions.jsonl --workdir runs/lora
    python -m t2i_jax.sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --lora runs/lora/export/pytorch_lora_weights.safetensors --prompt "..." --out out/
    # also the text encoder's attention (the text encoder then runs in the step; no cache):
    python -m t2i_jax.train --config configs/lora_sd15.py:/data/captions.jsonl --workdir runs/lora_te \
        --config.lora.text_encoder_targets='q_proj|k_proj|v_proj|out_proj'

The argument is a JSONL caption file as for configs/sd15_finetune.py (the same data
keys, `model.init_from` likewise). Adapters on to_q, to_k, to_v, to_out.0 of every
attention layer (add `|ff.net` to `lora.targets` for the feed-forward), PEFT init,
AdamW lr 1e-4 as diffusers' train_text_to_image_lora.py, no EMA. 512 px, bf16 compute.
The export folder holds the adapters alone: `pytorch_lora_weights.safetensors`
(diffusers' `pipe.load_lora_weights(DIR)` reads it) and `lora_kohya.safetensors`
(AUTOMATIC1111 / ComfyUI).

Memory (array sizes, BENCHMARKS.md "Training memory: LoRA vs full fine-tune"): the
train state (6.4 MB of adapters + their AdamW moments) is 19.1 MB against 13.75 GB
for configs/sd15_finetune.py's (fp32 params, moments and EMA); outside the state,
the frozen U-Net is ~1.7 GB in bf16, the text encoder ~0.25 GB (bf16) and the VAE
~0.33 GB (fp32). The rest is activations (batch x resolution; remat is on). Not yet
run on a GPU.
"""

import importlib.util
from pathlib import Path


def _base():
    # By path, as configs/bundled_ldm.py does: the config loads from any working directory.
    spec = importlib.util.spec_from_file_location("sd15_finetune", Path(__file__).with_name("sd15_finetune.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg=None):
    # sd15_finetune's model, data, dtype, remat and eval; LoRA's own optimizer and schedule.
    c = _base().get_config(arg)
    c.lora.rank = 8
    c.lora.alpha = 8.0
    c.lora.dropout = 0.0
    c.lora.targets = "to_q|to_k|to_v|to_out"
    c.lora.text_encoder_targets = ""
    c.train.steps = 3000
    c.train.checkpoint_every = 500
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.ema_decay = 0.0
    c.eval.every = 500
    return c
