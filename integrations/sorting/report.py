"""Result tables (Markdown + JSON) and the heat map of the learned comparison F (paper figures 2-3)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from integrations.common.figures import pyplot, write_png

METRICS = {
    "exact_hungarian": "exact-sort proportion, Hungarian on -P",
    "element_hungarian": "per-element accuracy, Hungarian on -P",
    "exact_soft": "exact-sort proportion, argmax per position of soft P (no Hungarian)",
    "element_soft": "per-element accuracy, argmax per position of soft P (no Hungarian)",
}
NA_NOTE = "n/a: LinAssign has a fixed number of positions (= its training N) and cannot take other set sizes"


def _interval_name(low: float, high: float) -> str:
    return f"[{low:g}, {high:g}]"


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _ok(records: Iterable[Mapping]) -> List[Mapping]:
    return [r for r in records if r.get("status") == "ok"]


def interval_table(records: Sequence[Mapping], metric: str) -> str:
    """Rows (model, N) evaluated at their training size; one column per interval."""
    recs = [r for r in _ok(records) if r["test_size"] == r["train_size"]]
    intervals = sorted({(r["low"], r["high"]) for r in recs})          # the paper's order
    rows = sorted({(r["permutation"], r["train_size"]) for r in recs}, key=lambda t: (t[0] != "po-u", t[0], t[1]))
    lookup = {(r["permutation"], r["train_size"], r["low"], r["high"]): r for r in recs}
    head = "| model | N | " + " | ".join(_interval_name(*iv) for iv in intervals) + " |"
    lines = [head, "|" + "---|" * (2 + len(intervals))]
    for model, n in rows:
        cells = [_fmt(lookup[(model, n, *iv)][metric]) if (model, n, *iv) in lookup else "-" for iv in intervals]
        lines.append(f"| {model} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generalisation_table(records: Sequence[Mapping], metric: str = "exact_hungarian", permutation: Optional[str] = None) -> str:
    """Train size x test size; each cell is the worst of the evaluated intervals (min over intervals)."""
    recs = [r for r in records if permutation is None or r["permutation"] == permutation]
    trains = sorted({(r["permutation"], r["train_size"]) for r in recs}, key=lambda t: (t[0] != "po-u", t[0], t[1]))
    tests = sorted({r["test_size"] for r in recs})
    lines = ["| model | train N \\ test N | " + " | ".join(str(t) for t in tests) + " |",
             "|" + "---|" * (2 + len(tests))]
    for m, n in trains:
        cells = []
        for t in tests:
            rs = [r for r in recs if r["permutation"] == m and r["train_size"] == n and r["test_size"] == t]
            if not rs:
                cells.append("-")
            elif any(r.get("status") != "ok" for r in rs):
                cells.append("n/a")
            else:
                v = _fmt(min(r[metric] for r in rs))
                cells.append(f"**{v}**" if t == n else v)
        lines.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_table(summaries: Sequence[Mapping]) -> str:
    lines = ["| model | N | Adam steps | train time (s) | median s/step | torch threads | final train MSE | eta |",
             "|---|---|---|---|---|---|---|---|"]
    for s in sorted(summaries, key=lambda s: (s["permutation"] != "po-u", s["permutation"], s["set_size"])):
        eta = ", ".join(f"{v:.3f}" for v in s.get("eta", {}).values()) or "-"
        loss = "-" if s.get("final_loss") is None else f"{s['final_loss']:.2e}"
        lines.append(f"| {s['permutation']} | {s['set_size']} | {s['steps_done']}/{s['total_train_steps']} | "
                     f"{s['train_seconds']:.0f} | {s['median_step_seconds']:.3f} | {s['torch_threads']} | {loss} | {eta} |")
    return "\n".join(lines)


def markdown_report(records: Sequence[Mapping], summaries: Sequence[Mapping] = (), *, title: str = "Sorting results") -> str:
    ok = _ok(records)
    n_sets = sorted({r["num_sets"] for r in ok})
    parts = [f"## {title}", "",
             f"Float64 evaluation, {', '.join(map(str, n_sets))} test sets per (set size, interval).", ""]
    for metric, desc in METRICS.items():
        parts += [f"### {desc}", "", interval_table(records, metric), ""]
    if len({r["test_size"] for r in records}) > 1:
        for metric in ("exact_hungarian", "exact_soft"):
            parts += [f"### Size generalisation: {METRICS[metric]}, worst of the intervals", "",
                      generalisation_table(records, metric), ""]
            if any(r.get("status") == "n/a" for r in records):
                parts += [NA_NOTE, ""]
    if summaries:
        parts += ["### Training", "", timing_table(summaries), ""]
    return "\n".join(parts)


@torch.no_grad()
def comparison_grid(cost, low: float, high: float, points: int = 201) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values (G,), F (G, G), f (G, G)) with ``F[a, b] = f(v_a, v_b) - f(v_b, v_a)`` (eq. 8), unnormalised.

    ``cost`` is the model's :class:`setperm.PairwiseCost` with one channel; ``F > 0`` means the row
    number is ordered after the column number.
    """
    v = torch.linspace(low, high, points, dtype=torch.float64)
    a = v.view(-1, 1, 1).expand(points, points, 1)
    b = v.view(1, -1, 1).expand(points, points, 1)
    f = copy.deepcopy(cost).to(dtype=torch.float64).pair_scores(a, b)[..., 0]
    return v, f - f.t(), f


def draw_heatmap(cost, path: str | Path, intervals: Sequence[Tuple[float, float]] = ((0.0, 1.0), (0.0, 1000.0)),
                 points: int = 201) -> Path:
    """PNG heat map of the learned ``F`` (top row, paper figure 2) and ``f`` (bottom row, figure 3)."""
    plt = pyplot()

    fig, axes = plt.subplots(2, len(intervals), figsize=(4.2 * len(intervals), 7.6), squeeze=False)
    for col, (low, high) in enumerate(intervals):
        v, F_, f = comparison_grid(cost, low, high, points)
        for row, (M, name, cmap) in enumerate(((F_, "F(x_i, x_j)", "RdBu_r"), (f, "f(x_i, x_j)", "viridis"))):
            ax = axes[row, col]
            lim = float(M.abs().max())
            kw = dict(vmin=-lim, vmax=lim) if row == 0 else {}
            im = ax.imshow(M.numpy(), cmap=cmap, extent=(low, high, high, low), interpolation="nearest", **kw)
            ax.xaxis.tick_top()
            ax.xaxis.set_label_position("top")
            ax.set_xlabel("x_j")
            ax.set_ylabel("x_i")
            ax.set_title(f"{name} on [{low:g}, {high:g}]", fontsize=10, pad=22)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return write_png(fig, path, dpi=80)
