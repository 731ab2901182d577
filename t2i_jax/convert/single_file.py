"""Original single-file Stable Diffusion 1.x / 2.x checkpoints -> canonical keys
(SDXL files, recognised by their `conditioner.embedders.*` keys, are split by
`t2i_jax.convert.sdxl_file` through the same `split_checkpoint`).

CompVis / Stability checkpoints (`v1-5-pruned-emaonly.safetensors`,
`v2-1_768-ema-pruned.ckpt`, and the fine-tunes shared in the same layout) hold
one flat state dict:

    model.diffusion_model.*      U-Net, LDM names (input_blocks.N.M, middle_block, output_blocks)
    first_stage_model.*          VAE, LDM names (encoder.down.N.block.M, mid.attn_1 ...)
    cond_stage_model.transformer.*  SD1 text encoder: a transformers CLIPTextModel
    cond_stage_model.model.*     SD2 text encoder: the OpenCLIP ViT-H/14 text tower
    model_ema.*, betas, alphas_cumprod ...   EMA copies and schedule buffers

`split_checkpoint` cuts it into three canonical-keyed state dicts (the
diffusers `UNet2DConditionModel` / `AutoencoderKL` keys and the transformers
`CLIPTextModel` keys), each with the diffusers/transformers config inferred
from tensor shapes, ready for the loaders in `convert.diffusers` and
`convert.clip` (or for the PyTorch classes themselves). The renaming is data:
one table of `core.Rule`s per component; the U-Net and VAE tables are
generated from the block layout, which differs between configs only in its
numbering.

    state = read_single_file("v2-1_768-ema-pruned.safetensors")
    parts = split_checkpoint(state, config={"scheduler": {"prediction_type": "v_prediction"}})
    parts["unet"]["state_dict"], parts["unet"]["config"]

What the shapes cannot tell -- the number of attention heads, the
GroupNorm group count, and above all whether an SD2 checkpoint predicts noise
(512-base) or velocity (768-v) -- comes from the SD1/SD2 conventions and may
be overridden with `config`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from t2i_jax.convert import core
from t2i_jax.schedulers.common import make_betas
from t2i_jax.schedulers.schedule import SD_SCHEDULER

Rule = core.Rule
StateDict = core.StateDict

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1: transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2: OpenCLIP text tower
EMA_PREFIX = "model_ema."
SDXL_PREFIX = "conditioner.embedders."

# Keys of the original files that no inference model uses. Full-match regexes
# on the original keys; anything else that no table consumes is reported.
IGNORED = (
    # EMA copies of the U-Net (flattened names) and their counters; see `use_ema`.
    r"model_ema\..*",
    # The DDPM schedule the model was trained with, as buffers; the scheduler
    # config carries the same information.
    r"betas|alphas_cumprod(?:_prev)?|sqrt_(?:one_minus_)?alphas_cumprod|log_one_minus_alphas_cumprod"
    r"|sqrt_recip(?:m1)?_alphas_cumprod|posterior_(?:variance|log_variance_clipped|mean_coef[12])"
    r"|logvar|lvlb_weights",
    # A non-persistent buffer in today's transformers.
    r"cond_stage_model\.transformer\.(?:text_model\.)?embeddings\.position_ids",
    # OpenCLIP's contrastive temperature and causal-mask buffer.
    r"cond_stage_model\.model\.(?:logit_scale|attn_mask)",
)
_IGNORED_RE = re.compile("|".join(f"(?:{p})" for p in IGNORED))


# --------------------------------------------------------------------------
# U-Net table
# --------------------------------------------------------------------------

# LDM ResBlock sub-layers -> diffusers ResnetBlock2D names.
_UNET_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
# LDM SpatialTransformer and diffusers Transformer2DModel share their inner
# names; this pattern lists them so a stray key is reported, not carried along.
_UNET_ATTENTION_INNER = (
    r"((?:norm|proj_in|proj_out)\.(?:weight|bias)"
    r"|transformer_blocks\.\d+\.(?:attn[12]\.to_[qkv]\.weight|attn[12]\.to_out\.0\.(?:weight|bias)"
    r"|ff\.net\.0\.proj\.(?:weight|bias)|ff\.net\.2\.(?:weight|bias)|norm[123]\.(?:weight|bias)))"
)


def _unet_resnet(src: str, dst: str) -> list[Rule]:
    return [Rule(rf"{re.escape(src)}\.{re.escape(a)}\.(weight|bias)", rf"{dst}.{b}.\1") for a, b in _UNET_RESNET]


def _unet_attention(src: str, dst: str) -> list[Rule]:
    return [Rule(rf"{re.escape(src)}\.{_UNET_ATTENTION_INNER}", rf"{dst}.\1")]


@functools.lru_cache(maxsize=16)
def unet_rules(layers_per_block: int = 2, num_levels: int = 4) -> tuple[Rule, ...]:
    """The U-Net table: LDM keys (without `model.diffusion_model.`) -> diffusers keys.

    LDM numbers the blocks in one sequence per path: `input_blocks.0` is
    conv_in, then per level `layers_per_block` (resnet, attention) pairs and,
    except at the last level, a downsampler; `output_blocks` holds per level
    `layers_per_block + 1` pairs, the last with the upsampler (at `.1` without
    attention, `.2` with). The numbering follows from the two numbers alone.
    """
    lpb, levels = layers_per_block, num_levels
    rules = [
        Rule(r"time_embed\.0\.(weight|bias)", r"time_embedding.linear_1.\1"),
        Rule(r"time_embed\.2\.(weight|bias)", r"time_embedding.linear_2.\1"),
        Rule(r"input_blocks\.0\.0\.(weight|bias)", r"conv_in.\1"),
        Rule(r"out\.0\.(weight|bias)", r"conv_norm_out.\1"),
        Rule(r"out\.2\.(weight|bias)", r"conv_out.\1"),
    ]
    for b in range(levels):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            rules += _unet_resnet(f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}")
            rules += _unet_attention(f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}")
        if b < levels - 1:
            i = 1 + b * (lpb + 1) + lpb
            rules.append(Rule(rf"input_blocks\.{i}\.0\.op\.(weight|bias)", rf"down_blocks.{b}.downsamplers.0.conv.\1"))
    rules += _unet_resnet("middle_block.0", "mid_block.resnets.0")
    rules += _unet_attention("middle_block.1", "mid_block.attentions.0")
    rules += _unet_resnet("middle_block.2", "mid_block.resnets.1")
    for b in range(levels):
        for j in range(lpb + 1):
            i = b * (lpb + 1) + j
            rules += _unet_resnet(f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}")
            rules += _unet_attention(f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}")
            if j == lpb and b < levels - 1:
                rules.append(Rule(rf"output_blocks\.{i}\.[12]\.conv\.(weight|bias)",
                                  rf"up_blocks.{b}.upsamplers.0.conv.\1"))
    return tuple(rules)


# --------------------------------------------------------------------------
# VAE table
# --------------------------------------------------------------------------


def _squeeze_1x1(key: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """LDM's VAE attention keeps q/k/v/proj_out as 1x1 convs; diffusers as Linear."""
    if x.ndim == 4:
        if x.shape[2:] != (1, 1):
            raise core.ConversionError(f"{key}: expected a 1x1 conv kernel, found shape {x.shape}")
        x = x[:, :, 0, 0]
    return {key: x}


