"""The bundled CLIP tokenizer: published ids, padding, truncation, folders."""

import json

import numpy as np
import pytest

from t2i_jax import tokenizer as tok


@pytest.fixture(scope="module")
def bundled():
    return tok.Tokenizer.bundled()


def test_vocabulary_size_and_special_ids():
    vocab, merges = tok.bundled_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab[tok.BOS] == 49406 and vocab[tok.EOS] == 49407


def test_known_ids(bundled):
    # Ids of OpenAI CLIP's tokenizer (as in `openai/clip-vit-large-patch14`).
    ids = bundled(["a photo of a cat", "A  Photo of a DOG!"])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    # Lower-cased, whitespace collapsed; "!" is 256.
    assert ids[1, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 256, 49407]
    # SD1.x pads with the end token.
    assert (ids[0, 7:] == 49407).all()


def test_truncation_warns_with_count(bundled):
    prompt = " ".join(["cat"] * 80)  # 80 tokens + start + end = 82
    with pytest.warns(UserWarning, match=r"82 tokens.*last 5 tokens were cut"):
        ids = bundled(prompt)
    assert ids.shape == (1, 77)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0, 1:76] == 2368).all()


def test_no_warning_at_exactly_77(bundled, recwarn):
    bundled(" ".join(["cat"] * 75))
    assert not [w for w in recwarn if "cut" in str(w.message)]


def test_sd_style_folder_with_vocab_and_merges(tmp_path, bundled):
    """SD model folders hold vocab.json + merges.txt; SD2's pads with '!'."""
    vocab, merges = tok.bundled_vocab()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "!",
        "bos_token": tok.BOS, "eos_token": tok.EOS, "unk_token": tok.EOS}))
    folder = tok.Tokenizer.from_pretrained(tmp_path)
    prompts = ["an astronaut riding a horse, 4k, trending on artstation", "a photo of a cat"]
    a, b = folder(prompts), bundled(prompts)
    for row in range(2):
        n = int((b[row] != 49407).sum()) + 1  # up to and including the end token
        assert a[row, :n].tolist() == b[row, :n].tolist()
    assert folder.pad_token_id == 0 and a[1, 7:].tolist() == [0] * 70


def test_save_and_reload(tmp_path, bundled):
    bundled.save_pretrained(tmp_path)
    again = tok.Tokenizer.from_pretrained(tmp_path)
    prompt = "a small yellow triangle on a green background"
    assert (again(prompt) == bundled(prompt)).all()
    assert again.decode(bundled(prompt)[0]) == prompt


AWKWARD = [
    "",
    " ",
    "a photo of a cat",
    "Ünïcödé café naïve — “quotes” and ‘single’ ½ ² 𝔘𝔫𝔦",
    "日本語のテキストと中文字符",
    "emoji 🐱🚀👩‍👩‍👧 mixed",
    "punctuation!!! ... ,,, ??? ;-) (parens) [brackets] {braces} #hash @at $5.00 100%",
    "it's they're we've I'm you'll he'd don't",
    "tabs\tand\nnewlines\r\n   multiple   spaces",
    "<|startoftext|> literal specials <|endoftext|>",
    "numbers 1234567890 3.14159 1e-5 0x1F",
    "x" * 300,
    " ".join(["very long prompt with many words"] * 20),
]


def test_awkward_strings_match_transformers(tmp_path, bundled):
    """Our ids equal a transformers CLIPTokenizer read from vocab.json/merges.txt
    files written from the same vocabulary, padded/truncated to 77 by transformers."""
    from transformers import CLIPTokenizer

    vocab, merges = tok.bundled_vocab()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    ref = CLIPTokenizer.from_pretrained(tmp_path)
    expected = ref(AWKWARD, padding="max_length", max_length=77, truncation=True)["input_ids"]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = bundled(AWKWARD)
    for prompt, a, b in zip(AWKWARD, ours.tolist(), expected):
        assert a == b, prompt
    assert ours[0, :2].tolist() == [49406, 49407]  # empty prompt: start, end
