"""Inpainting: repaint the white part of a mask, keep the rest.

Two kinds of model, both as diffusers' `StableDiffusionInpaintPipeline`:

* inpainting U-Nets (9 input channels: SD 1.5 / SD 2 inpainting) see, at
  every evaluation, [scaled latents, the mask at latent size, the latents of
  the image with the masked part set to 0 (grey)] concatenated on channels;
* ordinary U-Nets (4 channels): after every step the latents outside the
  mask are replaced by the init image's latents re-noised to the level of
  the next evaluation (the last step: the clean latents).

Host side (numpy): reading and checking the mask, its blur and padding, the
binarised full-size mask, its latent-size copy and the masked image. Device
side: `loop_inputs` (before the loop), `model_input` and `blend` (inside it),
called from `pipeline._denoise`. `composite` is `--keep-unmasked`.

Mask semantics (documented in the README):

* white (>= 0.5 after `prepare_mask`) = repaint, black = keep. The model sees
  the binarised mask, as diffusers' mask processor gives it;
* `padding` PX grows the repainted area by PX pixels (a square max filter),
  so a seam falls outside the object drawn; `blur` PX softens the mask with
  a Gaussian of radius PX (PIL's, as diffusers' `VaeImageProcessor.blur`
  and A1111's "mask blur"), before it is binarised;
* `composite` (keep-unmasked) pastes the input image back with the soft
  (blurred) mask as alpha, as A1111 overlays the original: where the mask
  is exactly 0 the output pixel is the input pixel, bit for bit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from t2i_jax.files import read_image

# --------------------------------------------------------------------------
# Host side: the mask
# --------------------------------------------------------------------------


def read_mask(path: str | Path, size: tuple[int, int] | None = None, *, name: str = "--mask") -> np.ndarray:
    """The mask image at `path` as float32 [H, W] in [0, 1]: its luminance
    (PIL's "L"), white = repaint. `size` (width, height): the init image's;
    a mask of another size is an error naming both."""
    im = read_image(path, "L", flag=name, what="mask image")
    check_mask_size(im.size, size, name=name)
    return np.asarray(im, np.float32) / 255.0


def check_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int] | None, *, name: str = "--mask") -> None:
    """ValueError when the mask's (width, height) is not the image's."""
    if image_size is not None and tuple(mask_size) != tuple(image_size):
        (mw, mh), (iw, ih) = mask_size, image_size
        raise ValueError(f"{name} is {mw}x{mh} pixels but the init image is {iw}x{ih}; draw the mask on the init "
                         f"image (or resize it to {iw}x{ih}) so the two line up")


def prepare_mask(mask: np.ndarray, *, blur: float = 0, padding: int = 0,
                 size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask [H, W] in [0, 1] grown by `padding` pixels, softened by a
    Gaussian of radius `blur` and resized to `size` (width, height; nearest
    neighbour, so a hard mask stays hard); float32 [H', W'] in [0, 1],
    quantised to 1/255 steps as the PNG it could be saved as."""
    from PIL import Image, ImageFilter

    if blur < 0 or padding < 0:
        raise ValueError(f"mask blur {blur} and padding {padding} must be >= 0 (pixels); 0 turns them off")
    im = Image.fromarray(np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8))
    if padding:
        im = im.filter(ImageFilter.MaxFilter(2 * int(padding) + 1))
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    if size is not None and im.size != tuple(size):
        im = im.resize(tuple(size), Image.NEAREST)
    return np.asarray(im, np.float32) / 255.0


def binarize(mask: np.ndarray) -> np.ndarray:
    """1 where mask >= 0.5 (repaint), else 0: diffusers' mask processor."""
    return (np.asarray(mask) >= 0.5).astype(np.float32)


def check_masks(mask_images, n: int, height: int, width: int) -> np.ndarray:
    """`mask_images` ([n, H, W] or [n, H, W, 1], in [0, 1]) as float32 [n, H, W]."""
    m = np.asarray(mask_images, np.float32)
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != (n, height, width):
        raise ValueError(f"mask images have shape {np.shape(mask_images)}; expected {(n, height, width)} or "
                         f"{(n, height, width, 1)}: one mask per prompt, the init images' size")
    if m.size and (m.min() < 0 or m.max() > 1 or not np.isfinite(m).all()):
        raise ValueError(f"mask images must lie in [0, 1] (white = 1 = repaint); got values in "
                         f"[{m.min():g}, {m.max():g}]")
    return m


