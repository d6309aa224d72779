"""Markdown tables from the run folders of ``reduced_budget.sh``.

python -m integrations.mosaic.collect [RUNS=runs/mosaic]

Rows: models; columns: dataset x tiles. Each cell is the final test metric of the run folder
``<dataset>-<n>-<model>`` (mosaic) or ``<dataset>-<n>-classify-<model>`` / ``<dataset>-<n>-pretrain`` (classify).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..common import run_command

MODELS = (("linassign", "LinAssign"), ("po-u", "PO-U"), ("po-la", "PO-LA"))
DATASETS = (("mnist", "MNIST"), ("cifar10", "CIFAR-10 subset"), ("tiny", "Tiny ImageNet"))


def _final(folder: Path):
    p = folder / "summary.json"
    return json.loads(p.read_text(encoding="utf-8"))["final"] if p.is_file() else None


def table(runs: Path, metric: str, scale: float, fmt: str, classify: bool = False) -> str:
    cols = [(d, dn, n) for d, dn in DATASETS for n in (2, 3, 4, 5)
            if any((runs / (f"{d}-{n}-classify-{m}" if classify else f"{d}-{n}-{m}")).is_dir() for m, _ in MODELS)]
    if not cols:
        return f"(no {'classification' if classify else 'mosaic'} runs in {runs})"
    head = "| model | " + " | ".join(f"{dn} {n}x{n}" for _, dn, n in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    rows = list(MODELS)
    if classify:
        rows = [("max", "max"), ("min", "min")] + rows
    for key, name in rows:
        cells = []
        for d, _, n in cols:
            if key in ("max", "min"):
                f = _final(runs / f"{d}-{n}-classify-po-u") or _final(runs / f"{d}-{n}-classify-linassign")
                k = {"acc": f"acc_{key}", "mse_soft": None}[metric] if f else None
                v = (f.get(k) if k else (0.0 if key == "max" else f.get("mse_min"))) if f else None
            else:
                f = _final(runs / (f"{d}-{n}-classify-{key}" if classify else f"{d}-{n}-{key}"))
                v = f.get(metric) if f else None
            cells.append("–" if v is None else format(v * scale, fmt))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing(runs: Path) -> str:
    lines = ["| run | train images | epochs | test images | training time (s) |", "|---|---|---|---|---|"]
    for p in sorted(runs.iterdir()):
        m = p / "summary.json"
        if not m.is_file():
            continue
        d = json.loads(m.read_text(encoding="utf-8"))
        f = d["final"]
        lines.append(f"| {p.name} | {d['n_train']} | {d['config']['epochs']} | {d['n_test']} | {f.get('train_seconds')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    runs = Path(argv[0] if argv else "runs/mosaic")
    if not runs.is_dir():
        raise FileNotFoundError(f"{runs}: no such folder (give the folder that holds the mosaic runs)")
    print("Table 1 (MSE, Hungarian)\n" + table(runs, "mse", 1, ".3f"))
    print("\nTable 4 (exact-permutation accuracy %)\n" + table(runs, "acc_perm", 100, ".1f"))
    print("\nPixel-exact reconstruction %\n" + table(runs, "acc_pixel", 100, ".1f"))
    print("\nTable 2 (classification accuracy %, soft assignment)\n" + table(runs, "acc", 100, ".1f", classify=True))
    print("\nTable 5 (MSE of the soft implicit reconstruction)\n" + table(runs, "mse_soft", 1, ".3f", classify=True))
    print("\nRuns\n" + timing(runs))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "python -m integrations.mosaic.collect"))
