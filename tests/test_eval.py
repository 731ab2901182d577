"""Shapes prompt adherence, CLIP score (against transformers PyTorch) and the `python -m t2i_jax.eval` CLI."""

import dataclasses
import itertools
import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

from t2i_jax.data.shapes import COLORS, SHAPES, SIZES, ShapesSource, render, shapes_caption
from t2i_jax.eval import __main__ as cli
from t2i_jax.eval import adherence
from t2i_jax.eval.adherence import ShapesPrompt, analyze_image, evaluate, parse_caption

# --------------------------------------------------------------------------
# Caption parser
# --------------------------------------------------------------------------


def test_parser_round_trips_every_caption():
    n = 0
    for shape, color, size, bg, template in itertools.product(SHAPES, COLORS, SIZES, COLORS, range(3)):
        text = shapes_caption(shape, color, size, bg, template=template)
        assert parse_caption(text) == ShapesPrompt(shape, color, size, bg), text
        n += 1
    assert n == 3 * 8 * 3 * 8 * 3


@pytest.mark.parametrize("text, expected", [
    ("A LARGE Blue Square, on a White background!", ShapesPrompt("square", "blue", "large", "white")),
    ("cinematic photo of a red circle, 35mm photograph, film", ShapesPrompt("circle", "red")),
    ("a green background with a triangle", ShapesPrompt("triangle", None, None, "green")),
    ("medium triangle", ShapesPrompt("triangle", None, "medium")),
    ("a circle next to a square", None),
    ("a photo of a cat", None),
])
def test_parser_free_wording(text, expected):
    assert parse_caption(text) == expected


# --------------------------------------------------------------------------
# Adherence on rendered images
# --------------------------------------------------------------------------


