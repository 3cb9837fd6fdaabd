#!/usr/bin/env bash
# One GPU run: our train step and the HF + PEFT peer on the same workloads, in the same call, then the table.
# Usage (on the GPU machine, repository root): bash bench/run_h200.sh OUT_DIR "w1 w2 w3:save_dots" [train_bench args]
set -uo pipefail
out=${1:?out dir}; workloads=${2:-"w1 w2 w3 w4"}; shift 2 || true
export XLA_PYTHON_CLIENT_MEM_FRACTION=.92 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
for spec in $workloads; do  # "w3:save_dots" runs w3 with that activation-checkpointing policy
  w=${spec%%:*}; remat=none; [[ $spec == *:* ]] && remat=${spec#*:}
  python3 bench/train_bench.py "$w" --remat "$remat" "$@" 2>&1 | tee -a "$out/ours.log" | grep '^{' >> "$out/ours.jsonl"
  python3 .carry/peer_hf.py "$w" 2>&1 | tee -a "$out/peer.log" | grep '^{' >> "$out/peer.jsonl"
done
python3 bench/compare.py "$out/ours.jsonl" "$out/peer.jsonl" | tee "$out/table.md"
