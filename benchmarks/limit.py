"""How far from the machine's limit: the layer's achieved throughput as a fraction of the
throughput measured on this machine in the same run.

    python -m benchmarks.limit [--threads 2] [--out runs/benchmarks]

Machine ceilings (measured here, same threads): float32 GEMM GFLOP/s (2048^2 ``torch.mm``), the
batched-matmul GFLOP/s at the inner optimisation's own shape ``(B, N, N) @ (B, N, N)``, DRAM
bandwidth (a 256 MiB copy, read + write bytes), and the elementwise rate of an L2-resident
``torch.add`` over one pairwise-kernel chunk (2^18 floats; 1 flop per element).

Work of each piece of the encoder (fwd+bwd, counted from the algorithm, not from the code):
- ordering cost: ``E = B N^2 H`` pairwise hidden units; forward add + ReLU + K multiply-adds
  (2 + 2K flops), backward compare + two contractions (1 + 4K flops): ``(3 + 6K) E`` flops. The
  chunked kernel (``setperm``) runs them as separate passes over cache-resident chunks, so its
  ceiling is the elementwise rate; the fused kernel (``setperm-compiled``) keeps the hidden units
  in registers, so its ceiling is the arithmetic (GEMM) rate;
- inner optimisation: ``T`` steps of ``C B`` (``2 B N^3`` flops forward, twice that backward) at the
  batched-matmul rate of that shape (Sinkhorn and cumulative sums are O(B N^2) and not counted);
- LSTM: ``8 B N h (D + h)`` flops forward, twice that backward, at the GEMM rate.
The attainable time is the sum of work / rate; the achieved fraction is attainable / measured.
"""
from __future__ import annotations

import sys
from typing import Dict

import torch

from integrations.common import run_command

from .harness import (KERNEL_OF, breakdown, common_parser, markdown_table, median_time, naming_no_compiled, prepare, vqa,
                      write_results)


def ceilings(threads: int, bmm_shapes, tiny: bool = False) -> Dict[str, float]:
    n = 256 if tiny else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: torch.mm(a, b), 1, 5)
    out = {"gemm_gflops": 2 * n ** 3 / t / 1e9}
    size = (1 << 20) if tiny else (64 << 20)                 # floats: 256 MiB
    src, dst = torch.randn(size), torch.empty(size)
    t = median_time(lambda: dst.copy_(src), 1, 5)
    out["dram_gbs"] = 2 * 4 * size / t / 1e9
    del src, dst
    x, y, z = torch.randn(1 << 18), torch.randn(1 << 18), torch.empty(1 << 18)
    reps = 50
    t = median_time(lambda: [torch.add(x, y, out=z) for _ in range(reps)], 1, 5)
    out["l2_elementwise_gflops"] = reps * (1 << 18) / t / 1e9
    for B, N in bmm_shapes:
        p, q = torch.randn(B, N, N), torch.randn(B, N, N)
        t = median_time(lambda: torch.bmm(p, q), 1, 5)
        out[f"bmm_gflops_B{B}_N{N}"] = 2 * B * N ** 3 / t / 1e9
    return out


def analyse(cfg, ceil: Dict[str, float], args, impl: str = "setperm") -> Dict[str, object]:
    b = breakdown(cfg, impl, args.warmup, args.repeats, args.device)
    B, N, H, K, T, D, h = cfg.batch, cfg.n, cfg.hidden, 1, cfg.steps, cfg.in_features, cfg.lstm_hidden
    work = {"cost": (3 + 6 * K) * B * N * N * H, "optimise": 3 * T * 2 * B * N ** 3,
            "lstm": 3 * 8 * B * N * h * (D + h)}
    cost_rate = ceil["gemm_gflops"] if KERNEL_OF[impl] == "compiled" else ceil["l2_elementwise_gflops"]
    rate = {"cost": cost_rate, "optimise": ceil[f"bmm_gflops_B{B}_N{N}"],
            "lstm": ceil["gemm_gflops"]}
    row: Dict[str, object] = {"config": cfg.name, "impl": impl}
    attainable = measured = 0.0
    for part in ("cost", "optimise", "lstm"):
        ideal = work[part] / (rate[part] * 1e9)
        row[f"{part}_ms"] = 1e3 * b[part]
        row[f"{part}_gflops"] = work[part] / b[part] / 1e9
        row[f"{part}_fraction"] = ideal / b[part]
        attainable += ideal
        measured += b[part]
    row["total_ms"] = 1e3 * measured
    row["attainable_ms"] = 1e3 * attainable
    row["fraction"] = attainable / measured
    return row


def main(argv=None) -> int:
    p = common_parser(__doc__.split("\n\n")[0], prog="python -m benchmarks.limit")
    args = p.parse_args(argv)
    path, info = prepare(args, "limit_tiny.json" if args.tiny else "limit.json")
    cfgs = [vqa(8, 2)] if args.tiny else [vqa(100, 64), vqa(100, 896), vqa(1024, 4)]
    ceil = ceilings(args.threads, sorted({(c.batch, c.n) for c in cfgs}), args.tiny)
    impls = ["setperm"] if args.no_compiled else ["setperm", "setperm-compiled"]
    rows = [analyse(c, ceil, args, impl) for c in cfgs for impl in impls]
    t1 = markdown_table([{"ceiling": k, "value": v} for k, v in ceil.items()],
                        [("ceiling", "measured ceiling"), ("value", "GFLOP/s or GB/s")])
    t2 = markdown_table(rows, [("config", "configuration"), ("impl", "implementation"), ("cost_ms", "cost ms"), ("cost_gflops", "cost GFLOP/s"),
                               ("cost_fraction", "cost fraction"), ("optimise_ms", "optimisation ms"),
                               ("optimise_gflops", "optimisation GFLOP/s"), ("optimise_fraction", "optimisation fraction"),
                               ("lstm_ms", "LSTM ms"), ("lstm_gflops", "LSTM GFLOP/s"), ("lstm_fraction", "LSTM fraction"),
                               ("attainable_ms", "attainable ms"), ("total_ms", "measured ms"),
                               ("fraction", "achieved fraction")])
    print("## machine ceilings\n\n" + t1 + "\n\n## setperm encoder fwd+bwd vs the ceilings\n\n" + t2)
    write_results(path, info, args, ceilings=ceil, rows=rows)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(naming_no_compiled(main), "python -m benchmarks.limit"))
