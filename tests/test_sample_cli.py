"""`python -m t2i_jax.sample` end to end on a tiny local model."""

import json
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pipeline import SIZE, build_tiny_pipeline

from t2i_jax import sample

# One persistent compilation cache for the module: the runs below compile a
# handful of distinct programs, each once (runs pass --no-compilation-cache so
# that the CLI leaves this cache setting alone).
pytestmark = pytest.mark.usefixtures("compilation_cache")


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
    # Seed of image i of entry e: --seed + 1000 e + i.
    assert [(e["prompt"], e["seed"], e["entry"], e["index"]) for e in entries] == [
        ("a red circle", 100, 0, 0), ("a red circle", 101, 0, 1), ("a blue square", 1100, 1, 0),
        ("a blue square", 1101, 1, 1)]
    assert [e["file"][:9] for e in entries] == ["0000-000-", "0000-001-", "0001-000-", "0001-001-"]
    pngs = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert pngs == sorted(e["file"] for e in entries)
    with Image.open(out / entries[2]["file"]) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        meta = json.loads(im.text["parameters"])
        assert im.text["prompt"] == "a blue square"
    assert meta["seed"] == 1100 and meta["steps"] == 3 and meta["scheduler"] == "euler"
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

    # Scheduler flags reach the sampler, the metadata and the resume key:
    # Karras sigmas make 4 new images, none equal to its plain-sigma twin.
    capsys.readouterr()
    assert sample.main(argv + ["--karras", "--timestep-spacing", "trailing"]) == 0
    assert "skipping" not in capsys.readouterr().err
    karras = [e for e in _manifest(out) if "scheduler_options" in e]
    assert len(karras) == 4
    assert all(e["scheduler_options"] == {"use_karras_sigmas": True, "timestep_spacing": "trailing"} for e in karras)
    for k in karras:
        (plain,) = [e for e in entries if e["seed"] == k["seed"]]
        a, b = (np.asarray(Image.open(out / e["file"]), np.float32) for e in (plain, k))
        assert np.abs(a - b).mean() > 1.0


def test_prompts_file_jsonl_styles_and_img2img(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    # The tiny model reads 77 tokens: the anime template (16 tokens) fits "a
    # dog", not a 70-word prompt, which is then used as written; with
    # --prompt-syntax none, 90 words are cut whatever the style.
    words = " ".join(["red"] * 70)
    prompts.write_text(
        json.dumps({"prompt": "a cat", "seed": 7, "steps": 2, "guidance": 1.0}) + "\n"
        + json.dumps({"prompt": "a dog", "negative_prompt": "blurry"}) + "\n"
        + words + "\n" + " ".join(["blue"] * 90) + "\n")
    init = tmp_path / "init.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 48, 3), np.uint8)).save(init)
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sample.main(_args(model_dir, out, "--prompts-file", str(prompts), "--style", "anime",
                                 "--init-image", str(init), "--strength", "0.5", "--prompt-syntax", "none")) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "warning" in x.lower()]
    assert len(lines) == 2, err
    assert lines[0].startswith("warning: --style anime does not fit the text encoder's 77-token context with "
                               "2 of 4 prompt(s), e.g. 'red red")
    assert lines[1].startswith("warning: 1 prompt(s) are longer than the text encoder's 77-token context and "
                               "are cut, e.g. 'blue blue")
    assert not [w for w in caught if "tokens with start and end" in str(w.message)]  # no raw UserWarning
    entries = {e["seed"]: e for e in _manifest(out)}
    assert entries[2000]["prompt"] == words
    assert entries[7]["steps"] == 2 and entries[7]["guidance_scale"] == 1.0
    assert entries[7]["prompt"].startswith("anime artwork of a cat")
    assert entries[1000]["negative_prompt"].startswith("blurry, photo")  # seed 0 + 1000 * entry 1
    assert entries[1000]["init_image_path"] == str(init) and entries[1000]["strength"] == 0.5
    assert len(entries[1000]["init_image"]) == 16  # the hash of its pixels: the resume key


