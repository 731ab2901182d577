"""Textual-inversion embeddings: new tokens for the tokenizer, new rows for the text encoder.

Reads the files diffusers' `load_textual_inversion` reads:
- AUTOMATIC1111 `.pt`: `{"string_to_param": {"*": tensor}, "name": ...}`;
- diffusers `learned_embeds.bin` / `.safetensors`: one `{token: tensor}` entry;
- A1111 `.safetensors`: `{"emb_params": tensor}`, its token the file's stem (as A1111 names it;
  diffusers would call it "emb_params");
- a bare tensor saved with `torch.save` (the token must be given);
- SDXL (civitai's form): `{"clip_l": [n, 768], "clip_g": [n, 1280]}`, its token the file's stem.
  Each encoder gets its own vectors and both tokenizers the token, as diffusers' two
  `load_textual_inversion` calls do (text_encoder/tokenizer with clip_l, text_encoder_2/tokenizer_2
  with clip_g; an SDXL refiner has only the second).

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


# SDXL files: one tensor per text encoder, by the bundle's names.
SDXL_PARTS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def _read(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    return core.read_safetensors(path) if path.suffix == ".safetensors" else _load_pickle(path)


def _is_sdxl_file(obj) -> bool:
    return isinstance(obj, dict) and set(SDXL_PARTS) <= set(obj)


def read_embedding(path: str | os.PathLike, token: str | None = None) -> tuple[str, np.ndarray]:
    """(token, vectors [n, dim] float32) of an SD 1.x/2.x textual-inversion file; `token` overrides the
    file's own. An SDXL file (clip_l + clip_g) is read by `read_embedding_parts`."""
    path = Path(path)
    obj = _read(path)
    if _is_sdxl_file(obj):
        raise ValueError(f"embedding {path} is an SDXL embedding (clip_l + clip_g); it loads on an SDXL model "
                         "(add_embeddings, --embedding with an SDXL --model), not on SD 1.x/2.x")
    return _single(path, obj, token)


def _single(path: Path, obj, token: str | None) -> tuple[str, np.ndarray]:
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
        raise ValueError(f"embedding {path} holds {keys}: not a textual-inversion file (expected one "
                         "{token: tensor} entry, emb_params, A1111's string_to_param, or SDXL's clip_l + clip_g)")
    vec = _numpy(vec)
    return token or str(name), vec.reshape(1, -1) if vec.ndim == 1 else vec


def read_embedding_parts(path: str | os.PathLike, token: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """(token, {text encoder: vectors [n, dim] float32}) of any textual-inversion file: an SD one gives
    {"text_encoder": ...}, an SDXL one (clip_l, clip_g) {"text_encoder": clip_l, "text_encoder_2": clip_g},
    its token the file's stem unless `token` gives one."""
    path = Path(path)
    obj = _read(path)
    if not _is_sdxl_file(obj):
        name, vecs = _single(path, obj, token)
        return name, {"text_encoder": vecs}
    parts = {}
    for key, comp in SDXL_PARTS.items():
        vec = _numpy(obj[key])
        parts[comp] = vec.reshape(1, -1) if vec.ndim == 1 else vec
    return token or path.stem, parts


def _extend(tokenizer: Tokenizer, module, te: dict, items, what: str):
    """(tokenizer, module, params) of one text encoder with `items` [(path, token, vectors)] added."""
    hf = copy.deepcopy(tokenizer.hf)
    te = dict(te)
    table = np.asarray(te[_TABLE[0]][_TABLE[1]][_TABLE[2]][_TABLE[3]])
    width = table.shape[1]
    rows: dict[int, np.ndarray] = {}
    expansions = dict(tokenizer.expansions)
    for path, name, vecs in items:
        if vecs.shape[1] != width:
            raise ValueError(f"embedding {path} has {what}vectors of width {vecs.shape[1]}; this text encoder "
                             f"takes {width} (SD1: 768, SD2: 1024, SDXL: clip_l 768 and clip_g 1280). Use an "
                             "embedding made for this model.")
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
    module = module.clone(config=dataclasses.replace(module.config, vocab_size=size))
    return Tokenizer(hf, tokenizer.max_length, expansions), module, te


def add_embeddings(pipe, embeddings: Sequence[tuple[str | os.PathLike, str | None]]):
    """A new bundle whose tokenizer(s) know the embeddings' tokens and whose text encoder(s)' token
    tables have their rows appended (each module's `vocab_size` grows to match).

    `embeddings`: (file, token or None). On SDXL every file must be an SDXL one (clip_l + clip_g):
    the first encoder and tokenizer get clip_l, the second clip_g. Raises `ValueError` for a token
    a tokenizer already has, vectors whose width is not the text encoder's hidden size, or a file
    for the other model family.
    """
    read = [(path, *read_embedding_parts(path, token)) for path, token in embeddings]
    xl = pipe.is_sdxl
    for path, _, parts in read:
        if xl and "text_encoder_2" not in parts:
            raise ValueError(f"embedding {path} is an SD 1.x/2.x embedding (one set of vectors); {pipe.source} is "
                             "SDXL, which takes an SDXL embedding with clip_l and clip_g vectors in one file")
        if not xl and "text_encoder_2" in parts:
            raise ValueError(f"embedding {path} is an SDXL embedding (clip_l + clip_g); {pipe.source} is an "
                             "SD 1.x/2.x model. Use an embedding made for this model.")
    changes = {}
    for tok_name, te_name in _ENCODERS:
        module = getattr(pipe, te_name, None)
        if module is None:  # SD: no second encoder; the SDXL refiner: no first
            continue
        what = {"text_encoder": "clip_l ", "text_encoder_2": "clip_g "}[te_name] if xl else ""
        items = [(path, name, parts[te_name]) for path, name, parts in read]
        tok, module, te = _extend(getattr(pipe, tok_name), module, pipe.params[te_name], items, what)
        changes.update({tok_name: tok, te_name: module})
        changes.setdefault("params", dict(pipe.params))[te_name] = te
    return dataclasses.replace(pipe, **changes)
