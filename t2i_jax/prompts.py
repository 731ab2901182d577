"""Prompt parsing: AUTOMATIC1111's emphasis syntax, and long prompts in chunks.

Syntax `"a1111"` (the default of the CLI and of `pipeline.Sampler`), as the
AUTOMATIC1111 web UI reads a prompt (`modules/prompt_parser.py`,
`parse_prompt_attention`; `modules/sd_hijack_clip.py`):

- `(text)` weights its tokens x1.1, `((text))` x1.21, `[text]` /1.1,
  `(text:1.3)` x1.3 (any number, also below 1 or negative); brackets nest and
  their weights multiply. `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal
  characters; `:` outside a `(text:w)` is plain text.
- Unbalanced brackets, as A1111: a `(` or `[` never closed weights everything
  after it (x1.1, /1.1); a `)` or `]` that closes nothing is kept as a literal
  character. `bracket_problems` names them, and `parse` warns.
- `BREAK` (upper case, a word of its own) ends the current chunk: what follows
  starts a new one. Unlike A1111, a BREAK inside brackets still breaks (A1111
  multiplies its marker's weight and then reads it as the word "BREAK").
- The prompt is tokenized segment by segment (A1111 tokenizes each run of one
  weight alone) and cut into chunks of `max_length - 2` tokens (75 for SD's
  77; 14 for the bundled model's 16), each encoded as start + tokens + end +
  padding, with the tokenizer's pad token (A1111's SD2 padding too). A chunk
  that fills up moves the words after its last comma into the next chunk when
  that comma is within the last `COMMA_BACKTRACK` tokens (A1111's
  `comma_padding_backtrack`, default 20), so a phrase is not split.

Weights act on the text encoder's output per chunk (A1111's "Original"
emphasis): `z = z * w`, then `z *= mean(z_before) / mean(z)` over that chunk,
which keeps the chunk's mean. A1111 takes that mean over every prompt of its
batch (usually one prompt); here it is per prompt, so an image never depends
on its batch neighbours. A chunk whose weights are all 1 is left exactly as
encoded: a plain prompt that fits one chunk gives the same conditioning as
`"none"`.

Syntax `"none"`: the prompt as written, one context of `max_length` tokens,
longer prompts cut with a warning (what diffusers does).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np

SYNTAXES = ("a1111", "none")
ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's bracket multipliers
# A full chunk moves the words after its last comma to the next chunk when
# the comma is at most this many tokens back (A1111's comma_padding_backtrack).
COMMA_BACKTRACK = 20

# The lexer: escapes, brackets, `:weight)`, runs of plain text, a lone colon
# (A1111's re_attention alternatives, in its order of preference). A
# backslash before any other character is dropped, as A1111 drops it.
_TOKEN = re.compile(r"""
    (?P<escape>\\[()\[\]\\]|\\)
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_PAIRS = {")": ("(", ROUND), "]": ("[", SQUARE)}  # closer -> (its opener, its factor)


def check_syntax(syntax: str) -> None:
    """Raises a ValueError naming the choices when `syntax` is not one of `SYNTAXES`."""
    if syntax not in SYNTAXES:
        raise ValueError(f"prompt syntax {syntax!r} is not one of {list(SYNTAXES)}; use 'a1111' for "
                         "(emphasis:1.2) and long prompts, 'none' for the prompt as written")


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _scan(text: str):
    """(segments, unclosed, unmatched): segments are [text, weight] pairs and
    None for a BREAK, weighted as A1111 weights them (each bracket multiplies
    the segments since its opening when it closes; unclosed ones at the end);
    unclosed / unmatched are the brackets that open or close nothing."""
    out: list = []
    opened: dict[str, list[int]] = {"(": [], "[": []}
    unmatched = []

    def scale(start: int, factor: float) -> None:
        for seg in out[start:]:
            if seg is not None:
                seg[1] *= factor

    for m in _TOKEN.finditer(text):
        if m["escape"] is not None:
            out.append([m["escape"][1:], 1.0])
        elif m["open"] is not None:
            opened[m["open"]].append(len(out))
        elif m["weight"] is not None and opened["("]:
            try:
                w = float(m["weight"])
            except ValueError:
                raise ValueError(f"prompt {_short(text)!r}: weight {m['weight']!r} is not a number; write e.g. "
                                 f"(word:1.2), or \\( \\) for literal parentheses") from None
            scale(opened["("].pop(), w)
        elif m["close"] is not None and opened[_PAIRS[m["close"]][0]]:
            opener, factor = _PAIRS[m["close"]]
            scale(opened[opener].pop(), factor)
        else:
            piece = m[0]
            if m["close"] is not None or m["weight"] is not None:
                unmatched.append(piece[-1])
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    out.append(None)
                out.append([part, 1.0])
    unclosed = ["("] * len(opened["("]) + ["["] * len(opened["["])
    # Unclosed brackets close at the end, round ones first (A1111's order,
    # which fixes the float rounding of the products).
    for start in opened["("]:
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    return out, unclosed, unmatched


