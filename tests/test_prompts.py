"""A1111 prompt syntax and long prompts (t2i_jax.prompts, Sampler.encode, the
CLI's --prompt-syntax): the parser and the chunker against independent
implementations written here, the conditioning against transformers'
CLIPTextModel (torch) with A1111's weighting done by hand, and images."""

import json
import re
import warnings

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

from t2i_jax import pipeline, sample
from t2i_jax import prompts as P
from t2i_jax.convert.load import load_components
from t2i_jax.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("compilation_cache")

SIZE = 16  # pixels; the VAE halves each side: latents 8x8x4

# --------------------------------------------------------------------------
# An independent parser: one pass over the characters, bracket spans
# recorded and applied to the characters afterwards (the module scales
# segments as brackets close, A1111's way).
# --------------------------------------------------------------------------


def ref_parse(text):
    chars, breaks, spans = [], [], []  # literal characters; BREAK cut positions; (start, end, factor)
    stack = {"(": [], "[": []}
    run = []  # the plain text since the last special character: BREAK is found inside one run

    def flush():
        pieces = re.split(r"\s*\bBREAK\b\s*", "".join(run))
        run.clear()
        for i, piece in enumerate(pieces):
            if i:
                breaks.append(len(chars))
            chars.extend(piece)

    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            flush()
            if text[i + 1: i + 2] in ("(", ")", "[", "]", "\\"):
                chars.append(text[i + 1])
                i += 1
            i += 1  # a backslash before anything else is dropped
        elif c in "([":
            flush()
            stack[c].append(len(chars))
            i += 1
        elif c == ":":
            flush()
            m = re.match(r":\s*([+-]?[.\d]+)\s*\)", text[i:])
            if m and stack["("]:
                spans.append((stack["("].pop(), len(chars), float(m[1])))
                i += m.end()
            else:
                chars.append(":")
                i += 1
        elif c in ")]":
            flush()
            o = "(" if c == ")" else "["
            if stack[o]:
                spans.append((stack[o].pop(), len(chars), 1.1 if c == ")" else 1 / 1.1))
            else:
                chars.append(c)
            i += 1
        else:
            run.append(c)
            i += 1
    flush()
    spans += [(s, len(chars), 1.1) for s in stack["("]] + [(s, len(chars), 1 / 1.1) for s in stack["["]]
    weights = []
    for j in range(len(chars)):
        w = 1.0
        for s, e, f in spans:  # in the order the brackets closed: the same float products
            if s <= j < e:
                w *= f
        weights.append(w)
    parts, cuts = [], [0] + breaks + [len(chars)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        segs = []
        for j in range(a, b):
            if segs and segs[-1][1] == weights[j]:
                segs[-1] = (segs[-1][0] + chars[j], weights[j])
            else:
                segs.append((chars[j], weights[j]))
        parts.append(segs or [("", 1.0)])
    return parts


LONG = " ".join(f"word{i % 7}" for i in range(60))  # 120 tokens: 2 chunks of 75
PROMPTS = [
    "a red circle", "", "   ", "an (important) word", "((very)) important", "(((three)))", "[less]", "[[much less]]",
    "(word:1.3)", "(word:0.5)", "(word: 1.25 )", "(word:-0.4) rest", "(word:0)", "a ((nested (deep:1.5)) again) end",
    "[a (mixed) b]", "(a [mixed] b:1.2)", r"\(literal\) and \[too\]", r"a \\ backslash", r"drop\x the slash",
    "(unbalanced", "[unbalanced too", "closes) nothing]", "(a[b)c]", "((a)", "a:b", "(a:b)", "[a:1.3)]",
    "()", "( )", "a () b [] c", "(unnecessary)(parens)", "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "a BREAK b", "BREAK first", "last BREAK", "a BREAK BREAK b", "(in BREAK brackets)", "aBREAKb", "(x)BREAK(y)",
    f"({LONG}:1.1), and more", f"{LONG} BREAK {LONG}", f"[{LONG}] (tail)", "\\(BREAK\\)",
]


def test_parser_matches_an_independent_implementation():
    assert len(PROMPTS) >= 30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in PROMPTS:
            assert P.parse(text) == ref_parse(text), text


def test_parser_gives_a1111s_documented_results():
    # The examples of A1111's parse_prompt_attention docstring.
    assert P.parse("normal text") == [[("normal text", 1.0)]]
    assert P.parse("an (important) word") == [[("an ", 1.0), ("important", 1.1), (" word", 1.0)]]
    assert P.parse(r"\(literal\]") == [[("(literal]", 1.0)]]
    assert P.parse("(unnecessary)(parens)") == [[("unnecessaryparens", 1.1)]]
    with pytest.warns(UserWarning, match="unclosed"):
        assert P.parse("(unbalanced") == [[("unbalanced", 1.1)]]
        got = P.parse("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    # (A1111's float products to the last bit: the brackets multiply in the order they close.)
    assert got == [[("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
                     ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]]
    with pytest.raises(ValueError, match=r"weight '1\.2\.3' is not a number; write e\.g\. \(word:1\.2\)"):
        P.parse("(a:1.2.3)")


def test_unbalanced_brackets_are_named_with_the_prompt():
    with pytest.warns(UserWarning) as caught:
        P.parse("a (red circle")
    (w,) = caught
    assert str(w.message).startswith("prompt 'a (red circle' has unbalanced brackets: 1 unclosed '(' (the rest "
                                     "of the prompt is weighted as if closed at its end)")
    assert P.bracket_problems("x) and ]") == (
        "prompt 'x) and ]' has unbalanced brackets: 2 unmatched ')' ']' (kept as literal text), as AUTOMATIC1111 "
        "reads them; balance them, or escape literal ones as \\( \\) \\[ \\]")
    assert P.bracket_problems(r"(fine) [too] \(escaped") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.parse("(balanced:1.2) [and] this")


# --------------------------------------------------------------------------
# Chunks: an independent chunker over the independent parser's segments
# --------------------------------------------------------------------------


def ref_chunks(tok, text, backtrack=20):
    """Token lists cut into windows of L - 2; a window that would end past the
    comma nearest its end (within `backtrack`) ends after that comma instead."""
    size = tok.max_length - 2
    comma = tok.hf.convert_tokens_to_ids(",</w>")
    chunks = []
    for p, part in enumerate(ref_parse(text)):
        toks, ws = [], []
        for seg, w in part:
            ids = tok.hf(seg, add_special_tokens=False)["input_ids"] if seg else []
            toks += ids
            ws += [w] * len(ids)
        start, skip_first = 0, False
        while len(toks) - start > size:
            window = toks[start: start + size]
            cut = size
            if toks[start + size] != comma:  # a comma arriving at a full chunk just starts the next one
                commas = [j for j, t in enumerate(window) if t == comma and not (j == 0 and skip_first)]
                if commas and size - commas[-1] <= backtrack:
                    cut = commas[-1] + 1
            skip_first = cut == size and toks[start + size] == comma
            chunks.append((toks[start: start + cut], ws[start: start + cut]))
            start += cut
        if len(toks) > start or p < len(ref_parse(text)) - 1 or not chunks:
            chunks.append((toks[start:], ws[start:]))
    ids = np.full((len(chunks), tok.max_length), tok.pad_token_id, np.int32)
    weights = np.ones(ids.shape, np.float32)
    for r, (t, w) in enumerate(chunks):
        ids[r, : len(t) + 2] = [tok.hf.bos_token_id, *t, tok.eos_token_id]
        weights[r, 1: len(t) + 1] = w
    return ids, weights


@pytest.fixture(scope="module")
def tokenizers():
    return {"sd1": Tokenizer.bundled(), "sd2_pad": Tokenizer.bundled(pad_token="!"),
            "bundled_16": Tokenizer.bundled(max_length=16)}


COMMAS = [" ".join(["red"] * 60) + ", " + " ".join(["blue"] * 20),  # comma 15 back: the blues move
          " ".join(["red"] * 50) + ", " + " ".join(["blue"] * 30),  # 25 back: a plain cut
          " ".join(["red"] * 75) + ", blue",  # the comma arrives at a full chunk
          ", ".join(["a b c d e f g"] * 14), "a, b " * 40 + "BREAK " + "c, " * 50]


@pytest.mark.parametrize("name", ["sd1", "sd2_pad", "bundled_16"])
def test_chunks_match_an_independent_chunker(tokenizers, name):
    tok = tokenizers[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in PROMPTS + COMMAS:
            ids, w = P.chunk_tokens(tok, text)
            ref_ids, ref_w = ref_chunks(tok, text)
            np.testing.assert_array_equal(ids, ref_ids, err_msg=text)
            np.testing.assert_array_equal(w, ref_w, err_msg=text)
            assert P.num_chunks(tok, text) == len(ids)


def test_chunk_layout_by_hand(tokenizers):
    tok = tokenizers["sd1"]
    red, blue, comma = (tok.hf.convert_tokens_to_ids(t) for t in ("red</w>", "blue</w>", ",</w>"))
    bos, eos = 49406, 49407
    ids, w = P.chunk_tokens(tok, COMMAS[0])  # 60 reds, comma, 20 blues: cut after the comma
    assert ids.shape == (2, 77)
    assert list(ids[0, :63]) == [bos] + [red] * 60 + [comma, eos] and (ids[0, 63:] == eos).all()
    assert list(ids[1, :22]) == [bos] + [blue] * 20 + [eos]
    ids, _ = P.chunk_tokens(tok, COMMAS[1])  # the comma 25 tokens back: a plain cut at 75
    assert list(ids[0]) == [bos] + [red] * 50 + [comma] + [blue] * 24 + [eos]
    ids, w = P.chunk_tokens(tokenizers["sd2_pad"], "(a b:1.5)")  # SD2: end token, then "!" (id 0)
    assert list(ids[0, :5]) == [bos, 320, 321, eos, 0] and (ids[0, 4:] == 0).all()
    np.testing.assert_array_equal(w[0, :4], np.float32([1, 1.5, 1.5, 1]))
    ids, _ = P.chunk_tokens(tokenizers["bundled_16"], " ".join(["red"] * 20))  # 14 tokens a chunk
    assert ids.shape == (2, 16) and (ids[0, 1:15] == red).all() and (ids[1, 1:7] == red).all()
    assert P.stack(tok, [P.chunk_tokens(tok, "a")], 3)[0][0, 1:].tolist() == [P.empty_chunk(tok).tolist()] * 2
    with pytest.raises(ValueError, match="num_chunks 1 is fewer than the 2 chunks a prompt needs; pass 2"):
        P.stack(tok, [P.chunk_tokens(tok, LONG)], 1)
    with pytest.raises(ValueError, match=r"prompt syntax 'compel' is not one of \['a1111', 'none'\]"):
        P.tokenize(tok, ["a"], "compel")


# --------------------------------------------------------------------------
# Conditioning against transformers' CLIPTextModel, and images
# --------------------------------------------------------------------------


def build_small_pipeline(path):
    """A diffusers pipeline with random parts, smaller than test_pipeline's, saved
    to `path`. The text encoder's final layer norm gets a random bias: with the
    init's zero bias every token's output has mean ~0, and A1111's mean
    restore would divide noise by noise."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(16,), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, sample_size=SIZE)
    text = T.CLIPTextModel(T.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77))
    with torch.no_grad():
        text.final_layer_norm.bias.normal_(0.5, 0.5)
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=Tokenizer.bundled().hf, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return pipe


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("small-sd")
    ref = build_small_pipeline(path)
    pipe = load_components(str(path))
    return ref, str(path), pipeline.Sampler(pipe, mesh=pipeline.make_mesh(devices=jax.devices()[:1]))


def ref_conditioning(text_encoder, tok, texts):
    """A1111's encoding in torch: each prompt's chunks encoded, scaled by their
    weights, brought back to their mean, padded with the empty prompt's chunk
    to the batch's chunk count, joined along the sequence."""
    chunked = [ref_chunks(tok, t) for t in texts]
    k = max(len(ids) for ids, _ in chunked)
    out = []
    with torch.no_grad():
        empty = text_encoder(torch.tensor(P.empty_chunk(tok)[None].astype(np.int64))).last_hidden_state[0]
        for ids, w in chunked:
            z = text_encoder(torch.tensor(ids.astype(np.int64))).last_hidden_state
            scaled = z * torch.tensor(w)[..., None]
            scaled = scaled * (z.mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True))
            out.append(torch.cat(list(scaled) + [empty] * (k - len(ids))).numpy())
    return np.stack(out)


WEIGHTED = ["a (red:1.4) circle", "[[blue]] ((square)) on (a (green:0.6) field)", f"({LONG}:1.2), end",
            f"{LONG} BREAK a (cat:1.3)", "plain words only", "(unclosed weights the rest", "(word:-0.5) x", ""]


def test_conditioning_matches_torch_with_a1111_weighting(small):
    ref, _, sampler = small
    tok = sampler.pipe.tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = np.asarray(sampler.encode(WEIGHTED))
        want = ref_conditioning(ref.text_encoder, tok, WEIGHTED)
    assert ours.shape == want.shape == (len(WEIGHTED), 3 * 77, 32)  # the BREAK prompt needs 3 chunks
    for b, text in enumerate(WEIGHTED):
        err = np.linalg.norm(ours[b] - want[b]) / np.linalg.norm(want[b])
        assert err < 1e-5, (text, err)
    # The weights do act: the weighted prompt differs from its plain twin beyond the tolerance.
    plain = np.asarray(sampler.encode(["a red circle"], num_chunks=3))[0]
    assert np.linalg.norm(ours[0] - plain) / np.linalg.norm(plain) > 1e-2


def test_weight_one_everywhere_is_the_plain_encoding_exactly(small):
    _, _, sampler = small
    a1111 = ["a red circle", "(a red circle:1.0)", r"a \(red\) circle", "((a red circle:1.0):1.0)"]
    plain = ["a red circle", "a red circle", "a (red) circle", "a red circle"]
    np.testing.assert_array_equal(np.asarray(sampler.encode(a1111)), np.asarray(sampler.encode(plain,
                                                                                               prompt_syntax="none")))
    # A weighted neighbour leaves a plain prompt's rows as they are encoded.
    mixed = np.asarray(sampler.encode(["a red circle", "a (red:1.5) circle"]))
    alone = np.asarray(sampler.encode(["a red circle", "a red circle"], prompt_syntax="none"))
    np.testing.assert_array_equal(mixed[0], alone[0])
    assert not np.array_equal(mixed[1], alone[1])
    # And so does the chunking: the chunks of a long unweighted prompt are its chunks as encoded alone.
    ids, _ = P.chunk_tokens(sampler.pipe.tokenizer, LONG)
    joined = np.asarray(sampler.encode([LONG]))[0]
    each = np.asarray(sampler._encode(sampler.params["text_encoder"], ids))
    np.testing.assert_array_equal(joined, each.reshape(-1, each.shape[-1]))


FULL = " ".join(["red"] * 75)  # one whole chunk: the two prompts differ only past it
LONG_A = FULL + " a small green triangle on a yellow field"
LONG_B = FULL + " a large blue square under a black sky"
SHORT = "a red circle"
# The CLI's seeds for entries 0 (SHORT) and 1 (LONG_A) at --seed 0.
SEEDS = {SHORT: 0, LONG_A: 1000, LONG_B: 1000}


@pytest.fixture(scope="module")
def images(small):
    """The three prompts' images under each syntax, in one batch of 8 on all 8
    devices: the programs the CLI test's runs compile (its batches are 8 on 8
    devices too), so it finds them in the compilation cache."""
    sampler = pipeline.Sampler(small[2].pipe)
    batch = [LONG_A, LONG_B, SHORT]
    batch += [SHORT] * (sampler.num_devices - len(batch))
    kw = dict(seeds=[SEEDS[p] for p in batch], steps=3, guidance_scale=7.5, scheduler="euler", height=SIZE,
              width=SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cut under "none"
        return {s: dict(zip(batch, sampler(batch, prompt_syntax=s, **kw))) for s in ("a1111", "none")}


def test_the_words_past_the_context_change_the_image(images):
    a1111, none = images["a1111"], images["none"]
    assert none[LONG_A].std() > 0.05
    # Cut to 77 tokens the two prompts are one; in chunks their tails count.
    np.testing.assert_array_equal(none[LONG_A], none[LONG_B])
    assert np.abs(a1111[LONG_A] - a1111[LONG_B]).max() > 0.02
    # The short prompt padded to its batch's 2 chunks is another image: what
    # the CLI's grouping by chunk count avoids (test below).
    assert np.abs(a1111[SHORT] - none[SHORT]).max() > 0.02


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im, np.int16), json.loads(im.text["parameters"])


def test_cli_prompt_syntax_flag_metadata_warnings_and_chunk_groups(small, images, tmp_path, capsys):
    _, model_dir, _ = small
    out = tmp_path / "out"
    base = ["--model", model_dir, "--out", str(out), "--height", str(SIZE), "--width", str(SIZE), "--steps", "3",
            "--scheduler", "euler", "--no-compilation-cache"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sample.main(base + ["--prompt", SHORT, "--prompt", LONG_A, "--prompt", "a (blue square"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "warning" in x.lower()]
    assert lines == ["warning: prompt 'a (blue square' has unbalanced brackets: 1 unclosed '(' (the rest of the "
                     "prompt is weighted as if closed at its end), as AUTOMATIC1111 reads them; balance them, or "
                     "escape literal ones as \\( \\) \\[ \\]"], err  # and no cut: the long prompt is chunked
    assert not [w for w in caught if "unbalanced" in str(w.message)]  # said once, as a line, not as a UserWarning
    entries = {e["prompt"]: e for e in (json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines())}
    assert {e["prompt_syntax"] for e in entries.values()} == {"a1111"}
    short, meta = _pixels(out / entries[SHORT]["file"])
    assert meta["prompt_syntax"] == "a1111" and meta["seed"] == SEEDS[SHORT]
    # Batched apart from the 2-chunk prompt: the short prompt's image is the
    # one it makes in a batch of 1-chunk prompts (other ones than here).
    assert np.abs(short - pipeline.to_uint8(images["none"][SHORT])).max() <= 1
    long_a, _ = _pixels(out / entries[LONG_A]["file"])
    assert np.abs(long_a - pipeline.to_uint8(images["a1111"][LONG_A])).max() <= 1

    # --prompt-syntax none: another image (its own key), cut, with the warning.
    assert sample.main(base + ["--prompt", LONG_A, "--prompt-syntax", "none", "--seed", "1000"]) == 0
    err = capsys.readouterr().err
    assert "skipping" not in err
    assert "warning: 1 prompt(s) are longer than the text encoder's 77-token context and are cut" in err
    (cut,) = [e for e in (json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines())
              if e["prompt_syntax"] == "none"]
    pixels, meta = _pixels(out / cut["file"])
    assert meta["prompt_syntax"] == "none" and cut["file"] != entries[LONG_A]["file"]
    assert np.abs(pixels - pipeline.to_uint8(images["none"][LONG_A])).max() <= 1


def test_batches_group_jobs_by_chunk_count():
    jobs = [sample.Job(p, "", i, 3, 7.5, entry=i) for i, p in enumerate(["a", "long", "b", "long2", "c"])]
    groups = list(sample.batches(jobs, 4, chunks=lambda j: 2 if j.prompt.startswith("long") else 1))
    assert [[j.prompt for j in g] for g in groups] == [["a", "b", "c"], ["long", "long2"]]
