"""Original single-file SD checkpoints -> canonical keys, checked against diffusers' own converter.

Tiny random diffusers / transformers models (and an OpenCLIP-layout text tower)
are written in the original CompVis/Stability layout by an independent
reverse mapping below, then converted back by `single_file.split_checkpoint`
and by `diffusers.loaders.single_file_utils`; both must agree bit for bit,
and the result must load strictly into the PyTorch classes built from the
*inferred* configs and compute what the source models compute.
"""

import collections

import numpy as np
import pytest
import torch
import transformers as T
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as dsf
from torch import nn

from t2i_jax.convert import core
from t2i_jax.convert import single_file as sf

UNET = {
    "sd1": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=64, attention_head_dim=8, use_linear_projection=False),
    "sd2": dict(sample_size=8, block_out_channels=(64, 128, 128), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=64, attention_head_dim=(1, 2, 2), use_linear_projection=True),
}
VAE = dict(block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
CLIP_L = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
# SD2 reads the penultimate of 24 OpenCLIP blocks; diffusers hard-codes the
# index of the block it leaves out (23), so the tiny tower has 24 too.
OPEN_CLIP = dict(vocab=1000, width=64, layers=24, heads=1, ctx=77, proj=32)


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Distinct random values everywhere (diffusers zero-inits some layers,
    which would hide a swap); 1-D `weight`s are norm scales, kept near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(noise + 1.0 if (p.ndim == 1 and name.endswith("weight")) else noise)
    return module.eval()


# --------------------------------------------------------------------------
# OpenCLIP text tower in its own layout (what SD2 files hold)
# --------------------------------------------------------------------------


class _ResBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(collections.OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPText(nn.Module):
    """OpenCLIP's text tower with its parameter names (`transformer.resblocks.N...`)."""

    def __init__(self, vocab, width, layers, heads, ctx, proj):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.zeros(ctx, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(_ResBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, proj))
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        self.register_buffer("attn_mask", torch.full((ctx, ctx), float("-inf")).triu(1), persistent=False)

    def penultimate(self, ids):
        """What SD2's FrozenOpenCLIPEmbedder(layer="penultimate") feeds the U-Net."""
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        for block in self.transformer.resblocks[:-1]:
            x = block(x, self.attn_mask[:n, :n])
        return self.ln_final(x)


# --------------------------------------------------------------------------
# diffusers layout -> original layout, written out by hand (independent of the tables)
# --------------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_to_original(sd: dict, config) -> dict:
    lpb = config["layers_per_block"]
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        top = ".".join(p[:-1])
        if top in _UNET_TOP:
            name = f"{_UNET_TOP[top]}.{p[-1]}"
        elif p[0] == "mid_block":
            j = int(p[2])
            name = (f"middle_block.{2 * j}.{_RESNET[p[3]]}.{p[4]}" if p[1] == "resnets"
                    else "middle_block.1." + ".".join(p[3:]))
        else:
            b, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
            if p[0] == "down_blocks":
                i = 1 + b * (lpb + 1) + j
                if kind == "resnets":
                    name = f"input_blocks.{i}.0.{_RESNET[rest[0]]}.{rest[1]}"
                elif kind == "attentions":
                    name = f"input_blocks.{i}.1." + ".".join(rest)
                else:
                    name = f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op.{rest[-1]}"
            else:
                i = b * (lpb + 1) + j
                if kind == "resnets":
                    name = f"output_blocks.{i}.0.{_RESNET[rest[0]]}.{rest[1]}"
                elif kind == "attentions":
                    name = f"output_blocks.{i}.1." + ".".join(rest)
                else:
                    i = b * (lpb + 1) + lpb
                    slot = 2 if config["up_block_types"][b].startswith("CrossAttn") else 1
                    name = f"output_blocks.{i}.{slot}.conv.{rest[-1]}"
        out["model.diffusion_model." + name] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_to_original(sd: dict, config) -> dict:
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        side = p[0]
        if p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2]) if side == "encoder" else levels - 1 - int(p[2])
            where = f"{side}.{'down' if side == 'encoder' else 'up'}.{i}"
            if p[3] == "resnets":
                sub = "nin_shortcut" if p[5] == "conv_shortcut" else p[5]
                name = f"{where}.block.{p[4]}.{sub}.{p[6]}"
            else:
                name = f"{where}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{p[-1]}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            name = f"{side}.mid.block_{int(p[3]) + 1}.{p[4]}.{p[5]}"
        elif p[1] == "mid_block":
            name = f"{side}.mid.attn_1.{_VAE_ATTN[p[4]]}.{p[-1]}"
            if value.ndim == 2:  # LDM keeps these as 1x1 convs
                value = value[:, :, None, None]
        elif p[1] == "conv_norm_out":
            name = f"{side}.norm_out.{p[2]}"
        else:
            name = key
        out["first_stage_model." + name] = value
    return out