def _error(capsys, argv):
    assert sample.main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "x", "--height", "500"], "height 500 is not a multiple of 8; use 496 or 504"),
    (["--prompt", "x", "--steps", "0"], "steps 0 must be an integer >= 1"),
    (["--prompt", "x", "--init-image", "i.png", "--strength", "0"], "strength 0.0 is outside (0, 1]"),
    (["--prompt", "x", "--scheduler", "karras9"], "unknown scheduler 'karras9'; choose one of ['ddim'"),
    (["--prompt", "x", "--style", "baroque"], "unknown style 'baroque'; choose one of ['anime'"),
    (["--prompt", "x", "--karras"], ("--scheduler pndm with --karras: scheduler option use_karras_sigmas=True is "
                                    "not supported by the 'pndm' sampler; samplers that accept use_karras_sigmas: ")),
    (["--prompt", "x", "--scheduler", "euler", "--eta", "0.3"], "--scheduler euler with --eta 0.3: scheduler option"),
    (["--prompt", "x", "--scheduler", "ddim", "--eta", "-1"], "--eta -1.0 must be >= 0"),
    ([], "no prompts: pass --prompt TEXT"),
    (["--prompt", "  "], "a prompt is empty"),
])
def test_bad_input(model_dir, tmp_path, capsys, no_model_load, extra, message):
    argv = ["--model", model_dir, "--out", str(tmp_path / "o"), "--no-compilation-cache", *extra]
    err = _error(capsys, argv)
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


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


def _readme_quick_start() -> list[str]:
    """The sampling command of README.md's "On a fresh machine" section, as argv."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## On a fresh machine", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in section.splitlines() if "python -m t2i_jax.sample" in x)  # the first one
    return shlex.split(line[line.index("python -m t2i_jax.sample"):])


def test_readme_quick_start_console_is_clean_and_uses_the_compilation_cache(tmp_path):
    # The README command as a fresh user runs it: the default install (no
    # torch: it is an extra; hidden here by a sitecustomize), no JAX_PLATFORMS
    # or XLA_FLAGS, the working directory as the output's parent. Only the
    # compilation cache is pointed into tmp_path, off the home folder.
    cmd = _readme_quick_start()
    assert cmd[:3] == ["python", "-m", "t2i_jax.sample"] and "--out" in cmd
    no_torch = tmp_path / "no_torch"
    no_torch.mkdir()
    (no_torch / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # import torch fails\n")
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(T2I_JAX_CACHE=str(cache), PYTHONPATH=os.pathsep.join([str(no_torch), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, *cmd[1:]], check=False, capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / cmd[cmd.index("--out") + 1]
    assert str(out.resolve()) in r.stdout
    assert len(list(out.glob("0000-000-a-red-circle-on-a-blue-background-s0-*.png"))) == 1
    assert any(cache.iterdir()), "the persistent compilation cache stayed empty"
    console = r.stdout + r.stderr
    for noise in ("warning", "Warning", "Traceback", "[transformers]", "PyTorch was not found",
                  "Unable to initialize backend"):
        assert noise not in console, console
    assert "text context 16 tokens" in r.stderr  # the model's context, said at start-up
    assert "compiling" in r.stderr and "step/s" in r.stderr  # compile apart, then denoising steps


# --------------------------------------------------------------------------
# Seeds keyed on (prompt entry, index); resume by content; this run's grid
# --------------------------------------------------------------------------


def _pngs(out):
    return {p.name: p.read_bytes() for p in out.glob("*.png") if p.name != "grid.png"}


# Behind --slow (~19 s, for the fast suite's budget): that an image depends on its own seed alone, not on
# its batch, is checked fast in test_serve.test_same_image_as_the_cli_alone_and_batched_with_7_others.
@pytest.mark.slow
def test_seeds_do_not_move_when_images_or_prompts_are_added(model_dir, tmp_path):
    two = ["--prompt", "a red circle", "--prompt", "a blue square", "--seed", "5"]
    three, four = tmp_path / "three", tmp_path / "four"
    assert sample.main(_args(model_dir, three, *two, "--num-images-per-prompt", "3")) == 0
    assert sample.main(_args(model_dir, four, *two, "--num-images-per-prompt", "4")) == 0
    a, b = _pngs(three), _pngs(four)
    assert len(a) == 6 and len(b) == 8
    # The 3-image run's files, names and bytes, are the first three of each
    # prompt in the 4-image run: the second prompt's images did not move when
    # the first one gained an image.
    assert set(a) <= set(b) and all(a[n] == b[n] for n in a)
    assert sorted(n[:8] for n in b) == [f"000{e}-00{i}" for e in range(2) for i in range(4)]
    # The rule, for any number of entries: a prompt appended after them gets
    # seeds of its own and moves none of theirs.
    seeds = {(e["entry"], e["index"]): e["seed"] for e in _manifest(four)}
    assert seeds == {(e, i): 5 + 1000 * e + i for e in range(2) for i in range(4)}
    jobs, _ = sample.build_jobs([{"prompt": "x"}, {"prompt": "y", "seed": 42}, {"prompt": "z"}], negative_prompt="",
                                style=None, seed=5, steps=3, guidance_scale=7.5, num_images_per_prompt=2)
    assert [(j.entry, j.index, j.seed) for j in jobs] == [(0, 0, 5), (0, 1, 6), (1, 0, 42), (1, 1, 43),
                                                          (2, 0, 2005), (2, 1, 2006)]
    # grid.png shows this run's 8 images (3 x 3 tiles), in order.
    with Image.open(four / "grid.png") as grid:
        assert grid.size == (3 * SIZE, 3 * SIZE)


# Behind --slow (~16 s): resume by manifest is checked fast in test_generate_files_metadata_manifest_and_resume.
@pytest.mark.slow
def test_grid_is_this_runs_images_and_init_image_resumes_by_content(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert sample.main(_args(model_dir, out, "--prompt", "a red circle")) == 0
    rng = np.random.RandomState(0)
    first, copy, edited = tmp_path / "init.png", tmp_path / "renamed.png", tmp_path / "edited.png"
    pixels = rng.randint(0, 255, (SIZE, SIZE, 3), np.uint8)
    Image.fromarray(pixels).save(first)
    Image.fromarray(pixels).save(copy, compress_level=1)  # other bytes, same pixels
    Image.fromarray(255 - pixels).save(edited)
    # The settings of test_prompts_file_...: its compiled program is reused.
    img2img = ["--prompt", "a cat", "--strength", "0.5", "--init-image"]
    assert sample.main(_args(model_dir, out, *img2img, str(first))) == 0
    (entry,) = [e for e in _manifest(out) if e["prompt"] == "a cat"]
    with Image.open(out / "grid.png") as grid, Image.open(out / entry["file"]) as im:
        assert np.array_equal(np.asarray(grid.convert("RGB")), np.asarray(im))  # only this run's image
    capsys.readouterr()
    assert sample.main(_args(model_dir, out, *img2img, str(copy))) == 0
    assert "skipping 1 image(s)" in capsys.readouterr().err
    assert len(_manifest(out)) == 2
    # The key is the pixels: a renamed copy matches, an edit does not.
    _, h = sample.read_init_image(str(first))
    assert sample.read_init_image(str(copy))[1] == h != sample.read_init_image(str(edited))[1]
    assert entry["init_image"] == h and entry["init_image_path"] == str(first)


# --------------------------------------------------------------------------
# Errors up front: exit 2, one line naming the value and the fix, nothing written
# --------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: these errors must come before it."""
    import t2i_jax.convert.load

    def fail(*a, **k):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(t2i_jax.convert.load, "load_components", fail)


