"""Textual-inversion embeddings: new tokens for the tokenizer, new rows for the text encoder.

Reads the files diffusers' `load_textual_inversion` reads:
- AUTOMATIC1111 `.pt`: `{"string_to_param": {"*": tensor}, "name": ...}`;
- diffusers `learned_embeds.bin` / `.safetensors`: one `{token: tensor}` entry;
- A1111 `.safetensors`: `{"emb_params": tensor}`, its token the file's stem (as A1111 names it;
  diffusers would call it "emb_params");
- a bare tensor saved with `torch.save` (the token must be given).

An embedding of n vectors adds tokens TOKEN, TOKEN_1 ... TOKEN_{n-1}, and prompts have TOKEN
spelled out as all of them (`Tokenizer.expand`), as diffusers does.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from t2i_jax.convert import core
from t2i_jax.tokenizer import Tokenizer

_TABLE = ("text_model", "embeddings", "token_embedding", "embedding")


def _load_pickle(path: Path):
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise core.ConversionError(f"{path} is a pickled embedding; reading it needs torch "
                                   "(`pip install torch`), or convert it to .safetensors") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise core.ConversionError(f"embedding {path}: torch.load(weights_only=True) refused it ({e}); "
                                   "t2i_jax never unpickles code. Convert it to .safetensors.") from e


def _numpy(x) -> np.ndarray:
    return np.asarray(x.detach().float().numpy() if hasattr(x, "detach") else x, np.float32)


def read_embedding(path: str | os.PathLike, token: str | None = None) -> tuple[str, np.ndarray]:
    """(token, vectors [n, dim] float32) of a textual-inversion file; `token` overrides the file's own."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    obj = core.read_safetensors(path) if path.suffix == ".safetensors" else _load_pickle(path)
    if hasattr(obj, "detach") or isinstance(obj, np.ndarray):
        if token is None:
            raise ValueError(f"embedding {path} is a bare tensor with no token name; pass one as {path}:TOKEN")
        name, vec = token, obj
    elif isinstance(obj, dict) and "string_to_param" in obj:  # A1111
        name, vec = obj.get("name") or path.stem, obj["string_to_param"]["*"]
    elif isinstance(obj, dict) and len(obj) == 1:
        name, vec = next(iter(obj.items()))
        name = path.stem if name == "emb_params" else name
    else:
        keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        hint = " (an SDXL embedding, clip_l + clip_g: t2i_jax runs SD 1.x/2.x)" if isinstance(obj, dict) and {
            "clip_l", "clip_g"} <= set(obj) else ""
        raise ValueError(f"embedding {path} holds {keys}{hint}: not a textual-inversion file (expected one "
                         "{token: tensor} entry, emb_params, or A1111's string_to_param)")
    vec = _numpy(vec)
    return token or str(name), vec.reshape(1, -1) if vec.ndim == 1 else vec


def add_embeddings(pipe, embeddings: Sequence[tuple[str | os.PathLike, str | None]]):
    """A new bundle whose tokenizer knows the embeddings' tokens and whose text encoder's
    token table has their rows appended (the module's `vocab_size` grows to match).

    `embeddings`: (file, token or None). Raises `ValueError` for a token the tokenizer already
    has, or vectors whose width is not the text encoder's hidden size.
    """
    hf = copy.deepcopy(pipe.tokenizer.hf)
    te = dict(pipe.params["text_encoder"])
    table = np.asarray(te[_TABLE[0]][_TABLE[1]][_TABLE[2]][_TABLE[3]])
    width = table.shape[1]
    rows: dict[int, np.ndarray] = {}
    expansions = dict(pipe.tokenizer.expansions)
    for path, token in embeddings:
        name, vecs = read_embedding(path, token)
        if vecs.shape[1] != width:
            raise ValueError(f"embedding {path} has vectors of width {vecs.shape[1]}; this text encoder takes "
                             f"{width} (SD1: 768, SD2: 1024). Use an embedding made for this model.")
        names = [name] + [f"{name}_{i}" for i in range(1, len(vecs))]
        taken = [n for n in names if n in hf.get_vocab()]
        if taken:
            raise ValueError(f"embedding {path}: token {taken[0]!r} is already in the tokenizer's vocabulary; "
                             f"give it another name with {path}:OTHER_NAME")
        for n, v in zip(names, vecs):
            hf.add_tokens(n)
            rows[hf.convert_tokens_to_ids(n)] = v
        if len(names) > 1:
            expansions[name] = " ".join(names)
    size = max(table.shape[0], max(rows) + 1)
    new = np.zeros((size, width), table.dtype)
    new[: table.shape[0]] = table
    for i, v in rows.items():
        new[i] = v.astype(table.dtype)
    embeds = dict(te[_TABLE[0]][_TABLE[1]])
    embeds[_TABLE[2]] = {_TABLE[3]: new}
    te[_TABLE[0]] = {**te[_TABLE[0]], _TABLE[1]: embeds}
    text_encoder = pipe.text_encoder.clone(config=dataclasses.replace(pipe.text_encoder.config, vocab_size=size))
    tokenizer = Tokenizer(hf, pipe.tokenizer.max_length, expansions)
    return dataclasses.replace(pipe, tokenizer=tokenizer, text_encoder=text_encoder,
                               params={**pipe.params, "text_encoder": te})
