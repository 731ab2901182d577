#!/bin/bash
# Run the same training command on every worker of a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   PROJECT=my-proj REPO_DIR=~/t2i_jax PYTHON=~/venv/bin/python launch/tpu_vm.sh my-v4-32 us-central2-b \
#       configs/celeba_ldm.py /mnt/shared/runs/celeba_ldm --config.batch_size=512
#
# `gcloud compute tpus tpu-vm ssh --worker=all` starts the command on all workers at
# once; on a multi-worker slice `--distributed=auto` sees TPU_WORKER_HOSTNAMES and
# jax.distributed.initialize() finds coordinator, process count and id from the TPU
# metadata. Every worker needs the repository at REPO_DIR and its Python
# environment (set them up once with SETUP=1, which pip-installs the repo and
# jax[tpu]). WORKDIR must be a path every worker sees (an NFS / Filestore mount,
# or a bucket mounted with gcsfuse; the trainer uses local paths, not gs:// URLs):
# checkpoints are written by every worker, metrics by worker 0.
# The command runs under nohup in the background and logs to ~/t2i_jax_train.log
# on each worker, so a dropped ssh does not stop training; attach with
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=0 --command='tail -f ~/t2i_jax_train.log'
set -euo pipefail
TPU=${1:?usage: launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
REPO_DIR=${REPO_DIR:-~/t2i_jax}
PYTHON=${PYTHON:-python3}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

quote() { printf '%q ' "$@"; }
EXTRA=$(quote "$@")

if [[ "${SETUP:-0}" == 1 ]]; then
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" $PROJECT_FLAG --worker=all \
    --command="cd $REPO_DIR && $PYTHON -m pip install -e . 'jax[tpu]'"
fi

CMD="cd $REPO_DIR && nohup $PYTHON -m t2i_jax.train --config $(quote "$CONFIG") --workdir $(quote "$WORKDIR") \
--distributed=auto $EXTRA > ~/t2i_jax_train.log 2>&1 &"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" $PROJECT_FLAG --worker=all --command="$CMD"
echo "started on all workers of $TPU; logs: ~/t2i_jax_train.log on each worker"
