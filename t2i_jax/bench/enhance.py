"""Prompt-enhancer speed: `python -m t2i_jax.bench enhance [--models tiny,small] [--batches 1,8]`.

Tokens/s of the jitted KV-cache generator (`t2i_jax.enhance.Generator`)
against transformers' PyTorch `generate` on the same random GPT-2 weights, in
one process, one row per (model, batch). Both sample as `--enhance-prompt`
does (temperature 0.9, top-k 50, repetition penalty 1.2) and run the whole
token budget (no EOS), so both produce batch x max_new_tokens tokens per call.
After one warm-up call each (ours compiles there: reported separately), the
two alternate call by call, so a change of load on a shared machine hits both;
times are medians over at least `--iters` calls (and 2 s) each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np

MODELS = {
    # name: (transformers GPT2Config kwargs, prompt tokens, new tokens)
    "tiny": (dict(vocab_size=1000, n_positions=64, n_embd=36, n_layer=2, n_head=3), 16, 32),
    "small": (dict(), 16, 64),  # GPT-2 small, 124M (MagicPrompt's size)
}


def _settings(max_new_tokens: int):
    from t2i_jax.enhance import GenerationSettings

    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.9, top_k=50, repetition_penalty=1.2)


def _time_pair(ours, theirs, iters: int, min_seconds: float = 2.0) -> tuple[float, float, float]:
    """(our first call's seconds, our median, their median). One warm-up call each, then the two
    alternate, at least `iters` calls each and `min_seconds` of ours, so a change of load on a shared
    machine hits both sides alike and millisecond calls (the tiny model) are timed over many."""
    t0 = time.perf_counter()
    ours()
    first = time.perf_counter() - t0
    theirs()
    a, b = [], []
    while len(a) < iters or sum(a) < min_seconds:
        for fn, times in ((ours, a), (theirs, b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return first, statistics.median(a), statistics.median(b)


def bench_one(name: str, batch: int, iters: int, log=print) -> dict:
    """Ours and transformers' tokens/s for model `name` at `batch`."""
    import jax
    import torch
    import transformers

    from t2i_jax.convert.gpt2 import convert_state
    from t2i_jax.enhance import Generator
    from t2i_jax.models import gpt2

    kw, prompt_len, new = MODELS[name]
    torch.manual_seed(0)
    config = transformers.GPT2Config(**kw, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    cfg = gpt2.GPT2Config.from_hf(config.to_dict())
    params, _ = convert_state({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    params = jax.device_put(params)
    rs = np.random.RandomState(0)
    ids = rs.randint(1, cfg.vocab_size, (batch, prompt_len))
    mask = np.ones_like(ids)
    seeds = np.arange(batch, dtype=np.uint32)
    settings = _settings(new)
    gen = Generator(gpt2.GPT2LMHeadModel(cfg), eos_token_id=None, pad_token_id=0)
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)

    def theirs():
        with torch.inference_mode():
            out = hf.generate(t_ids, attention_mask=t_mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                              temperature=0.9, top_k=50, repetition_penalty=1.2, pad_token_id=0)
        assert out.shape[1] == prompt_len + new

    log(f"{name} batch {batch}: ours and transformers, alternating ...")
    compile_s, ours_s, theirs_s = _time_pair(lambda: gen(params, ids, mask, seeds, settings), theirs, iters)
    tokens = batch * new
    return {"model": name, "params_M": sum(p.numel() for p in hf.parameters()) / 1e6, "batch": batch,
            "prompt_tokens": prompt_len, "new_tokens": new, "ours_tokens_per_s": tokens / ours_s,
            "transformers_tokens_per_s": tokens / theirs_s, "ratio": theirs_s / ours_s,
            "ours_compile_s": compile_s - ours_s, "torch_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0]}


def table(rows: Sequence[dict]) -> str:
    """A markdown table of `bench_one` rows."""
    lines = ["| model | params | batch | prompt + new tokens | ours tokens/s | transformers tokens/s | ours/theirs "
             "| our compile s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_M']:.1f} M | {r['batch']} | {r['prompt_tokens']} + "
                     f"{r['new_tokens']} | {r['ours_tokens_per_s']:.1f} | {r['transformers_tokens_per_s']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['ours_compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Parses flags, runs every (model, batch), prints the table, writes --json."""
    p = argparse.ArgumentParser(prog="python -m t2i_jax.bench enhance", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,small", help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--iters", type=int, default=3, help="timed calls per row, at least (and 2 s)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        p.error(f"--models {','.join(unknown)}: unknown; choose from {', '.join(MODELS)}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = [0]
    if args.iters < 1 or any(b < 1 for b in batches):
        p.error(f"--iters {args.iters} and --batches {args.batches} must be positive integers, e.g. --batches 1,8")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows = [bench_one(m, b, args.iters, log) for m in names for b in batches]
    print(table(rows), flush=True)
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
