#!/usr/bin/env bash
# One GPU run of the VLM LoRA benchmark: ours (bench/vlm_bench.py), then the transformers + PEFT peer
# (bench/vlm_peer_hf.py), as separate processes in the same call, then a comparison table.
# Usage (on the GPU machine, repository root): bash bench/run_vlm_h200.sh OUT_DIR [--steps 10 --warmup 2 ...]
# The arguments go to both scripts (the peer ignores the ones that only concern us: --remat, --loss).
set -uo pipefail
out=${1:?out dir}; shift
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION=.92 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax, flax, torch, transformers, peft; print('jax', jax.__version__, 'flax', flax.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
python3 bench/vlm_bench.py "$@" 2>&1 | tee -a "$out/ours.log" | grep '^{' >> "$out/ours.jsonl"
python3 bench/vlm_peer_hf.py "$@" 2>&1 | tee -a "$out/peer.log" | grep '^{' >> "$out/peer.jsonl"
python3 - "$out/ours.jsonl" "$out/peer.jsonl" <<'EOF' | tee "$out/table.md"
import json, sys
rows = [[json.loads(l) for l in open(p) if l.startswith("{")] for p in sys.argv[1:3]]
peer = rows[1][-1] if rows[1] else None
print("| workload | impl | tokens/s | step s | TFLOP/s | MFU | peak GB | compile + 1st step s | vs peer tok/s | "
      "vs peer mem |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows[0]:
    tok = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-"
    mem = f"{r['peak_mem_gb'] / peer['peak_mem_gb']:.2f}x" if peer and peer["peak_mem_gb"] else "-"
    print(f"| {r['workload']} | ours (remat {r['remat']}, {r['loss_impl']}) | {r['tokens_per_s']} | {r['step_s']} | "
          f"{r['model_tflops']} | {r['mfu']} | {r['peak_mem_gb']} | {r['compile_and_first_step_s']} | {tok} | {mem} |")
if peer:
    print(f"| {peer['workload']} | HF + PEFT peer (median step) | {peer['tokens_per_s']} | {peer['step_s']} | "
          f"{peer['model_tflops']} | {peer['mfu']} | {peer['peak_mem_gb']} | {peer['first_step_s']} | 1.00x | 1.00x |")
EOF
