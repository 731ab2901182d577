"""Flax CLIP against transformers PyTorch on tiny random checkpoints saved to disk."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from t2i_jax.convert import clip as cc
from t2i_jax.convert import core
from t2i_jax.models import clip

VOCAB = 99
SEQ = 20


def rel(ours, ref) -> float:
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


# Two tiny configs that differ in activation, projection, patch size, width
# and pooling rule (legacy eos_token_id=2 pools at argmax(ids)).
CONFIGS = {
    "quickgelu-legacy-eos": dict(
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", eos_token_id=2),
        vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=16),
    "gelu-new-eos": dict(
        text=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="gelu", eos_token_id=VOCAB - 1),
        vision=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                    image_size=16, patch_size=4, hidden_act="gelu"),
        projection_dim=24),
}


def text_config(spec) -> T.CLIPTextConfig:
    return T.CLIPTextConfig(vocab_size=VOCAB, max_position_embeddings=SEQ, bos_token_id=VOCAB - 2,
                            pad_token_id=1, projection_dim=spec["projection_dim"], **spec["text"])


def vision_config(spec) -> T.CLIPVisionConfig:
    return T.CLIPVisionConfig(projection_dim=spec["projection_dim"], **spec["vision"])


def token_ids(spec, batch=3, seed=0):
    """Ids with the end token at different places, padded after it with the
    end token (as SD1 tokenizers do); in legacy configs the end token is the
    largest id, which is what argmax pooling relies on."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, VOCAB - 3, (batch, SEQ))
    eos = VOCAB - 1
    for row, end in enumerate([5, SEQ - 1, 11][:batch]):
        ids[row, end:] = eos
    return ids


def images(spec, batch=2, seed=1):
    s = spec["vision"]["image_size"]
    return np.random.RandomState(seed).randn(batch, 3, s, s).astype(np.float32)


def nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved_clip(request, tmp_path_factory):
    """A tiny random transformers CLIPModel saved with save_pretrained."""
    spec = CONFIGS[request.param]
    torch.manual_seed(0)
    cfg = T.CLIPConfig(text_config=text_config(spec).to_dict(), vision_config=vision_config(spec).to_dict(),
                       projection_dim=spec["projection_dim"])
    model = T.CLIPModel(cfg).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return spec, model, path


def test_clip_model_parity(saved_clip):
    spec, ref, path = saved_clip
    module, params = cc.load_clip(path)
    assert isinstance(module, clip.CLIPModel)
    ids, px = token_ids(spec), images(spec)
    with torch.no_grad():
        r = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px))
        rt = ref.text_model(input_ids=torch.tensor(ids), output_hidden_states=True)
        rv = ref.vision_model(pixel_values=torch.tensor(px), output_hidden_states=True)
    o = jax.jit(lambda p, i, x: module.apply({"params": p}, i, x, output_hidden_states=True))(
        params, jnp.asarray(ids), nhwc(px))
    t, v = o.text_model_output, o.vision_model_output
    errors = {
        "logits_per_image": rel(o.logits_per_image, r.logits_per_image),
        "text_embeds": rel(o.text_embeds, r.text_embeds),
        "image_embeds": rel(o.image_embeds, r.image_embeds),
        "text last_hidden_state": rel(t.last_hidden_state, rt.last_hidden_state),
        "text pooler_output": rel(t.pooler_output, rt.pooler_output),
        "text penultimate": rel(t.hidden_states[-2], rt.hidden_states[-2]),
        "vision last_hidden_state": rel(v.last_hidden_state, rv.last_hidden_state),
        "vision pooler_output": rel(v.pooler_output, rv.pooler_output),
        "vision penultimate": rel(v.hidden_states[-2], rv.hidden_states[-2]),
    }
    assert len(t.hidden_states) == len(rt.hidden_states) == spec["text"]["num_hidden_layers"] + 1
    assert max(errors.values()) <= 1e-5, errors


def test_text_attention_mask_parity(saved_clip):
    spec, ref, path = saved_clip
    module, params = cc.load_clip(path, tower="text")
    ids = token_ids(spec)
    mask = (np.arange(SEQ)[None] < np.array([[6], [SEQ], [12]])).astype(np.int64)
    with torch.no_grad():
        rt = ref.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        re_ = ref.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    o = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert rel(o.last_hidden_state, rt.last_hidden_state) <= 1e-5
    assert rel(o.text_embeds, re_.pooler_output) <= 1e-5