def bracket_problems(text: str) -> str | None:
    """What is unbalanced in `text` under the a1111 syntax, and what it does, in
    one sentence naming the prompt; None when every bracket pairs up."""
    _, unclosed, unmatched = _scan(text)
    if not unclosed and not unmatched:
        return None
    what = []
    if unclosed:
        what.append(f"{len(unclosed)} unclosed {' '.join(repr(c) for c in unclosed)} (the rest of the prompt is "
                    f"weighted as if closed at its end)")
    if unmatched:
        what.append(f"{len(unmatched)} unmatched {' '.join(repr(c) for c in unmatched)} (kept as literal "
                    f"text)")
    return (f"prompt {_short(text)!r} has unbalanced brackets: {' and '.join(what)}, as AUTOMATIC1111 reads "
            "them; balance them, or escape literal ones as \\( \\) \\[ \\]")


def parse(text: str, *, warn: bool = True) -> list[list[tuple[str, float]]]:
    """A prompt in the a1111 syntax -> its parts (split at BREAK), each a list
    of (text, weight) segments with neighbours of equal weight merged and
    empty ones left out.

    `parse("a (red:1.3) ball")` is `[[("a ", 1.0), ("red", 1.3), (" ball", 1.0)]]`.
    An empty part is `[("", 1.0)]`. With `warn`, unbalanced brackets raise a
    UserWarning (`bracket_problems`); a malformed weight (`(a:1.2.3)`) is a
    ValueError.
    """
    segments, unclosed, unmatched = _scan(text)
    if warn and (unclosed or unmatched):
        warnings.warn(bracket_problems(text), stacklevel=2)
    parts: list[list[tuple[str, float]]] = [[]]
    for seg in segments:
        if seg is None:
            parts.append([])
            continue
        part = parts[-1]
        if part and part[-1][1] == seg[1]:
            part[-1] = (part[-1][0] + seg[0], seg[1])
        else:
            part.append((seg[0], seg[1]))
    # Empty segments (a lone backslash, the sides of a BREAK) hold no tokens;
    # dropped after the merge, which they take part in as in A1111.
    return [[(t, w) for t, w in part if t] or [("", 1.0)] for part in parts]


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # Multi-vector textual-inversion tokens spelled out (Tokenizer.expand).
    texts = [tokenizer.expand(t) for t in texts] if getattr(tokenizer, "expansions", None) else texts
    return tokenizer.hf(texts, add_special_tokens=False, padding=False, truncation=False,
                        verbose=False)["input_ids"]


