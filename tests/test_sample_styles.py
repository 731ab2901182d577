"""--style with the bundled shapes model, whose text encoder reads 16 tokens:
a template must not push the prompt's own words out of that context, and
every style must leave the prompt's colours on the image (read back by the
project's adherence evaluator)."""

import numpy as np
import pytest

from t2i_jax import pipeline, sample
from t2i_jax.convert.load import load_components
from t2i_jax.eval.adherence import evaluate
from t2i_jax.tokenizer import Tokenizer

PROMPT = "a red circle on a blue background"  # the example: pixel-art drew it yellow on orange


@pytest.fixture(scope="module")
def pipe():
    return load_components(sample.BUNDLED_MODEL)


def _count(tokenizer):
    return lambda text: len(tokenizer.hf(text, padding=False, truncation=False, verbose=False)["input_ids"])


def test_bundled_context_is_16_tokens_and_help_says_so(pipe, capsys):
    assert pipe.tokenizer.max_length == sample.bundled_context_length() == 16
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "its text encoder reads 16 tokens" in text


@pytest.mark.parametrize("style", sorted(sample.STYLES))
def test_style_keeps_every_word_of_the_prompt_in_the_context(pipe, style):
    count, context = _count(pipe.tokenizer), pipe.tokenizer.max_length
    prompt, negative, styled = sample.style_prompt(PROMPT, "", style, lambda t: count(t) <= context)
    # Every template overflows 16 tokens with this prompt: the prompt is kept whole, unstyled.
    assert count(sample.STYLES[style][0].format(prompt=PROMPT)) > context
    assert (prompt, negative, styled) == (PROMPT, "", False)
    ids = pipe.tokenizer([prompt])[0]
    assert pipe.tokenizer.decode(ids) == PROMPT
    # With SD's 77 tokens the whole template and its negative prompt apply.
    sd = Tokenizer.bundled()
    count77 = _count(sd)
    prompt, negative, styled = sample.style_prompt(PROMPT, "", style, lambda t: count77(t) <= 77)
    assert styled and prompt == sample.STYLES[style][0].format(prompt=PROMPT)
    assert negative == sample.STYLES[style][1]


def test_every_style_keeps_the_prompts_colours(pipe):
    """One batch: the 7 styles' prompts as the CLI builds them for the bundled
    model, one seed each, scored for background and shape colour."""
    count, context = _count(pipe.tokenizer), pipe.tokenizer.max_length
    styles = sorted(sample.STYLES)
    # Style e's job is entry e of a run of 7 copies of the prompt (seed 1000 e):
    # the prompt, negative prompt and seed the CLI would use.
    jobs = [sample.build_jobs([{"prompt": PROMPT}] * len(styles), negative_prompt="", style=style, seed=0,
                              steps=10, guidance_scale=7.5, num_images_per_prompt=1,
                              fits=lambda t: count(t) <= context)[0][e] for e, style in enumerate(styles)]
    prompts, negatives = [j.prompt for j in jobs], [j.negative_prompt for j in jobs]
    sampler = pipeline.Sampler(pipe)
    n = -(-len(prompts) // sampler.num_devices) * sampler.num_devices
    pad = n - len(prompts)
    images = sampler(prompts + prompts[:1] * pad, seeds=[j.seed for j in jobs] + [0] * pad,
                     negative_prompts=negatives + negatives[:1] * pad, steps=10, scheduler="dpmpp_2m",
                     height=32, width=32)
    report = evaluate(list(pipeline.to_uint8(images[: len(prompts)])), [PROMPT] * len(prompts))
    assert report.accuracy["background"] == 1.0 and report.accuracy["color"] == 1.0, [
        (s, r["predicted"]) for s, r in zip(styles, report.per_image)]
    assert np.isfinite(images).all()