def test_vision_tower_of_clip_model(saved_clip):
    spec, ref, path = saved_clip
    module, params = cc.load_clip(path, tower="vision")
    px = images(spec)
    with torch.no_grad():
        r = ref.get_image_features(pixel_values=torch.tensor(px)).pooler_output
    assert rel(module.apply({"params": params}, nhwc(px)).image_embeds, r) <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", ["v5-no-prefix", "v4-prefix-bin", "sharded"])
def test_text_model_layouts(tmp_path, name, layout):
    """CLIPTextModel as transformers 5.6+ saves it (no `text_model.` prefix),
    as 4.x saved it (prefix, pytorch_model.bin), and sharded."""
    spec = CONFIGS[name]
    torch.manual_seed(1)
    ref = T.CLIPTextModel(text_config(spec)).eval()
    if layout == "v5-no-prefix":
        ref.save_pretrained(tmp_path)
        assert not any(k.startswith("text_model.") for k in core.read_weights_dir(tmp_path, ["model"]))
    elif layout == "v4-prefix-bin":
        ref.config.to_json_file(tmp_path / "config.json")
        sd = {f"text_model.{k}": v for k, v in ref.state_dict().items()}
        sd["text_model.embeddings.position_ids"] = torch.arange(SEQ)[None]  # 4.x saved this buffer
        torch.save(sd, tmp_path / "pytorch_model.bin")
    else:
        ref.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    module, params = cc.load_clip(tmp_path)
    assert isinstance(module, clip.CLIPTextModel) and not module.with_projection
    ids = token_ids(spec)
    with torch.no_grad():
        r = ref(input_ids=torch.tensor(ids), output_hidden_states=True)
    o = module.apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
    assert rel(o.last_hidden_state, r.last_hidden_state) <= 1e-5
    assert rel(o.pooler_output, r.pooler_output) <= 1e-5
    assert rel(o.hidden_states[-2], r.hidden_states[-2]) <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_with_projection_models(tmp_path, name):
    spec = CONFIGS[name]
    torch.manual_seed(2)
    text = T.CLIPTextModelWithProjection(text_config(spec)).eval()
    vision = T.CLIPVisionModel(vision_config(spec)).eval()
    text.save_pretrained(tmp_path / "t")
    vision.save_pretrained(tmp_path / "v")
    ids, px = token_ids(spec), images(spec)
    with torch.no_grad():
        rt = text(input_ids=torch.tensor(ids))
        rv = vision(pixel_values=torch.tensor(px))
    tm, tp = cc.load_clip(tmp_path / "t")
    vm, vp = cc.load_clip(tmp_path / "v")
    assert tm.with_projection and not vm.with_projection
    ot = tm.apply({"params": tp}, jnp.asarray(ids))
    ov = vm.apply({"params": vp}, nhwc(px))
    assert rel(ot.text_embeds, rt.text_embeds) <= 1e-5
    assert rel(ot.last_hidden_state, rt.last_hidden_state) <= 1e-5
    assert rel(ov.pooler_output, rv.pooler_output) <= 1e-5
    assert rel(ov.last_hidden_state, rv.last_hidden_state) <= 1e-5


# --------------------------------------------------------------------------
# Export: Flax -> safetensors -> transformers
# --------------------------------------------------------------------------

def _random_flax(module, seed=0):
    params = module.init(jax.random.key(seed), *clip.dummy_inputs(module))["params"]
    # Init leaves layer norms at 1/0 and logit_scale constant; perturb every
    # leaf so a swapped or untransposed tensor cannot go unnoticed.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


def _flax_config(spec):
    return clip.CLIPConfig(
        text=clip.CLIPTextConfig(vocab_size=VOCAB, max_position_embeddings=SEQ,
                                 projection_dim=spec["projection_dim"], **spec["text"]),
        vision=clip.CLIPVisionConfig(projection_dim=spec["projection_dim"], **spec["vision"]),
        projection_dim=spec["projection_dim"])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["CLIPModel", "CLIPTextModel", "CLIPTextModelWithProjection",
                                  "CLIPVisionModelWithProjection"])