def _one_line_error(capsys, argv, *fragments):
    assert sample.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err
    return err


def test_out_is_an_existing_file(model_dir, tmp_path, capsys, no_model_load):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    _one_line_error(capsys, _args(model_dir, out, "--prompt", "x"), f"--out {out} is an existing file",
                    "pass a folder")
    assert out.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [out]
    under = out / "sub"
    _one_line_error(capsys, _args(model_dir, under, "--prompt", "x"), f"{out} is a file", "pass a path under a folder")


def test_out_not_writable(model_dir, tmp_path, capsys, no_model_load, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:
        # root writes through permission bits; let the check see them as a user would.
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and Path(p) != locked)
    try:
        _one_line_error(capsys, _args(model_dir, locked, "--prompt", "x"), f"--out {locked} is not writable",
                        "pass a folder you can write to")
        _one_line_error(capsys, _args(model_dir, locked / "new", "--prompt", "x"),
                        f"would be made in {locked}, which is not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_attention_cudnn_without_a_gpu(model_dir, tmp_path, capsys, no_model_load):
    out = tmp_path / "o"
    _one_line_error(capsys, _args(model_dir, out, "--prompt", "x", "--attention", "cudnn"),
                    "--attention cudnn needs an NVIDIA GPU", "JAX runs on cpu here", "use --attention xla")
    assert not out.exists()  # no folder, no empty manifest
    with pytest.raises(ValueError, match="needs bf16 or fp16 compute; pass --dtype bf16"):
        sample.check_attention("cudnn", "fp32", "gpu")
    sample.check_attention("cudnn", "bf16", "gpu")


@pytest.mark.parametrize("value", ["0", "-2"])
def test_batch_size_not_positive(model_dir, tmp_path, capsys, no_model_load, value):
    _one_line_error(capsys, _args(model_dir, tmp_path / "o", "--prompt", "x", "--batch-size", value),
                    f"--batch-size {value} must be >= 1", "leave it out")
    assert not (tmp_path / "o").exists()


def test_init_image_problems(model_dir, tmp_path, capsys, no_model_load):
    out = tmp_path / "o"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    for path, message in [(bad, f"cannot read init image {bad}"), (folder, f"--init-image {folder} is a folder"),
                          (tmp_path / "no.png", "init image not found")]:
        _one_line_error(capsys, _args(model_dir, out, "--prompt", "x", "--init-image", str(path)), message)
    assert not out.exists()


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a cat", "steps": "abc"}', 'field "steps" is "abc"; write an integer >= 1, e.g. "steps": 30'),
    ('{"prompt": "a cat", "seed": 1.5}', 'field "seed" is 1.5; write an integer in [0, 4294967295]'),
    ('{"prompt": "a cat", "guidance": true}', 'field "guidance" is true; write a number >= 1'),
    ('{"prompt": "a cat", "guidance_scale": 0.5}', 'field "guidance_scale" is 0.5'),
    ('{"prompt": 3}', 'field "prompt" is 3; write a string'),
])
def test_jsonl_field_of_the_wrong_type(model_dir, tmp_path, capsys, no_model_load, line, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a dog"}\n\n' + line + "\n")
    _one_line_error(capsys, _args(model_dir, tmp_path / "o", "--prompts-file", str(prompts)),
                    f"{prompts}:3: {message}")


def test_jsonl_guidance_scale_is_accepted(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "guidance_scale": 3}\n{"prompt": "a dog", "guidance": 2.5}\n')
    entries = sample.read_prompts_file(prompts)
    jobs, _ = sample.build_jobs(entries, negative_prompt="", style=None, seed=0, steps=9, guidance_scale=7.5,
                                num_images_per_prompt=1)
    assert [j.guidance_scale for j in jobs] == [3.0, 2.5]
    prompts.write_text('{"prompt": "a cat", "guidance_scale": 3, "guidance": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: both \"guidance\" and \"guidance_scale\" given"):
        sample.read_prompts_file(prompts)


# --------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------


def test_ctrl_c_leaves_a_consistent_manifest_and_one_line(model_dir, tmp_path, capsys, monkeypatch):
    import signal

    out = tmp_path / "out"
    # 9 images at batch 8: two batches of one program. Ctrl-C arrives while the
    # first batch's second image is being saved.
    argv = _args(model_dir, out, "--prompt", "a red circle", "--num-images-per-prompt", "9", "--batch-size", "8")
    real_save, calls = sample.save_png, []

    def save_and_interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        real_save(*a, **k)

    monkeypatch.setattr(sample, "save_png", save_and_interrupt)
    assert sample.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"interrupted: 8 new image(s) saved in {out} and listed in its manifest.jsonl, 1 not made; "
                       "run the same command again to make them")
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in err)
    entries = _manifest(out)  # every line whole
    assert sorted(e["file"] for e in entries) == sorted(_pngs(out))
    assert len(entries) == 8
    monkeypatch.setattr(sample, "save_png", real_save)
    assert sample.main(argv) == 0
    assert "skipping 8 image(s)" in capsys.readouterr().err
    assert len(_manifest(out)) == 9 == len(_pngs(out))


def test_a_manifest_line_cut_by_a_kill_is_ended_before_appending(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"file": "a.png", "key": "a"}\n{"file": "b.pn')
    with sample._open_manifest(path) as f:
        f.write('{"file": "c.png", "key": "c"}\n')
    lines = path.read_text().splitlines()
    assert lines[1] == '{"file": "b.pn' and json.loads(lines[2])["key"] == "c"