def chunk_tokens(tokenizer, text: str, *, comma_backtrack: int = COMMA_BACKTRACK) -> tuple[np.ndarray, np.ndarray]:
    """One a1111-syntax prompt -> (ids int32 [k, L], weights float32 [k, L]), L
    the tokenizer's `max_length`: k >= 1 chunks of start + up to L - 2 tokens
    + end + padding."""
    size = tokenizer.max_length - 2
    if size < 1:
        raise ValueError(f"tokenizer max_length {tokenizer.max_length} leaves no room for a token between the start "
                         "and end tokens; the text encoder needs a context of 3 or more")
    # The id of "," as a word of its own (A1111's comma_token); None if the vocabulary has none.
    comma = tokenizer.hf.convert_tokens_to_ids(",</w>")
    comma = None if comma == tokenizer.hf.unk_token_id else comma
    parts = parse(text, warn=True)
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    ws: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, ws, last_comma
        chunks.append((ids, ws))
        ids, ws, last_comma = [], [], -1

    for p, part in enumerate(parts):
        if p:
            close()  # BREAK: a chunk ends here, even an empty one (A1111)
        for tokens, (_, weight) in zip(_token_ids(tokenizer, [s for s, _ in part]), part):
            for token in tokens:
                if token == comma:
                    last_comma = len(ids)
                elif comma_backtrack and len(ids) == size and last_comma != -1 and \
                        len(ids) - last_comma <= comma_backtrack:
                    cut = last_comma + 1
                    moved = ids[cut:], ws[cut:]
                    ids, ws = ids[:cut], ws[:cut]
                    close()
                    ids, ws = list(moved[0]), list(moved[1])
                if len(ids) == size:
                    close()
                ids.append(token)
                ws.append(weight)
    if ids or not chunks:
        close()
    bos, eos, pad = tokenizer.hf.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    out_ids = np.full((len(chunks), size + 2), pad, np.int32)
    out_w = np.ones((len(chunks), size + 2), np.float32)
    for row, (t, w) in enumerate(chunks):
        out_ids[row, : len(t) + 2] = [bos, *t, eos]
        out_w[row, 1: len(w) + 1] = w
    return out_ids, out_w


def tokenize(tokenizer, prompts: Sequence[str], syntax: str = "a1111") -> list[tuple[np.ndarray, np.ndarray]]:
    """Each prompt -> (ids int32 [k, L], weights float32 [k, L]) under `syntax`
    ("none": one chunk, cut to the context with the tokenizer's warning)."""
    check_syntax(syntax)
    prompts = list(prompts)
    if syntax == "none":
        ids = tokenizer(prompts)
        return [(row[None], np.ones((1, row.shape[0]), np.float32)) for row in ids]
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for p in prompts:
        if p not in cache:
            cache[p] = chunk_tokens(tokenizer, p)
    return [cache[p] for p in prompts]


def empty_chunk(tokenizer) -> np.ndarray:
    """The ids of a chunk with no tokens: start, end, padding ([L], as the empty prompt's)."""
    ids = np.full((tokenizer.max_length,), tokenizer.pad_token_id, np.int32)
    ids[:2] = tokenizer.hf.bos_token_id, tokenizer.eos_token_id
    return ids


def stack(tokenizer, chunked: Sequence[tuple[np.ndarray, np.ndarray]],
          num_chunks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`tokenize`'s per-prompt chunks -> (ids [n, k, L], weights [n, k, L]),
    every prompt padded with empty chunks (weight 1) to k = `num_chunks`, or
    the most any prompt has when None."""
    most = max((len(ids) for ids, _ in chunked), default=1)
    k = most if num_chunks is None else num_chunks
    if k < most:
        raise ValueError(f"num_chunks {k} is fewer than the {most} chunks a prompt needs; pass {most} or more")
    empty = empty_chunk(tokenizer)
    ids = np.stack([np.concatenate([i, np.tile(empty, (k - len(i), 1))]) for i, _ in chunked])
    ws = np.stack([np.concatenate([w, np.ones((k - len(w), w.shape[1]), np.float32)]) for _, w in chunked])
    return ids, ws


def num_chunks(tokenizer, text: str, syntax: str = "a1111") -> int:
    """How many context-length chunks `text` is encoded in (1 under "none")."""
    check_syntax(syntax)
    if syntax == "none":
        return 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counting, not encoding: `parse` warns when the prompt is encoded
        return len(chunk_tokens(tokenizer, text)[0])
