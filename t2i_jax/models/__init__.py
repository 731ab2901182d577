"""Flax models: CLIP (`clip`), VAE (`vae`), U-Net (`unet`), shared blocks (`layers`), and the
bundle of a whole Stable Diffusion model (`bundle.StableDiffusion`).

This package is the bottom layer: it imports nothing else of t2i_jax's but the tokenizer's type.
`t2i_jax.convert.load.load_components(path_or_id)` builds a bundle from a checkpoint.
"""
