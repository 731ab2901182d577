"""Fine-tune the SDXL base U-Net on your own captioned images (VAE and both text encoders frozen).

    python -m t2i_jax.train --config configs/sdxl_finetune.py:/data/captions.jsonl --workdir runs/sdxl_ft
    # 8 GPUs, params / moments / EMA sharded 8 ways (FSDP), EMA on:
    python -m t2i_jax.train --config configs/sdxl_finetune.py:/data/captions.jsonl,gpus=8 --workdir runs/sdxl_ft8
    # the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix) instead of the base's:
    python -m t2i_jax.train --config configs/sdxl_finetune.py:/data/captions.jsonl,fp16_fix_vae --workdir runs/x

The argument is `CAPTIONS[,gpus=N][,fp16_fix_vae]`: a JSONL caption file as for
configs/sd15_finetune.py (`{"image": ..., "caption": ...}` per line). 1024 px, bf16
compute with fp32 params, remat, AdamW 1e-6 (diffusers' train_text_to_image_sdxl.py
example), 10% caption dropout (both encoders encode ""), time ids per image from its
original size and crop (t2i_jax.train.sdxl_cond). `fp16_fix_vae` sets
`model.vae_from`: that VAE's config says force_upcast false, so the eval samples decode
in bf16; the base's VAE is right in bf16 too (its fp16 trouble is overflow, which bf16's
range does not have), so the option is off by default.

Memory plan (state bytes computed from the arrays by `memory_plan()`: jax.eval_shape of
the SDXL U-Net, `UNetConfig.named("sdxl")`, 2,567,463,684 params, and of the trainer's
AdamW state; the test checks these figures):

    U-Net params (fp32)                      9.56 GiB
    train state with EMA                    38.26 GiB   params + AdamW mu, nu + EMA
    train state without EMA                 28.69 GiB   params + AdamW mu, nu
    gradients (fp32, live in the step)       9.56 GiB
    bf16 copy of the params (the casts)      4.78 GiB   assumed materialised by XLA (it may fuse)
    frozen text encoders + VAE (fp32)        ~3.4 GiB   assumed from the published parameter
                                                        counts (123.1M + 694.7M + 83.7M); replicated

- One 80 GB GPU (74.5 GiB): with EMA the arrays above are ~56 GiB before any activation,
  leaving ~18 GiB for 1024 px activations (128x128 latents) and XLA's temporaries; without
  EMA ~47 GiB, leaving ~28 GiB. Activations are NOT computed here (no GPU was available to
  this change): with remat they are the blocks' inputs plus one block's recomputation, and
  with XLA's attention (not cuDNN flash) the 64x64-latent level's 4096-token self-attention
  scores alone are 4096^2 x 10 heads x 2 B = 0.31 GiB per layer. So the default (gpus=1)
  turns EMA off and takes batch 4 as 4 micro-batches of 1 (`train.grad_accum=4`);
  `--config.ema_decay=0.9999` turns EMA on for a try, and `--config.model.attention_impl=cudnn`
  is the first thing to set on NVIDIA GPUs. Measure before relying on either.
- 8 GPUs (`gpus=8`: mesh.fsdp=8): the state with EMA is 38.26 / 8 = 4.78 GiB per GPU and the
  gradients 1.20 GiB; the frozen parts stay replicated (3.4 GiB); batch 32, 4 per GPU as 4
  micro-batches of 1, with EMA 0.9999 on. The activations per GPU are the one-GPU case's at
  the same micro-batch (assumed, as above), so there is room for `train.grad_accum=2`
  (micro-batches of 2 per GPU) once measured.

TPU pods (`POD_PLANS`, `--config.mesh.fsdp=N` with `gpus=<chips>`): lower bounds before activations,
NOT compiles. `t2i_jax.bench.plan.lower_bounds` (abstract values only) sums per chip the train step's
arguments (this config's state with EMA, the frozen VAE and both text encoders replicated, the
batch) and one fp32 gradient shard, at 1024 px and this config's 4 images per chip:

    fsdp   1: 51.18 GiB   2: 27.29 GiB   4: 15.34 GiB   8: 9.37 GiB   16: 6.38 GiB

- v5e-16 (`tpu:v5e:4x4`, 16 GiB per chip), batch 64: the smallest fsdp passing the bound is 4
  (data 4), with only 0.66 GiB left for activations; fsdp 8 leaves 6.63 GiB.
- v5e-256 (`tpu:v5e:16x16`), batch 1024: the same per-chip figures, smallest fsdp 4 (data 64).
- v6e-8 (`tpu:v6e:2x4`, 32 GiB per chip), batch 32: smallest fsdp 2 (data 4), 4.71 GiB left.

Whether 1024 px activations fit what is left is for a compile to say
(`python -m t2i_jax.bench --plan tpu:v5e:4x4 --model sdxl --batch 64`); none was run for these
figures (BENCHMARKS.md, "SDXL pod plans: lower bounds").
"""

