"""`python -m t2i_jax.sample` end to end on a tiny local model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from t2i_jax import sample
from test_pipeline import SIZE, build_tiny_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd-cli")
    build_tiny_pipeline(path)
    return str(path)


def _args(model_dir, out, *extra):
    return ["--model", model_dir, "--out", str(out), "--height", str(SIZE), "--width", str(SIZE),
            "--steps", "3", "--no-compilation-cache", *extra]


def _manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_generate_files_metadata_manifest_and_resume(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _args(model_dir, out, "--prompt", "a red circle", "--prompt", "a blue square",
                 "--num-images-per-prompt", "2", "--batch-size", "3", "--seed", "100", "--scheduler", "euler")
    assert sample.main(argv) == 0
    err = capsys.readouterr()
    assert f"images in {out.resolve()}" in err.out
    assert "images/s per device" in err.err and "model: " in err.err
    entries = _manifest(out)
    assert len(entries) == 4
    assert [(e["prompt"], e["seed"]) for e in entries] == [
        ("a red circle", 100), ("a red circle", 101), ("a blue square", 102), ("a blue square", 103)]
    pngs = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert pngs == sorted(e["file"] for e in entries)
    with Image.open(out / entries[2]["file"]) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        meta = json.loads(im.text["parameters"])
        assert im.text["prompt"] == "a blue square"
    assert meta["seed"] == 102 and meta["steps"] == 3 and meta["scheduler"] == "euler"
    assert meta["guidance_scale"] == 7.5 and meta["height"] == SIZE and meta["model"] == model_dir
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * SIZE, 2 * SIZE)
    # Different seeds give different images.
    a, b = (np.asarray(Image.open(out / e["file"]), np.float32) for e in entries[:2])
    assert np.abs(a - b).mean() > 1.0

    # Rerun: nothing to do.
    assert sample.main(argv) == 0
    assert "skipping 4 image(s)" in capsys.readouterr().err
    assert len(_manifest(out)) == 4

    # A partial run: one image lost (killed before its PNG was renamed into
    # place leaves only a temporary file), and a new prompt added.
    lost = out / entries[1]["file"]
    lost_bytes = lost.read_bytes()
    lost.unlink()
    (out / f".{lost.name}.abc.tmp").write_bytes(b"half")
    assert sample.main(argv + ["--prompt", "a green triangle"]) == 0
    err = capsys.readouterr().err
    assert "skipping 3 image(s)" in err
    final = {e["file"]: e for e in sample.read_manifest(out / "manifest.jsonl").values()}
    assert len(final) == 6  # the 4 first images (one remade) and 2 new
    assert lost.read_bytes() == lost_bytes  # same job, same image, same file name
    assert sum(e["prompt"] == "a green triangle" for e in final.values()) == 2


def test_prompts_file_jsonl_styles_and_img2img(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "a cat", "seed": 7, "steps": 2, "guidance": 1.0}) + "\n"
        + json.dumps({"prompt": "a dog", "negative_prompt": "blurry"}) + "\n")
    init = tmp_path / "init.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 48, 3), np.uint8)).save(init)
    out = tmp_path / "out"
    assert sample.main(_args(model_dir, out, "--prompts-file", str(prompts), "--style", "anime",
                             "--init-image", str(init), "--strength", "0.5")) == 0
    entries = {e["seed"]: e for e in _manifest(out)}
    assert entries[7]["steps"] == 2 and entries[7]["guidance_scale"] == 1.0
    assert entries[7]["prompt"].startswith("anime artwork of a cat")
    assert entries[1]["negative_prompt"].startswith("blurry, photo")  # seed 0 + running index 1
    assert entries[1]["init_image"] == str(init) and entries[1]["strength"] == 0.5


def _error(capsys, argv):
    assert sample.main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "x", "--height", "500"], "height 500 is not a multiple of 8; use 496 or 504"),
    (["--prompt", "x", "--steps", "0"], "steps 0 must be an integer >= 1"),
    (["--prompt", "x", "--init-image", "i.png", "--strength", "0"], "strength 0.0 is outside (0, 1]"),
    (["--prompt", "x", "--scheduler", "karras9"], "unknown scheduler 'karras9'; choose one of ['ddim'"),
    (["--prompt", "x", "--style", "baroque"], "unknown style 'baroque'; choose one of ['anime'"),
    ([], "no prompts: pass --prompt TEXT"),
    (["--prompt", "  "], "a prompt is empty"),
    (["--prompt", "x", "--dtype", "fp32", "--attention", "cudnn"], "--attention cudnn needs bf16 or fp16 compute"),
])
def test_bad_input(model_dir, tmp_path, capsys, extra, message):
    argv = ["--model", model_dir, "--out", str(tmp_path / "o"), "--no-compilation-cache", *extra]
    assert message in _error(capsys, argv)


def test_bad_files(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    assert "holds no prompts" in _error(capsys, _args(model_dir, tmp_path / "o", "--prompts-file", str(empty)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    err = _error(capsys, _args(model_dir, tmp_path / "o", "--prompt", "x", "--init-image", str(bad)))
    assert f"cannot read init image {bad}" in err
    err = _error(capsys, _args(model_dir, tmp_path / "o", "--prompt", "x", "--init-image", str(tmp_path / "no.png")))
    assert "init image not found" in err
    err = _error(capsys, _args(str(tmp_path / "nowhere"), tmp_path / "o", "--prompt", "x"))
    assert "nowhere" in err


def test_module_entry_point_uses_the_compilation_cache(model_dir, tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, T2I_JAX_CACHE=str(cache), XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "t2i_jax.sample", "--model", model_dir, "--prompt", "a red circle",
           "--out", str(out), "--steps", "2", "--height", str(SIZE), "--width", str(SIZE)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(out.resolve()) in r.stdout
    assert len(list(out.glob("0000*.png"))) == 1
    assert any(cache.iterdir()), "the persistent compilation cache stayed empty"
