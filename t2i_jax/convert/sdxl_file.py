"""Original single-file SDXL checkpoints (`sd_xl_base_1.0.safetensors`,
`sd_xl_refiner_1.0.safetensors`) -> canonical keys.

Stability's `sgm` files hold one flat state dict:

    model.diffusion_model.*      U-Net, LDM names; `label_emb.0.{0,2}` is diffusers' add_embedding
    first_stage_model.*          VAE, LDM names (as SD1/SD2)
    conditioner.embedders.N.transformer.*  CLIP ViT-L/14 as a transformers CLIPTextModel (base: N = 0)
    conditioner.embedders.N.model.*        OpenCLIP ViT-bigG/14 text tower with fused q/k/v and
                                           `text_projection` (base: N = 1; the refiner's only one: N = 0)

`split_sdxl` (called by `single_file.split_checkpoint` when it sees
`conditioner.embedders.*`) returns the components `text_encoder` (CLIP-L,
the base only) and `text_encoder_2` (bigG as CLIPTextModelWithProjection,
all its layers: SDXL reads the penultimate hidden states and projects the
pooled final ones), `unet`, `vae`, `scheduler`, as the SD1/SD2 split does.
The tables are the SD1/SD2 ones (`single_file.unet_rules`, `CLIP_RULES`,
`OPEN_CLIP_RULES`, `vae_rules`) plus add_embedding's two linears.

What the shapes cannot tell: heads are SDXL's 64 channels each, the time
ids' sinusoid width is (add_embedding input - pooled width) / ids with 6
ids when the file has both text encoders (base: original size, crop,
target size) and 5 with one (the refiner: original size, crop, aesthetic
score); `config` overrides any of it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from t2i_jax.convert import core
from t2i_jax.convert import single_file as sf

Rule = core.Rule
PREFIX = "conditioner.embedders."
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")

# Keys of SDXL files that no inference model uses (full-match regexes).
IGNORED = (
    r"conditioner\.embedders\.\d+\.model\.(?:logit_scale|attn_mask)",
    r"conditioner\.embedders\.\d+\.transformer\.(?:text_model\.)?embeddings\.position_ids",
)
_IGNORED_RE = re.compile("|".join(f"(?:{p})" for p in IGNORED + sf.IGNORED))

ADD_EMBEDDING_RULES = (
    Rule(r"label_emb\.0\.0\.(weight|bias)", r"add_embedding.linear_1.\1"),
    Rule(r"label_emb\.0\.2\.(weight|bias)", r"add_embedding.linear_2.\1"),
)
# SDXL's VAE latents are scaled by 0.13025 (SD1/SD2: 0.18215); it overflows in fp16.
VAE_DEFAULTS = {"scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024}


def is_sdxl(keys) -> bool:
    """Whether an original checkpoint's keys are SDXL's (`conditioner.embedders.*`)."""
    return any(k.startswith(PREFIX) for k in keys)


def _embedders(keys) -> dict[int, str]:
    """Embedder index -> "clip" (`.transformer.`: transformers layout) or "open_clip" (`.model.`)."""
    found: dict[int, str] = {}
    r = re.compile(r"conditioner\.embedders\.(\d+)\.(transformer|model)\.")
    for k in keys:
        if m := r.match(k):
            found[int(m.group(1))] = "clip" if m.group(2) == "transformer" else "open_clip"
    return found


def _text_component(state, index: int, layout: str, override, source):
    kind = "transformer" if layout == "clip" else "model"
    prefix = f"{PREFIX}{index}.{kind}."
    rules = sf.CLIP_RULES if layout == "clip" else sf.OPEN_CLIP_RULES
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not _IGNORED_RE.fullmatch(k)}
    canonical, origin, used = sf._convert(sub, prefix, rules)
    cfg = sf.infer_text_config(canonical, "clip", source)  # every layer kept, in both towers
    if layout == "open_clip":
        if "text_projection.weight" not in canonical:
            raise core.ConversionError(f"{source}: the OpenCLIP text tower under {prefix}* has no text_projection, "
                                       "which SDXL's pooled embedding needs")
        cfg.update(architectures=["CLIPTextModelWithProjection"], hidden_act="gelu")
    cfg.update(override)
    if cfg["architectures"] != ["CLIPTextModelWithProjection"]:
        # CLIP-L's projection is not in SD files; drop one if a file has it.
        for k in [k for k in canonical if k.startswith("text_projection.")]:
            used.discard(origin.pop(k))
            del canonical[k]
    return {"state_dict": canonical, "config": cfg, "origin": origin}, used


def infer_unet_config(unet: Mapping[str, Any], pooled_dim: int, time_ids: int, source: str) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config of an SDXL U-Net from its LDM keys (prefix stripped).

    The SD1/SD2 inference gives channels, levels, block types, the
    projection kind and the text width; added here: per-block transformer
    depths, 64-channel heads and the text-time embedding's widths.
    """
    cfg = sf.infer_unet_config(unet, "sd2", False, source)
    lpb, channels = cfg["layers_per_block"], cfg["block_out_channels"]
    depths = []
    for b, kind in enumerate(cfg["down_block_types"]):
        i = 1 + b * (lpb + 1)
        n = len(sf._block_numbers(unet, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
        depths.append(n if kind == "CrossAttnDownBlock2D" else None)
    mid = cfg["transformer_layers_per_block"]
    attn = {d for d in depths if d is not None}
    # diffusers' configs: one number when every attention level has the same
    # depth (the refiner's 4), else one per level (base: [1, 2, 10]; the mid
    # block reads the last entry).
    if attn <= {mid}:
        tlpb: int | list[int] = mid
    else:
        tlpb = [d if d is not None else 1 for d in depths]
        tlpb[-1] = mid
    adm = sf._need(unet, "label_emb.0.0.weight", sf.UNET_PREFIX, source)
    adm_in = int(np.shape(adm)[1])
    extra = adm_in - pooled_dim
    if extra <= 0 or extra % time_ids:
        raise core.ConversionError(
            f"{source}: add_embedding (label_emb.0.0.weight) takes {adm_in} inputs, which is not the pooled text "
            f"width {pooled_dim} plus {time_ids} time ids; pass config={{'unet': {{'addition_time_embed_dim': N, "
            "'projection_class_embeddings_input_dim': M}}}}")
    cfg.update(
        sample_size=128,
        transformer_layers_per_block=tlpb,
        attention_head_dim=[max(1, c // 64) for c in channels],
        upcast_attention=False,
        addition_embed_type="text_time",
        addition_time_embed_dim=extra // time_ids,
        projection_class_embeddings_input_dim=adm_in,
    )
    return cfg


def split_sdxl(state: Mapping[str, Any], config: Mapping[str, Mapping[str, Any]], *, strict: bool,
               source: str) -> dict[str, Any]:
    """Splits an SDXL base or refiner single file (see the module docstring); arguments and result as
    `single_file.split_checkpoint`, with `text_encoder_2` and family "sdxl" or "sdxl_refiner"."""
    unknown = sorted(set(config) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"config overrides for unknown components {unknown}; expected keys among {COMPONENTS}")
    keys = list(state)
    old = [k for k in keys if k.startswith((sf.CLIP_PREFIX, sf.OPEN_CLIP_PREFIX))]
    if old:
        raise core.ConversionError(
            f"{source} mixes an SDXL conditioner ({PREFIX}*) with an SD 1.x/2.x text encoder ({old[0]!r}); "
            "it is neither an SDXL nor an SD1/SD2 file (a bad merge?)")
    if not any(k.startswith(sf.UNET_PREFIX) for k in keys):
        raise core.ConversionError(f"{source} has SDXL text encoders ({PREFIX}*) but no U-Net under "
                                   f"{sf.UNET_PREFIX!r}; it is not a complete SDXL checkpoint")
    ignored = sorted(k for k in keys if _IGNORED_RE.fullmatch(k))
    consumed: set[str] = set(ignored)
    out: dict[str, Any] = {}
    warnings: list[str] = []

    layouts = _embedders(keys)
    clip = [i for i, lay in layouts.items() if lay == "clip"]
    open_clip = [i for i, lay in layouts.items() if lay == "open_clip"]
    if len(clip) > 1 or len(open_clip) != 1:
        raise core.ConversionError(
            f"{source}: expected one OpenCLIP bigG text tower ({PREFIX}N.model.*) and at most one CLIP-L "
            f"({PREFIX}N.transformer.*); found embedders {layouts}")
    if clip:
        out["text_encoder"], used = _text_component(state, clip[0], "clip", config.get("text_encoder", {}), source)
        consumed |= used
    out["text_encoder_2"], used = _text_component(state, open_clip[0], "open_clip",
                                                  config.get("text_encoder_2", {}), source)
    consumed |= used
    family = "sdxl" if clip else "sdxl_refiner"

    sched = sf._scheduler_config(state, "sd1", config.get("scheduler", {}), source, warnings)
    out["scheduler"] = {"config": sched}

    unet_sub = {k[len(sf.UNET_PREFIX):]: v for k, v in state.items() if k.startswith(sf.UNET_PREFIX)}
    pooled = out["text_encoder_2"]["config"]["projection_dim"]
    unet_config = {**infer_unet_config(unet_sub, pooled, 6 if clip else 5, source), **config.get("unet", {})}
    rules = sf.unet_rules(sf._int_layers(unet_config), len(unet_config["block_out_channels"])) + ADD_EMBEDDING_RULES
    unet_sd, origin, used = sf._convert(unet_sub, sf.UNET_PREFIX, rules)
    out["unet"] = {"state_dict": unet_sd, "config": unet_config, "origin": origin}
    consumed |= used

    vae_sub = {k[len(sf.VAE_PREFIX):]: v for k, v in state.items() if k.startswith(sf.VAE_PREFIX)}
    if vae_sub:
        vae_over = {**VAE_DEFAULTS, **config.get("vae", {})}
        out["vae"], used = sf._vae_component(vae_sub, sf.VAE_PREFIX, vae_over, "sd1", False, source)
        consumed |= used
    else:
        warnings.append(f"{source} holds no VAE (no {sf.VAE_PREFIX}* keys)")

    report = core.Report(source=source)
    report.unexpected = sorted(k for k in keys if k not in consumed)
    report.loaded = sum(len(out[c]["state_dict"]) for c in ("unet", "vae", "text_encoder", "text_encoder_2")
                        if c in out)
    if strict and report.unexpected:
        raise core.ConversionError(
            f"{source} has keys that no SDXL table uses; if they are known to be unused, pass strict=False "
            f"and check report.unexpected.\n{report}", report)
    out.update(family=family, report=report, ignored=ignored, warnings=warnings)
    return out
