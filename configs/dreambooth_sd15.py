"""DreamBooth on Stable Diffusion 1.5: teach one subject from a few photos, with prior preservation.

    python -m t2i_jax.train --config configs/dreambooth_sd15.py:/data/my_dog --workdir runs/sks_dog
    python -m t2i_jax.train --config configs/dreambooth_sd15.py:/data/my_cat --workdir runs/sks_cat \
        --config.dreambooth.instance_prompt="a photo of sks cat" --config.dreambooth.class_prompt="a photo of cat"
    python -m t2i_jax.sample --model runs/sks_dog/export --prompt "a photo of sks dog in a bucket" --out out/

The argument is a folder of 3-10 photos of the subject. As diffusers'
examples/dreambooth (README recipe with prior preservation): 200 class images of
the class prompt, sampled once by SD 1.5 itself (PNDM, 50 steps, guidance 7.5)
into <workdir>/class_images (a re-run or resume reuses them); one instance and
one class example per step (batch_size 2), loss = instance + 1.0 * prior,
AdamW lr 5e-6 constant, 800 steps, no caption dropout, no EMA, no min-SNR. The
U-Net is fine-tuned in full (fp32 params, bf16 compute, remat); VAE and text
encoder stay frozen, so latents and text states are cached (cache.enabled).
Memory: the full U-Net with AdamW state is ~10 GB (fp32 params + 2 moments).

DreamBooth as LoRA: DreamBooth changes only the data and the loss, so once LoRA
training is in the trainer, add `--config.lora.rank=4` (and a LoRA learning
rate, e.g. `--config.optim.lr=1e-4`) to train adapters instead of the U-Net.
"""

import ml_collections

from t2i_jax.train import ldm


def get_config(arg=None):
    c = ldm.default_config()
    c.model.init_from = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.attention_impl = ""  # "cudnn" on NVIDIA GPUs
    c.data = ml_collections.ConfigDict({"resolution": 512, "seed": 0})
    db = c.dreambooth
    db.enabled = True
    db.instance_images = arg or ""
    db.instance_prompt = "a photo of sks dog"
    db.class_prompt = "a photo of dog"
    db.prior_preservation = True
    db.prior_loss_weight = 1.0
    db.num_class_images = 200
    db.class_steps = 50
    db.class_guidance_scale = 7.5
    db.class_scheduler = "pndm"
    db.class_batch_size = 8
    c.cache.enabled = True
    c.cache.batch_size = 16
    c.batch_size = 2  # 1 instance + 1 class example
    c.train.steps = 800
    c.train.log_every = 20
    c.train.checkpoint_every = 200
    c.optim.lr = 5e-6
    c.optim.warmup_steps = 0
    c.optim.end_lr_factor = 1.0
    c.optim.weight_decay = 1e-2
    c.optim.grad_clip = 1.0
    c.ema_decay = 0.0
    c.diffusion.prediction_type = ""  # keep the model's own (epsilon for SD 1.5)
    c.diffusion.snr_gamma = 0.0
    c.diffusion.caption_dropout = 0.0
    c.eval.every = 200
    c.eval.prompts = ["a photo of sks dog", "a photo of sks dog in a bucket", "a photo of dog"]
    c.eval.steps = 25
    c.eval.guidance_scale = 7.5
    return c
