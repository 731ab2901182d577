"""Prompt expansion with a Flax GPT-2 (MagicPrompt and any GPT-2-family checkpoint).

`Enhancer.load("Gustavosta/MagicPrompt-Stable-Diffusion")` (or a local
folder) reads the weights with `t2i_jax.convert.gpt2` and the tokenizer from
the checkpoint's own files; `Enhancer.expand(prompts, seeds)` continues each
prompt and cleans the text.

The generator is one jitted program per (batch, prompt length bucket,
max_new_tokens, greedy or sampled, top-k): the left-padded prompts are
prefilled into a fixed-size KV cache, then the decode runs as one
`lax.while_loop` that stops when every row has emitted EOS or the token
budget is spent. Temperature, top-p and the repetition penalty are traced
values, so changing them does not recompile; top-k is static (`lax.top_k`
needs its size). Row b samples step i with `fold_in(key(seed_b), i)`, so an
expansion depends only on its prompt, seed and settings, not on the batch it
ran in or its padding.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.models import gpt2

DEFAULT_ENHANCER = "Gustavosta/MagicPrompt-Stable-Diffusion"


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How tokens are picked; transformers' `generate` semantics for each."""

    max_new_tokens: int = 60
    temperature: float = 0.9  # 0 = greedy (argmax, no sampling)
    top_k: int = 50  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 keeps all
    # > 1 discourages tokens already in the sequence (prompt included): positive logits are divided by it,
    # negative ones multiplied. Padding is not part of a sequence here (unlike transformers, which also
    # penalises the pad id), so a row does not depend on its batch.
    repetition_penalty: float = 1.2

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} must be >= 1, e.g. 60")
        if self.temperature < 0:
            raise ValueError(f"temperature {self.temperature} must be >= 0 (0 is greedy), e.g. 0.9")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k} must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p {self.top_p} must be in (0, 1] (1 keeps every token)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty {self.repetition_penalty} must be > 0 (1 is none)")


# --------------------------------------------------------------------------
# The jitted generator
# --------------------------------------------------------------------------


def candidates(logits, seen, *, temperature, top_p, repetition_penalty, top_k: int, use_top_p: bool):
    """The tokens a sampling step draws from: (logits [B, K], token ids [B, K]), dropped ones at -inf.

    transformers' processors in its order: repetition penalty, temperature, top-k, top-p. `logits` [B, V]
    fp32, `seen` [B, V] boolean; temperature, top_p and the penalty are traced scalars. `top_k` (0: all)
    and `use_top_p` are static: `lax.top_k` keeps K = top_k candidates in a millisecond where a sort of
    GPT-2's 50257 logits takes ~170 ms on a CPU, so only top-k 0 with top-p < 1 sorts the vocabulary.
    """
    logits = penalise(logits, seen, repetition_penalty) / temperature
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        values, ids = jax.lax.top_k(logits, top_k)  # descending
    elif use_top_p:
        ids = jnp.argsort(-logits, axis=-1)
        values = jnp.take_along_axis(logits, ids, axis=-1)
    else:
        return logits, jnp.broadcast_to(jnp.arange(vocab), logits.shape)
    if use_top_p:
        # transformers drops the low tail whose cumulative probability (summed from the least likely up)
        # is <= 1 - top_p, never the most likely token.
        tail = jnp.cumsum(jax.nn.softmax(values, axis=-1)[:, ::-1], axis=-1)[:, ::-1]
        drop = (tail <= 1 - top_p).at[:, 0].set(False)
        values = jnp.where(drop, -jnp.inf, values)
    return values, ids


def penalise(logits, seen, repetition_penalty):
    """The repetition penalty alone (the greedy path): transformers' RepetitionPenaltyLogitsProcessor."""
    return jnp.where(seen, jnp.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty), logits)


