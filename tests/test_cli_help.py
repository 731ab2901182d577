"""`--help` of the sample and bench CLIs: every default shown, once; the
sample CLI lists the scheduler names; jax's TPU-plugin noise is dropped."""

import logging
import re

import pytest

from t2i_jax import sample
from t2i_jax.bench import cli as bench_cli
from t2i_jax.schedulers import SCHEDULERS


def _options(parser_help: str) -> dict[str, str]:
    """Option flag -> its help text (joined lines), from argparse's output."""
    blocks, flag = {}, None
    for line in parser_help.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            flag = m.group(1)
            blocks[flag] = line
        elif flag and line.startswith("      "):
            blocks[flag] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def _sample_help(capsys) -> str:
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    return capsys.readouterr().out


def test_sample_help_shows_every_default_once_and_the_schedulers(capsys):
    text = _sample_help(capsys)
    options = _options(text)
    for line in options.values():
        assert line.count("default") <= 1, line
        assert "(default: None)" not in line and "(default: False)" not in line, line
        assert "(default: [])" not in line, line
    for flag, default in [("--steps", "50"), ("--scheduler", "pndm"), ("--guidance-scale", "7.5"), ("--seed", "0"),
                          ("--num-images-per-prompt", "1"), ("--strength", "0.8"), ("--attention", "auto")]:
        assert f"(default: {default})" in options[flag], options[flag]
    assert "(default: empty)" in options["--negative-prompt"]
    for flag in ("--model", "--batch-size", "--height", "--width", "--dtype", "--eta", "--timestep-spacing",
                 "--final-sigmas-type"):
        assert "default:" in options[flag], options[flag]  # said in the text itself
    assert all(name in options["--scheduler"] for name in SCHEDULERS)
    assert "1000 * e + i" in " ".join(text.split())  # the seed rule


def test_bench_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        bench_cli.parser().parse_args(["--help"])
    options = _options(capsys.readouterr().out)
    for line in options.values():
        assert line.count("default") <= 1, line
        assert "(default: None)" not in line and "(default: False)" not in line, line
    assert "(default: 50)" in options["--steps"] and "(default: 0)" in options["--seed"]
    assert options["--resolution"].endswith("(default: native, 512 for sd15, 768 for sd21, 1024 for sdxl)")


def test_quiet_console_drops_the_tpu_backend_notice_only(caplog):
    sample.quiet_console()
    log = logging.getLogger("jax._src.xla_bridge")
    with caplog.at_level(logging.INFO, logger="jax._src.xla_bridge"):
        log.warning("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
        log.warning("An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed.")
    assert [r.getMessage()[:9] for r in caplog.records] == ["An NVIDIA"]


def test_train_help_exits_0_and_a_missing_config_does_not():
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "t2i_jax.train", "--help"], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0 and "--workdir" in ok.stdout, (ok.returncode, ok.stderr[-500:])
    bad = subprocess.run([sys.executable, "-m", "t2i_jax.train"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--config and --workdir are required" in bad.stderr, bad.stderr[-500:]
