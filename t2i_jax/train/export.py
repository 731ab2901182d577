"""Export a trained Stable Diffusion as a complete diffusers pipeline folder.

    export_pipeline(pipe, "runs/x/export")      # pipe: t2i_jax.models.bundle.StableDiffusion

writes

    model_index.json                 StableDiffusionPipeline and its component classes
    unet/        config.json + diffusion_pytorch_model.safetensors
    vae/         config.json + diffusion_pytorch_model.safetensors
    text_encoder/config.json + model.safetensors (transformers CLIPTextModel)
    tokenizer/   vocab.json, merges.txt, tokenizer_config.json ... (CLIPTokenizer)
    scheduler/   scheduler_config.json (PNDMScheduler, SD's default sampler)

which `python -m t2i_jax.sample --model DIR`, `t2i_jax.convert.load.load_components(DIR)`
and `diffusers.StableDiffusionPipeline.from_pretrained(DIR)` all load. Shared by the
ldm and vae objectives (the VAE trainer writes only `vae/`).

An SDXL bundle (`pipe.text_encoder_2` set) is written as a
StableDiffusionXLPipeline folder (the refiner, without `text_encoder`, as
StableDiffusionXLImg2ImgPipeline), adding `text_encoder_2/`
(CLIPTextModelWithProjection) and `tokenizer_2/`, with an
EulerDiscreteScheduler config as stabilityai's folders have.

ldm and vae objectives (the VAE trainer writes only `vae/`). A LoRA run exports its
adapters alone (`export_lora`): `pytorch_lora_weights.safetensors` (diffusers/PEFT, what
`pipe.load_lora_weights(DIR)` reads) and `lora_kohya.safetensors` (kohya/AUTOMATIC1111);
`python -m t2i_jax.sample --lora FILE` reads either.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from t2i_jax.convert import clip as clip_convert
from t2i_jax.convert import diffusers as diffusers_convert
from t2i_jax.convert.core import target_version
from t2i_jax.files import atomic_write

__all__ = ["export_pipeline", "export_lora", "scheduler_json", "text_encoder_for_export"]

LORA_FILES = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors"}

# Scheduler fields a diffusers PNDMScheduler config carries beyond the noise schedule.
_PNDM_EXTRA = {"skip_prk_steps": True}


def scheduler_json(scheduler_config: dict) -> dict:
    """A diffusers PNDMScheduler `scheduler_config.json` for a noise schedule (SD_SCHEDULER-like dict)."""
    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return {"_class_name": "PNDMScheduler", "_diffusers_version": target_version("diffusers"), **_PNDM_EXTRA, **cfg}


def text_encoder_for_export(module, params):
    """(module, params) of a plain `CLIPTextModel` (what SD pipelines hold) from a CLIP text
    tower with or without its projection; the projection is unused by SD and dropped."""
    from t2i_jax.models import clip as clip_lib

    if isinstance(module, clip_lib.CLIPTextModel) and module.with_projection:
        module = module.clone(with_projection=False)
        params = {k: v for k, v in params.items() if k != "text_projection"}
    if not isinstance(module, clip_lib.CLIPTextModel):
        raise TypeError(f"the text encoder is a {type(module).__name__}; SD pipelines take a CLIPTextModel")
    return module, params


def export_pipeline(pipe, out_dir: str | os.PathLike, *, dtype=None) -> Path:
    """Writes `pipe` (a `t2i_jax.models.bundle.StableDiffusion` with host params) as a diffusers
    StableDiffusionPipeline folder; `dtype` (e.g. np.float16) casts the saved weights.

    The U-Net's `sample_size` is what the sampling CLI takes as the native size
    (times the VAE factor); set it in the U-Net config before exporting.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(pipe, "text_encoder_2", None) is not None:
        return _export_sdxl(pipe, out, dtype)
    params = pipe.params
    diffusers_convert.save_unet(_np(params["unet"]), pipe.unet.config, out / "unet", dtype=dtype)
    diffusers_convert.save_vae(_np(params["vae"]), pipe.vae.config, out / "vae", dtype=dtype)
    te, te_params = text_encoder_for_export(pipe.text_encoder, _np(params["text_encoder"]))
    clip_convert.save_clip(te_params, te, out / "text_encoder", dtype=dtype)
    # The tokenizer must pad to what the text encoder's position table holds
    # (diffusers reads `model_max_length`), not to CLIP's usual 77.
    hf = copy.deepcopy(pipe.tokenizer.hf)
    hf.model_max_length = te.config.max_position_embeddings
    hf.save_pretrained(os.fspath(out / "tokenizer"))
    (out / "scheduler").mkdir(exist_ok=True)
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler_json(pipe.scheduler_config))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": target_version("diffusers"),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write_json(out / "model_index.json", index)
    return out