def test_export_round_trip(tmp_path, name, kind):
    spec = CONFIGS[name]
    cfg = _flax_config(spec)
    module = {
        "CLIPModel": clip.CLIPModel(cfg),
        "CLIPTextModel": clip.CLIPTextModel(cfg.text),
        "CLIPTextModelWithProjection": clip.CLIPTextModel(cfg.text, with_projection=True),
        "CLIPVisionModelWithProjection": clip.CLIPVisionModel(cfg.vision, with_projection=True),
    }[kind]
    params = _random_flax(module)
    cc.save_clip(params, module, tmp_path)
    ref, info = getattr(T, kind).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref.eval()
    ids, px = token_ids(spec), images(spec)
    with torch.no_grad():
        if kind == "CLIPModel":
            r = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px)).logits_per_image
            o = module.apply({"params": params}, jnp.asarray(ids), nhwc(px)).logits_per_image
        elif kind == "CLIPTextModel":
            r = ref(input_ids=torch.tensor(ids)).last_hidden_state
            o = module.apply({"params": params}, jnp.asarray(ids)).last_hidden_state
        elif kind == "CLIPTextModelWithProjection":
            r = ref(input_ids=torch.tensor(ids)).text_embeds
            o = module.apply({"params": params}, jnp.asarray(ids)).text_embeds
        else:
            r = ref(pixel_values=torch.tensor(px)).image_embeds
            o = module.apply({"params": params}, nhwc(px)).image_embeds
    assert rel(o, r) <= 1e-5
    # And it loads back into Flax unchanged.
    _, again = cc.load_clip(tmp_path)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), params, again)
    assert all(jax.tree.leaves(same))


# --------------------------------------------------------------------------
# Strict reports and bad input
# --------------------------------------------------------------------------

@pytest.fixture()
def text_folder(tmp_path):
    spec = CONFIGS["gelu-new-eos"]
    torch.manual_seed(3)
    T.CLIPTextModel(text_config(spec)).save_pretrained(tmp_path)
    return tmp_path


def _rewrite(folder, edit):
    state = dict(core.read_safetensors(folder / "model.safetensors"))
    state = {k: np.array(v) for k, v in state.items()}
    edit(state)
    core.write_safetensors(state, folder / "model.safetensors")


def test_missing_key_is_named(text_folder):
    _rewrite(text_folder, lambda s: s.pop("encoder.layers.1.mlp.fc2.weight"))
    with pytest.raises(core.ConversionError, match=r"text_model\.encoder\.layers\.1\.mlp\.fc2\.weight") as e:
        cc.load_clip(text_folder)
    assert e.value.report.missing == ["text_model.encoder.layers.1.mlp.fc2.weight"]
    assert "1 missing" in str(e.value)


def test_unexpected_and_misshapen_keys_are_named(text_folder):
    def edit(s):
        s["encoder.layers.0.extra.weight"] = np.zeros(3, np.float32)
        s["final_layer_norm.weight"] = np.ones(7, np.float32)
    _rewrite(text_folder, edit)
    with pytest.raises(core.ConversionError) as e:
        cc.load_clip(text_folder)
    report = e.value.report
    assert str(text_folder / "model.safetensors") in str(e.value)
    assert "text_model.final_layer_norm.weight: model expects (48,), checkpoint has (7,)" in str(e.value)
    assert report.unexpected == ["text_model.encoder.layers.0.extra.weight"]
    assert report.misshapen == [("text_model.final_layer_norm.weight", (48,), (7,))]
    # Non-strict loading returns what fits and the same report.
    _, params = cc.load_clip(text_folder, strict=False)
    assert "scale" not in params["text_model"]["final_layer_norm"]
    assert "bias" in params["text_model"]["final_layer_norm"]


def test_not_a_clip_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(core.ConversionError, match=r"BertModel.*not a CLIP model"):
        cc.load_clip(tmp_path)


def test_missing_weights_named(tmp_path):
    T.CLIPTextConfig(**CONFIGS["gelu-new-eos"]["text"]).to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors"):
        cc.load_clip(tmp_path)


def test_bad_activation_named():
    with pytest.raises(ValueError, match=r"hidden_act 'relu6'.*quick_gelu"):
        clip.CLIPTextConfig(hidden_act="relu6")


def test_offline_hub_id_error_names_id_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(FileNotFoundError) as e:
        cc.load_clip("openai/clip-vit-base-patch32")
    msg = str(e.value)
    assert "openai/clip-vit-base-patch32" in msg and "local" in msg and "hf download" in msg