def schedule_buffers() -> dict:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float(),
            "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)}


@pytest.fixture(scope="module")
def models():
    """family -> (models, original-layout torch state dict)."""
    out = {}
    for seed, family in enumerate(("sd1", "sd2")):
        torch.manual_seed(seed)
        unet = randomize(UNet2DConditionModel(**UNET[family]), 10 + seed)
        vae = randomize(AutoencoderKL(**VAE), 20 + seed)
        orig = unet_to_original(unet.state_dict(), unet.config)
        orig.update(vae_to_original(vae.state_dict(), vae.config))
        if family == "sd1":
            te = randomize(T.CLIPTextModel(T.CLIPTextConfig(**CLIP_L)), 30)
            # transformers 5 drops `text_model.` from CLIPTextModel's own keys; the files have it.
            orig.update({"cond_stage_model.transformer.text_model." + k: v for k, v in te.state_dict().items()})
            orig["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        else:
            te = randomize(OpenCLIPText(**OPEN_CLIP), 31)
            orig.update({"cond_stage_model.model." + k: v for k, v in te.state_dict().items()})
        orig.update(schedule_buffers())
        out[family] = (dict(unet=unet, vae=vae, te=te), {k: v.contiguous() for k, v in orig.items()})
    return out


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    """family -> (safetensors path, .ckpt path) of the original-layout checkpoint."""
    root = tmp_path_factory.mktemp("single_file")
    out = {}
    for family, (_, orig) in models.items():
        st = root / f"{family}.safetensors"
        core.write_safetensors({k: v.numpy() for k, v in orig.items()}, st)
        ckpt = root / f"{family}.ckpt"
        torch.save({"state_dict": orig, "global_step": 875000}, ckpt)
        out[family] = (st, ckpt)
    return out


@pytest.fixture(scope="module")
def parts(files):
    """family -> split_checkpoint of the safetensors file."""
    return {family: sf.load_single_file(st) for family, (st, _) in files.items()}


def assert_same(ours: dict, ref: dict):
    assert sorted(ours) == sorted(ref)
    for k in ref:
        r = ref[k].numpy() if isinstance(ref[k], torch.Tensor) else np.asarray(ref[k])
        assert ours[k].shape == r.shape, k
        assert np.array_equal(ours[k], r), k


def as_torch(sd: dict, strip: str = "") -> dict:
    return {k.removeprefix(strip): torch.from_numpy(np.array(v)) for k, v in sd.items()}


# --------------------------------------------------------------------------
# Against diffusers' converter, and into the PyTorch classes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_matches_diffusers_and_runs(family, models, parts):
    m, orig = models[family]
    ours = parts[family]["unet"]["state_dict"]
    ref = dsf.convert_ldm_unet_checkpoint(orig, dict(m["unet"].config))
    assert_same(ours, ref)
    assert_same(ours, m["unet"].state_dict())
    assert len(ours) == len(m["unet"].state_dict()) > 100

    # The inferred config builds a model that takes the weights strictly and
    # computes what the source model computes (wrong head counts would not).
    rebuilt = UNet2DConditionModel.from_config(parts[family]["unet"]["config"]).eval()
    result = rebuilt.load_state_dict(as_torch(ours), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        want = m["unet"](x, torch.tensor([3, 700]), ctx).sample
        got = rebuilt(x, torch.tensor([3, 700]), ctx).sample
    assert float(want.abs().mean()) > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_vae_matches_diffusers_and_loads(models, parts):
    m, orig = models["sd1"]
    ours = parts["sd1"]["vae"]["state_dict"]
    assert_same(ours, dsf.convert_ldm_vae_checkpoint(orig, dict(m["vae"].config)))
    assert_same(ours, m["vae"].state_dict())
    assert ours["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    rebuilt = AutoencoderKL.from_config(parts["sd1"]["vae"]["config"])
    result = rebuilt.load_state_dict(as_torch(ours), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_clip_text_matches_diffusers_and_loads(models, parts):
    m, orig = models["sd1"]
    ours = parts["sd1"]["text_encoder"]["state_dict"]
    ref = dsf.convert_ldm_clip_checkpoint(orig)
    # diffusers carries the position_ids buffer along; today's transformers does not save it.
    assert "text_model.embeddings.position_ids" in ref
    del ref["text_model.embeddings.position_ids"]
    assert_same(ours, ref)
    rebuilt = T.CLIPTextModel(T.CLIPTextConfig(**parts["sd1"]["text_encoder"]["config"]))
    result = rebuilt.load_state_dict(as_torch(ours, strip="text_model."), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_open_clip_text_matches_diffusers_and_runs(models, parts):
    m, orig = models["sd2"]
    te = parts["sd2"]["text_encoder"]
    cfg = T.CLIPTextConfig(**te["config"])
    rebuilt = T.CLIPTextModel(cfg).eval()
    ref = dsf.convert_open_clip_checkpoint(rebuilt, orig)
    assert_same(te["state_dict"], ref)
    assert "text_model.encoder.layers.22.self_attn.q_proj.weight" in te["state_dict"]
    assert "text_model.encoder.layers.23.self_attn.q_proj.weight" not in te["state_dict"]
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in parts["sd2"]["ignored"]
    assert "cond_stage_model.model.text_projection" in parts["sd2"]["ignored"]

    result = rebuilt.load_state_dict(as_torch(te["state_dict"], strip="text_model."), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ids = torch.randint(0, OPEN_CLIP["vocab"], (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m["te"].penultimate(ids)
        got = rebuilt(ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_open_clip_projection_kept_for_with_projection(models):
    _, orig = models["sd2"]
    state = {k: v.numpy() for k, v in orig.items()}
    parts = sf.split_checkpoint(state, {"text_encoder": {"architectures": ["CLIPTextModelWithProjection"],
                                                         "num_hidden_layers": 24}})
    sd = parts["text_encoder"]["state_dict"]
    proj = orig["cond_stage_model.model.text_projection"].numpy()
    np.testing.assert_array_equal(sd["text_projection.weight"], proj.T)
    assert "text_model.encoder.layers.23.mlp.fc2.bias" in sd
    model = T.CLIPTextModelWithProjection(T.CLIPTextConfig(**{**parts["text_encoder"]["config"],
                                                              "projection_dim": proj.shape[1]}))
    result = model.load_state_dict(as_torch(sd), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_use_ema_matches_diffusers(models):
    m, orig = models["sd1"]
    orig = dict(orig)
    for k in [k for k in orig if k.startswith("model.diffusion_model.")]:
        orig["model_ema." + k[len("model."):].replace(".", "")] = orig[k] + 1.0
    state = {k: v.numpy() for k, v in orig.items()}
    ours = sf.split_checkpoint(state, use_ema=True)["unet"]
    assert_same(ours["state_dict"], dsf.convert_ldm_unet_checkpoint(orig, dict(m["unet"].config), extract_ema=True))
    assert ours["origin"]["conv_in.weight"] == "model_ema.diffusion_modelinput_blocks00weight"
    plain = sf.split_checkpoint(state)["unet"]["state_dict"]
    np.testing.assert_array_equal(ours["state_dict"]["conv_in.weight"], plain["conv_in.weight"] + 1.0)


def test_ckpt_and_safetensors_give_the_same(files, parts):
    from_ckpt = sf.load_single_file(files["sd1"][1])
    for comp in ("unet", "vae", "text_encoder"):
        assert_same(from_ckpt[comp]["state_dict"], parts["sd1"][comp]["state_dict"])
        assert from_ckpt[comp]["config"] == parts["sd1"][comp]["config"]
    assert from_ckpt["report"].ok and from_ckpt["report"].unexpected == []
    assert {"betas", "alphas_cumprod", "model_ema.decay", "model_ema.num_updates",
            "cond_stage_model.transformer.text_model.embeddings.position_ids"} <= set(from_ckpt["ignored"])


# --------------------------------------------------------------------------
# Config inference
# --------------------------------------------------------------------------

UNET_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
               "up_block_types", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
               "transformer_layers_per_block", "norm_num_groups")
VAE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
              "down_block_types", "up_block_types", "norm_num_groups")
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
               "max_position_embeddings", "hidden_act")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_inferred_configs(family, models, parts):
    m, _ = models[family]
    p = parts[family]
    assert p["family"] == family
    for f in UNET_FIELDS:
        assert _norm(p["unet"]["config"][f]) == _norm(m["unet"].config[f]), f
    for f in VAE_FIELDS:
        assert _norm(p["vae"]["config"][f]) == _norm(m["vae"].config[f]), f
    te = p["text_encoder"]["config"]
    if family == "sd1":
        assert {f: te[f] for f in TEXT_FIELDS + ("num_hidden_layers",)} == {
            f: CLIP_L[f] for f in TEXT_FIELDS + ("num_hidden_layers",)}
    else:
        assert {f: te[f] for f in TEXT_FIELDS} == dict(
            vocab_size=1000, hidden_size=64, intermediate_size=256, num_attention_heads=1,
            max_position_embeddings=77, hidden_act="gelu")
        assert te["num_hidden_layers"] == 23  # the penultimate layer's output
    assert p["scheduler"]["config"]["prediction_type"] == "epsilon"
    assert p["scheduler"]["config"]["beta_schedule"] == "scaled_linear"
    assert p["unet"]["config"]["sample_size"] == 64
    warned = any("v_prediction" in w for w in p["warnings"])
    assert warned == (family == "sd2")


def test_sd2_768_v_needs_and_takes_the_users_word(models):
    _, orig = models["sd2"]
    state = {k: v.numpy() for k, v in orig.items()}
    p = sf.split_checkpoint(state, {"scheduler": {"prediction_type": "v_prediction"},
                                    "unet": {"attention_head_dim": [1, 1, 1]}})
    assert p["scheduler"]["config"]["prediction_type"] == "v_prediction"
    assert p["unet"]["config"]["sample_size"] == 96 and p["unet"]["config"]["upcast_attention"] is True
    assert p["vae"]["config"]["sample_size"] == 768
    assert p["unet"]["config"]["attention_head_dim"] == [1, 1, 1]
    assert p["warnings"] == []
    with pytest.raises(ValueError, match="prediction_type 'v'"):
        sf.split_checkpoint(state, {"scheduler": {"prediction_type": "v"}})
    with pytest.raises(ValueError, match="unknown components \\['unets'\\]"):
        sf.split_checkpoint(state, {"unets": {}})


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def test_not_an_sd_checkpoint():
    state = {"down_blocks.0.resnets.0.conv1.weight": np.zeros((4, 4, 3, 3), np.float32),
             "down_blocks.0.resnets.0.conv1.bias": np.zeros(4, np.float32),
             "conv_in.weight": np.zeros((4, 4, 3, 3), np.float32), "logit_scale": np.zeros(())}
    with pytest.raises(core.ConversionError) as e:
        sf.split_checkpoint(state, source="unet.safetensors")
    msg = str(e.value)
    assert "unet.safetensors is not a Stable Diffusion 1.x/2.x single-file checkpoint" in msg
    assert "expected U-Net keys under 'model.diffusion_model.'" in msg
    assert "found 4 keys: down_blocks.0.* (2), conv_in.* (1), logit_scale (1)." in msg
    assert "t2i_jax.convert.diffusers" in msg


def test_sdxl_keys_in_an_sd1_file_are_named(models):
    """SDXL files are split by convert.sdxl_file (tests/test_sdxl.py); an SD1 file with one stray
    SDXL conditioner key is neither, and the error names both."""
    _, orig = models["sd1"]
    state = {k: v.numpy() for k, v in orig.items()}
    state["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"] = np.zeros(4, np.float32)
    with pytest.raises(core.ConversionError) as e:
        sf.split_checkpoint(state, source="sd_xl_base_1.0.safetensors")
    msg = str(e.value)
    assert "sd_xl_base_1.0.safetensors mixes an SDXL conditioner (conditioner.embedders.*)" in msg
    assert "'cond_stage_model.transformer.text_model." in msg


def test_unknown_keys_are_reported(models):
    _, orig = models["sd1"]
    state = {k: v.numpy() for k, v in orig.items()}
    extra = ["first_stage_model.loss.logvar", "model.diffusion_model.label_emb.0.0.weight", "some_new_buffer"]
    for k in extra:
        state[k] = np.zeros(3, np.float32)
    with pytest.raises(core.ConversionError) as e:
        sf.split_checkpoint(state)
    assert e.value.report.unexpected == extra
    for k in extra:
        assert k in str(e.value)
    p = sf.split_checkpoint(state, strict=False)
    assert p["report"].unexpected == extra and not p["report"].ok
    assert len(p["unet"]["state_dict"]) == len(models["sd1"][0]["unet"].state_dict())


def test_wrong_layout_override_leaves_keys_over(models):
    _, orig = models["sd1"]
    state = {k: v.numpy() for k, v in orig.items()}
    with pytest.raises(core.ConversionError) as e:
        sf.split_checkpoint(state, {"unet": {"layers_per_block": 1}})
    assert "model.diffusion_model.input_blocks.5.0.in_layers.0.weight" in e.value.report.unexpected


# --------------------------------------------------------------------------
# The project's Flax models on the canonical dicts
# --------------------------------------------------------------------------


def rel(ours, ref) -> float:
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_flax_unet_runs_from_canonical_dict(family, models, parts):
    import jax

    from t2i_jax.models import unet as unet_lib

    m, _ = models[family]
    p = parts[family]["unet"]
    config = unet_lib.UNetConfig.from_diffusers(p["config"], source=f"{family} single file")
    module = unet_lib.UNet2DConditionModel(config)
    expected = jax.eval_shape(module.init, jax.random.key(0), *unet_lib.dummy_inputs(config))["params"]
    params, report = core.load_params(p["state_dict"], expected, source=family, origin=p["origin"])
    assert report.ok and report.loaded == len(p["state_dict"])

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, 64, generator=g)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        want = m["unet"](x, t, ctx).sample.permute(0, 2, 3, 1)
    # One compiled program: op-by-op dispatch of a whole U-Net costs several times more on CPU.
    got = jax.jit(module.apply)({"params": params}, x.permute(0, 2, 3, 1).numpy(), t.numpy(), ctx.numpy())
    assert rel(got, want) < 1e-5


def test_flax_open_clip_text_runs_from_canonical_dict(models, parts):
    import jax

    from t2i_jax.convert import clip as clip_convert
    from t2i_jax.models import clip as clip_lib

    m, _ = models["sd2"]
    te = parts["sd2"]["text_encoder"]
    module = clip_convert.build_module(te["config"], where="sd2 single file")
    expected = jax.eval_shape(module.init, jax.random.key(0), *clip_lib.dummy_inputs(module))["params"]
    params, report = core.load_params(te["state_dict"], expected, source="sd2", origin=te["origin"])
    assert report.ok
    ids = torch.randint(0, OPEN_CLIP["vocab"], (2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m["te"].penultimate(ids)
    got = module.apply({"params": params}, ids.numpy()).last_hidden_state
    assert rel(got, want) < 1e-5


def test_standalone_vae_file(models, tmp_path):
    m, orig = models["sd1"]
    # vae-ft-mse-840000-style file: the VAE without its prefix, plus EMA copies.
    state = {k.removeprefix("first_stage_model."): v.numpy() for k, v in orig.items()
             if k.startswith("first_stage_model.")}
    state["model_ema.decay"] = np.float32(0.999)
    path = tmp_path / "vae-ft-mse.safetensors"
    core.write_safetensors(state, path)
    with pytest.raises(core.ConversionError, match="standalone VAE in the original layout"):
        sf.load_single_file(path)
    out = sf.convert_vae(sf.read_single_file(path), source=str(path))
    assert_same(out["state_dict"], m["vae"].state_dict())
    assert out["report"].ok and out["config"]["block_out_channels"] == [32, 64, 64]
    state["decoder.extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(core.ConversionError) as e:
        sf.convert_vae(state)
    assert e.value.report.unexpected == ["decoder.extra.weight"]


# --------------------------------------------------------------------------
# Full-size layouts (shapes only: meta tensors, zero-stride numpy arrays)
# --------------------------------------------------------------------------

FULL = {
    "sd15": dict(
        unet=dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64),
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
    ),
    "sd21": dict(
        unet=dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                  upcast_attention=True, sample_size=96),
        # OpenCLIP ViT-H/14 text tower: 24 blocks, of which SD2 runs 23.
        open_clip=dict(vocab=49408, width=1024, layers=24, heads=16, ctx=77, proj=1024),
        text=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
    ),
}
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def shapes_only(sd: dict) -> dict:
    return {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape)) for k, v in sd.items()}


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_layout_and_config(name):
    spec = FULL[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**SD_VAE)
        if "open_clip" in spec:
            tower = OpenCLIPText(**spec["open_clip"])
            te_orig = {"cond_stage_model.model." + k: v for k, v in tower.state_dict().items()}
        else:
            te_orig = {"cond_stage_model.transformer.text_model." + k: v
                       for k, v in T.CLIPTextModel(T.CLIPTextConfig(**spec["text"])).state_dict().items()}
        text_keys = T.CLIPTextModel(T.CLIPTextConfig(**spec["text"])).state_dict()
    orig = {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict(), vae.config),
            **te_orig}
    prediction = "v_prediction" if name == "sd21" else "epsilon"
    p = sf.split_checkpoint(shapes_only(orig), {"scheduler": {"prediction_type": prediction}})

    assert p["family"] == ("sd2" if name == "sd21" else "sd1")
    for comp, ref in (("unet", unet.state_dict()), ("vae", vae.state_dict()),
                      ("text_encoder", {"text_model." + k: v for k, v in text_keys.items()})):
        got = p[comp]["state_dict"]
        assert sorted(got) == sorted(ref), comp
        assert all(got[k].shape == tuple(ref[k].shape) for k in ref), comp
    # diffusers' converter agrees on the U-Net's keys at full size too.
    assert sorted(dsf.convert_ldm_unet_checkpoint(orig, dict(unet.config))) == sorted(p["unet"]["state_dict"])

    ref_unet = dict(unet.config)
    for f in UNET_FIELDS + ("sample_size", "upcast_attention"):
        assert _norm(p["unet"]["config"][f]) == _norm(ref_unet[f]), f
    assert p["unet"]["config"]["block_out_channels"] == [320, 640, 1280, 1280]
    for f in VAE_FIELDS:
        assert _norm(p["vae"]["config"][f]) == _norm(vae.config[f]), f
    te = p["text_encoder"]["config"]
    assert {f: te[f] for f in spec["text"]} == spec["text"]
