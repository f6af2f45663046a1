#!/usr/bin/env bash
# Start one dynface worker on one GPU.
#
# Why a claim step: Docker turns an NVIDIA device request of `count: 1` into NVIDIA_VISIBLE_DEVICES=0
# for every container (moby's countToDevices), so `docker compose up --scale worker=N` with
# `count: 1` would put every replica on GPU 0. The compose file instead gives each replica all GPUs
# and this script takes an exclusive flock(1) on <claim dir>/gpu<i>.lock for the first free i,
# then runs the worker with CUDA_VISIBLE_DEVICES=i. The claim dir is a volume shared by the
# replicas of one host; the kernel drops a lock when its holder dies, so a crashed or stopped
# replica frees its GPU with no clean-up.
#
# Without DYNFACE_GPU_CLAIM_DIR (Kubernetes: the device plugin already hands each pod exactly one
# GPU) or with CUDA_VISIBLE_DEVICES already set (pinned by hand), no claim is made.
#
# Extra arguments are passed to `dynface worker`.
set -euo pipefail

claim_dir="${DYNFACE_GPU_CLAIM_DIR:-}"
if [[ -z "$claim_dir" || -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  exec dynface worker --device cuda:0 "$@"
fi

gpu_count() {
  if [[ -n "${DYNFACE_GPU_COUNT:-}" ]]; then
    echo "$DYNFACE_GPU_COUNT"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    # grep -c prints 0 but exits 1 when nvidia-smi lists no GPU (or fails, saying why on stderr):
    # `|| true`, or `set -e` would end the script here without the message below.
    # One line per physical GPU: MIG instances (indented "MIG ..." lines) are not counted, and this
    # claim cannot hand them out (CUDA_VISIBLE_DEVICES=<index> names a GPU, not a MIG instance): on
    # a MIG host pin each worker to its instance's UUID by hand (CUDA_VISIBLE_DEVICES=MIG-...).
    nvidia-smi -L | grep -c '^GPU ' || true
  else
    python -c 'import torch; print(torch.cuda.device_count())'
  fi
}

n="$(gpu_count)"
if ! [[ "$n" =~ ^[0-9]+$ ]] || [[ "$n" -lt 1 ]]; then
  echo "dynface-gpu-worker: no GPU visible in this container (use the cpu profile on hosts without GPUs)" >&2
  # Slow the restart loop, as for a surplus replica below.
  sleep "${DYNFACE_GPU_CLAIM_RETRY_DELAY:-60}"
  exit 1
fi

mkdir -p "$claim_dir"
for ((i = 0; i < n; i++)); do
  # fd 9 stays open across exec, so the running worker itself holds the lock for its lifetime.
  exec 9>"$claim_dir/gpu$i.lock"
  if flock --nonblock 9; then
    echo "dynface-gpu-worker: claimed GPU $i of $n" >&2
    export CUDA_VISIBLE_DEVICES="$i"
    exec dynface worker --device cuda:0 "$@"
  fi
  exec 9>&-
done

echo "dynface-gpu-worker: all $n GPUs of this host are claimed by other workers; scale to at most $n" >&2
# Slow the restart loop of a surplus replica instead of spinning.
sleep "${DYNFACE_GPU_CLAIM_RETRY_DELAY:-60}"
exit 1