def test_hub_id_goes_through_huggingface_hub(monkeypatch, text_folder):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw["allow_patterns"]))
        return str(text_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    module, _ = cc.load_clip("some-org/some-clip")
    assert calls == [("some-org/some-clip", ["config.json", "model.safetensors", "model.safetensors.index.json",
                                             "model-*-of-*.safetensors"])]
    assert isinstance(module, clip.CLIPTextModel)


def test_bf16_compute_close_to_fp32(saved_clip):
    spec, _, path = saved_clip
    m32, params = cc.load_clip(path)
    m16, _ = cc.load_clip(path, dtype=jnp.bfloat16)
    ids, px = jnp.asarray(token_ids(spec)), nhwc(images(spec))
    a = m32.apply({"params": params}, ids, px)
    b = m16.apply({"params": params}, ids, px)
    assert b.text_model_output.last_hidden_state.dtype == jnp.bfloat16
    assert rel(b.text_model_output.last_hidden_state, a.text_model_output.last_hidden_state) <= 2e-2
    assert rel(b.image_embeds, a.image_embeds) <= 2e-2


@pytest.mark.parametrize("name", ["tiny", "vit-b-32", "vit-l-14", "sd2-text"])
def test_named_variants_param_counts(name):
    """Parameter counts of the named variants equal transformers' for the same config."""
    cfg = clip.named_config(name)
    ours = clip.CLIPModel(cfg)
    shapes = jax.eval_shape(ours.init, jax.random.key(0), *clip.dummy_inputs(ours))
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    with torch.device("meta"):
        ref = T.CLIPModel(T.CLIPConfig(text_config=cfg.text.to_hf(), vision_config=cfg.vision.to_hf(),
                                       projection_dim=cfg.projection_dim))
    assert n_ours == sum(p.numel() for p in ref.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["vit-l-14 text", "vit-b-32 vision"])
def test_full_size_parity(tmp_path, tower):
    """Full-size configs, random weights (SD1.x's text encoder; CLIP-B/32's vision tower)."""
    torch.manual_seed(0)
    if tower.endswith("text"):
        cfg = clip.named_config("vit-l-14").text
        ref = T.CLIPTextModelWithProjection(T.CLIPTextConfig(**cfg.to_hf())).eval()
        ids = np.random.RandomState(0).randint(0, 49406, (2, 77))
        ids[:, 0], ids[0, 9:], ids[1, 40:] = 49406, 49407, 49407
        inputs = {"input_ids": torch.tensor(ids)}
        flax_inputs = (jnp.asarray(ids),)
    else:
        cfg = clip.named_config("vit-b-32").vision
        ref = T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**cfg.to_hf())).eval()
        px = np.random.RandomState(0).randn(2, 3, 224, 224).astype(np.float32)
        inputs = {"pixel_values": torch.tensor(px)}
        flax_inputs = (nhwc(px),)
    ref.save_pretrained(tmp_path)
    module, params = cc.load_clip(tmp_path)
    with torch.no_grad():
        r = ref(**inputs, output_hidden_states=True)
    o = jax.jit(lambda p, x: module.apply({"params": p}, x, output_hidden_states=True))(params, *flax_inputs)
    embeds = (o.text_embeds, r.text_embeds) if tower.endswith("text") else (o.image_embeds, r.image_embeds)
    assert rel(o.last_hidden_state, r.last_hidden_state) <= 1e-4
    assert rel(o.hidden_states[-2], r.hidden_states[-2]) <= 1e-4
    assert rel(*embeds) <= 1e-4


def test_hub_repo_with_only_pickles_falls_back_to_bin(monkeypatch, tmp_path):
    import huggingface_hub

    spec = CONFIGS["gelu-new-eos"]
    ref = T.CLIPTextModel(text_config(spec))
    ref.config.to_json_file(tmp_path / "config.json")
    torch.save({f"text_model.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "pytorch_model.bin")
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append(kw["allow_patterns"])
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    module, params = cc.load_clip("old-org/bin-only-clip")
    assert [c[1] for c in calls] == ["model.safetensors", "pytorch_model.bin"]
    ids = token_ids(spec)
    with torch.no_grad():
        r = ref(input_ids=torch.tensor(ids)).last_hidden_state
    assert rel(module.apply({"params": params}, jnp.asarray(ids)).last_hidden_state, r) <= 1e-5
