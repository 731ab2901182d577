"""SDXL's sampling side: both text encoders, micro-conditioning time ids and the
base -> refiner hand-off, as diffusers' StableDiffusionXL(Img2Img)Pipeline.

`pipeline.Sampler` calls these for an SDXL bundle (`StableDiffusion.is_sdxl`):

- the text: both encoders' penultimate hidden states concatenated (the
  refiner has only the second), and the second encoder's projected pooled
  embedding; an empty negative prompt is zeros when the model says
  `force_zeros_for_empty_prompt` (the base), as diffusers;
- the time ids per image: original size, crop top-left, target size (base),
  or original size, crop top-left, aesthetic score (the refiner,
  `requires_aesthetics_score`), with the negative variants for the
  unconditional half;
- `denoising_end` / `denoising_start`: the evaluation window of a run, cut
  where diffusers cuts it (`timestep_window`).

Prompts are taken as written and cut to the context (77 tokens), as
diffusers does: the A1111 emphasis and long-prompt chunks of `t2i_jax.prompts`
are not applied to SDXL yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Conditions:
    """SDXL's micro-conditioning (diffusers' argument names and defaults).

    Sizes are (height, width) in pixels; None means the call's (height,
    width). The negative variants condition the unconditional half, by
    diffusers' rules (`time_ids`). The aesthetic scores are read by the
    refiner only (time ids: original size, crop, score).
    """

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


def time_ids(cond: Conditions, height: int, width: int, *, aesthetic: bool, img2img: bool, num_ids: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) time ids, float32 [K] each, exactly as diffusers builds them.

    The refiner (`aesthetic`): original size + crop + score. Otherwise
    original size + crop + target size, and diffusers' two pipelines differ
    on the negative half, which is kept here: txt2img
    (StableDiffusionXLPipeline) uses the negative sizes and crop only when
    both negative sizes are given, else the positive ids; img2img
    (StableDiffusionXLImg2ImgPipeline) fills a missing negative size with the
    positive one and always takes the positive crop. `num_ids` is what the
    U-Net takes (`unet.text_time_sizes`); a mismatch names the setting.
    """
    size = (height, width)
    orig = tuple(cond.original_size or size)
    target = tuple(cond.target_size or size)
    crop = tuple(cond.crops_coords_top_left)
    n_orig = tuple(cond.negative_original_size or orig)
    n_crop = tuple(cond.negative_crops_coords_top_left)
    n_target = tuple(cond.negative_target_size or target)
    pos = orig + crop + ((cond.aesthetic_score,) if aesthetic else target)
    if aesthetic:
        neg = n_orig + n_crop + (cond.negative_aesthetic_score,)
    elif img2img:
        neg = n_orig + crop + n_target
    elif cond.negative_original_size is not None and cond.negative_target_size is not None:
        neg = n_orig + n_crop + n_target
    else:
        neg = pos
    if len(pos) != num_ids:
        kind = "the aesthetic score (refiner)" if aesthetic else "the target size (base)"
        raise ValueError(f"this U-Net takes {num_ids} time ids, but the model's requires_aesthetics_score="
                         f"{aesthetic} gives {len(pos)} ({kind}); the model_index.json setting does not fit "
                         "its U-Net")
    return np.asarray(pos, np.float32), np.asarray(neg, np.float32)


def encode_text(te1, te2, p1, p2, ids1, ids2):
    """(states [n, L, D1 + D2], pooled [n, P]): the penultimate hidden states of
    both encoders side by side (only the second's without a first, the
    refiner) and the second's projected pooled embedding."""
    states = []
    if te1 is not None:
        states.append(te1.apply({"params": p1}, ids1, output_hidden_states=True).hidden_states[-2])
    out = te2.apply({"params": p2}, ids2, output_hidden_states=True)
    states.append(out.hidden_states[-2])
    return jnp.concatenate(states, axis=-1), out.text_embeds


def timestep_window(timesteps: np.ndarray, num_train_timesteps: int, order: int, *,
                    denoising_start: float | None = None, denoising_end: float | None = None
                    ) -> tuple[int, int]:
    """(begin, end): the evaluations [begin, end) of a full run that this one
    makes, as diffusers cuts them.

    `denoising_end` (the base's share, e.g. 0.8) keeps the evaluations whose
    timestep is at least round(T - end * T); `denoising_start` (the
    refiner's) those below round(T - start * T), one more for a second-order
    sampler whose count comes out even (diffusers' `get_timesteps`).
    """
    T = num_train_timesteps
    k = len(timesteps)
    begin, end = 0, k
    for name, v in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError(f"{name} {v} is outside (0, 1); use e.g. 0.8 (the fraction of the schedule the "
                             "base denoises before the refiner)")
    if denoising_end is not None:
        cutoff = int(round(T - denoising_end * T))
        end = int((np.asarray(timesteps) >= cutoff).sum())
    if denoising_start is not None:
        cutoff = int(round(T - denoising_start * T))
        n = int((np.asarray(timesteps) < cutoff).sum())
        if order == 2 and n % 2 == 0:
            n += 1
        begin = k - n
    if end - begin < 1:
        raise ValueError(f"denoising_start {denoising_start} / denoising_end {denoising_end} leave no step of "
                         f"the {k} evaluations; use more steps or a wider window")
    return begin, end


def check_sizes(name: str, value: Sequence[int] | None) -> None:
    """A (height, width) pair or None; a ValueError says what was given."""
    if value is not None and (len(tuple(value)) != 2 or any(not isinstance(v, (int, np.integer)) for v in value)):
        raise ValueError(f"{name} {value!r} must be a (height, width) pair of ints, e.g. (1024, 1024)")
