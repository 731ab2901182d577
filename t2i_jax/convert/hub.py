"""Resolve a local path or a Hugging Face Hub id to a local folder or file."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

# `org/name`, optionally followed by a file inside the repo (`org/name/x.ckpt`).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(s: str) -> bool:
    """True if `s` looks like a hub repo id (`org/name`) rather than a path."""
    return bool(_HUB_ID.fullmatch(s)) and not s.startswith((".", "/", "~"))


def resolve(path_or_id: str | os.PathLike, *, allow_patterns: Sequence[str] | None = None,
            revision: str | None = None) -> Path:
    """Returns a local path for a file or folder, downloading hub ids.

    A path that exists is returned as is. Otherwise `org/name` is fetched with
    `huggingface_hub.snapshot_download` (restricted to `allow_patterns`), which
    also serves it from the local cache when offline. Anything else, or a hub
    id that cannot be fetched, raises `FileNotFoundError` saying what to do.
    """
    s = os.fspath(path_or_id)
    p = Path(s).expanduser()
    if p.exists():
        return p
    if not is_hub_id(s):
        raise FileNotFoundError(
            f"{s!r} is neither an existing file or folder nor a hub id of the form 'org/name'"
        )
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(s, allow_patterns=allow_patterns, revision=revision))
    except Exception as e:  # offline, no such repo, gated repo, network errors
        raise FileNotFoundError(
            f"could not get {s!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            f"If this machine is offline, download it where there is network "
            f"(`hf download {s} --local-dir DIR`), copy DIR here and pass the folder path instead. "
            f"For a gated model, log in first (`hf auth login`)."
        ) from e
