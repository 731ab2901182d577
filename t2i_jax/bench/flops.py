"""FLOP counts: XLA's cost analysis, and an analytic count of the U-Net.

XLA's cost analysis of a *compiled* program describes the program one
device runs (the SPMD-partitioned module): with the batch split over N
devices it reports 1/N of the global work. A *lowered* (not yet
partitioned) program is the global computation. Either way a
`lax.fori_loop`/`while` body is counted once, not once per trip, so the
sampling loop's cost is assembled from separately lowered pieces (see
`t2i_jax.bench.core`).
"""

from __future__ import annotations

from t2i_jax.models.unet import UNetConfig


def flops_of(cost) -> float | None:
    """The "flops" figure of a `cost_analysis()` result.

    jax has returned a dict, a list with one dict per program, or None
    across versions and backends; a list is summed. None or 0 -> None.
    """
    if cost is None:
        return None
    if isinstance(cost, dict):
        cost = [cost]
    total = sum(float(c.get("flops", 0.0)) for c in cost if c)
    return total if total > 0 else None


def lowered_flops(lowered) -> float | None:
    """Global FLOPs of a `jax.stages.Lowered` (no compilation needed)."""
    try:
        return flops_of(lowered.cost_analysis())
    except Exception:  # backends without HLO cost analysis before compiling
        return None


def compiled_flops(compiled) -> float | None:
    """Per-device FLOPs of a `jax.stages.Compiled`."""
    try:
        return flops_of(compiled.cost_analysis())
    except Exception:
        return None


# --------------------------------------------------------------------------
# Analytic count of the U-Net's convolutions and matmuls
# --------------------------------------------------------------------------


def _conv(h: int, w: int, k: int, cin: int, cout: int) -> float:
    return 2.0 * h * w * k * k * cin * cout


def _transformer(n: int, c: int, layers: int, text_len: int, text_dim: int) -> float:
    """proj_in/out and `layers` BasicTransformerBlocks over n tokens of width c."""
    f = 2 * 2.0 * n * c * c  # proj_in, proj_out (1x1 conv or Linear: same count)
    per = 0.0
    per += 4 * 2.0 * n * c * c + 2 * 2.0 * n * n * c  # self-attn: q, k, v, out; q.k and p.v
    per += 2 * 2.0 * n * c * c + 2 * 2.0 * text_len * text_dim * c + 2 * 2.0 * n * text_len * c  # cross-attn
    per += 2.0 * n * c * 8 * c + 2.0 * n * 4 * c * c  # GEGLU proj (c -> 8c) and net_2 (4c -> c)
    return f + layers * per


def unet_matmul_flops(cfg: UNetConfig, batch: int, height: int, width: int, text_len: int = 77) -> float:
    """FLOPs (2 per multiply-add) of the U-Net's convolutions, linear layers and
    attention products for one call on [batch, height, width, C] latents.

    Norms, activations, softmax and the residual adds are left out: they are
    a few percent of the total for SD-sized models. SDXL (per-block
    transformer depths, the text-time addition embedding) is counted too:
    6.76 TFLOP at 128x128 latents, batch 1.
    """
    ch = cfg.block_out_channels
    n = len(ch)
    layers = cfg.per_block("layers_per_block")
    tlayers = cfg.per_block("transformer_layers_per_block")
    text_dim = cfg.per_block("cross_attention_dim")[0]
    temb_dim = 4 * ch[0]
    total = 2.0 * (ch[0] * temb_dim + temb_dim * temb_dim)  # time embedding MLP
    if cfg.addition_embed_type == "text_time":  # SDXL: the MLP on (pooled text, time-id sinusoids)
        total += 2.0 * (cfg.projection_class_embeddings_input_dim * temb_dim + temb_dim * temb_dim)
    h, w = height, width

    def resnet(h, w, cin, cout):
        f = _conv(h, w, 3, cin, cout) + _conv(h, w, 3, cout, cout) + 2.0 * temb_dim * cout
        return f + (_conv(h, w, 1, cin, cout) if cin != cout else 0.0)

    total += _conv(h, w, 3, cfg.in_channels, ch[0])
    skips = [(ch[0], h, w)]
    cur = ch[0]
    sizes = []
    for i, kind in enumerate(cfg.down_block_types):
        sizes.append((h, w))
        for _ in range(layers[i]):
            total += resnet(h, w, cur, ch[i])
            cur = ch[i]
            if kind == "CrossAttnDownBlock2D":
                total += _transformer(h * w, cur, tlayers[i], text_len, text_dim)
            skips.append((cur, h, w))
        if i < n - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            total += _conv(h, w, 3, cur, cur)
            skips.append((cur, h, w))
    if cfg.mid_block_type is not None:
        total += 2 * resnet(h, w, cur, cur) + _transformer(h * w, cur, tlayers[-1], text_len, text_dim)
    for i, kind in enumerate(cfg.up_block_types):
        j = n - 1 - i
        for _ in range(layers[j] + 1):
            skip_c, _, _ = skips.pop()
            total += resnet(h, w, cur + skip_c, ch[j])
            cur = ch[j]
            if kind == "CrossAttnUpBlock2D":
                total += _transformer(h * w, cur, tlayers[j], text_len, text_dim)
        if i < n - 1:
            h, w = sizes[j - 1]
            total += _conv(h, w, 3, cur, cur)
    total += _conv(h, w, 3, ch[0], cfg.out_channels)
    return batch * total
