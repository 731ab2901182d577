"""The model bundle: a Stable Diffusion model's parts and their params.

`t2i_jax.convert.load.load_components` builds one from a checkpoint; the
sampler (`t2i_jax.pipeline.Sampler`), the trainers and the exporter take one.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the bundle needs no tokenizer code
    from t2i_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class StableDiffusion:
    """The parts of a Stable Diffusion model and their params.

    `params` holds `text_encoder`, `unet` and `vae` param trees.

    SDXL models have a second tokenizer and text encoder (OpenCLIP ViT-bigG,
    a `CLIPTextModel` with projection), `tokenizer_2` / `text_encoder_2`
    with params under `text_encoder_2`; the SDXL refiner has only those, and
    `tokenizer` / `text_encoder` are None (no `text_encoder` params).
    SD 1.x/2.x bundles leave the second pair None.
    `scheduler_config` is the diffusers `scheduler_config.json` dict, from
    which any sampler is built (`scheduler` names one of
    `schedulers.SCHEDULERS`).
    """

    tokenizer: Tokenizer | None
    text_encoder: Any  # t2i_jax.models.clip.CLIPTextModel (None: the SDXL refiner)
    unet: Any  # t2i_jax.models.unet.UNet2DConditionModel
    vae: Any  # t2i_jax.models.vae.AutoencoderKL
    params: dict
    scheduler_config: dict
    source: str = ""  # where it was loaded from, for messages and metadata
    tokenizer_2: Tokenizer | None = None  # SDXL: the OpenCLIP tokenizer (pads with "!")
    text_encoder_2: Any = None  # SDXL: CLIPTextModel(with_projection=True), OpenCLIP ViT-bigG
    # SDXL's pipeline settings from model_index.json: `force_zeros_for_empty_prompt`
    # (base: True, the empty negative prompt is zeros, not its encoding) and
    # `requires_aesthetics_score` (the refiner: True, its time ids end in a score).
    pipeline_options: dict = dataclasses.field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        """True for SDXL (a U-Net with the text-time addition embedding)."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return self.vae.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        """Channels of the latents, the VAE's (4 for SD); an inpainting U-Net
        takes 2 * C + 1 input channels (latents, mask, masked-image latents)."""
        return self.vae.config.latent_channels

    @property
    def dtype(self):
        """The U-Net's compute dtype."""
        return self.unet.dtype

    def with_compute(self, dtype=None, attention_impl: str | None = None) -> StableDiffusion:
        """The same model and params with its modules' compute `dtype` and/or
        attention implementation (None/"xla", "cudnn", "auto"; the VAE's
        attention always runs on XLA) replaced; None keeps what they have.
        Params are not touched: fp32 params in bf16 compute is the usual
        setting (a `Sampler` keeps its own copy cast to the compute dtype,
        see its `cast_params`)."""
        if dtype is None and attention_impl is None:
            return self
        kw = {} if dtype is None else {"dtype": dtype}
        attn = {} if attention_impl is None else {"attention_impl": attention_impl}
        def text(m):
            return None if m is None else m.clone(**kw, **attn)

        return dataclasses.replace(self, text_encoder=text(self.text_encoder), text_encoder_2=text(self.text_encoder_2),
                                   unet=self.unet.clone(**kw, **attn), vae=self.vae.clone(**kw))
