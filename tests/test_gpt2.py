"""The Flax GPT-2, its converter and the KV-cache generator against transformers' PyTorch GPT-2."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from t2i_jax import enhance
from t2i_jax.convert import core
from t2i_jax.convert import gpt2 as convert_gpt2
from t2i_jax.models import gpt2

VOCAB = 311
EOS = VOCAB - 1


def tiny_hf_gpt2(vocab_size=VOCAB, eos=EOS, **kw):
    """A random transformers GPT2LMHeadModel with odd sizes. initializer_range 0.2 (not 0.02) spreads the
    logits, so argmax never hinges on a 1e-6 difference between torch and XLA."""
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=36, n_head=3, n_layer=2,
                          initializer_range=0.2, bos_token_id=eos, eos_token_id=eos, **kw)
    return T.GPT2LMHeadModel(config).eval()


def left_padded(lengths, width, seed=0):
    """Random prompts of `lengths` tokens, left-padded with EOS to `width`: (ids, mask) int64."""
    rs = np.random.RandomState(seed)
    ids = np.full((len(lengths), width), EOS)
    mask = np.zeros((len(lengths), width), np.int64)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = rs.randint(0, EOS, n)
        mask[r, width - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_hf_gpt2()
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    cfg = gpt2.GPT2Config.from_hf(hf.config.to_dict())
    params, report = convert_gpt2.convert_state(state, cfg)
    assert report.ok and report.loaded == 4 + 12 * cfg.n_layer  # wte, wpe, ln_f x2; 12 tensors per block
    module = gpt2.GPT2LMHeadModel(cfg)
    # One generator for the module's tests: its programs are shared (fewer compilations, a faster suite).
    return hf, module, params, enhance.Generator(module, eos_token_id=None, pad_token_id=EOS)


def test_logits_match_transformers_with_padding(tiny):
    hf, module, params, _ = tiny
    ids, mask = left_padded([10, 6, 3], 10)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)).logits
    out, cache = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(positions),
                              gpt2.causal_mask(jnp.asarray(mask), jnp.arange(10)))
    assert cache is None
    valid = mask.astype(bool)  # padded query rows attend to nothing real; their logits are never read
    ref = ref.numpy()[valid]
    err = np.linalg.norm(np.asarray(out)[valid] - ref) / np.linalg.norm(ref)
    assert err < 1e-5, err


def test_untied_head_and_inverse_layer_scaling():
    hf = tiny_hf_gpt2(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True)
    with torch.no_grad():
        hf.lm_head.weight.normal_()  # differs from wte, so using wte would fail
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    cfg = gpt2.GPT2Config.from_hf(hf.config.to_dict())
    params, _ = convert_gpt2.convert_state(state, cfg)
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    out, _ = gpt2.GPT2LMHeadModel(cfg).apply({"params": params}, jnp.asarray(ids), jnp.arange(7)[None],
                                             gpt2.causal_mask(jnp.ones((2, 7), bool), jnp.arange(7)))
    assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 1e-5


def test_greedy_matches_transformers_generate_token_for_token(tiny):
    hf, _, params, gen = tiny
    ids, mask = left_padded([5, 9, 2, 7], 16)
    greedy = enhance.GenerationSettings(max_new_tokens=40, temperature=0, repetition_penalty=1.0)
    gen.eos_token_id = None
    free, steps = gen(params, ids, mask, np.arange(4), greedy)
    assert steps == 40
    # An EOS the greedy path meets mid-way: that row stops (pads after), the others go on.
    eos = int(free[0, 12])
    kw = dict(attention_mask=torch.tensor(mask), max_new_tokens=40, do_sample=False, pad_token_id=EOS)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), eos_token_id=eos, **kw).numpy()[:, 16:]
    assert (ref == EOS).any(), "the chosen EOS should end a row early"
    gen.eos_token_id = eos
    tokens, steps = gen(params, ids, mask, np.arange(4), greedy)
    np.testing.assert_array_equal(tokens[:, :ref.shape[1]], ref)
    assert (tokens[:, ref.shape[1]:] == EOS).all() and steps == ref.shape[1]
    # Repetition penalty (greedy): the same tokens as transformers' processor.
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), eos_token_id=None, repetition_penalty=1.7, **kw).numpy()[:, 16:]
    gen.eos_token_id = None
    tokens, _ = gen(params, ids, mask, np.arange(4), enhance.GenerationSettings(40, 0, repetition_penalty=1.7))
    np.testing.assert_array_equal(tokens, ref)
    assert (tokens != free).any()  # the penalty changed something
    # Top-k 1 sampling is greedy, whatever the seeds and temperature.
    tokens_k1, _ = gen(params, ids, mask, np.arange(4) + 7,
                       enhance.GenerationSettings(40, temperature=1.3, top_k=1, repetition_penalty=1.7))
    np.testing.assert_array_equal(tokens_k1, ref)


def test_sampling_filters_match_transformers_warpers():
    rs = np.random.RandomState(0)
    logits = rs.randn(4, 50).astype(np.float32) * 3
    seen = np.zeros((4, 50), bool)
    seen[:, :5] = True
    for top_k, top_p, temp in [(7, 1.0, 0.7), (0, 0.8, 1.0), (10, 0.5, 1.5), (0, 1.0, 1.0)]:
        values, ids = enhance.candidates(jnp.asarray(logits), jnp.asarray(seen), temperature=temp, top_k=top_k,
                                         top_p=top_p, repetition_penalty=1.3, use_top_p=top_p < 1)
        ours = np.full_like(logits, -np.inf)
        np.put_along_axis(ours, np.asarray(ids), np.asarray(values), axis=-1)
        procs = [T.RepetitionPenaltyLogitsProcessor(1.3), T.TemperatureLogitsWarper(temp)]
        procs += [T.TopKLogitsWarper(top_k)] if top_k else []
        procs += [T.TopPLogitsWarper(top_p)] if top_p < 1 else []
        ref = torch.tensor(logits)
        for p in procs:
            ref = p(torch.arange(5).repeat(4, 1), ref)
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref.numpy()))
        kept = ~np.isinf(ours)
        np.testing.assert_allclose(ours[kept], ref.numpy()[kept], rtol=1e-6)
        assert kept.sum() < kept.size or (top_k == 0 and top_p == 1)


def test_seeded_rows_independent_of_batch_and_no_recompile(tiny):
    _, _, params, gen = tiny
    gen.eos_token_id = None
    settings = enhance.GenerationSettings(40, temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.1)
    ids, mask = left_padded([5, 9, 2, 7], 16)
    seeds = np.array([3, 4, 5, 6])
    tokens, _ = gen(params, ids, mask, seeds, settings)
    assert len({tuple(r) for r in tokens}) == 4
    # Row 2 alone, padded to another width, gives the same tokens (and a different seed does not).
    ids1, mask1 = ids[2:3, -8:], mask[2:3, -8:]
    alone, _ = gen(params, ids1, mask1, seeds[2:3], settings)
    np.testing.assert_array_equal(alone[0], tokens[2])
    other, _ = gen(params, ids1, mask1, seeds[2:3] + 1, settings)
    assert (other[0] != tokens[2]).any()
    traces = gen.traces
    # New prompts, EOS and settings (but top_k, which is static) at the same shapes reuse the program.
    ids2, mask2 = left_padded([3, 16, 1, 8], 16, seed=5)
    gen.eos_token_id = 5
    gen(params, ids2, mask2, seeds + 10, enhance.GenerationSettings(40, 0.5, 20, 0.8, 1.4))
    assert gen.traces == traces


def _save_torch_bin(hf, folder, prefix=True):
    folder.mkdir()
    hf.config.save_pretrained(folder)
    state = {k: v for k, v in hf.state_dict().items() if prefix or k.startswith("transformer.")}
    if not prefix:
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    # Buffers old transformers versions saved: ignored on load.
    state["transformer.h.0.attn.bias" if prefix else "h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    torch.save(state, folder / "pytorch_model.bin")


def test_loader_safetensors_bin_prefix_and_strict_report(tiny, tmp_path):
    hf, _, params, _ = tiny
    hf.save_pretrained(tmp_path / "st")
    _save_torch_bin(hf, tmp_path / "bin")
    _save_torch_bin(hf, tmp_path / "bare", prefix=False)
    for name in ("st", "bin", "bare"):
        module, loaded, folder = convert_gpt2.load_gpt2(tmp_path / name)
        assert folder == tmp_path / name and module.config.n_embd == 36
        for path in (("transformer", "h_1", "attn", "c_attn", "kernel"), ("transformer", "wte", "embedding")):
            a, b = loaded, params
            for p in path:
                a, b = a[p], b[p]
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Conv1D weight [in, out] is the Flax kernel as is (no transpose).
    np.testing.assert_array_equal(params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"],
                                  hf.transformer.h[0].mlp.c_fc.weight.detach().numpy())
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    state["transformer.h.0.attn.c_atn.weight"] = state.pop("transformer.h.0.attn.c_attn.weight")
    with pytest.raises(core.ConversionError) as e:
        convert_gpt2.convert_state(state, module.config, source="bad.safetensors")
    assert e.value.report.missing == ["transformer.h_0.attn.c_attn.weight"]
    assert e.value.report.unexpected == ["transformer.h.0.attn.c_atn.weight"]
    assert "bad.safetensors" in str(e.value)


def test_config_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="activation_function 'swish'"):
        gpt2.GPT2Config.from_hf({"activation_function": "swish"})
    with pytest.raises(ValueError, match="add_cross_attention"):
        gpt2.GPT2Config.from_hf({"add_cross_attention": True})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(core.ConversionError, match="model_type 'llama'"):
        convert_gpt2.load_gpt2(tmp_path)


@pytest.mark.slow
def test_gpt2_small_size_logits_and_greedy():
    """GPT-2 small's shapes (124M, random weights): logits and 20 greedy tokens as transformers."""
    torch.manual_seed(0)
    hf = T.GPT2LMHeadModel(T.GPT2Config()).eval()
    cfg = gpt2.GPT2Config.from_hf(hf.config.to_dict())
    params, _ = convert_gpt2.convert_state({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    rs = np.random.RandomState(0)
    ids = rs.randint(0, 50256, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)).logits
        ref_tokens = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20,
                                 do_sample=False, pad_token_id=50256, eos_token_id=None).numpy()[:, 12:]
    module = gpt2.GPT2LMHeadModel(cfg)
    out, _ = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(positions),
                          gpt2.causal_mask(jnp.asarray(mask), jnp.arange(12)))
    valid = mask.astype(bool)
    ref = ref.numpy()[valid]
    assert np.linalg.norm(np.asarray(out)[valid] - ref) / np.linalg.norm(ref) < 1e-5
    gen = enhance.Generator(module, eos_token_id=None, pad_token_id=50256)
    tokens, _ = gen(params, ids, mask, np.arange(2), enhance.GenerationSettings(20, 0, repetition_penalty=1.0))
    np.testing.assert_array_equal(tokens, ref_tokens)
