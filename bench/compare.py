"""Print the BENCHMARKS.md table from our JSON lines and the HF peer's (same workloads, same GPU run).

    python bench/compare.py ours.jsonl peer.jsonl
"""
import json
import sys


def _rows(path):
    rows = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def main(ours_path: str, peer_path: str) -> None:
    peer = {r["workload"].split()[0]: r for r in _rows(peer_path)}
    print("| workload | impl | tokens/s | step s | TFLOP/s | MFU | peak GB | compile s | vs peer tok/s | vs peer mem |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in _rows(ours_path):
        key = r["workload"].split()[0]
        p = peer.get(key)
        ratio = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x" if p else "-"
        mem = f"{r['peak_mem_gb'] / p['peak_mem_gb']:.2f}x" if p else "-"
        print(f"| {r['workload']} | ours ({r['remat']}, {r['loss_impl']}) | {r['tokens_per_s']} | {r['step_s']} | "
              f"{r['model_tflops']} | {r['mfu']} | {r['peak_mem_gb']} | {r['compile_s']} | {ratio} | {mem} |")
        if p:
            print(f"| {p['workload']} | HF peer | {p['tokens_per_s']} | {p['step_s']} | {p['model_tflops']} | "
                  f"{p['mfu']} | {p['peak_mem_gb']} | - | 1.00x | 1.00x |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
