"""Markdown tables of the mosaic runs in a folder: the tables of integrations/mosaic/README.md.

    python -m integrations.mosaic.collect [RUNS]          # RUNS: default runs/mosaic

Every sub-folder of RUNS that holds a run of ``python -m integrations.mosaic train`` (its
``config.json``) counts, whatever its name: the run's task, dataset, tiles and permutation are read
from its ``config.json``. Rows: models; columns: dataset x tiles. Each cell is the final test metric
of the run's ``summary.json`` ("–" while the run is not finished). Tables 1 and 4 come from
``--task mosaic`` runs, Tables 2 and 5 from ``--task classify`` runs (whose *max* / *min* rows are the
frozen classifier on the original / shuffled images). Where several runs share a cell (e.g. other
epochs or seeds), the table shows the first by folder name and says which ones it left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..common import HelpFormatter, run_command

PROG = "python -m integrations.mosaic.collect"
MODELS = (("linassign", "LinAssign"), ("po-u", "PO-U"), ("po-la", "PO-LA"))
DATASETS = (("mnist", "MNIST"), ("fashion-mnist", "Fashion-MNIST"), ("cifar10", "CIFAR-10 subset"),
            ("tiny-imagenet", "Tiny ImageNet"))

Key = Tuple[str, str, int, str]          # (task, dataset, tiles, permutation)


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_runs(runs: Path) -> Dict[Key, List[Path]]:
    """The run folders directly under ``runs`` by (task, dataset, tiles, permutation), from each run's
    ``config.json`` (sorted by folder name); folders without a readable one are not runs."""
    found: Dict[Key, List[Path]] = {}
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        cfg = _read_json(folder / "config.json")
        if cfg is None or not {"task", "dataset", "tiles", "permutation"} <= set(cfg):
            continue
        key = (str(cfg["task"]), str(cfg["dataset"]), int(cfg["tiles"]), str(cfg["permutation"]))
        found.setdefault(key, []).append(folder)
    return found


def _final(folder: Path) -> Optional[dict]:
    summary = _read_json(folder / "summary.json")
    return summary.get("final") if summary is not None else None


def table(found: Dict[Key, List[Path]], runs: Path, metric: str, scale: float, fmt: str,
          classify: bool = False) -> str:
    task = "classify" if classify else "mosaic"
    labels = dict(DATASETS)
    order = {d: i for i, (d, _) in enumerate(DATASETS)}
    cols = sorted({(d, n) for (t, d, n, _) in found if t == task}, key=lambda c: (order.get(c[0], len(order)), c))
    if not cols:
        return f"(no {'classification' if classify else 'mosaic'} runs in {runs})"
    lines = ["| model | " + " | ".join(f"{labels.get(d, d)} {n}x{n}" for d, n in cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    rows = [("max", "max"), ("min", "min")] + list(MODELS) if classify else list(MODELS)
    left_out = []
    for key, name in rows:
        cells = []
        for d, n in cols:
            if key in ("max", "min"):           # the frozen classifier: the same in every classify run of (d, n)
                folders = [f for m, _ in MODELS for f in found.get((task, d, n, m), [])]
                f = next((x for x in map(_final, folders) if x is not None), None)
                if metric == "acc":
                    v = f.get(f"acc_{key}") if f else None
                else:                            # mse_soft: 0 on the original images, mse_min on shuffled ones
                    v = (0.0 if key == "max" else f.get("mse_min")) if f else None
            else:
                folders = found.get((task, d, n, key), [])
                f = _final(folders[0]) if folders else None
                v = f.get(metric) if f else None
                if len(folders) > 1:
                    left_out.append(f"{folders[0].name} (left out: {', '.join(p.name for p in folders[1:])})")
            cells.append("–" if v is None else format(v * scale, fmt))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if left_out:
        lines.append(f"(several runs per cell; shown: {'; '.join(left_out)})")
    return "\n".join(lines)


def timing(found: Dict[Key, List[Path]]) -> str:
    lines = ["| run | train images | epochs | test images | training time (s) |", "|---|---|---|---|---|"]
    for p in sorted(f for folders in found.values() for f in folders):
        d = _read_json(p / "summary.json")
        if d is None or "final" not in d:
            continue
        epochs = (d.get("config") or _read_json(p / "config.json") or {}).get("epochs")
        lines.append(f"| {p.name} | {d.get('n_train')} | {epochs} | {d.get('n_test')} | "
                     f"{d['final'].get('train_seconds')} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="?", type=Path, default=Path("runs/mosaic"),
                   help="folder holding the run folders (default runs/mosaic)")
    args = p.parse_args(argv)
    runs = args.runs
    if not runs.is_dir():
        raise FileNotFoundError(f"{runs}: no such folder (give the folder that holds the mosaic runs)")
    found = find_runs(runs)
    print("Table 1 (MSE, Hungarian)\n" + table(found, runs, "mse", 1, ".3f"))
    print("\nTable 4 (exact-permutation accuracy %)\n" + table(found, runs, "acc_perm", 100, ".1f"))
    print("\nPixel-exact reconstruction %\n" + table(found, runs, "acc_pixel", 100, ".1f"))
    print("\nTable 2 (classification accuracy %, soft assignment)\n"
          + table(found, runs, "acc", 100, ".1f", classify=True))
    print("\nTable 5 (MSE of the soft implicit reconstruction)\n"
          + table(found, runs, "mse_soft", 1, ".3f", classify=True))
    print("\nRuns\n" + timing(found))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, PROG))
