"""The CLIP BPE tokenizer, usable offline.

The BPE vocabulary of OpenAI's CLIP ships with this package
(`assets/bpe_simple_vocab_16e6.txt.gz`, MIT, see `assets/BPE_LICENSE.txt`);
a transformers `CLIPTokenizer` is built from it, so ids equal those of the
`tokenizer/` folder of every Stable Diffusion 1.x model. A model folder's own
`tokenizer/` (SD2 pads with "!") is loaded with `Tokenizer.from_pretrained`.
"""

from __future__ import annotations

import functools
import gzip
import os
import warnings
from collections.abc import Sequence
from importlib import resources

import numpy as np

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77
# The OpenAI file holds 262,145 lines; CLIP uses the first 48,894 merges, which
# with 2 x 256 byte symbols and the two special tokens gives 49,408 ids.
_NUM_MERGES = 49408 - 2 * 256 - 2


def _bytes_to_unicode() -> list[str]:
    """The printable stand-in for each of the 256 byte values (GPT-2/CLIP order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    # The vocabulary lists the printable bytes first, then the remapped ones.
    return [chars[b] for b in keep] + [chars[b] for b in range(256) if b not in keep]


@functools.cache
def bundled_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary (token -> id) and BPE merges, from the bundled file."""
    raw = resources.files("t2i_jax").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _hf_bundled(pad_token: str):
    from transformers import CLIPTokenizer

    vocab, merges = bundled_vocab()
    return CLIPTokenizer(vocab=vocab, merges=list(merges), pad_token=pad_token, model_max_length=MAX_LENGTH)


class Tokenizer:
    """Text -> fixed-length CLIP token ids (numpy int32, [batch, max_length]).

    Prompts are padded to `max_length` and longer ones are cut, with a warning
    that says how many tokens were lost. `expansions` maps a multi-vector
    textual-inversion token to its spelled-out tokens ("tok" -> "tok tok_1
    tok_2"), applied to every prompt (see `expand`).
    """

    def __init__(self, hf_tokenizer, max_length: int = MAX_LENGTH, expansions: dict[str, str] | None = None):
        self.hf = hf_tokenizer
        self.max_length = max_length
        self.expansions = dict(expansions or {})

    def expand(self, text: str) -> str:
        """`text` with each multi-vector embedding token spelled out as its vectors' tokens,
        as diffusers' `maybe_convert_prompt` does (a plain replace where the token occurs)."""
        if not self.expansions:
            return text
        found = set(self.hf.tokenize(text))
        for token, spelled in self.expansions.items():
            if token in found:
                text = text.replace(token, spelled)
        return text

    @classmethod
    def bundled(cls, pad_token: str = EOS, max_length: int = MAX_LENGTH) -> Tokenizer:
        """The OpenAI CLIP tokenizer from the bundled vocabulary (SD1.x: pad with EOS)."""
        return cls(_hf_bundled(pad_token), max_length)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_length: int | None = None) -> Tokenizer:
        """Loads a transformers tokenizer folder (`vocab.json` + `merges.txt`, or `tokenizer.json`)."""
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(os.fspath(path))
        if max_length is None:
            max_length = hf.model_max_length if hf.model_max_length < 10_000 else MAX_LENGTH
        return cls(hf, max_length)

    @property
    def pad_token_id(self) -> int:
        return self.hf.pad_token_id

    @property
    def eos_token_id(self) -> int:
        return self.hf.eos_token_id

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Tokenizes one prompt or a list; returns int32 ids of shape [n, max_length]."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [self.expand(p) for p in prompts]
        # verbose=False: our own warning below says more than transformers' one.
        full = self.hf(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
        out = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int32)
        for row, (prompt, ids) in enumerate(zip(prompts, full)):
            if len(ids) > self.max_length:
                cut = len(ids) - self.max_length
                warnings.warn(
                    f"prompt {_short(prompt)!r} is {len(ids)} tokens with start and end; the text "
                    f"encoder takes {self.max_length}, so the last {cut} token{'s' * (cut != 1)} were cut. "
                    "Shorten the prompt to keep them.",
                    stacklevel=2,
                )
                ids = ids[: self.max_length - 1] + [ids[-1]]  # keep the end token
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, without special tokens."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes a transformers tokenizer folder (what SD model folders hold in `tokenizer/`)."""
        self.hf.save_pretrained(os.fspath(path))


def _short(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."