import ml_collections

from t2i_jax.train import ldm

FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"
# TPU pods: the smallest mesh.fsdp whose lower bound (arguments + one fp32 gradient, before any
# activation; `t2i_jax.bench.plan.lower_bounds`) fits a chip at 4 images per chip, 1024 px, EMA on.
# Not compiled: see "TPU pods" in the docstring.
POD_PLANS = {"v5e:4x4": 4, "v5e:16x16": 4, "v6e:2x4": 2}


def _parse(arg):
    """`CAPTIONS[,gpus=N][,fp16_fix_vae]` -> (path, gpus, fp16_fix_vae)."""
    path, gpus, fix = "", 1, False
    for item in (arg or "").split(","):
        if item.startswith("gpus="):
            gpus = int(item[len("gpus="):])
        elif item == "fp16_fix_vae":
            fix = True
        elif item:
            path = item
    return path, gpus, fix


def get_config(arg=None):
    path, gpus, fix = _parse(arg)
    c = ldm.default_config()
    c.model.init_from = "stabilityai/stable-diffusion-xl-base-1.0"
    c.model.vae_from = FP16_FIX_VAE if fix else ""
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.attention_impl = ""  # "cudnn" on NVIDIA GPUs
    c.data = ml_collections.ConfigDict({"name": "jsonl", "path": path, "images": "", "resolution": 1024,
                                        "seed": 0, "random_flip": True, "worker_count": 4})
    c.batch_size = 4 * gpus
    c.train.grad_accum = 4  # micro-batches of 1 image per device
    c.mesh.fsdp = gpus
    c.train.steps = 10000
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 1e-2
    c.optim.grad_clip = 1.0
    c.ema_decay = 0.9999 if gpus >= 8 else 0.0  # one 80 GB GPU: see the memory plan
    c.diffusion.prediction_type = ""  # the model's own (epsilon)
    c.diffusion.snr_gamma = 5.0
    c.diffusion.caption_dropout = 0.1
    c.eval.every = 500
    c.eval.prompts = ["a photo of an astronaut riding a horse", "a watercolor painting of a fox"]
    c.eval.steps = 30
    c.eval.scheduler = "euler"
    c.eval.guidance_scale = 5.0
    return c


def memory_plan(config=None) -> dict:
    """Bytes of the SDXL U-Net's train state from the arrays (nothing allocated): {"params",
    "params_bytes", "state_bytes_ema", "state_bytes_no_ema", "gradient_bytes"}."""
    import functools

    import jax

    from t2i_jax.models import unet as unet_lib
    from t2i_jax.train import lora as lora_lib
    from t2i_jax.train import state as state_lib

    config = config or get_config()
    cfg = unet_lib.UNetConfig.named("sdxl")
    unet = unet_lib.UNet2DConditionModel(cfg)
    params = jax.eval_shape(unet.init, jax.random.PRNGKey(0), *unet_lib.dummy_inputs(cfg))["params"]
    tx, _ = ldm.make_optimizer(config, 1000)
    sizes = {ema: lora_lib.state_bytes(jax.eval_shape(functools.partial(state_lib.create_state, tx=tx, ema=ema,
                                                                         seed=0), params)) for ema in (True, False)}
    n = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    pb = lora_lib.state_bytes(params)
    return {"params": n, "params_bytes": pb, "state_bytes_ema": sizes[True], "state_bytes_no_ema": sizes[False],
            "gradient_bytes": pb}
