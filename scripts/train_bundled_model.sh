#!/usr/bin/env bash
# Reproduces the bundled model t2i_jax/assets/shapes_model end to end, from scratch, on CPU:
#   1. VAE         configs/bundled_vae.py   (tiny AutoencoderKL, 32 px -> 16x16x4)
#   2. CLIP        configs/bundled_clip.py  (tiny CLIP, 4x4 patches, contrastive; its text tower is kept)
#   3. U-Net       configs/bundled_ldm.py   (3-level conditional U-Net, 3.3M params, on the frozen 1 + 2)
#   4. copy the diffusers export (fp16 safetensors) into t2i_jax/assets/shapes_model
#   5. score 100 prompts (50 held-out attribute combinations + 50 eval-split ones), redraw docs/gallery.png
#
#   bash scripts/train_bundled_model.sh [RUNS_DIR]      # default RUNS_DIR: runs/bundled
#
# Each stage resumes from its checkpoints if run again. Extra environment:
#   PYTHON (default: python), SKIP_EVAL=1 (stop after the copy), EVAL_STEPS (default 50).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/bundled}
PY=${PYTHON:-python}
DEST=t2i_jax/assets/shapes_model
mkdir -p "$RUNS"

stage() {  # name, then the command; prints its wall time
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@"
  echo "=== $name done in $((SECONDS - t0)) s"
}

stage vae  $PY -m t2i_jax.train --config configs/bundled_vae.py  --workdir "$RUNS/vae"  --config.progress=False
stage clip $PY -m t2i_jax.train --config configs/bundled_clip.py --workdir "$RUNS/clip" --config.progress=False
stage ldm  $PY -m t2i_jax.train --config "configs/bundled_ldm.py:vae=$RUNS/vae/export,text=$RUNS/clip/export" \
  --workdir "$RUNS/ldm" --config.progress=False

echo "=== copy $RUNS/ldm/export -> $DEST (fp16 safetensors)"
rm -rf "$DEST.tmp"
$PY - "$RUNS/ldm/export" "$DEST.tmp" <<'PY'
import sys

import numpy as np

from t2i_jax.convert.load import load_components
from t2i_jax.train.export import export_pipeline

export_pipeline(load_components(sys.argv[1]), sys.argv[2], dtype=np.float16)
PY
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
du -sh "$DEST"

if [[ "${SKIP_EVAL:-0}" != 1 ]]; then
  echo "=== eval: 100 prompts (50 holdout + 50 eval split), ${EVAL_STEPS:-50} steps, default guidance 7.5"
  $PY - "$RUNS/prompts.jsonl" <<'PY'
import json
import sys

from t2i_jax.data.shapes import ShapesSource

with open(sys.argv[1], "w") as f:
    for split in ("holdout", "eval"):
        src = ShapesSource(32, split=split, seed=1234)
        for i in range(50):
            f.write(json.dumps({"prompt": src[i]["captions"][0], "seed": i}) + "\n")
PY
  rm -rf "$RUNS/eval_out"
  $PY -m t2i_jax.sample --prompts-file "$RUNS/prompts.jsonl" --steps "${EVAL_STEPS:-50}" --batch-size 50 \
    --out "$RUNS/eval_out"
  $PY -m t2i_jax.eval "$RUNS/eval_out"
  echo "=== gallery: docs/gallery_prompts.txt -> docs/gallery.png"
  rm -rf "$RUNS/gallery"
  $PY -m t2i_jax.sample --prompts-file docs/gallery_prompts.txt --batch-size 16 --out "$RUNS/gallery"
  $PY scripts/make_gallery.py "$RUNS/gallery" docs/gallery.png
fi