def _generate(module: gpt2.GPT2LMHeadModel, on_trace, params, ids, mask, seeds, eos_id, pad_id, temperature,
              top_p, repetition_penalty, *, max_new_tokens: int, do_sample: bool, top_k: int, use_top_p: bool):
    """New tokens [B, max_new_tokens] (pad_id after a row's EOS) and the number of decode steps run."""
    on_trace()  # Python side effect: runs once per trace, so tests can count compilations
    b, p = ids.shape
    cfg = module.config
    rows = jnp.arange(b)
    mask = mask.astype(bool)
    key_valid = jnp.concatenate([mask, jnp.ones((b, max_new_tokens), bool)], axis=1)
    # Positions as transformers gives a left-padded batch: cumsum(mask) - 1 (pads at 0, never read).
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    cache = gpt2.init_cache(cfg, b, p + max_new_tokens, module.dtype)
    logits, cache = module.apply({"params": params}, ids, positions, gpt2.causal_mask(key_valid, jnp.arange(p)),
                                 cache, 0)
    seen = jnp.zeros((b, cfg.vocab_size), bool).at[rows[:, None], ids].max(mask)
    keys = jax.vmap(jax.random.key)(seeds)
    n_prompt = mask.sum(-1)

    def cond(state):
        i, _, _, _, finished, _ = state
        return (i < max_new_tokens) & ~finished.all()

    def body(state):
        i, cache, logits, tokens, finished, seen = state
        if do_sample:
            values, token_ids = candidates(logits, seen, temperature=temperature, top_p=top_p,
                                           repetition_penalty=repetition_penalty, top_k=top_k, use_top_p=use_top_p)
            pick = jax.vmap(lambda k, row: jax.random.categorical(jax.random.fold_in(k, i), row))(keys, values)
            tok = jnp.take_along_axis(token_ids, pick[:, None], axis=-1)[:, 0]
        else:
            tok = jnp.argmax(penalise(logits, seen, repetition_penalty), axis=-1)
        tok = jnp.where(finished, pad_id, tok).astype(jnp.int32)
        tokens = tokens.at[:, i].set(tok)
        seen = seen.at[rows, tok].set(True)
        finished = finished | (tok == eos_id)
        slot = p + i
        logits, cache = module.apply({"params": params}, tok[:, None], (n_prompt + i)[:, None],
                                     gpt2.causal_mask(key_valid, slot[None]), cache, slot)
        return i + 1, cache, logits[:, 0], tokens, finished, seen

    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(0), cache, logits[:, -1], tokens, jnp.zeros(b, bool), seen)
    steps, _, _, tokens, _, _ = jax.lax.while_loop(cond, body, state)
    return tokens, steps


class Generator:
    """The jitted KV-cache generator for one GPT-2 module; `traces` counts compilations. One program per
    (batch, prompt length, max_new_tokens, greedy or sampled, top_k, top_p < 1); `eos_token_id` (None:
    never stop early), `pad_token_id`, temperature, top_p and the penalty are traced: changing them does
    not recompile."""

    def __init__(self, module: gpt2.GPT2LMHeadModel, *, eos_token_id: int | None, pad_token_id: int):
        self.module = module
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.traces = 0
        self._fn = jax.jit(functools.partial(_generate, module, self._count),
                           static_argnames=("max_new_tokens", "do_sample", "top_k", "use_top_p"))

    def _count(self):
        self.traces += 1

    def __call__(self, params, ids, mask, seeds, settings: GenerationSettings):
        """Runs one padded batch: `ids`, `mask` [B, P] int (left-padded), `seeds` [B] uint32.
        Returns (tokens [B, max_new_tokens] numpy, decode steps run)."""
        tokens, steps = self._fn(
            params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(seeds, jnp.uint32),
            # EOS -1 never matches a token: rows then run the whole budget.
            jnp.int32(-1 if self.eos_token_id is None else self.eos_token_id), jnp.int32(self.pad_token_id),
            jnp.float32(settings.temperature or 1.0), jnp.float32(settings.top_p),
            jnp.float32(settings.repetition_penalty), max_new_tokens=settings.max_new_tokens,
            do_sample=settings.temperature > 0, top_k=settings.top_k if settings.temperature > 0 else 0,
            use_top_p=settings.temperature > 0 and settings.top_p < 1)
        return np.asarray(tokens), int(steps)


# --------------------------------------------------------------------------
# Text cleaning
# --------------------------------------------------------------------------

_URL = re.compile(r"(https?://|www\.)\S+|\S+\.(com|net|org|io)\b\S*")
_EDGE = re.compile(r"^[\s,.;:!?|/\\\-_*~'\"]+|[\s,.;:!?|/\\\-_*~'\"]+$")


def clean(prompt: str, continuation: str, *, hit_limit: bool) -> str:
    """The expanded prompt: `prompt` followed by the model's `continuation`, tidied as the MagicPrompt
    tools do. Only the continuation's first line is kept (the model writes one prompt per line); its URLs
    and angle brackets are dropped; when generation stopped at the token budget (`hit_limit`) inside that
    line, it is cut after its last full phrase (at its last comma). Then repeated commas and spaces are
    collapsed and stray punctuation at the start and end removed. Falls back to the prompt when nothing
    is left."""
    text, *rest = continuation.split("\n", 1)
    if hit_limit and not rest and "," in text:
        text = text[:text.rindex(",")]
    text = _URL.sub("", text).replace("<", "").replace(">", "")
    text = re.sub(r"\s+", " ", prompt + text)
    text = re.sub(r"\s*,[\s,]*", ", ", text)  # ", ,  ," -> ", "; no space before a comma
    return _EDGE.sub("", text).strip() or prompt.strip()


