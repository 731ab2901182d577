"""LoRA and textual-inversion files merged into a bundle (t2i_jax.convert.lora / embeddings)
against diffusers' load_lora_weights / load_textual_inversion on the tiny pipeline."""

import json
import re

import diffusers
import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig, inject_adapter_in_model
from test_pipeline import SIZE, build_tiny_pipeline

from t2i_jax import pipeline, sample
from t2i_jax.convert import core, embeddings, lora
from t2i_jax.convert.load import load_components

PROMPT = ["a red circle on a blue background"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONV_TARGETS = ["conv1", "conv2", "proj_in", "conv_shortcut", "time_emb_proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
KW = dict(steps=3, guidance_scale=6.0, scheduler="pndm", height=SIZE, width=SIZE)


def _lora_layers(model, targets, rank, alpha, seed):
    """PEFT LoRA layers on `model` with random lora_B (PEFT starts it at zero); their state dict."""
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    inject_adapter_in_model(cfg, model, adapter_name="tmp")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                sd[name.replace(".tmp", "")] = p.detach().clone()
    for name, module in list(model.named_modules()):  # back to the plain layers for the next LoRA
        if hasattr(module, "base_layer"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base_layer)
    del model.peft_config
    return sd, cfg.to_dict()


def _save_peft(folder, unet, te, seed, alpha):
    u, umeta = _lora_layers(unet, UNET_TARGETS, 4, alpha, seed)
    t, tmeta = _lora_layers(te, TE_TARGETS, 4, alpha, seed + 1)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=u, text_encoder_lora_layers=t, unet_lora_adapter_metadata=umeta,
        text_encoder_lora_adapter_metadata=tmeta)
    return folder / "pytorch_lora_weights.safetensors", {**{"unet." + k: v for k, v in u.items()},
                                                          **{"text_encoder." + k: v for k, v in t.items()}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("lora"))  # torch runs on one thread (conftest)


def _setup(root):
    pipe = build_tiny_pipeline(root / "model")
    a, a_sd = _save_peft(root / "a", pipe.unet, pipe.text_encoder, seed=1, alpha=8)  # scale 2
    b, _ = _save_peft(root / "b", pipe.unet, pipe.text_encoder, seed=3, alpha=4)  # scale 1
    # Convolutions (3x3 resnet convs, SD1's 1x1 proj_in, a shortcut) and other Dense layers, U-Net only.
    conv, conv_meta = _lora_layers(pipe.unet, CONV_TARGETS, 4, 2, seed=7)  # scale 0.5
    diffusers.StableDiffusionPipeline.save_lora_weights(root / "conv", unet_lora_layers=conv,
                                                        unet_lora_adapter_metadata=conv_meta)
    # `a` in diffusers' older spellings, pickled: the U-Net's as attention processors
    # (attn1.processor.to_q_lora.down.weight), the text encoder's as lora_linear_layer, network alphas.
    old = {}
    for k, v in a_sd.items():
        module, role = k.split(".lora_")
        role = {"A.weight": "down.weight", "B.weight": "up.weight"}[role]
        if module.startswith("unet."):
            module = re.sub(r"\.(to_[qkv]|to_out)(\.0)?$", r".processor.\1_lora", module)
            old[f"{module}.{role}"], old[f"{module}.alpha"] = v, torch.tensor(8.0)
        else:
            old[f"{module}.lora_linear_layer.{role}"], old[f"{module}.alpha"] = v, torch.tensor(8.0)
    torch.save(old, root / "a_old.bin")
    # The same LoRA `a` as kohya writes it; diffusers' converter gives every layer alpha = rank,
    # so the alphas are set to the PEFT file's lora_alpha to keep the scale.
    kohya = {k: (torch.tensor(8.0) if k.endswith(".alpha") else v) for k, v in
             convert_state_dict_to_kohya(a_sd).items()}
    safetensors.torch.save_file({k: v.contiguous() for k, v in kohya.items()}, root / "a_kohya.safetensors")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(root / "model", safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(root / "a", adapter_name="a")
    ref.load_lora_weights(root / "b", adapter_name="b")
    ref.load_lora_weights(root / "conv", adapter_name="conv")
    latents = np.random.RandomState(0).randn(1, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    bundle = load_components(str(root / "model"))
    mesh = pipeline.make_mesh(devices=jax.devices()[:1])
    # One sampler for every LoRA case: merged params have the base's shapes, so
    # update_params swaps them in without a recompile.
    return dict(root=root, ref=ref, bundle=bundle, a=a, b=b, conv=root / "conv/pytorch_lora_weights.safetensors",
                old=root / "a_old.bin", kohya=root / "a_kohya.safetensors",
                kohya_keys=sorted(kohya), latents=latents, mesh=mesh, sampler=pipeline.Sampler(bundle, mesh=mesh),
                cache={})


def _reference(s, names, weights):
    key = ("ref", tuple(names), tuple(weights))
    if key not in s["cache"]:
        s["ref"].set_adapters(names, adapter_weights=weights)
        lat = torch.tensor(s["latents"].transpose(0, 3, 1, 2))
        s["cache"][key] = s["ref"](PROMPT, num_inference_steps=3, guidance_scale=6.0, latents=lat, height=SIZE,
                                   width=SIZE, output_type="np").images
    return s["cache"][key]


def _ours(s, loras=()):
    merged = lora.apply_adapters(s["bundle"], loras=loras)
    s["sampler"].update_params(merged.params)
    return s["sampler"](PROMPT, seeds=[0], latents=s["latents"], **KW), merged


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_peft_lora_matches_diffusers(setup, weight):
    ref = _reference(setup, ["a"], [weight])
    ours, merged = _ours(setup, loras=[(setup["a"], weight)])
    base, _ = _ours(setup)
    # The LoRA must change the image well beyond the tolerance for the check to mean anything.
    assert np.abs(base - ref).max() > 0.03
    assert np.abs(ours - ref).max() <= 1 / 255
    assert ((ref > 0.02) & (ref < 0.98)).mean() > 0.5
    # Merged once into the params (the base bundle untouched): the U-Net's 6 transformer blocks x 2
    # attentions x 4 projections, the text encoder's 2 layers x 4.
    flat = {c: jax.tree_util.tree_leaves_with_path(merged.params[c]) for c in ("unet", "text_encoder")}
    base_flat = {c: jax.tree_util.tree_leaves(setup["bundle"].params[c]) for c in ("unet", "text_encoder")}
    changed = {c: sum(not np.array_equal(x, y) for (_, x), y in zip(flat[c], base_flat[c])) for c in flat}
    assert changed == {"unet": 48, "text_encoder": 8}


def test_two_loras_and_kohya_match_diffusers(setup):
    ref = _reference(setup, ["a", "b"], [1.0, 0.6])
    ours, _ = _ours(setup, loras=[(setup["a"], 1.0), (setup["b"], 0.6)])
    assert np.abs(ours - ref).max() <= 1 / 255
    # Kohya keys (lora_unet_..., lora_te1_...), same weights: the same image as the PEFT file.
    assert {k.split("_")[1] for k in setup["kohya_keys"]} == {"unet", "te1"}
    assert any(k.endswith(".lora_down.weight") for k in setup["kohya_keys"])
    peft, _ = _ours(setup, loras=[(setup["a"], 1.0)])
    kohya, _ = _ours(setup, loras=[(setup["kohya"], 1.0)])
    assert np.abs(kohya - peft).max() <= 1 / 255
    assert np.abs(kohya - _reference(setup, ["a"], [1.0])).max() <= 1 / 255


def test_conv_lora_and_old_format_match_diffusers(setup):
    ref = _reference(setup, ["conv"], [1.0])
    ours, merged = _ours(setup, loras=[(setup["conv"], 1.0)])
    assert np.abs(ours - _reference(setup, ["a"], [0.0])).max() > 0.03  # the LoRA changes the image
    assert np.abs(ours - ref).max() <= 1 / 255
    conv_in = merged.params["unet"]["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]
    assert conv_in.shape[:2] == (3, 3)  # a 3x3 kernel was merged, not only 1x1 and Dense ones
    assert not np.array_equal(conv_in, setup["bundle"].params["unet"]["down_blocks_1"]["resnets_0"]["conv1"]["kernel"])
    old, _ = _ours(setup, loras=[(setup["old"], 1.0)])
    assert np.abs(old - _reference(setup, ["a"], [1.0])).max() <= 1 / 255


def check_unmatched_keys_are_named(bundle, kohya_file, stray_names, tmp_path):
    """A kohya file plus stray `<name>.lora_down.weight` keys: apply_adapters names them (the first
    five, then "and N more") and says to use a LoRA made for this model."""
    state = core.read_safetensors(kohya_file)
    extra = {f"{name}.lora_down.weight": np.zeros((4, 8), np.float32) for name in stray_names}
    path = tmp_path / "bad.safetensors"
    core.write_safetensors({**state, **extra}, path)
    with pytest.raises(core.ConversionError) as e:
        lora.apply_adapters(bundle, loras=[(path, 1.0)])
    msg = str(e.value)
    n = len(stray_names)
    assert f"{n} of its {len(state) + n} keys match no layer" in msg and stray_names[0] in msg
    assert f"and {n - 5} more" in msg and "Use a LoRA made for this model" in msg


def test_unmatched_lora_keys_are_named(setup, tmp_path):
    check_unmatched_keys_are_named(setup["bundle"], setup["kohya"],
                                   [f"lora_unet_nonexistent_block_{i}" for i in range(7)], tmp_path)


@pytest.fixture(scope="module")
def embedded(setup):
    """An A1111 .pt with two vectors and a diffusers-style safetensors with one (random), and the
    bundle with both added (its own sampler: the token table grew by three rows)."""
    g = torch.Generator().manual_seed(5)
    pt = setup["root"] / "two.pt"
    torch.save({"string_to_param": {"*": torch.randn(2, 32, generator=g)}, "name": "twovec",
                "string_to_token": {"*": 265}, "step": 10}, pt)
    st = setup["root"] / "one.safetensors"
    safetensors.torch.save_file({"<one>": torch.randn(1, 32, generator=g)}, st)
    specs = [(pt, "<two>"), (st, None)]
    bundle = lora.apply_adapters(setup["bundle"], embeddings=specs)
    return dict(pt=pt, st=st, specs=specs, bundle=bundle, sampler=pipeline.Sampler(bundle, mesh=setup["mesh"]))


def test_textual_inversion_matches_diffusers(setup, embedded):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(setup["root"] / "model", safety_checker=None,
                                                            requires_safety_checker=False)
    ref.load_textual_inversion(str(embedded["pt"]), token="<two>")
    ref.load_textual_inversion(str(embedded["st"]))
    ours = embedded["bundle"]
    prompts = ["a <two> circle", "<one> on a blue background, <two>"]
    ids = ref.tokenizer(ref.maybe_convert_prompt(prompts, ref.tokenizer), padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
    assert ours.tokenizer.expansions == {"<two>": "<two> <two>_1"}
    np.testing.assert_array_equal(ours.tokenizer(prompts), ids.numpy())
    assert ids.max() == 49410  # three new tokens after the 49,408 of CLIP
    assert setup["bundle"].text_encoder.config.vocab_size == 49408  # the base bundle is untouched
    with torch.no_grad():
        want = ref.text_encoder(ids)[0].numpy()
    # Through the sampler's A1111 prompt path (prompts.tokenize), as sampling reads them.
    got = np.asarray(embedded["sampler"].encode(prompts))
    without = np.asarray(embedded["sampler"].encode(["a circle", "on a blue background,"]))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    assert np.linalg.norm(without - want) / np.linalg.norm(want) > 0.05
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary.*:OTHER_NAME"):
        lora.apply_adapters(ours, embeddings=[(embedded["st"], None)])


# slow (17 s): the CLI's adapter wiring stays fast in test_sdxl_adapters.py::test_cli_with_lora_and_embedding
# (the same sample.py path); the SD1 merge itself in the tests above.
@pytest.mark.slow
def test_cli_with_lora_and_embedding(setup, embedded, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", str(setup["root"] / "model"), "--prompt", "a <one> <two> circle", "--steps", "3",
            "--out", str(out), "--embedding", f"{embedded['pt']}:<two>", "--embedding", str(embedded["st"]),
            "--no-compilation-cache", "--seed", "7"]
    assert sample.main([*argv, "--lora", f"{setup['a']}:0.6"]) == 0
    (entry,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert entry["lora"] == [[sample.file_hash(str(setup["a"])), 0.6]] and len(entry["lora"][0][0]) == 16
    assert entry["embeddings"] == [[sample.file_hash(str(embedded["pt"])), "<two>"],
                                   [sample.file_hash(str(embedded["st"])), None]]
    assert entry["lora_paths"] == [str(setup["a"])]
    assert entry["embedding_paths"] == [str(embedded["pt"]), str(embedded["st"])]
    from PIL import Image

    got = np.asarray(Image.open(out / entry["file"]))
    merged = lora.apply_adapters(embedded["bundle"], loras=[(setup["a"], 0.6)])
    embedded["sampler"].update_params(merged.params)
    want = pipeline.to_uint8(embedded["sampler"](["a <one> <two> circle"], seeds=[7], steps=3, guidance_scale=7.5,
                                                 scheduler="pndm", height=SIZE, width=SIZE))
    assert got.std() > 10 and np.abs(got.astype(int) - want[0].astype(int)).max() <= 1
    assert sample.main([*argv, "--lora", f"{setup['a']}:strong"]) == 2
    assert sample.main([*argv, "--lora", str(tmp_path / "missing.safetensors")]) == 2


def test_misshapen_lora_and_embedding_forms(setup, tmp_path):
    # A LoRA for a wider model: its layer is named with both shapes.
    state = core.read_safetensors(setup["kohya"])
    key = next(k for k in sorted(state) if k.endswith("attn1_to_q.lora_up.weight"))
    core.write_safetensors({**state, key: np.zeros((48, 4), np.float32)}, tmp_path / "wide.safetensors")
    fits = r"attn1\.to_q: up \(48, 4\) @ down \(4, 64\) does not fit its weight \(Flax shape \(64, 64\)\)"
    with pytest.raises(core.ConversionError, match=fits):
        lora.apply_adapters(setup["bundle"], loras=[(tmp_path / "wide.safetensors", 1.0)])
    # A1111's safetensors form is named by its file; a bare tensor needs a token; widths are checked.
    core.write_safetensors({"emb_params": np.ones((3, 32), np.float32)}, tmp_path / "my-style.safetensors")
    name, vecs = embeddings.read_embedding(tmp_path / "my-style.safetensors")
    assert name == "my-style" and vecs.shape == (3, 32)
    torch.save(torch.ones(32), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="bare tensor with no token name"):
        embeddings.read_embedding(tmp_path / "bare.pt")
    assert embeddings.read_embedding(tmp_path / "bare.pt", "<b>")[1].shape == (1, 32)
    core.write_safetensors({"<w>": np.ones((1, 48), np.float32)}, tmp_path / "wide_emb.safetensors")
    with pytest.raises(ValueError, match="vectors of width 48; this text encoder takes 32"):
        lora.apply_adapters(setup["bundle"], embeddings=[(tmp_path / "wide_emb.safetensors", None)])


def test_sd1_kohya_export_keeps_diffusers_names(setup, tmp_path):
    """SDXL's original-layout names are for SDXL only: an SD1 LoRA is written as before (diffusers
    module names, `lora_te_`), with or without the bundle's params."""
    layers = lora.read_lora(setup["a"], setup["bundle"].params)
    for params in (None, setup["bundle"].params):
        path = lora.save_lora(tmp_path / "k.safetensors", layers, fmt="kohya", params=params)
        keys = set(core.read_safetensors(path))
        assert len(keys) == 3 * len(layers)
        assert all(re.match(r"lora_(unet_(down_blocks|mid_block|up_blocks)_|te_text_model_encoder_layers_)", k)
                   for k in keys), sorted(keys)[:3]