@dataclasses.dataclass(frozen=True)
class Mode:
    """The static choices of an inpainting loop (part of its cache key)."""

    concat: bool  # a 9-channel U-Net: mask and masked-image latents join its input
    from_noise: bool  # strength 1.0: start from pure noise (diffusers' is_strength_max)


def mode_for(unet_in_channels: int, latent_channels: int, strength: float) -> Mode:
    """The `Mode` for a U-Net with `unet_in_channels` inputs, or a ValueError."""
    if unet_in_channels == 2 * latent_channels + 1:
        concat = True
    elif unet_in_channels == latent_channels:
        concat = False
    else:
        raise ValueError(f"the U-Net takes {unet_in_channels} input channels; inpainting needs "
                         f"{latent_channels} (an ordinary model) or {2 * latent_channels + 1} (an inpainting "
                         f"model: latents, mask, masked-image latents)")
    return Mode(concat=concat, from_noise=strength == 1.0)


def host_inputs(mode: Mode, masks: np.ndarray, init_images: np.ndarray, factor: int) -> dict:
    """The loop's inpainting inputs from checked masks [n, H, W] in [0, 1]
    and init images [n, H, W, 3] in [-1, 1] (numpy; the caller places them).

    `mask`: the binarised mask at latent size [n, H/f, W/f, 1], picked as
    torch's nearest `interpolate` does (pixel (f*i, f*j)); `masked_images`
    (9-channel U-Nets only): the init images with the repainted part set to
    0, as diffusers' `image * (mask < 0.5)`.
    """
    binary = binarize(masks)
    out = {"mask": np.ascontiguousarray(binary[:, ::factor, ::factor, None])}
    if mode.concat:
        out["masked_images"] = (init_images * (binary < 0.5)[..., None]).astype(np.float32)
    return out


# --------------------------------------------------------------------------
# Device side: used by pipeline._denoise
# --------------------------------------------------------------------------


def loop_inputs(mode: Mode, sched, state, encode, inp: dict, x0, noise, x):
    """(starting sample, what `model_input` and `blend` read) for an
    inpainting loop.

    `encode(images, eps)`: scaled latents of the VAE posterior sampled with
    `eps` (None: the seeded masked-image stream), as diffusers samples the
    masked image's posterior with its generator. `x0`: the init image's
    latents; `x`: the img2img start (x0 noised to evaluation 0), replaced by
    `noise * init_noise_sigma` at full strength as diffusers does.
    """
    if mode.from_noise:
        x = noise * state.init_noise_sigma
    if mode.concat:
        z = encode(inp["masked_images"], inp.get("masked_encoder_noise"))
        return x, {"extra": jnp.concatenate([inp["mask"], z], axis=-1)}
    levels = sched.noise_levels(state)
    # Row i: the level of evaluation i + 1; after the last step the known
    # latents go in clean (1 * x0 + 0 * noise is x0 exactly).
    nxt = jnp.concatenate([levels[1:], jnp.asarray([[1.0, 0.0]], levels.dtype)], axis=0)
    return x, {"mask": inp["mask"], "known": x0, "noise": noise, "next_levels": nxt}


def model_input(inp: dict | None, xin):
    """The U-Net's input: the scaled latents, with the mask and masked-image
    latents appended on channels for a 9-channel U-Net."""
    if inp is None or "extra" not in inp:
        return xin
    return jnp.concatenate([xin, inp["extra"].astype(xin.dtype)], axis=-1)


def blend(inp: dict | None, x, i):
    """After step i (4-channel U-Nets): outside the mask, the known latents
    at the next evaluation's noise level; inside, the sampler's."""
    if inp is None or "known" not in inp:
        return x
    a, s = inp["next_levels"][i, 0], inp["next_levels"][i, 1]
    known = a * inp["known"] + s * inp["noise"]
    m = inp["mask"]
    return ((1 - m) * known + m * x).astype(x.dtype)


# --------------------------------------------------------------------------
# Keep-unmasked
# --------------------------------------------------------------------------


def composite(images: np.ndarray, init_images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The init images pasted over the generated ones with `masks` as alpha
    (float [n, H, W] or [n, H, W, 1] in [0, 1], white = generated): where a
    mask is 0 the pixel is the init image's exactly (then also after
    `pipeline.to_uint8` when the init image came from uint8)."""
    a = np.asarray(masks, np.float32)
    if a.ndim == 3:
        a = a[..., None]
    return (np.asarray(init_images, np.float32) * (1 - a) + np.asarray(images, np.float32) * a).astype(np.float32)
