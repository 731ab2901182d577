"""CLIP score: how well an image matches its prompt, by a CLIP model's cosine.

Two conventions share the name:

- "CLIP score" as text-to-image papers and torchmetrics' `CLIPScore` report
  it: 100 * max(cos(image embedding, text embedding), 0). This is the default
  (`weight=100`).
- CLIP-S of Hessel et al. 2021 ("CLIPScore: A Reference-free Evaluation
  Metric for Image Captioning"): 2.5 * max(cos, 0). Pass `weight=2.5`.

Both are per-pair scores, averaged over the set. Images go through CLIP's own
preprocessing: resize the shorter side to the model's input size (bicubic,
PIL), centre crop, scale to [0, 1], normalise with the model's mean and std.
The settings come from the model folder's `preprocessor_config.json` when it
has one, else OpenAI's defaults; the steps are those of transformers'
`CLIPImageProcessor` (PIL backend), so pixels match it. The embeddings are
computed by the Flax CLIP (`t2i_jax.models.clip`) in fixed-size jitted
batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_CLIP", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "CLIPPreprocess", "CLIPScorer",
           "clip_score_from_cosine"]

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_BICUBIC = 3
# What a tokenizer folder holds (either the slow files or tokenizer.json).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
_EXTRA_PATTERNS = ["preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                   "merges.txt", "special_tokens_map.json"]


def clip_score_from_cosine(cos: np.ndarray, weight: float = 100.0) -> np.ndarray:
    """weight * max(cos, 0): weight 100 is the text-to-image "CLIP score", 2.5 Hessel et al.'s CLIP-S."""
    return weight * np.maximum(np.asarray(cos, np.float64), 0.0)


def _side(value: Any, key: str) -> int:
    """An int size from a processor config entry: an int or a dict holding `key`."""
    if isinstance(value, Mapping):
        if key not in value:
            raise ValueError(f"preprocessor size {dict(value)} has no {key!r}; CLIP needs a square crop of a "
                             "shorter-side resize")
        return int(value[key])
    return int(value)


@dataclasses.dataclass(frozen=True)
class CLIPPreprocess:
    """CLIP image preprocessing, uint8 HWC -> float32 HWC (the model's NHWC input)."""

    size: int = 224  # shorter side after the resize
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = _PIL_BICUBIC  # a PIL resampling filter id
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any], image_size: int = 224) -> CLIPPreprocess:
        """From a transformers `preprocessor_config.json` dict; missing fields use OpenAI's values for `image_size`."""
        crop = config.get("crop_size", image_size)
        return cls(
            size=_side(config.get("size", image_size), "shortest_edge"),
            crop_height=_side(crop, "height"), crop_width=_side(crop, "width"),
            mean=tuple(float(v) for v in config.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(float(v) for v in config.get("image_std", OPENAI_CLIP_STD)),
            resample=int(config.get("resample", _PIL_BICUBIC)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_resize=bool(config.get("do_resize", True)),
            do_center_crop=bool(config.get("do_center_crop", True)),
            do_rescale=bool(config.get("do_rescale", True)),
            do_normalize=bool(config.get("do_normalize", True)),
        )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, image_size: int = 224) -> CLIPPreprocess:
        """From `folder/preprocessor_config.json`, or OpenAI's defaults at `image_size` if there is none."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls(size=image_size, crop_height=image_size, crop_width=image_size)
        return cls.from_config(json.loads(path.read_text()), image_size)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One image (uint8 HWC RGB, or float in [0, 1]) -> float32 [crop_height, crop_width, 3]."""
        from PIL import Image

        im = np.asarray(image)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"image of shape {im.shape} is not HWC RGB")
        if im.dtype != np.uint8:
            im = np.clip(np.round(np.asarray(im, np.float64) * 255), 0, 255).astype(np.uint8)
        if self.do_resize:
            h, w = im.shape[:2]
            # transformers' rule: the shorter side becomes `size`, the longer
            # keeps the aspect ratio, rounded down.
            if h <= w:
                new_h, new_w = self.size, int(self.size * w / h)
            else:
                new_h, new_w = int(self.size * h / w), self.size
            im = np.asarray(Image.fromarray(im).resize((new_w, new_h), resample=self.resample))
        if self.do_center_crop:
            h, w = im.shape[:2]
            if h < self.crop_height or w < self.crop_width:
                raise ValueError(f"image of {h}x{w} after resizing is smaller than the crop "
                                 f"{self.crop_height}x{self.crop_width}")
            top, left = (h - self.crop_height) // 2, (w - self.crop_width) // 2
            im = im[top:top + self.crop_height, left:left + self.crop_width]
        x = im.astype(np.float64) * self.rescale_factor if self.do_rescale else im.astype(np.float64)
        x = x.astype(np.float32)
        if self.do_normalize:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x


