"""Fine-tune the Stable Diffusion 1.5 U-Net on your own captioned images (VAE and text encoder frozen).

    python -m t2i_jax.train --config configs/sd15_finetune.py:/data/pokemon/captions.jsonl --workdir runs/ft
    python -m t2i_jax.train --config configs/sd15_finetune.py:/data/captions.jsonl --workdir runs/ft \
        --config.model.init_from=/models/v1-5-pruned-emaonly.safetensors --config.data.images=/data/img

The argument is a JSONL caption file (`{"image": "a.jpg", "caption": "..."}` per
line, images relative to it or to `data.images`); for a CSV set
`--config.data.name=csv`. `model.init_from` is anything `load_components`
takes: a diffusers folder, a hub id (default), or an original single-file
checkpoint. 512 px, bf16 compute with fp32 params, remat, AdamW 1e-5 with
100 warm-up steps, EMA 0.9999, 10% caption dropout; min-SNR-5 weighting.
For an SD 2.x 768-v model set `--config.diffusion.prediction_type=v_prediction`
(and data.resolution=768). Memory: on one 80 GB GPU, batch 8 per device fits;
add `--config.train.grad_accum=N` for larger effective batches, or
`--config.mesh.fsdp=N` to shard params and optimizer state over N devices.

TPU pods, 8 images per chip at 512 px (this config's batch per device; set
`--config.batch_size` to 8 x chips), as checked by the memory planner
(`python -m t2i_jax.bench --plan tpu:v5e:4x4 --model sd15 --resolution 512 --batch 128`,
which compiles the trainer's step for the topology; see BENCHMARKS.md, "TPU, compiled ahead
of time"). The state (fp32 U-Net params, two AdamW moments, the EMA copy: 12.8 GiB) shards
over fsdp; with cached latents the frozen VAE and text encoder are not in the step. The
plans need `model.attention_impl = "chunked"` (set here): XLA's attention materialises the
64x64 level's 4096 x 4096 scores and does not fit a v5e at 8 per chip with any fsdp.
- v5e-16 (`tpu:v5e:4x4`, 16 GiB per chip), batch 128: `--config.mesh.fsdp=2` (data 8), remat,
  chunked attention, no grad_accum: compiled, 11.45 GiB per chip (4.55 GiB headroom). fsdp 1
  cannot fit (arguments and gradients alone 16.78 GiB per chip).
- v5e-256 (`tpu:v5e:16x16`), batch 2048: the same `mesh.fsdp=2` (data 128). Not compiled at
  256 chips (a 16-chip compile took 47 min and 10.6 GB of this 23 GB host's RAM, and the compile
  grows with the chip count), but the per-chip answer carries: every array's per-chip shard
  depends on the fsdp degree and the images per chip only, which are the v5e-16 plan's; the data
  axis adds no state, only larger groups in the gradient all-reduce.
- v6e-8 (`tpu:v6e:2x4`, 32 GiB per chip), batch 64: fsdp 1 passes the planner's lower bound
  (16.78 GiB per chip before activations); its compile was stopped unfinished after 37 min.
  `--config.mesh.fsdp=2` (data 4) has the v5e-16 plan's per-chip shapes (11.45 GiB on a v5e) and
  leaves over half of 32 GiB free; compiled for v5e, not for v6e.
Other fsdp degrees, remat off or a smaller micro-batch (`--config.train.grad_accum`) were not
compiled at full size; run the planner without its option cuts to search them.
"""

import ml_collections

from t2i_jax.train import ldm


def get_config(arg=None):
    c = ldm.default_config()
    c.model.init_from = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    # Exact attention over query chunks of 1024 (layers.query_chunk_size): bounds the 64x64 level's
    # 4096 x 4096 scores, which do not fit a v5e at 8 per chip otherwise. "cudnn" on NVIDIA GPUs.
    c.model.attention_impl = "chunked"
    c.data = ml_collections.ConfigDict({"name": "jsonl", "path": arg or "", "images": "", "resolution": 512,
                                        "seed": 0, "random_flip": True, "worker_count": 4})
    c.batch_size = 8
    c.train.steps = 15000
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 1e-2
    c.optim.grad_clip = 1.0
    c.ema_decay = 0.9999
    c.diffusion.prediction_type = ""  # keep the model's own (epsilon for SD 1.5)
    c.diffusion.snr_gamma = 5.0
    c.diffusion.caption_dropout = 0.1
    c.eval.every = 1000
    c.eval.prompts = ["a photo of an astronaut riding a horse", "a watercolor painting of a fox"]
    c.eval.steps = 25
    c.eval.guidance_scale = 7.5
    return c
