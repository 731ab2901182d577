#!/usr/bin/env bash
# One GPU check: parity with diffusers/transformers at fp32 and bf16, cuDNN vs
# XLA attention, sampling and training throughput against diffusers, SDXL at
# 1024x1024 (30 steps, batch 1 and best batch, against diffusers and the MLPerf
# TensorRT anchor), and the targets, in one table (python -m
# t2i_jax.bench.gpu_check; --help lists the flags, thresholds and targets).
#
#   bash scripts/gpu_check.sh                 # the full check, about 10 minutes on an H100/H200 (--budget-s 600)
#   bash scripts/gpu_check.sh --sections sdxl # the SDXL line alone
#   bash scripts/gpu_check.sh --smoke         # tiny configs, any machine, well under a minute
#   bash scripts/gpu_check.sh --sections parity,attention
#
# What it does, in order:
#   1. Without --smoke: `nvidia-smi -L` must list a GPU, else it says so on one
#      line and exits 2.
#   2. If wheels/ (or .whl/) in the repository root holds *.whl files, installs
#      them offline: pip install --no-index --no-deps <those files>. A GPU machine
#      that cannot reach a package index gets diffusers (and what it needs)
#      this way. Make the folder on a machine that can, for the GPU machine's
#      Python (3.12 here) and CPU (x86_64):
#
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#          --platform manylinux2014_x86_64 -d wheels \
#          diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 \
#          ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
#
#      (--no-deps fetches no dependencies: each missing one is named. The check
#      itself needs only diffusers and importlib_metadata (+ lazy-importer) beside
#      jax[cuda], torch and transformers; ml_collections and grain are the
#      trainers'.) GPU_CHECK_WHEELS=DIR picks another folder;
#      GPU_CHECK_PIP_TARGET=DIR installs there (pip --target) and puts it on
#      PYTHONPATH, for a read-only site-packages. A failed install is a warning:
#      the rows that need a missing package say so and the rest runs.
#   3. Without --smoke: jax must see a GPU, else one line and exit 2.
#   4. Runs python -m t2i_jax.bench.gpu_check with your flags, writing
#      --json and --markdown into ${GPU_CHECK_OUT:-gpu_check_out}/ unless you
#      name them. Its exit status is this script's: 0, or 1 when a parity
#      row failed.
#
# Environment: PYTHON (default python3), NVIDIA_SMI (default nvidia-smi),
# GPU_CHECK_WHEELS, GPU_CHECK_PIP_TARGET, GPU_CHECK_OUT.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
smi="${NVIDIA_SMI:-nvidia-smi}"
# The package is imported from this checkout (installed or not); relative
# paths in the flags stay relative to the caller's folder.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# jax must not take 75% of the GPU up front: torch shares it in the same process.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

die() { echo "gpu_check.sh: $*" >&2; exit 2; }

smoke=0 help=0 has_json=0 has_md=0
for a in "$@"; do
  case "$a" in
    --smoke) smoke=1 ;;
    -h | --help) help=1 ;;
    --json | --json=*) has_json=1 ;;
    --markdown | --markdown=*) has_md=1 ;;
  esac
done
if ((help)); then
  exec "$py" -m t2i_jax.bench.gpu_check --help
fi

if ((!smoke)); then
  hint="run this on a GPU machine, or pass --smoke for the tiny CPU run"
  command -v "$smi" >/dev/null 2>&1 || die "no NVIDIA GPU: '$smi' is not installed; $hint"
  "$smi" -L 2>/dev/null | grep -q "^GPU" || die "no NVIDIA GPU: '$smi -L' lists none; $hint"
fi

wheels="${GPU_CHECK_WHEELS:-}"
if [[ -z "$wheels" ]]; then
  for d in "$root/wheels" "$root/.whl"; do
    if compgen -G "$d/*.whl" >/dev/null; then wheels="$d" && break; fi
  done
fi
if [[ -n "$wheels" ]] && compgen -G "$wheels/*.whl" >/dev/null; then
  echo "gpu_check.sh: installing the wheels in $wheels (offline, no dependencies)" >&2
  target=()
  if [[ -n "${GPU_CHECK_PIP_TARGET:-}" ]]; then
    target=(--target "$GPU_CHECK_PIP_TARGET" --upgrade)
    export PYTHONPATH="$GPU_CHECK_PIP_TARGET:$PYTHONPATH"
  fi
  "$py" -m pip install -q --no-index --no-deps --no-cache-dir "${target[@]}" "$wheels"/*.whl ||
    echo "gpu_check.sh: warning: installing the wheels in $wheels failed (above); going on with what is installed" >&2
elif [[ -n "$wheels" ]]; then
  echo "gpu_check.sh: warning: GPU_CHECK_WHEELS=$wheels holds no .whl files" >&2
fi

if ((!smoke)); then
  seen="$("$py" -c 'import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)' 2>/dev/null)" ||
    die "'$py' cannot import jax; install jax[cuda13] or jax[cuda12] (pip install -U 'jax[cuda13]')"
  [[ "$seen" == gpu* ]] ||
    die "jax sees no GPU (its first device: ${seen:-none}); install jax[cuda13] or jax[cuda12], and unset JAX_PLATFORMS"
fi

out="${GPU_CHECK_OUT:-gpu_check_out}"
stamp="$(date -u +%Y%m%d-%H%M%S)"
extra=()
((has_json)) || extra+=(--json "$out/gpu_check-$stamp.json")
((has_md)) || extra+=(--markdown "$out/gpu_check-$stamp.md")
exec "$py" -m t2i_jax.bench.gpu_check "$@" "${extra[@]}"
