"""Score a folder of generated images: `python -m t2i_jax.eval DIR [--clip PATH_OR_ID] [--json OUT]`.

DIR is what `python -m t2i_jax.sample --out DIR` wrote: PNGs and a
`manifest.jsonl` naming each PNG and its prompt. Two scores:

- shapes prompt adherence (`t2i_jax.eval.adherence`), for the images whose
  prompt parses as a shapes prompt ("a small red circle on a blue
  background"): accuracy of background colour, shape colour, shape kind,
  size, and all of them;
- CLIP score (`t2i_jax.eval.clip_score`, 100 * max(cos, 0)), when a CLIP
  checkpoint is given with --clip (e.g. openai/clip-vit-large-patch14).

Prints a table and writes the scores and per-image results as JSON
(default DIR/eval.json), atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from t2i_jax.eval import adherence
from t2i_jax.files import atomic_write

MANIFEST = "manifest.jsonl"


def read_run(folder: str | Path) -> tuple[list[dict], list[np.ndarray], int]:
    """The manifest entries of a sampler output folder and their images (uint8 HWC RGB).

    A later line with the same job key replaces an earlier one (the sampler
    appends a new line when it remakes a PNG). Lines that are not JSON (cut
    by a kill) are skipped and counted. Returns (entries, images, skipped).
    Raises FileNotFoundError for a missing folder, manifest or PNG, and
    ValueError for a manifest line without file/prompt or an unreadable PNG.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist; pass the --out folder of python -m t2i_jax.sample")
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {folder}: {manifest} is written by `python -m t2i_jax.sample --out {folder}`; "
            "score a folder that the sampler wrote")
    entries: dict[Any, dict] = {}
    skipped = 0
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "prompt" not in entry:
            raise ValueError(f"{manifest} line {n} has no \"file\" and \"prompt\": {line[:120]!r}")
        entries[entry.get("key", n)] = {**entry, "line": n}
    entries_list = list(entries.values())
    if not entries_list:
        raise ValueError(f"{manifest} lists no images; generate some with python -m t2i_jax.sample --out {folder}")
    missing = [e for e in entries_list if not (folder / e["file"]).is_file()]
    if missing:
        first = missing[0]
        raise FileNotFoundError(
            f"{len(missing)} of {len(entries_list)} images in {manifest} are missing, first {folder / first['file']} "
            f"(line {first['line']}); re-run the same python -m t2i_jax.sample command to make them again, "
            "or delete those manifest lines")
    images = []
    for e in entries_list:
        path = folder / e["file"]
        try:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read {path} ({type(err).__name__}: {err}); delete it and re-run the "
                             "sampler to remake it, or delete its manifest line") from err
    return entries_list, images, skipped


def evaluate_run(folder: str | Path, *, clip: str | None = None, batch_size: int = 16,
                 clip_weight: float = 100.0) -> dict[str, Any]:
    """Scores a sampler output folder; returns the JSON-ready results dict.

    {"dir", "num_images", "skipped_lines", "adherence": AdherenceReport dict
    or None, "clip": CLIPScorer.evaluate dict or None}; per-image rows carry
    the PNG's "file".
    """
    entries, images, skipped = read_run(folder)
    prompts = [str(e["prompt"]) for e in entries]
    result: dict[str, Any] = {"dir": str(Path(folder).resolve()), "num_images": len(images),
                              "skipped_lines": skipped, "adherence": None, "clip": None}
    scorer = None
    if clip is not None:  # load first: a bad --clip fails before any scoring
        from t2i_jax.eval.clip_score import CLIPScorer

        scorer = CLIPScorer(clip, batch_size=batch_size, weight=clip_weight)
    shapes = [i for i, p in enumerate(prompts) if adherence.parse_caption(p) is not None]
    if shapes:
        report = adherence.evaluate([images[i] for i in shapes], [prompts[i] for i in shapes]).to_dict()
        for i, row in zip(shapes, report["per_image"]):
            row["file"] = entries[i]["file"]
        report["num_images"] = len(images)  # parsed out of all, not of the shapes subset
        result["adherence"] = report
    if scorer is not None:
        scores = scorer.evaluate(images, prompts)
        scores["per_image"] = [{"file": e["file"], "prompt": p, "score": s}
                               for e, p, s in zip(entries, prompts, scores["per_image"])]
        result["clip"] = scores
    return result


def format_results(result: dict[str, Any]) -> str:
    """The printed summary of `evaluate_run`'s dict."""
    lines = [f"{result['num_images']} image(s) in {result['dir']}"]
    if result["skipped_lines"]:
        lines.append(f"skipped {result['skipped_lines']} manifest line(s) that are not JSON (cut by a kill?)")
    a = result["adherence"]
    if a is None:
        lines.append("shapes adherence: no prompt parsed as a shapes prompt (e.g. 'a small red circle on a blue "
                     "background'); skipped")
    else:
        lines.append(f"shapes adherence: {a['num_parsed']} of {a['num_images']} prompts parsed as shapes prompts; "
                     "accuracy in %")
        report = adherence.AdherenceReport(**{k: a[k] for k in ("accuracy", "counts", "num_parsed", "per_image")},
                                           num_images=a["num_images"])
        lines.append(adherence.format_adherence_table(report))
    c = result["clip"]
    if c is None:
        lines.append("CLIP score: skipped (pass --clip openai/clip-vit-large-patch14 or a CLIPModel folder)")
    else:
        lines.append(f"CLIP score ({c['weight']:g} * max(cos, 0), {c['model']}): {c['clip_score']:.2f} "
                     f"+- {c['clip_score_std']:.2f} over {c['num_images']} image(s)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m t2i_jax.eval", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="a folder written by python -m t2i_jax.sample (PNGs + manifest.jsonl)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--clip", help="CLIPModel folder or hub id for the CLIP score "
                                  "(e.g. openai/clip-vit-large-patch14); default: no CLIP score")
    g.add_argument("--no-clip", action="store_true", help="no CLIP score (the default without --clip)")
    p.add_argument("--clip-weight", type=float, default=100.0,
                   help="score = weight * max(cos, 0): 100 (text-to-image CLIP score, default) or 2.5 "
                        "(Hessel et al. CLIP-S)")
    p.add_argument("--batch-size", type=int, default=16, help="CLIP batch size")
    p.add_argument("--json", help="where to write the results (default: DIR/eval.json)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Scores `args.dir`, prints the table, writes the JSON; returns the results."""
    result = evaluate_run(args.dir, clip=None if args.no_clip else args.clip, batch_size=args.batch_size,
                          clip_weight=args.clip_weight)
    print(format_results(result))
    out = Path(args.json) if args.json else Path(args.dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode("utf-8")))
    print(f"results in {out}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