def _tokenizer_for(folder: Path | None, max_length: int):
    from t2i_jax.tokenizer import Tokenizer

    if folder is not None and any((folder / f).is_file() for f in _TOKENIZER_FILES):
        tok = Tokenizer.from_pretrained(folder)
        tok.max_length = min(tok.max_length, max_length)
        return tok
    return Tokenizer.bundled(max_length=max_length)


class CLIPScorer:
    """CLIP score of (image, prompt) pairs with a two-tower CLIP checkpoint.

    `CLIPScorer(path_or_id)` loads a transformers `CLIPModel` folder or hub id
    (`load_clip`), its `preprocessor_config.json` and tokenizer when present
    (else OpenAI's preprocessing and the bundled CLIP tokenizer).
    """

    def __init__(self, path_or_id: str | os.PathLike = DEFAULT_CLIP, *, batch_size: int = 16,
                 weight: float = 100.0, dtype=None):
        """Args:
          path_or_id: a transformers CLIPModel folder or hub id.
          batch_size: images (or prompts) per jitted call; the last batch is padded.
          weight: 100 for the text-to-image "CLIP score", 2.5 for Hessel et al.'s CLIP-S.
          dtype: compute dtype (default float32).
        """
        import jax
        import jax.numpy as jnp

        from t2i_jax.convert import hub
        from t2i_jax.convert.clip import load_clip
        from t2i_jax.models import clip

        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be at least 1")
        module, params = load_clip(path_or_id, dtype=dtype or jnp.float32)
        if not isinstance(module, clip.CLIPModel):
            raise ValueError(f"{os.fspath(path_or_id)} holds a {type(module).__name__}; the CLIP score needs both "
                             "towers: pass a CLIPModel checkpoint (e.g. openai/clip-vit-large-patch14)")
        try:
            folder = Path(hub.resolve(path_or_id, allow_patterns=_EXTRA_PATTERNS))
        except FileNotFoundError as e:  # weights cached, extras not: the defaults are OpenAI's
            warnings.warn(f"no preprocessor/tokenizer files for {os.fspath(path_or_id)} ({e}); "
                          "using OpenAI CLIP's preprocessing and tokenizer", stacklevel=2)
            folder = None
        vision = module.config.vision
        self.name = os.fspath(path_or_id)
        self.module, self.params = module, params
        self.batch_size, self.weight = batch_size, weight
        self.preprocess = (CLIPPreprocess.from_folder(folder, vision.image_size) if folder is not None
                           else CLIPPreprocess(vision.image_size, vision.image_size, vision.image_size))
        if (self.preprocess.crop_height, self.preprocess.crop_width) != (vision.image_size,) * 2:
            raise ValueError(f"preprocessor crop {self.preprocess.crop_height}x{self.preprocess.crop_width} of "
                             f"{self.name} does not match the vision tower's image_size {vision.image_size}")
        self.tokenizer = _tokenizer_for(folder, module.config.text.max_position_embeddings)

        def unit(x):
            x = x.astype(jnp.float32)
            return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

        self._image_fn = jax.jit(lambda p, x: unit(module.apply(
            {"params": p}, x, method=clip.CLIPModel.get_image_features)))
        self._text_fn = jax.jit(lambda p, ids: unit(module.apply(
            {"params": p}, ids, method=clip.CLIPModel.get_text_features)))

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i:i + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:  # one compiled shape for every batch
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
            out.append(np.asarray(fn(self.params, chunk))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.module.config.projection_dim), np.float32)

    def image_embeddings(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Unit-norm image embeddings [N, P] of uint8 HWC images (any sizes)."""
        x = np.stack([self.preprocess(im) for im in images]) if len(images) else np.zeros((0,))
        return self._batched(self._image_fn, x)

    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """Unit-norm text embeddings [N, P]."""
        ids = self.tokenizer(list(prompts)) if len(prompts) else np.zeros((0,))
        return self._batched(self._text_fn, ids)

    def scores(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """Per pair: weight * max(cos(image_i, prompt_i), 0), float64 [N]."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
        cos = np.sum(self.image_embeddings(images).astype(np.float64)
                     * self.text_embeddings(prompts).astype(np.float64), axis=-1)
        return clip_score_from_cosine(cos, self.weight)

    def evaluate(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, Any]:
        """{"clip_score": mean, "clip_score_std", "num_images", "weight", "model", "per_image": [scores]}."""
        s = self.scores(images, prompts)
        return {"clip_score": float(s.mean()) if len(s) else float("nan"),
                "clip_score_std": float(s.std()) if len(s) else float("nan"),
                "num_images": len(s), "weight": self.weight, "model": self.name,
                "per_image": [float(v) for v in s]}
