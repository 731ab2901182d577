"""Flax models: CLIP (`clip`), VAE (`vae`), U-Net (`unet`), shared blocks (`layers`).

`load_components(path_or_id)` loads a whole Stable Diffusion model (see
`t2i_jax.models.components`).
"""


def load_components(*args, **kwargs):
    """See `t2i_jax.models.components.load_components`."""
    # Imported here: the converters import the model modules of this package.
    from t2i_jax.models.components import load_components as _load

    return _load(*args, **kwargs)


load_components.__doc__ = "Loads tokenizer, text encoder, VAE, U-Net and scheduler config; see t2i_jax.models.components."