# --------------------------------------------------------------------------
# The enhancer
# --------------------------------------------------------------------------


class Enhancer:
    """A GPT-2 prompt expander: `Enhancer.load(path_or_id).expand(prompts, seeds)`.

    Prompts are grouped by length, rounded up to a multiple of `bucket` tokens (left padding), and run
    in batches of `batch_size` (the last one padded with copies), so new prompts reuse the compiled
    programs.
    """

    def __init__(self, module: gpt2.GPT2LMHeadModel, params, tokenizer, *, source: str = "GPT-2",
                 batch_size: int = 8, bucket: int = 16):
        self.module = module
        self.params = params
        self.tokenizer = tokenizer
        self.source = source
        self.batch_size = batch_size
        self.bucket = bucket
        cfg = module.config
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        self.generator = Generator(module, eos_token_id=eos, pad_token_id=0 if pad is None else pad)

    @classmethod
    def load(cls, path_or_id: str | os.PathLike = DEFAULT_ENHANCER, *, dtype=jnp.float32, **kw: Any) -> Enhancer:
        """From a transformers GPT-2 folder or hub id: weights through `convert.gpt2.load_gpt2` (strict
        report), tokenizer from the same folder (`vocab.json` + `merges.txt`, or `tokenizer.json`)."""
        from transformers import AutoTokenizer

        from t2i_jax.convert.gpt2 import load_gpt2

        module, params, folder = load_gpt2(path_or_id, dtype=dtype)
        if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            raise FileNotFoundError(f"{folder} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                                    "save the checkpoint's tokenizer there with tokenizer.save_pretrained(folder)")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(module, jax.device_put(params), tokenizer, source=os.fspath(path_or_id), **kw)

    @property
    def traces(self) -> int:
        """How many times the generator was compiled (traced)."""
        return self.generator.traces

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids (BOS alone for a prompt with no tokens)."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return ids or [self.bos_token_id]

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int],
                     settings: GenerationSettings) -> list[list[int]]:
        """The new tokens of each prompt, up to and without its EOS."""
        if len(prompt_ids) != len(seeds):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} seeds; give one seed per prompt")
        n_pos = self.module.config.n_positions
        room = n_pos - settings.max_new_tokens
        for ids in prompt_ids:
            if len(ids) > room:
                raise ValueError(f"a prompt of {len(ids)} tokens plus max_new_tokens {settings.max_new_tokens} "
                                 f"exceeds the enhancer's {n_pos} positions; shorten the prompt or lower "
                                 "max_new_tokens")
        eos = self.generator.eos_token_id
        # Batches are formed within each length bucket, so a prompt's padded width depends on its own length
        # alone, not on its neighbours'.
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(prompt_ids):
            groups.setdefault(min(-(-len(ids) // self.bucket) * self.bucket, room), []).append(i)
        out: list[list[int]] = [[] for _ in prompt_ids]
        for length, members in groups.items():
            for start in range(0, len(members), self.batch_size):
                rows = members[start:start + self.batch_size]
                rows += [rows[-1]] * (self.batch_size - len(rows))  # padding rows: computed and dropped
                ids = np.full((self.batch_size, length), self.generator.pad_token_id, np.int32)
                mask = np.zeros((self.batch_size, length), np.int32)
                for r, i in enumerate(rows):
                    ids[r, length - len(prompt_ids[i]):] = prompt_ids[i]
                    mask[r, length - len(prompt_ids[i]):] = 1
                seeds_np = np.asarray([seeds[i] for i in rows], np.uint32)
                tokens, _ = self.generator(self.params, ids, mask, seeds_np, settings)
                for i, row in zip(rows, tokens.tolist()):
                    out[i] = row[:row.index(eos)] if eos in row else row
        return out

    def expand(self, prompts: Sequence[str], seeds: Sequence[int],
               settings: GenerationSettings | None = None) -> list[str]:
        """Each prompt continued by the model and cleaned (`clean`); the expansion of prompt i depends only
        on (prompts[i], seeds[i], settings)."""
        settings = settings or GenerationSettings()
        prompt_ids = [self.encode(p) for p in prompts]
        new = self.generate_ids(prompt_ids, seeds, settings)
        out = []
        for prompt, ids, gen in zip(prompts, prompt_ids, new):
            base = self.tokenizer.decode(ids, skip_special_tokens=True)
            full = self.tokenizer.decode(list(ids) + gen, skip_special_tokens=True)
            # Decoding prompt and continuation together keeps a character split across tokens whole.
            cont = full[len(base):] if full.startswith(base) else self.tokenizer.decode(gen, skip_special_tokens=True)
            out.append(clean(prompt, cont, hit_limit=len(gen) == settings.max_new_tokens))
        return out