def degrade(image, rng, sigma=8.0, blur=0.6):
    """Gaussian blur (PIL radius = sigma in pixels) then gaussian noise of `sigma`/255."""
    x = image if not blur else np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)))
    x = x.astype(np.float64) + rng.normal(0.0, sigma, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def shapes_set(resolution, n=150):
    """Train and holdout records, captions in all three phrasings."""
    recs = [r for split, k in (("train", n), ("holdout", n // 3))
            for r in (ShapesSource(resolution, split=split, seed=3)[i] for i in range(k))]
    return recs, [r["image"] for r in recs], [r["captions"][i % 3] for i, r in enumerate(recs)]


def every_combination(resolution, seed=0):
    """One image of each (shape, colour, size, background != colour), at a random position."""
    rng = np.random.default_rng(seed)
    out = []
    for shape, color, size, bg in itertools.product(SHAPES, COLORS, SIZES, COLORS):
        if bg == color:
            continue
        half = SIZES[size] * resolution / 2
        center = tuple(rng.uniform(half + 1, resolution - half - 1, 2))
        out.append((render(shape, color, size, bg, center, resolution), shapes_caption(shape, color, size, bg)))
    return [im for im, _ in out], [c for _, c in out]


ALL = ("background", "color", "shape", "size", "all")


@pytest.mark.parametrize("resolution", [32, 64])
def test_ground_truth_scores_100(resolution):
    recs, images, captions = shapes_set(resolution)
    assert {r["shape"] for r in recs} == set(SHAPES) and {r["size"] for r in recs} == set(SIZES)
    assert {r["color"] for r in recs} == {r["background"] for r in recs} == set(COLORS)
    report = evaluate(images, captions)
    assert report.num_parsed == report.num_images == len(recs)
    assert report.accuracy == {a: 1.0 for a in ALL}, report.accuracy
    images, captions = every_combination(resolution)
    assert len(images) == 3 * 8 * 3 * 7
    assert evaluate(images, captions).accuracy == {a: 1.0 for a in ALL}


def _swap(caption, attribute):
    """The caption with one attribute replaced by a wrong value (still a valid shapes caption)."""
    p = parse_caption(caption)
    if attribute == "shape":
        new = dataclasses.replace(p, shape={"circle": "square", "square": "triangle", "triangle": "circle"}[p.shape])
    elif attribute == "size":
        new = dataclasses.replace(p, size={"small": "large", "medium": "small", "large": "medium"}[p.size])
    elif attribute == "color":
        new = dataclasses.replace(p, color=next(c for c in COLORS if c not in (p.color, p.background)))
    else:
        new = dataclasses.replace(p, background=next(c for c in COLORS if c not in (p.color, p.background)))
    return shapes_caption(new.shape, new.color, new.size, new.background)


@pytest.mark.parametrize("attribute", ["shape", "color", "background", "size"])
def test_wrong_captions_score_zero_on_that_attribute(attribute):
    _, images, captions = shapes_set(32, n=90)
    report = evaluate(images, [_swap(c, attribute) for c in captions])
    expected = {a: 1.0 for a in ALL}
    expected[attribute] = expected["all"] = 0.0
    assert report.accuracy == expected
    wrong = report.per_image[0]
    assert wrong["correct"][attribute] is False and wrong["predicted"][attribute] != wrong["expected"][attribute]


@pytest.mark.parametrize("resolution, blurs", [(32, (0.0, 0.6)), (64, (0.0, 0.6, 1.0))])
def test_robust_to_noise_and_blur(resolution, blurs):
    """sigma 8/255 noise, alone and after a gaussian blur: >= 95% on every attribute (measured: 100%).

    The 1 px blur runs at 64 px only: at 32 px a small shape is 6 px across
    and 1 px of blur makes discs, squares and triangles alike (~90% there).
    """
    rng = np.random.default_rng(resolution)
    _, images, captions = shapes_set(resolution)
    for blur in blurs:
        report = evaluate([degrade(im, rng, 8.0, blur) for im in images], captions)
        assert min(report.accuracy.values()) >= 0.95, (blur, report.accuracy)


def test_large_and_float_images():
    """512 px images go through the box downsampling; float [0, 1] input is accepted."""
    im = render("triangle", "purple", "medium", "blue", (250.0, 300.0), 512)
    pred = analyze_image(im)
    assert (pred["shape"], pred["color"], pred["size"], pred["background"]) == ("triangle", "purple", "medium", "blue")
    assert analyze_image(im.astype(np.float32) / 255)["shape"] == "triangle"


def test_blank_image_has_no_shape():
    blank = np.full((32, 32, 3), COLORS["green"], np.uint8)
    pred = analyze_image(blank)
    assert pred["background"] == "green" and pred["shape"] is None and pred["color"] is None
    report = evaluate([blank], ["a small red circle on a green background"])
    assert report.accuracy == {"background": 1.0, "color": 0.0, "shape": 0.0, "size": 0.0, "all": 0.0}


def test_lab_reference_values():
    # sRGB red and white in CIELAB (D65), as published colour calculators give them.
    np.testing.assert_allclose(adherence.srgb_to_lab([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.02)
    np.testing.assert_allclose(adherence.srgb_to_lab([255, 255, 255]), [100.0, 0.0, 0.0], atol=0.01)


def test_unparsed_prompts_are_left_out_and_table():
    images, captions = every_combination(32)
    report = evaluate(images[:4] + images[4:6], captions[:4] + ["a photo of a cat", "a landscape"])
    assert (report.num_images, report.num_parsed, report.counts["shape"]) == (6, 4, 4)
    assert report.per_image[4]["parsed"] is False and "correct" not in report.per_image[4]
    table = adherence.format_adherence_table({"ours": report})
    assert table.splitlines()[0].split() == ["background", "color", "shape", "size", "all", "parsed"]
    assert table.splitlines()[1].split() == ["ours", "100.0", "100.0", "100.0", "100.0", "100.0", "4/6"]
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        evaluate(images[:2], captions[:1])


# --------------------------------------------------------------------------
# CLIP score against transformers
# --------------------------------------------------------------------------

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random transformers CLIPModel with the real CLIP vocabulary size (so the
    bundled tokenizer's ids are valid) and a preprocessor config with its own mean/std."""
    import torch
    import transformers as T
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    text = T.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8, projection_dim=16)
    model = T.CLIPModel(T.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                     projection_dim=16)).eval()
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      image_mean=MEAN, image_std=STD)
    processor.save_pretrained(path)
    return model, processor, path


@pytest.fixture(scope="module")
def scorer(tiny_clip):
    from t2i_jax.eval.clip_score import CLIPScorer

    return CLIPScorer(tiny_clip[2], batch_size=4)


def _photos(n=5, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(50, 37), (37, 61), (32, 32), (64, 64), (40, 90)]
    return [rng.integers(0, 256, shapes[i % len(shapes)] + (3,), dtype=np.uint8) for i in range(n)]


def test_preprocessing_matches_transformers(tiny_clip, scorer, tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from t2i_jax.eval.clip_score import CLIPPreprocess

    _, processor, _ = tiny_clip
    assert scorer.preprocess.mean == tuple(MEAN) and scorer.preprocess.std == tuple(STD)
    for im in _photos():  # portrait, landscape and square
        ref = processor(im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = scorer.preprocess(im)
        assert ours.shape == (32, 32, 3)
        assert np.abs(ours - ref).max() <= 1e-5
    # A folder without preprocessor_config.json: OpenAI's defaults.
    default = CLIPPreprocess.from_folder(tmp_path, image_size=32)
    ref_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    im = _photos(1, seed=1)[0]
    ref = ref_processor(im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert np.abs(default(im) - ref).max() <= 1e-5


def test_clip_score_matches_torch(tiny_clip, scorer):
    import torch

    model, processor, _ = tiny_clip
    images = _photos(6)
    prompts = ["a red circle", "a small blue square on a white background", "x", "a photo of a cat",
               "triangle", "a large yellow triangle on a black background"]
    ours = scorer.scores(images, prompts)
    ids = scorer.tokenizer(prompts)
    pixels = np.stack([processor(im, return_tensors="np")["pixel_values"][0] for im in images])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output.double()
        txt = model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long)).pooler_output.double()
    cos = torch.nn.functional.cosine_similarity(img, txt).numpy()
    ref = 100 * np.maximum(cos, 0)
    assert (cos < 0).any() and (cos > 0).any()  # both sides of the clip at 0 are exercised
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-5
    assert np.all(ours[cos < 0] == 0)
    summary = scorer.evaluate(images, prompts)
    assert summary["clip_score"] == pytest.approx(ref.mean(), rel=1e-5) and summary["num_images"] == 6


def test_clip_s_weight():
    from t2i_jax.eval.clip_score import clip_score_from_cosine

    cos = np.array([0.3, -0.2, 0.0])
    np.testing.assert_allclose(clip_score_from_cosine(cos), [30.0, 0.0, 0.0])
    np.testing.assert_allclose(clip_score_from_cosine(cos, weight=2.5), [0.75, 0.0, 0.0])


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _sampler_folder(path):
    """A folder as `python -m t2i_jax.sample` writes it: PNGs (with text chunks) and manifest.jsonl lines."""
    from t2i_jax import sample

    path.mkdir()
    src = ShapesSource(64, split="eval", seed=5)
    prompts = [src[i]["captions"][i % 3] for i in range(6)]
    images = [src[i]["image"] for i in range(6)]
    prompts[5] = _swap(prompts[5], "shape")  # one image that does not match its prompt
    prompts.append("a photo of a cat")
    images.append(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    common = {"model": "tiny", "scheduler": "ddim", "height": 64, "width": 64, "dtype": "fp32"}
    lines = []
    for i, (prompt, im) in enumerate(zip(prompts, images)):
        job = sample.Job(prompt=prompt, negative_prompt="", seed=i, steps=2, guidance_scale=7.5, entry=i)
        name = sample.file_name(job, common)
        meta = {**dataclasses.asdict(job), **common}
        sample.save_png(path / name, im, {"parameters": meta, "prompt": prompt, "software": "t2i_jax"})
        lines.append(json.dumps({"file": name, "key": job.key(common), **meta}))
    (path / "manifest.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:30] + "\n")  # last line cut by a kill
    return prompts, images


def test_cli_scores_a_sampler_folder(tiny_clip, scorer, tmp_path, capsys):
    run_dir = tmp_path / "run"
    prompts, images = _sampler_folder(run_dir)
    out = tmp_path / "scores" / "eval.json"
    assert cli.main([str(run_dir), "--clip", str(tiny_clip[2]), "--json", str(out), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "6 of 7 prompts parsed as shapes prompts" in printed
    assert "skipped 1 manifest line(s)" in printed
    assert "background       color       shape        size         all" in printed
    assert "100.0       100.0        83.3       100.0        83.3         6/7" in printed
    result = json.loads(out.read_text())
    acc = result["adherence"]["accuracy"]
    assert acc == {"background": 1.0, "color": 1.0, "shape": pytest.approx(5 / 6), "size": 1.0,
                   "all": pytest.approx(5 / 6)}
    rows = result["adherence"]["per_image"]
    assert [r["correct"]["shape"] for r in rows] == [True] * 5 + [False]
    assert rows[0]["file"].startswith("0000-000-") and rows[0]["file"].endswith(".png")
    ref = scorer.scores(images, prompts)
    assert result["clip"]["clip_score"] == pytest.approx(ref.mean(), rel=1e-6)
    assert [r["score"] for r in result["clip"]["per_image"]] == pytest.approx(list(ref), rel=1e-6)
    assert f"CLIP score (100 * max(cos, 0), {tiny_clip[2]}): {ref.mean():.2f}" in printed

    # Without a CLIP: adherence only, JSON next to the images.
    assert cli.main([str(run_dir), "--no-clip"]) == 0
    assert "CLIP score: skipped" in capsys.readouterr().out
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["clip"] is None and result["adherence"]["num_parsed"] == 6


def _error(capsys, argv):
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _sampler_folder(run_dir)
    files = sorted(p.name for p in run_dir.glob("*.png"))

    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error(capsys, [str(empty)])
    assert f"no manifest.jsonl in {empty}" in err and "python -m t2i_jax.sample" in err
    assert "does not exist" in _error(capsys, [str(tmp_path / "nowhere")])
    err = _error(capsys, [str(run_dir), "--clip", str(tmp_path / "no_clip")])
    assert f"{tmp_path / 'no_clip'}' is neither an existing file or folder nor a hub id" in err

    missing = tmp_path / "missing"
    shutil.copytree(run_dir, missing)
    (missing / files[1]).unlink()
    (missing / files[3]).unlink()
    err = _error(capsys, [str(missing)])
    assert f"2 of 7 images in {missing / 'manifest.jsonl'} are missing, first {missing / files[1]}" in err

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / files[2]).write_bytes(b"not a png")
    err = _error(capsys, [str(broken)])
    assert f"cannot read {broken / files[2]}" in err

    no_prompt = tmp_path / "no_prompt"
    no_prompt.mkdir()
    (no_prompt / "manifest.jsonl").write_text(json.dumps({"file": "a.png"}) + "\n")
    assert 'line 1 has no "file" and "prompt"' in _error(capsys, [str(no_prompt)])


def test_largest_component_is_4_connected_and_first_on_ties():
    m = np.zeros((7, 7), bool)
    m[0, 0] = m[1, 1] = m[2, 2] = m[3, 3] = True  # a diagonal: four components of one pixel, 4-connected
    m[5, 0:3] = True  # three pixels in a row
    m[6, 4:7] = True  # as many, later in raster order
    want = np.zeros_like(m)
    want[5, 0:3] = True
    got = adherence._largest_component(m)
    assert got.dtype == bool and (got == want).all()
    assert not adherence._largest_component(np.zeros((3, 3), bool)).any()
