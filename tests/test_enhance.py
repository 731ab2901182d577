"""`t2i_jax.enhance.Enhancer` on a tiny local GPT-2 with its own BPE tokenizer, text cleaning, and
`python -m t2i_jax.sample --enhance-prompt` end to end."""

import json
import shutil

import pytest
import transformers as T
from PIL import Image
from test_gpt2 import tiny_hf_gpt2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from t2i_jax import enhance, sample

CORPUS = ["a red circle, highly detailed, digital art, trending on artstation, sharp focus",
          "a blue square on a green field, oil painting, by greg rutkowski, 4 k, octane render"]


def tiny_enhancer_folder(path):
    """A transformers GPT-2 (random, 300 tokens) and a byte-level BPE tokenizer trained here, saved as
    `save_pretrained` writes them (model.safetensors, config.json, tokenizer.json)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    special = "<|endoftext|>"
    tok = T.GPT2TokenizerFast(tokenizer_object=bpe, eos_token=special, bos_token=special, unk_token=special)
    tiny_hf_gpt2(vocab_size=300, eos=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_enhancer_folder(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def enhancer(folder):
    return enhance.Enhancer.load(folder, batch_size=4)


def test_clean():
    clean = enhance.clean
    messy = ",, , highly detailed,  by x ,, 4k ,"
    assert clean(" a cat ", messy, hit_limit=False) == "a cat, highly detailed, by x, 4k"
    # At the token budget the last, unfinished phrase goes.
    assert clean("a cat", ", sharp focus, trending on art", hit_limit=True) == "a cat, sharp focus"
    assert clean("a cat", " with a hat, artstation.com by www.x.org/y <lora>\nsecond prompt",
                 hit_limit=False) == "a cat with a hat, by lora"
    assert clean("a cat", "!!;", hit_limit=False) == "a cat"
    # A first line that ended (newline) before the budget ran out is whole; the prompt's own text is kept.
    assert clean("a cat on example.com ", "with a hat, in\nnext, line", hit_limit=True) == \
        "a cat on example.com with a hat, in"


def test_expand_seeded_batch_independent_and_compiled_once(enhancer, folder):
    settings = enhance.GenerationSettings(max_new_tokens=10, temperature=1.0)  # top-k 50, as the CLI
    prompts = ["a red circle", "a blue square on a green field, oil", "a", "sharp focus"]
    seeds = [11, 12, 13, 14]
    out = enhancer.expand(prompts, seeds, settings)
    assert all(o.startswith(p) for o, p in zip(out, prompts))  # the expansion continues the prompt
    assert len(set(out)) == 4 and all(len(o) > len(p) for o, p in zip(out, prompts))
    ids = enhancer.generate_ids([enhancer.encode(p) for p in prompts], seeds, settings)
    assert all(len(r) == 10 for r in ids)  # eos is id 0, which the random model does not pick here
    # Batch 1 (padded to 4 with copies) gives prompt 1 the same expansion; another seed another one.
    assert enhancer.expand(prompts[1:2], seeds[1:2], settings) == out[1:2]
    assert enhancer.expand(prompts[1:2], [99], settings) != out[1:2]
    traces = enhancer.traces
    new = ["an orange cat on a mat, digital", "green"]
    assert [len(enhancer.encode(p)) > 16 for p in new + prompts[1:2]] == [True, False, True]  # one 32 bucket
    enhancer.expand(new, [5, 6], enhance.GenerationSettings(10, 0.7, 50, 1.0, 1.3))
    assert enhancer.traces == traces  # new prompts and settings, same (batch, bucket, max tokens)
    # vocab.json + merges.txt instead of tokenizer.json: the same tokens.
    other = folder.parent / "vocab-merges"
    shutil.copytree(folder, other)
    (other / "tokenizer.json").unlink()
    Tokenizer.from_file(str(folder / "tokenizer.json")).model.save(str(other))
    assert enhance.Enhancer.load(other).encode(prompts[1]) == enhancer.encode(prompts[1])


def test_prompt_too_long_names_the_fix(enhancer):
    with pytest.raises(ValueError, match="exceeds the enhancer's 64 positions; shorten the prompt or lower"):
        enhancer.generate_ids([[5] * 20], [0], enhance.GenerationSettings(max_new_tokens=50))


def _read_manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_cli_enhance_prompt_metadata_and_resume(folder, enhancer, tmp_path, capsys):
    out = tmp_path / "out"
    # The bundled shapes model (32 px): the cheapest text-to-image run there is.
    argv = ["--prompt", "a red circle", "--prompt", "a blue square", "--steps", "2", "--out", str(out),
            "--no-compilation-cache", "--enhance-prompt", "--enhancer", str(folder), "--enhance-max-tokens", "10",
            "--seed", "3"]
    assert sample.main(argv) == 0
    entries = _read_manifest(out)
    assert [e["original_prompt"] for e in entries] == ["a red circle", "a blue square"]
    # The module's enhancer (batch 4, already compiled for these shapes): expansions do not depend on the batch.
    direct = enhancer.expand(["a red circle", "a blue square"], [3, 1003], enhance.GenerationSettings(10))
    assert [e["prompt"] for e in entries] == direct  # image seed S samples the expansion with seed S
    assert all(e["prompt"] != e["original_prompt"] for e in entries)
    assert entries[0]["enhance"] == {"enhancer": str(folder), "max_new_tokens": 10, "temperature": 0.9,
                                     "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.2}
    with Image.open(out / entries[0]["file"]) as im:
        assert im.text["prompt"] == direct[0]
        meta = json.loads(im.text["parameters"])
        assert (meta["prompt"], meta["original_prompt"]) == (direct[0], "a red circle")
    # The rerun needs no enhancer: the keys come from the original prompts and the settings.
    moved = folder.parent / "moved-away"
    folder.rename(moved)
    try:
        capsys.readouterr()
        assert sample.main(argv) == 0
        assert "skipping 2 image(s)" in capsys.readouterr().err
        assert _read_manifest(out) == entries
    finally:
        moved.rename(folder)


def test_cli_offline_default_enhancer_says_how_to_pass_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "o"), "--no-compilation-cache",
            "--enhance-prompt"]
    assert sample.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--enhancer {enhance.DEFAULT_ENHANCER}" in err and "--enhancer /path/to/folder" in err
    assert sample.main(argv[:-1] + ["--enhance-prompt", "--enhance-temperature", "-1"]) == 2
    assert "--enhance-temperature" in capsys.readouterr().err
    assert sample.main(argv[:-1] + ["--enhance-max-tokens", "9"]) == 2
    assert "--enhance-max-tokens only act(s) with --enhance-prompt" in capsys.readouterr().err
