"""Tiles a sampler output folder's PNGs (manifest order) into a grid, each image upscaled (nearest).

    python -m t2i_jax.sample --prompts-file docs/gallery_prompts.txt --batch-size 16 --out out/gallery
    python scripts/make_gallery.py out/gallery docs/gallery.png [--cols 4] [--scale 4]
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a python -m t2i_jax.sample --out folder (with manifest.jsonl)")
    ap.add_argument("dest", type=Path, help="the PNG to write")
    ap.add_argument("--cols", type=int, default=4)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--pad", type=int, default=4)
    args = ap.parse_args(argv)
    manifest = args.folder / "manifest.jsonl"
    if not manifest.is_file():
        raise SystemExit(f"{manifest} not found: pass the --out folder of python -m t2i_jax.sample")
    entries = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    tiles = []
    for e in entries:
        im = Image.open(args.folder / e["file"]).convert("RGB")
        tiles.append(np.asarray(im.resize((im.width * args.scale, im.height * args.scale), Image.NEAREST)))
    th, tw = tiles[0].shape[:2]
    pad, cols = args.pad, args.cols
    rows = -(-len(tiles) // cols)
    sheet = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[pad + r * (th + pad):pad + r * (th + pad) + th, pad + c * (tw + pad):pad + c * (tw + pad) + tw] = t
    Image.fromarray(sheet).save(args.dest, optimize=True)
    print(f"{len(tiles)} images -> {args.dest}")


if __name__ == "__main__":
    main()