_VAE_RESNET_INNER = r"(norm1|conv1|norm2|conv2)\.(weight|bias)"


@functools.lru_cache(maxsize=16)
def vae_rules(num_levels: int = 4) -> tuple[Rule, ...]:
    """The VAE table: LDM keys (without `first_stage_model.`) -> diffusers keys.

    The LDM decoder numbers its up blocks from the lowest resolution's *index*
    (`up.0` is the last one run); diffusers numbers them in running order, so
    `decoder.up.{j}` is `decoder.up_blocks.{num_levels - 1 - j}`.
    """
    rules = [
        Rule(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", r"\1.\2.\3"),
        Rule(r"(encoder|decoder)\.norm_out\.(weight|bias)", r"\1.conv_norm_out.\2"),
        Rule(r"(quant_conv|post_quant_conv)\.(weight|bias)", r"\1.\2"),
        Rule(rf"encoder\.down\.(\d+)\.block\.(\d+)\.{_VAE_RESNET_INNER}", r"encoder.down_blocks.\1.resnets.\2.\3.\4"),
        Rule(r"encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\.(weight|bias)",
             r"encoder.down_blocks.\1.resnets.\2.conv_shortcut.\3"),
        Rule(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)",
             r"encoder.down_blocks.\1.downsamplers.0.conv.\2"),
    ]
    for j in range(num_levels):
        b = num_levels - 1 - j
        rules += [
            Rule(rf"decoder\.up\.{j}\.block\.(\d+)\.{_VAE_RESNET_INNER}", rf"decoder.up_blocks.{b}.resnets.\1.\2.\3"),
            Rule(rf"decoder\.up\.{j}\.block\.(\d+)\.nin_shortcut\.(weight|bias)",
                 rf"decoder.up_blocks.{b}.resnets.\1.conv_shortcut.\2"),
            Rule(rf"decoder\.up\.{j}\.upsample\.conv\.(weight|bias)", rf"decoder.up_blocks.{b}.upsamplers.0.conv.\1"),
        ]
    mid = r"(encoder|decoder)\.mid"
    rules += [
        Rule(rf"{mid}\.block_1\.{_VAE_RESNET_INNER}", r"\1.mid_block.resnets.0.\2.\3"),
        Rule(rf"{mid}\.block_2\.{_VAE_RESNET_INNER}", r"\1.mid_block.resnets.1.\2.\3"),
        Rule(rf"{mid}\.attn_1\.norm\.(weight|bias)", r"\1.mid_block.attentions.0.group_norm.\2"),
        Rule(rf"{mid}\.attn_1\.q\.(weight|bias)", r"\1.mid_block.attentions.0.to_q.\2", _squeeze_1x1),
        Rule(rf"{mid}\.attn_1\.k\.(weight|bias)", r"\1.mid_block.attentions.0.to_k.\2", _squeeze_1x1),
        Rule(rf"{mid}\.attn_1\.v\.(weight|bias)", r"\1.mid_block.attentions.0.to_v.\2", _squeeze_1x1),
        Rule(rf"{mid}\.attn_1\.proj_out\.(weight|bias)", r"\1.mid_block.attentions.0.to_out.0.\2", _squeeze_1x1),
    ]
    return tuple(rules)


