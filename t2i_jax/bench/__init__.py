"""Throughput per device: `python -m t2i_jax.bench --model sd15 --compare diffusers`
(SDXL: `--model sdxl`, 1024x1024, against diffusers' StableDiffusionXLPipeline).

`core.run(BenchSettings(...))` times the U-Net forward ("unet"), the whole
txt2img sampler ("sample") and one U-Net training step ("train") of a named
model with random weights, sharded over every device; `reference` runs the
same work in PyTorch diffusers; `flops` and `devices` hold the FLOP counting
and the per-device peaks. See BENCHMARKS.md for measured figures.
"""

from t2i_jax.bench.core import MODELS, MODES, BenchSettings, run  # noqa: F401
