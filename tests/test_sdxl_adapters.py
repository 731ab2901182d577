"""SDXL LoRA and textual inversion (t2i_jax.convert.lora / embeddings) against diffusers'
StableDiffusionXLPipeline load_lora_weights / load_textual_inversion on the tiny SDXL of test_sdxl.

The LoRAs are made by PEFT on the diffusers U-Net and both text encoders and saved with diffusers'
own `save_lora_weights`; the kohya files name the U-Net in Stability's original layout, as kohya
writes SDXL LoRAs, and diffusers' own converter reads them back to the same images.
"""

import json

import diffusers
import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from test_lora import TE_TARGETS, UNET_TARGETS, _lora_layers, check_unmatched_keys_are_named
from test_sdxl import build_tiny_sdxl

from t2i_jax import pipeline, sample
from t2i_jax.convert import core, embeddings, lora
from t2i_jax.convert.load import load_components

PROMPT = ["a red circle on a blue background"]
SIZE = 32  # pixels; the tiny VAE halves each side
# Convolutions in every place the original layout renames (resnets, the shortcut, down- and upsampler).
CONV_TARGETS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "proj_in"]
SEED = 7
KW = dict(steps=3, guidance_scale=5.0, scheduler="euler", height=SIZE, width=SIZE)


def _save_peft(folder, ref, seed, alpha, unet_targets=UNET_TARGETS):
    u, umeta = _lora_layers(ref.unet, unet_targets, 4, alpha, seed)
    t1, t1meta = _lora_layers(ref.text_encoder, TE_TARGETS, 4, alpha, seed + 1)
    t2, t2meta = _lora_layers(ref.text_encoder_2, TE_TARGETS, 4, alpha, seed + 2)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=u, text_encoder_lora_layers=t1, text_encoder_2_lora_layers=t2,
        unet_lora_adapter_metadata=umeta, text_encoder_lora_adapter_metadata=t1meta,
        text_encoder_2_lora_adapter_metadata=t2meta)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def xl(tmp_path_factory, compilation_cache):  # the CLI test reads the Sampler's compiled programs
    root = tmp_path_factory.mktemp("sdxl-adapters")
    made = build_tiny_sdxl(root / "model")
    a = _save_peft(root / "a", made, seed=1, alpha=8)  # scale 2
    b = _save_peft(root / "b", made, seed=4, alpha=4, unet_targets=CONV_TARGETS)  # scale 1, convolutions
    bundle = load_components(str(root / "model"))
    # `a` as kohya writes an SDXL LoRA (lora_unet_input_blocks_..., lora_te1_, lora_te2_), by save_lora.
    # Written without `params`, as the trainer's export does: the layers themselves say SDXL.
    layers = lora.read_lora(a, bundle.params)
    kohya = lora.save_lora(root / "a_kohya.safetensors", layers, fmt="kohya")
    saved = lora.save_lora(root / "a_saved.safetensors", layers, fmt="diffusers")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(root / "model")
    ref.set_progress_bar_config(disable=True)
    for name, path in (("a", a), ("b", b), ("a_kohya", kohya), ("a_saved", saved)):
        ref.load_lora_weights(str(path), adapter_name=name)
    # The Sampler's own starting latents for SEED, handed to diffusers: our calls then take seeds, as the CLI,
    # and the CLI test reads the TI Sampler's compiled program from the module's compilation cache.
    latents = np.asarray(pipeline.seeded_normal([SEED], (SIZE // 2, SIZE // 2, 4)))
    mesh = pipeline.make_mesh(devices=jax.devices()[:1])
    # One sampler for every LoRA case: merged params keep the base's shapes (update_params, no recompile).
    return dict(root=root, ref=ref, bundle=bundle, a=a, b=b, kohya=kohya, latents=latents, mesh=mesh,
                sampler=pipeline.Sampler(bundle, mesh=mesh), cache={})


def _reference(s, names, weights, prompt=PROMPT, pipe=None):
    key = (tuple(names), tuple(weights), tuple(prompt), pipe is None)
    if key not in s["cache"]:
        ref = pipe or s["ref"]
        if pipe is None:
            ref.set_adapters(list(names), adapter_weights=list(weights))
        lat = torch.tensor(s["latents"].transpose(0, 3, 1, 2))
        s["cache"][key] = ref(prompt, num_inference_steps=KW["steps"], guidance_scale=KW["guidance_scale"],
                              latents=lat, height=SIZE, width=SIZE, output_type="np").images
    return s["cache"][key]


def _ours(s, loras=(), sampler=None, bundle=None, prompt=PROMPT):
    merged = lora.apply_adapters(bundle or s["bundle"], loras=loras)
    sampler = sampler or s["sampler"]
    sampler.update_params(merged.params)
    return sampler(prompt, seeds=[SEED], **KW), merged


def _changed(merged, base):
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        new, old = jax.tree_util.tree_leaves(merged.params[comp]), jax.tree_util.tree_leaves(base.params[comp])
        out[comp] = sum(not np.array_equal(x, y) for x, y in zip(new, old))
    return out


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_peft_lora_matches_diffusers(xl, weight):
    ref = _reference(xl, ["a"], [weight])
    ours, merged = _ours(xl, loras=[(xl["a"], weight)])
    base = _reference(xl, ["a"], [0.0])
    assert np.abs(base - ref).max() > 0.03  # the LoRA changes the image well beyond the tolerance
    assert ((ref > 0.02) & (ref < 0.98)).mean() > 0.5
    assert np.abs(ours - ref).max() <= 1 / 255
    # Merged into all three parts: the U-Net's 12 transformer blocks x 2 attentions x 4 projections
    # (2 blocks in each of down_blocks.1's 2 attentions, the mid one, up_blocks.0's 3), each encoder's 3 layers x 4.
    assert _changed(merged, xl["bundle"]) == {"unet": 96, "text_encoder": 12, "text_encoder_2": 12}


def test_two_loras_and_kohya_match_diffusers(xl):
    ref = _reference(xl, ["a", "b"], [1.0, 0.6])
    ours, merged = _ours(xl, loras=[(xl["a"], 1.0), (xl["b"], 0.6)])
    assert np.abs(ours - ref).max() <= 1 / 255
    assert np.abs(ref - _reference(xl, ["a"], [1.0])).max() > 0.03  # b (convolutions) counts
    conv = merged.params["unet"]["up_blocks_0"]["upsamplers_0"]["conv"]["kernel"]
    assert not np.array_equal(conv, xl["bundle"].params["unet"]["up_blocks_0"]["upsamplers_0"]["conv"]["kernel"])
    # The kohya file: the original layout's names, which diffusers' own converter reads to the PEFT image.
    keys = set(core.read_safetensors(xl["kohya"]))
    for key in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0.alpha",
                "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_v.lora_up.weight",
                "lora_te1_text_model_encoder_layers_2_self_attn_out_proj.lora_down.weight",
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"):
        assert key in keys, key
    assert not any("down_blocks" in k or "lora_te_" in k for k in keys)
    want = _reference(xl, ["a"], [1.0])
    assert np.abs(_reference(xl, ["a_kohya"], [1.0]) - want).max() <= 1 / 255
    kohya, _ = _ours(xl, loras=[(xl["kohya"], 1.0)])
    assert np.abs(kohya - want).max() <= 1 / 255
    # save_lora's diffusers/PEFT file (text_encoder_2 with its text_model. level), read by diffusers.
    assert np.abs(_reference(xl, ["a_saved"], [1.0]) - want).max() <= 1 / 255


def test_sgm_names_of_convolutions(xl, tmp_path):
    """The original layout's resnet, sampler and embedding names (layers_per_block 2), which kohya's
    conv LoRAs use, as diffusers' `_maybe_map_sgm_blocks_to_diffusers` reads them back."""
    names = {
        "down_blocks.1.resnets.0.conv1": "input_blocks.4.0.in_layers.2",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.0.resnets.1.time_emb_proj": "input_blocks.2.0.emb_layers.1",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.resnets.2.conv1": "output_blocks.5.0.in_layers.2",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
    }
    assert {m: lora.sgm_name(m) for m in names} == names
    # An up block without attention (the refiner's first) has its upsampler at .1.
    assert lora.sgm_name("up_blocks.0.upsamplers.0.conv", 2, frozenset({1, 2})) == "output_blocks.2.1.conv"
    assert lora.sgm_name("down_blocks.1.resnets.0.norm1") is None
    # A U-Net-only conv LoRA written with the bundle's params: its layout, and read back to the same layers.
    layers = [x for x in lora.read_lora(xl["b"], xl["bundle"].params) if x.component == "unet"]
    path = lora.save_lora(tmp_path / "b_kohya.safetensors", layers, fmt="kohya", params=xl["bundle"].params)
    keys = set(core.read_safetensors(path))
    assert "lora_unet_output_blocks_2_2_conv.lora_down.weight" in keys  # up_blocks.0's upsampler
    assert "lora_unet_input_blocks_4_0_skip_connection.alpha" in keys
    back = {x.module: x for x in lora.read_lora(path, xl["bundle"].params)}
    assert sorted(back) == sorted(x.module for x in layers)
    for x in layers:
        np.testing.assert_array_equal(back[x.module].up, x.up)
        assert back[x.module].scale == x.scale


def test_unmatched_lora_keys_are_named(xl, tmp_path):
    # Original-layout (sgm) names past the model's blocks.
    check_unmatched_keys_are_named(xl["bundle"], xl["kohya"],
                                   [f"lora_unet_input_blocks_{40 + i}_1_proj_in" for i in range(6)], tmp_path)


@pytest.fixture(scope="module")
def embedded(xl):
    """An SDXL embedding as civitai ships them (clip_l and clip_g, two vectors each, random), and the
    bundle with it (its own sampler: both token tables grew by two rows)."""
    g = torch.Generator().manual_seed(5)
    path = xl["root"] / "xl-style.safetensors"
    tensors = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)}
    safetensors.torch.save_file(tensors, path)
    bundle = lora.apply_adapters(xl["bundle"], embeddings=[(path, None)])
    return dict(path=path, tensors=tensors, bundle=bundle, sampler=pipeline.Sampler(bundle, mesh=xl["mesh"]))


def test_textual_inversion_matches_diffusers(xl, embedded):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(xl["root"] / "model")
    ref.set_progress_bar_config(disable=True)
    t = embedded["tensors"]
    ref.load_textual_inversion(t["clip_l"], token="xl-style", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(t["clip_g"], token="xl-style", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    ours = embedded["bundle"]
    prompt = ["a xl-style circle on a blue background"]
    for tok, theirs in ((ours.tokenizer, ref.tokenizer), (ours.tokenizer_2, ref.tokenizer_2)):
        ids = theirs(ref.maybe_convert_prompt(prompt, theirs), padding="max_length", max_length=77,
                     return_tensors="np").input_ids
        np.testing.assert_array_equal(tok(prompt), ids)
        assert ids.max() == 49409 and tok.expansions == {"xl-style": "xl-style xl-style_1"}
    assert ours.text_encoder_2.config.vocab_size == 49410 and xl["bundle"].text_encoder_2.config.vocab_size == 49408
    want = _reference(xl, [], [], prompt=prompt, pipe=ref)
    got, _ = _ours(xl, sampler=embedded["sampler"], bundle=ours, prompt=prompt)
    assert np.abs(got - want).max() <= 1 / 255
    # Each encoder reads its own vectors: clip_l and clip_g swapped is another image.
    swapped = xl["root"] / "swapped.safetensors"
    safetensors.torch.save_file({"clip_l": t["clip_g"], "clip_g": t["clip_l"]}, swapped)
    other, _ = _ours(xl, sampler=embedded["sampler"], bundle=lora.apply_adapters(xl["bundle"], embeddings=[
        (swapped, "xl-style")]), prompt=prompt)
    assert np.abs(other - want).max() > 0.03


def test_embedding_family_errors(xl, embedded, tmp_path):
    core.write_safetensors({"<sd>": np.ones((1, 32), np.float32)}, tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match="is an SD 1.x/2.x embedding.*takes an SDXL embedding with clip_l and clip_g"):
        lora.apply_adapters(xl["bundle"], embeddings=[(tmp_path / "sd.safetensors", None)])
    with pytest.raises(ValueError, match="is an SDXL embedding \\(clip_l \\+ clip_g\\); it loads on an SDXL model"):
        embeddings.read_embedding(embedded["path"])
    core.write_safetensors({"clip_l": np.ones((1, 32), np.float32), "clip_g": np.ones((1, 48), np.float32)},
                           tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="has clip_g vectors of width 48; this text encoder takes 32"):
        lora.apply_adapters(xl["bundle"], embeddings=[(tmp_path / "wide.safetensors", "<wide>")])


CLI_PROMPT = "a xl-style circle"


def _cli(xl, embedded, out, lora_file, monkeypatch):
    make_mesh = pipeline.make_mesh  # one device: a batch of 1, not one image per fake device
    monkeypatch.setattr(pipeline, "make_mesh", lambda devices=None: make_mesh(devices=jax.devices()[:1]))
    return sample.main(["--model", str(xl["root"] / "model"), "--prompt", CLI_PROMPT, "--steps", "3",
                        "--scheduler", "euler", "--guidance-scale", "5", "--height", str(SIZE), "--width", str(SIZE),
                        "--seed", str(SEED), "--no-compilation-cache", "--embedding", str(embedded["path"]),
                        "--lora", lora_file, "--out", str(out)])


def test_cli_with_lora_and_embedding(xl, embedded, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _cli(xl, embedded, out, f"{xl['kohya']}:0.6", monkeypatch) == 0
    (entry,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert entry["lora"] == [[sample.file_hash(str(xl["kohya"])), 0.6]]
    assert entry["embeddings"] == [[sample.file_hash(str(embedded["path"])), None]]
    from PIL import Image

    got = np.asarray(Image.open(out / entry["file"]).convert("RGB"))
    merged = lora.apply_adapters(embedded["bundle"], loras=[(xl["kohya"], 0.6)])
    embedded["sampler"].update_params(merged.params)
    assert entry["seed"] == SEED
    want = pipeline.to_uint8(embedded["sampler"]([CLI_PROMPT], seeds=[SEED], **KW))
    assert got.std() > 10 and np.abs(got.astype(int) - want[0].astype(int)).max() <= 1


@pytest.mark.slow
def test_cli_names_unmatched_lora_keys(xl, embedded, tmp_path, monkeypatch, capsys):
    """A name this U-Net lacks (SD1's fourth down block) is a usage error, before any image is written."""
    bad = tmp_path / "bad.safetensors"
    core.write_safetensors({"lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight":
                            np.zeros((4, 8), np.float32)}, bad)
    assert _cli(xl, embedded, tmp_path / "out", str(bad), monkeypatch) == 2
    assert "1 of its 1 keys match no layer of this model: 'lora_unet_down_blocks_3_attentions_0_proj_in" in (
        capsys.readouterr().err)
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.slow
def test_refiner_takes_clip_g(xl, embedded, tmp_path_factory, monkeypatch):
    """An SDXL refiner has only the second encoder: an SDXL embedding adds its clip_g rows there, and
    `--refiner` with `--embedding` gives the refiner the token too (the LoRA is the base's only)."""
    root = tmp_path_factory.mktemp("sdxl-refiner")
    build_tiny_sdxl(root / "model", refiner=True)
    refiner = load_components(str(root / "model"))
    ours = lora.apply_adapters(refiner, embeddings=[(embedded["path"], None)])
    assert ours.text_encoder is None and ours.tokenizer is None
    table = ours.params["text_encoder_2"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(np.asarray(table[49408:]), embedded["tensors"]["clip_g"].numpy())
    assert ours.tokenizer_2.expansions == {"xl-style": "xl-style xl-style_1"}
    assert ours.tokenizer_2(["a xl-style"])[0, 2:4].tolist() == [49408, 49409]
    make_mesh = pipeline.make_mesh
    monkeypatch.setattr(pipeline, "make_mesh", lambda devices=None: make_mesh(devices=jax.devices()[:1]))
    out = root / "out"
    argv = ["--model", str(xl["root"] / "model"), "--refiner", str(root / "model"), "--high-noise-frac", "0.75",
            "--prompt", "a xl-style circle", "--steps", "4", "--scheduler", "euler", "--height", str(SIZE),
            "--width", str(SIZE), "--no-compilation-cache", "--embedding", str(embedded["path"]),
            "--lora", f"{xl['kohya']}:0.6", "--out", str(out)]
    assert sample.main(argv) == 0
    (entry,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    from PIL import Image

    assert np.asarray(Image.open(out / entry["file"])).std() > 10


@pytest.mark.slow
def test_kohya_conv_lora_in_the_original_layout_matches_diffusers(xl):
    """The convolution LoRA `b` (resnets, shortcut, down- and upsampler, time_emb_proj) written by save_lora in
    kohya's original-layout names: diffusers' own converter reads it to the PEFT file's image, and so do we."""
    path = lora.save_lora(xl["root"] / "b_kohya.safetensors", lora.read_lora(xl["b"], xl["bundle"].params),
                          fmt="kohya")
    keys = set(core.read_safetensors(path))
    assert {"lora_unet_input_blocks_3_0_op.lora_down.weight", "lora_unet_input_blocks_1_0_emb_layers_1.alpha",
            "lora_unet_middle_block_2_out_layers_3.lora_up.weight"} <= keys
    xl["ref"].load_lora_weights(str(path), adapter_name="b_kohya")
    want = _reference(xl, ["b"], [1.0])
    assert np.abs(want - _reference(xl, ["a"], [0.0])).max() > 0.03
    assert np.abs(_reference(xl, ["b_kohya"], [1.0]) - want).max() <= 1 / 255
    ours, _ = _ours(xl, loras=[(path, 1.0)])
    assert np.abs(ours - want).max() <= 1 / 255