# --------------------------------------------------------------------------
# Text encoder tables
# --------------------------------------------------------------------------

# SD1 stores a transformers CLIPTextModel as is; some files lack `text_model.`.
CLIP_RULES = (
    Rule(r"(?:text_model\.)?(embeddings\.(?:token|position)_embedding\.weight)", r"text_model.\1"),
    Rule(r"(?:text_model\.)?(encoder\.layers\.\d+\.(?:self_attn\.[qkv]_proj|self_attn\.out_proj|layer_norm[12]"
         r"|mlp\.fc[12])\.(?:weight|bias))", r"text_model.\1"),
    Rule(r"(?:text_model\.)?(final_layer_norm\.(?:weight|bias))", r"text_model.\1"),
)


def _split_qkv(key: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """torch MultiheadAttention's fused `in_proj` ([3 * width, ...], q then k then v) -> q/k/v_proj."""
    if x.shape[0] % 3:
        raise core.ConversionError(f"{key}: a fused q/k/v projection needs 3 * width rows, found shape {x.shape}")
    n = x.shape[0] // 3
    return {key.replace(".in_proj.", f".{name}_proj."): x[i * n:(i + 1) * n] for i, name in enumerate("qkv")}


def _transpose(key: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """OpenCLIP applies `x @ P` with P [width, proj]; a Linear weight is P.T."""
    return {key: np.ascontiguousarray(np.asarray(x).T)}


_LAYER = r"transformer\.resblocks\.(\d+)"
_HF_LAYER = r"text_model.encoder.layers.\1"
OPEN_CLIP_RULES = (
    Rule(r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    Rule(r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
    Rule(rf"{_LAYER}\.ln_([12])\.(weight|bias)", rf"{_HF_LAYER}.layer_norm\2.\3"),
    Rule(rf"{_LAYER}\.attn\.in_proj_(weight|bias)", rf"{_HF_LAYER}.self_attn.in_proj.\2", _split_qkv),
    Rule(rf"{_LAYER}\.attn\.out_proj\.(weight|bias)", rf"{_HF_LAYER}.self_attn.out_proj.\2"),
    Rule(rf"{_LAYER}\.mlp\.c_fc\.(weight|bias)", rf"{_HF_LAYER}.mlp.fc1.\2"),
    Rule(rf"{_LAYER}\.mlp\.c_proj\.(weight|bias)", rf"{_HF_LAYER}.mlp.fc2.\2"),
    Rule(r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
    Rule(r"text_projection", "text_projection.weight", _transpose),
)

# --------------------------------------------------------------------------
# Splitting a checkpoint
# --------------------------------------------------------------------------

_COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")


def read_single_file(path: str | os.PathLike) -> StateDict:
    """Reads an original single-file checkpoint (`.safetensors` memory-mapped,
    or `.ckpt` via `torch.load(weights_only=True)`, unwrapping `state_dict`)."""
    return core.read_checkpoint(path)


def load_single_file(path: str | os.PathLike, config: Mapping[str, Mapping[str, Any]] | None = None,
                     **kwargs) -> dict[str, Any]:
    """`split_checkpoint(read_single_file(path), config, **kwargs)`, naming the file in errors."""
    return split_checkpoint(read_single_file(path), config, source=os.fspath(path), **kwargs)


def split_checkpoint(state_dict: Mapping[str, Any], config: Mapping[str, Mapping[str, Any]] | None = None, *,
                     use_ema: bool = False, strict: bool = True, source: str = "single-file checkpoint",
                     ) -> dict[str, Any]:
    """Splits an original SD 1.x/2.x checkpoint into canonical-keyed components
    (an SDXL one too: see `t2i_jax.convert.sdxl_file.split_sdxl`).

    Args:
      state_dict: the flat original state dict (numpy or anything `np.asarray` takes).
      config: overrides of the inferred configs, per component:
        `{"unet": {...}, "vae": {...}, "text_encoder": {...}, "scheduler": {...}}`.
        SD2 768-v checkpoints need `{"scheduler": {"prediction_type": "v_prediction"}}`;
        `{"text_encoder": {"num_hidden_layers": N}}` keeps only the first N layers.
      use_ema: take the U-Net from the `model_ema.*` copies (files that hold both).
      strict: raise `core.ConversionError` if keys are left over that no table
        uses and that are not known to be unused (see `IGNORED`); else report them.
      source: names the checkpoint in messages.

    Returns a dict with
      "unet", "vae", "text_encoder": each `{"state_dict": canonical numpy dict,
        "config": diffusers / transformers config dict, "origin": canonical -> original key}`
        ("vae" / "text_encoder" are absent when the file has none);
      "scheduler": `{"config": ...}` with the training schedule and prediction type;
      "family": "sd1" or "sd2";
      "report": a `core.Report` whose `unexpected` lists left-over original keys;
      "ignored": original keys deliberately unused (EMA, schedule buffers,
        text layers past `num_hidden_layers`, OpenCLIP's projection);
      "warnings": what was guessed rather than read from the weights.
    """
    config = {k: dict(v) for k, v in (config or {}).items()}
    from t2i_jax.convert import sdxl_file  # it builds on this module's tables

    if sdxl_file.is_sdxl(state_dict):
        if use_ema:
            raise ValueError(f"use_ema=True: {source} is an SDXL checkpoint; its released files carry no EMA "
                             "copies, load it with use_ema=False")
        return sdxl_file.split_sdxl(state_dict, config, strict=strict, source=source)
    unknown = sorted(set(config) - set(_COMPONENTS))
    if unknown:
        raise ValueError(f"config overrides for unknown components {unknown}; expected keys among {_COMPONENTS}")
    keys = list(state_dict)
    _check_is_sd(keys, source)
    state = dict(state_dict)
    ignored = sorted(k for k in keys if _IGNORED_RE.fullmatch(k))
    warnings: list[str] = []
    ema_of: dict[str, str] = {}
    if use_ema:
        state, ema_of = _take_ema(state, source)
        # The EMA copies are used, the weights they replace are not.
        ignored = sorted(set(ignored) - set(ema_of.values()) | set(ema_of))

    clip_keys = [k for k in keys if k.startswith(CLIP_PREFIX)]
    open_clip_keys = [k for k in keys if k.startswith(OPEN_CLIP_PREFIX)]
    out: dict[str, Any] = {}
    consumed: set[str] = set(ignored) | set(ema_of.values())

    # Text encoder first: its layout tells SD1 from SD2.
    family = None
    if clip_keys and open_clip_keys:
        raise core.ConversionError(
            f"{source} holds both an SD1 text encoder ({CLIP_PREFIX}*) and an SD2 one ({OPEN_CLIP_PREFIX}*); "
            "expected one of them"
        )
    if clip_keys or open_clip_keys:
        layout = "clip" if clip_keys else "open_clip"
        family = "sd1" if clip_keys else "sd2"
        te, used, dropped = _convert_text_encoder(state, layout, config.get("text_encoder", {}), source)
        out["text_encoder"] = te
        consumed |= used
        ignored += dropped
    else:
        warnings.append(f"{source} holds no text encoder (no {CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}* keys)")

    unet_sub = _strip(state, UNET_PREFIX)
    if family is None:
        ctx = _cross_attention_dim(unet_sub, source)
        family = "sd2" if ctx == 1024 else "sd1"
        warnings.append(f"no text encoder: taking the U-Net's cross-attention width {ctx} to mean {family}")

    sched = _scheduler_config(state, family, config.get("scheduler", {}), source, warnings)
    out["scheduler"] = {"config": sched}
    v_model = sched["prediction_type"] == "v_prediction"

    unet_config = {**infer_unet_config(unet_sub, family, v_model, source), **config.get("unet", {})}
    unet_sd, origin, used = _convert(unet_sub, UNET_PREFIX,
                                     unet_rules(_int_layers(unet_config), len(unet_config["block_out_channels"])))
    origin = {k: ema_of.get(v, v) for k, v in origin.items()}
    out["unet"] = {"state_dict": unet_sd, "config": unet_config, "origin": origin}
    consumed |= used

    vae_sub = _strip(state, VAE_PREFIX)
    if vae_sub:
        out["vae"], used = _vae_component(vae_sub, VAE_PREFIX, config.get("vae", {}), family, v_model, source)
        consumed |= used
    else:
        warnings.append(f"{source} holds no VAE (no {VAE_PREFIX}* keys)")

    report = core.Report(source=source)
    report.unexpected = sorted(k for k in keys if k not in consumed)
    report.loaded = sum(len(out[c]["state_dict"]) for c in ("unet", "vae", "text_encoder") if c in out)
    for w in warnings:
        log.warning(w)
    if strict and report.unexpected:
        raise core.ConversionError(
            f"{source} has keys that no Stable Diffusion 1.x/2.x table uses; if they are known to be "
            f"unused, pass strict=False and check report.unexpected.\n{report}", report)
    out.update(family=family, report=report, ignored=sorted(set(ignored)), warnings=warnings)
    return out


def convert_vae(state_dict: Mapping[str, Any], config: Mapping[str, Any] | None = None, *,
                prefix: str = "", strict: bool = True, source: str = "VAE checkpoint") -> dict[str, Any]:
    """Converts an original-layout VAE alone, e.g. a standalone
    `vae-ft-mse-840000-ema-pruned.ckpt` (`prefix=""`) or the
    `first_stage_model.` part of a full checkpoint.

    Returns `{"state_dict", "config", "origin", "report"}` as the components
    of `split_checkpoint`; `config` overrides the inferred AutoencoderKL
    config. Keys under `prefix` that the table does not use, other than EMA
    copies, are reported (raised with `strict`).
    """
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    sub = {k: v for k, v in sub.items() if not k.startswith(EMA_PREFIX)}
    out, used = _vae_component(sub, prefix, config or {}, "sd1", False, source)
    report = core.Report(source=source, loaded=len(out["state_dict"]))
    report.unexpected = sorted(prefix + k for k in sub if prefix + k not in used)
    if strict and report.unexpected:
        raise core.ConversionError(f"{source} has keys that the VAE table does not use.\n{report}", report)
    return {**out, "report": report}


def _vae_component(sub: Mapping[str, Any], prefix: str, override: Mapping[str, Any], family: str, v_model: bool,
                   source: str) -> tuple[dict[str, Any], set[str]]:
    vae_config = {**infer_vae_config(sub, family, v_model, source), **override}
    vae_sd, origin, used = _convert(sub, prefix, vae_rules(len(vae_config["block_out_channels"])))
    return {"state_dict": vae_sd, "config": vae_config, "origin": origin}, used


def _check_is_sd(keys: Sequence[str], source: str) -> None:
    """Raises a ConversionError naming what was found if this is no SD 1.x/2.x checkpoint."""
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        counts: dict[str, int] = {}
        for k in keys:
            parts = k.split(".")
            head = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
            counts[head] = counts.get(head, 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
        found = ", ".join(f"{p}.* ({n})" if p not in keys else f"{p} ({n})" for p, n in top) or "no keys at all"
        hint = ""
        if any(k.startswith("encoder.down.") for k in keys):
            hint = (" The keys look like a standalone VAE in the original layout (vae-ft-mse-840000 and the "
                    "like): convert it with t2i_jax.convert.single_file.convert_vae.")
        elif any(k.startswith(("down_blocks.", "conv_in.", "encoder.down_blocks.", "text_model.")) for k in keys):
            hint = (" The keys look like a diffusers/transformers model file: load its folder with "
                    "t2i_jax.convert.diffusers or t2i_jax.convert.clip.")
        raise core.ConversionError(
            f"{source} is not a Stable Diffusion 1.x/2.x single-file checkpoint (nor SDXL): expected U-Net keys under "
            f"{UNET_PREFIX!r} (with {VAE_PREFIX!r} and {CLIP_PREFIX!r}, {OPEN_CLIP_PREFIX!r} or {SDXL_PREFIX!r}), "
            f"found {len(keys)} keys: {found}.{hint}"
        )


def _take_ema(state: dict, source: str) -> tuple[dict, dict[str, str]]:
    """Replaces the U-Net weights with their EMA copies (`model_ema.` + the
    key after `model.` with the dots removed, as LitEma names them); returns
    the new state and original key -> EMA key."""
    out = dict(state)
    ema_of = {}
    missing = []
    for k in state:
        if k.startswith(UNET_PREFIX):
            ema = EMA_PREFIX + k[len("model."):].replace(".", "")
            if ema in state:
                out[k] = state[ema]
                ema_of[k] = ema
            else:
                missing.append(ema)
    if missing:
        raise core.ConversionError(
            f"use_ema=True, but {source} lacks {len(missing)} EMA U-Net weights (e.g. {missing[0]!r}); "
            "it may be an EMA-only or pruned file whose U-Net already is the EMA: load it with use_ema=False"
        )
    return out, ema_of


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not _IGNORED_RE.fullmatch(k)}


def _convert(sub: Mapping[str, Any], prefix: str, rules: Sequence[Rule]
             ) -> tuple[StateDict, dict[str, str], set[str]]:
    """Applies `rules` to a component's prefix-stripped keys; returns the
    canonical dict, canonical -> original key, and the original keys used."""
    renamed, origin = core.apply_rules(sub, rules, passthrough=False)
    canonical = {k: np.asarray(v) for k, v in renamed.items()}
    origin = {k: prefix + v for k, v in origin.items()}
    return canonical, origin, set(origin.values())


def _int_layers(unet_config: Mapping[str, Any]) -> int:
    lpb = unet_config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"layers_per_block {lpb!r}: the single-file layout needs one number for all blocks")
    return lpb


# --------------------------------------------------------------------------
# Config inference
# --------------------------------------------------------------------------


def _block_numbers(keys, pattern: str) -> list[int]:
    r = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := r.match(k))})


def _need(sub: Mapping[str, Any], key: str, prefix: str, source: str) -> np.ndarray:
    if key not in sub:
        raise core.ConversionError(f"{source}: the {prefix}* weights lack {prefix}{key}, which every SD model has")
    return sub[key]


def _cross_attention_dim(unet: Mapping[str, Any], source: str) -> int:
    for k, v in unet.items():
        if k.endswith(".attn2.to_k.weight"):
            return int(np.shape(v)[1])
    raise core.ConversionError(f"{source}: the U-Net has no cross-attention (no *.attn2.to_k.weight key)")


def infer_unet_config(unet: Mapping[str, Any], family: str, v_model: bool = False,
                      source: str = "checkpoint") -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config from LDM U-Net keys (prefix stripped).

    Channels, levels, layers per block, block types, cross-attention width and
    the projection kind are read from shapes. Heads are not in the shapes:
    SD1 uses 8 heads everywhere, SD2 heads of 64 channels
    (`attention_head_dim` is diffusers' name for the head count).
    """
    p = UNET_PREFIX
    conv_in = np.shape(_need(unet, "input_blocks.0.0.weight", p, source))
    n_in = len(_block_numbers(unet, r"input_blocks\.(\d+)\."))
    downs = _block_numbers(unet, r"input_blocks\.(\d+)\.0\.op\.weight")
    lpb = downs[0] - 1 if downs else n_in - 1
    levels = n_in // (lpb + 1)
    expected_downs = [1 + b * (lpb + 1) + lpb for b in range(levels - 1)]
    if lpb < 1 or n_in != levels * (lpb + 1) or downs != expected_downs:
        raise core.ConversionError(
            f"{source}: unexpected U-Net layout: {n_in} input blocks with downsamplers at {downs}; "
            "an SD U-Net has levels * (layers_per_block + 1) input blocks with a downsampler ending each level "
            "but the last"
        )
    first = [1 + b * (lpb + 1) for b in range(levels)]
    channels = [int(np.shape(_need(unet, f"input_blocks.{i}.0.in_layers.2.weight", p, source))[0]) for i in first]
    down_types = ["CrossAttnDownBlock2D" if f"input_blocks.{i}.1.proj_in.weight" in unet else "DownBlock2D"
                  for i in first]
    up_types = ["CrossAttnUpBlock2D" if f"output_blocks.{b * (lpb + 1)}.1.proj_in.weight" in unet else "UpBlock2D"
                for b in range(levels)]
    proj_in = np.shape(_need(unet, "middle_block.1.proj_in.weight", p, source))
    depth = len(_block_numbers(unet, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    heads: int | list[int] = 8 if family == "sd1" else [max(1, c // 64) for c in channels]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 96 if v_model else 64,
        "in_channels": int(conv_in[1]),
        "out_channels": int(np.shape(_need(unet, "out.2.weight", p, source))[0]),
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "cross_attention_dim": _cross_attention_dim(unet, source),
        "transformer_layers_per_block": depth,
        "attention_head_dim": heads,
        "use_linear_projection": len(proj_in) == 2,
        # SD 2.1 768-v overflows fp16 attention; the reference config upcasts.
        "upcast_attention": family == "sd2" and v_model,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def infer_vae_config(vae: Mapping[str, Any], family: str = "sd1", v_model: bool = False,
                     source: str = "checkpoint") -> dict[str, Any]:
    """A diffusers AutoencoderKL config from LDM VAE keys (prefix stripped)."""
    p = VAE_PREFIX
    levels = len(_block_numbers(vae, r"encoder\.down\.(\d+)\."))
    lpb = len(_block_numbers(vae, r"encoder\.down\.0\.block\.(\d+)\."))
    if levels == 0 or lpb == 0:
        raise core.ConversionError(f"{source}: the VAE has no encoder.down.N.block.M weights under {p}*")
    channels = [int(np.shape(_need(vae, f"encoder.down.{i}.block.0.conv1.weight", p, source))[0])
                for i in range(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(np.shape(_need(vae, "encoder.conv_in.weight", p, source))[1]),
        "out_channels": int(np.shape(_need(vae, "decoder.conv_out.weight", p, source))[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "latent_channels": int(np.shape(_need(vae, "decoder.conv_in.weight", p, source))[1]),
        "norm_num_groups": 32,
        "sample_size": 768 if v_model else 512,
        "scaling_factor": 0.18215,
        "use_quant_conv": "quant_conv.weight" in vae,
        "use_post_quant_conv": "post_quant_conv.weight" in vae,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in vae,
    }


def infer_text_config(canonical: Mapping[str, Any], layout: str, source: str = "checkpoint") -> dict[str, Any]:
    """A transformers CLIPTextConfig dict from canonical text-encoder keys.

    `layout` is "clip" (SD1, OpenAI CLIP ViT-L/14: quick_gelu, all layers) or
    "open_clip" (SD2, OpenCLIP ViT-H/14: gelu; SD2 reads the penultimate
    layer, so the last one is left out). Heads are 64 channels in both.
    """
    p = "text encoder "
    vocab, width = np.shape(_need(canonical, "text_model.embeddings.token_embedding.weight", p, source))
    positions = np.shape(_need(canonical, "text_model.embeddings.position_embedding.weight", p, source))[0]
    layers = len(_block_numbers(canonical, r"text_model\.encoder\.layers\.(\d+)\."))
    inner = np.shape(_need(canonical, "text_model.encoder.layers.0.mlp.fc1.weight", p, source))[0]
    proj = canonical.get("text_projection.weight")
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(vocab),
        "hidden_size": int(width),
        "intermediate_size": int(inner),
        "num_hidden_layers": layers if layout == "clip" else layers - 1,
        "num_attention_heads": max(1, int(width) // 64),
        "max_position_embeddings": int(positions),
        "hidden_act": "quick_gelu" if layout == "clip" else "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": int(np.shape(proj)[0]) if proj is not None else int(width),
        # The ids of the SD1/SD2 text_encoder configs (eos 2: pooling at argmax(ids)).
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def _convert_text_encoder(state: Mapping[str, Any], layout: str, override: Mapping[str, Any], source: str):
    """Renames the text encoder, infers its config, and leaves out what the
    config does not use (layers past `num_hidden_layers`; the projection
    unless the architecture is CLIPTextModelWithProjection)."""
    prefix, rules = (CLIP_PREFIX, CLIP_RULES) if layout == "clip" else (OPEN_CLIP_PREFIX, OPEN_CLIP_RULES)
    canonical, origin, used = _convert(_strip(state, prefix), prefix, rules)
    te_config = {**infer_text_config(canonical, layout, source), **override}
    n = te_config["num_hidden_layers"]
    keep_proj = te_config["architectures"] == ["CLIPTextModelWithProjection"]
    layer_re = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")
    dropped = []
    for k in list(canonical):
        m = layer_re.match(k)
        if (m and int(m.group(1)) >= n) or (k == "text_projection.weight" and not keep_proj):
            dropped.append(origin.pop(k))
            del canonical[k]
    return {"state_dict": canonical, "config": te_config, "origin": origin}, used, sorted(set(dropped))


def _scheduler_config(state: Mapping[str, Any], family: str, override: Mapping[str, Any], source: str,
                      warnings: list[str]) -> dict[str, Any]:
    """SD's training schedule, checked against the file's `betas` buffer when present."""
    sched = dict(SD_SCHEDULER)
    if "betas" in state:
        betas = np.asarray(state["betas"], np.float64)
        ref = make_betas(sched).astype(np.float64)
        if betas.shape != ref.shape or not np.allclose(betas, ref, rtol=1e-4, atol=1e-9):
            warnings.append(
                f"{source}: its `betas` buffer ({betas.shape[0]} steps, {betas[0]:.6g} .. {betas[-1]:.6g}) is not "
                f"SD's scaled_linear 0.00085 .. 0.012 over 1000 steps; set the scheduler config by hand"
            )
    if family == "sd2" and "prediction_type" not in override:
        warnings.append(
            f"{source} is an SD 2.x checkpoint; its weights do not say whether it predicts noise "
            "(512-base models: 'epsilon') or velocity (768-v models such as v2-1_768-ema-pruned: "
            "'v_prediction'). Assuming 'epsilon'; for a 768-v model pass "
            "config={'scheduler': {'prediction_type': 'v_prediction'}}"
        )
    sched.update(override)
    if sched["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type {sched['prediction_type']!r}: use 'epsilon', 'v_prediction' or 'sample'")
    return sched