def _save_tokenizer(tokenizer, text_encoder, path: Path) -> None:
    # The tokenizer must pad to what the text encoder's position table holds
    # (diffusers reads `model_max_length`), not to CLIP's usual 77.
    hf = copy.deepcopy(tokenizer.hf)
    hf.model_max_length = text_encoder.config.max_position_embeddings
    hf.save_pretrained(os.fspath(path))


def _export_sdxl(pipe, out: Path, dtype) -> Path:
    """`export_pipeline` for an SDXL base or refiner bundle."""
    params = pipe.params
    diffusers_convert.save_unet(_np(params["unet"]), pipe.unet.config, out / "unet", dtype=dtype)
    diffusers_convert.save_vae(_np(params["vae"]), pipe.vae.config, out / "vae", dtype=dtype)
    index = {"_diffusers_version": target_version("diffusers"), "feature_extractor": [None, None],
             "image_encoder": [None, None], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for te_name, tok_name, arch in (("text_encoder", "tokenizer", "CLIPTextModel"),
                                    ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection")):
        module = getattr(pipe, te_name)
        if module is None:
            index[te_name] = index[tok_name] = [None, None]
            continue
        te_params = _np(params[te_name])
        if te_name == "text_encoder":
            module, te_params = text_encoder_for_export(module, te_params)
        clip_convert.save_clip(te_params, module, out / te_name, dtype=dtype)
        _save_tokenizer(getattr(pipe, tok_name), module, out / tok_name)
        index[te_name], index[tok_name] = ["transformers", arch], ["transformers", "CLIPTokenizer"]
    refiner = pipe.text_encoder is None
    opts = {"force_zeros_for_empty_prompt": not refiner, "requires_aesthetics_score": refiner,
            **getattr(pipe, "pipeline_options", {})}
    index["_class_name"] = "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline"
    index.update(opts if refiner else {"force_zeros_for_empty_prompt": opts["force_zeros_for_empty_prompt"]})
    (out / "scheduler").mkdir(exist_ok=True)
    sched = {k: v for k, v in pipe.scheduler_config.items() if not k.startswith("_")}
    _write_json(out / "scheduler" / "scheduler_config.json",
                {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": target_version("diffusers"), **sched})
    _write_json(out / "model_index.json", dict(sorted(index.items())))
    return out

def export_lora(layers, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes LoRA layers (`t2i_jax.convert.lora.LoraLayer`s) in both formats into `out_dir`
    (`LORA_FILES`); returns {format: path}."""
    from t2i_jax.convert import lora as lora_convert

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {fmt: lora_convert.save_lora(out / name, layers, fmt=fmt) for fmt, name in LORA_FILES.items()}


def with_sample_size(unet_config, latent_side: int):
    """The U-Net config with `sample_size` set to the latent side it was trained at."""
    return dataclasses.replace(unet_config, sample_size=int(latent_side))


def _write_json(path: Path, obj) -> None:
    data = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def _np(tree):
    import jax
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)
