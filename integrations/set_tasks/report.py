"""From the cell files alone: ``results/summary.json``, ``results/table.md`` and ``results/set_tasks.png``.

For every task and encoder: test accuracy (mean ± std over seeds) at the training sizes and at each
larger test size, MAE for count tasks, time per training step, parameter count, and for the PO
encoders eta, the entropy of P and the Spearman correlation of the Hungarian order with the task's
sort key. Real-valued tasks have no accuracy: they are scored by test MSE (lower is better) wherever
the others are scored by accuracy (``metric`` of a task's entry). Per task, each of our encoders is
compared with the best of PyG's aggregations by a paired t-test over seeds (cells of the same seed share
their training batches and the initial element embedding, so they are paired), and the recommended
setting of the task's family (:data:`.encoders.RECOMMENDED`) gets a table of its own.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from integrations.common import CommandError, write_json
from integrations.common.figures import pyplot, write_png
from integrations.common.stats import fmt_mean_std, fmt_p, paired_test, summarize as summarize_values

from .encoders import BASELINES, ENCODERS, OURS, RECOMMENDED
from .tasks import TASKS

OURS_MAIN = "po-u"                                  # the parameter-count reference
REFERENCE_COST = "set-transformer"                  # step-time yardstick: the common attention-based set encoder


def load_cells(out: Path) -> List[dict]:
    cells = []
    for path in sorted((Path(out) / "cells").glob("*/*/seed*.json")):
        try:
            cells.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as e:
            raise ValueError(f"{path}: not a finished cell file ({e})") from None
    return cells


def _mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {**summarize_values(vals), "values": vals}


def summarize(cells: List[dict]) -> dict:
    """Aggregate the cells per task and encoder (see the module docstring)."""
    tasks = [t for t in TASKS if any(c["task"] == t for c in cells)]
    summary: Dict[str, dict] = {"tasks": {}}
    for t in tasks:
        tc = [c for c in cells if c["task"] == t]
        encoders = [e for e in ENCODERS if any(c["encoder"] == e for c in tc)]
        sizes = sorted({k for c in tc for k in c["test"]}, key=lambda k: (k != "train", int(k) if k.isdigit() else 0))
        # every set of a task, at every size, compared over the cells that were scored on it (PO-LA has no
        # larger sizes): the paired tests need the same sets for every encoder and seed
        differ = sorted({k for c in tc for k in c["fingerprints"]
                         if len({d["fingerprints"][k] for d in tc if k in d["fingerprints"]}) > 1})
        metric = TASKS[t].metric
        entry = {"family": TASKS[t].family, "output": TASKS[t].output, "metric": metric,
                 "description": TASKS[t].description,
                 "same_test_sets": not differ, "differing_sets": differ, "sizes": sizes,
                 "prior": {k: next(c["prior"][k] for c in tc if k in c["prior"]) for k in sizes},
                 "encoders": {}}
        for e in encoders:
            ec = sorted((c for c in tc if c["encoder"] == e), key=lambda c: c["seed"])
            row = {"seeds": [c["seed"] for c in ec], "parameters": ec[0]["parameters"], "width": ec[0]["width"],
                   "encoder_parameters": ec[0]["encoder_parameters"], "invariant": ec[0]["invariant"],
                   "step_ms": _mean_std([c["step_ms"] for c in ec]),
                   "cell_seconds": _mean_std([c.get("wall_seconds") for c in ec]),
                   "best_step": _mean_std([c["best_step"] for c in ec]),
                   "steps": max(c["config"]["steps"] for c in ec),
                   metric: {k: _mean_std([c["test"][k][metric] if k in c["test"] else None for c in ec])
                            for k in sizes}}
            if TASKS[t].output != "class":
                row["mae"] = {k: _mean_std([c["test"][k]["mae"] if k in c["test"] else None for c in ec]) for k in sizes}
            row["values_by_seed"] = {k: {str(c["seed"]): c["test"][k][metric] for c in ec if k in c["test"]}
                                     for k in sizes}
            if any(c.get("eta") is not None for c in ec):
                row["eta"] = _mean_std([c["eta"] for c in ec])
            diag = {}
            for key in ("entropy_rel", "spearman_abs", "spearman"):
                vals = {k: _mean_std([c["test"][k].get(key) if k in c["test"] else None for c in ec]) for k in sizes}
                if any(v["n"] for v in vals.values()):
                    diag[key] = vals
            if diag:
                row["diagnostics"] = diag
            entry["encoders"][e] = row
        entry["comparison"] = _compare(entry)
        summary["tasks"][t] = entry
    return summary


def _ranked(entry: dict, encoders, size: str = "train") -> List[str]:
    """``encoders`` that have a score at ``size``, best first by the task's metric (higher accuracy,
    lower MSE)."""
    metric = entry["metric"]
    scored = {e: entry["encoders"][e][metric][size]["mean"] for e in encoders
              if size in entry["encoders"][e][metric] and entry["encoders"][e][metric][size]["mean"] is not None}
    return sorted(scored, key=lambda e: scored[e] if metric == "mse" else -scored[e])


def _compare(entry: dict) -> dict:
    """Each of our encoders against the best PyG encoder (by the task's ``metric`` at the training sizes:
    the highest mean accuracy, or the lowest mean MSE): the difference ours − best in that metric and a
    paired t-test of it, both over the seeds both have, and its rank among all encoders."""
    enc = entry["encoders"]
    metric = entry["metric"]
    ranking = _ranked(entry, enc)
    means = {e: enc[e][metric]["train"]["mean"] for e in ranking}
    baselines = [e for e in ranking if e in BASELINES]
    out = {"metric": metric, "ranking": ranking, "best": ranking[0] if ranking else None}
    if not baselines:
        return out
    best = baselines[0]
    out["best_baseline"] = best
    theirs = enc[best]["values_by_seed"]["train"]
    for ours in OURS:
        if ours not in means:
            continue
        mine = enc[ours]["values_by_seed"]["train"]
        seeds = sorted(set(mine) & set(theirs), key=int)
        test = paired_test([mine[k] for k in seeds], [theirs[k] for k in seeds])
        # the difference the test is of: over the seeds both have (the same as the means' where they have the same)
        difference = means[ours] - means[best] if set(mine) == set(theirs) else test["diff_mean"]
        out[ours] = {"difference": difference, "paired": test, "rank": ranking.index(ours) + 1,
                     "seeds": len(seeds),
                     "seed_spread": max(enc[ours][metric]["train"]["std"], enc[best][metric]["train"]["std"])}
    return out


def _fmt(ms: Optional[dict], scale: float = 100.0, digits: int = 1) -> str:
    return fmt_mean_std(ms, scale, digits, missing="n/a", std_of_one=False)


def _encoder_table(summary: dict, encoders: List[str], columns: List[tuple], label, value, prior=None) -> List[str]:
    """A Markdown table with one row per encoder (and first a ``prior`` row when ``prior`` is given) and one
    column per ``(task, key)`` of ``columns``: ``label(task, key)`` heads a column, ``value(row, key)`` fills
    an encoder's cell (empty where the encoder did not run the task), ``prior(task's prior, key)`` the prior's."""
    lines = ["| encoder | " + " | ".join(label(t, k) for t, k in columns) + " |", "|---|" + "---|" * len(columns)]
    if prior is not None:
        lines.append("| prior | " + " | ".join(prior(summary["tasks"][t]["prior"], k) for t, k in columns) + " |")
    for e in encoders:
        rows = [(summary["tasks"][t]["encoders"].get(e), k) for t, k in columns]
        lines.append(f"| {e} | " + " | ".join(value(row, k) if row else "" for row, k in rows) + " |")
    return lines


def _prior_accuracy(prior: dict, size: str) -> str:
    return f"{100 * prior[size]['accuracy']:.1f}" if size in prior else ""


def _accuracy_section(summary: dict, tasks: List[str], encoders: List[str]) -> List[str]:
    if not tasks:
        return []
    return ["Test accuracy (%) at the training sizes, mean ± std over seeds; `prior`: the most frequent "
            "answer of the test sets.", ""] + _encoder_table(
        summary, encoders, [(t, "train") for t in tasks], lambda t, _: f"{t} ({summary['tasks'][t]['family']})",
        lambda row, n: _fmt(row["accuracy"][n]), _prior_accuracy)


def _difference(summary: dict, t: str, c: dict) -> str:
    if c["difference"] is None:
        return "n/a"                   # no seed in common (cells of an unfinished sweep): nothing to pair
    return f"{c['difference']:+.4f}" if summary["tasks"][t]["metric"] == "mse" else f"{100 * c['difference']:+.1f}"


def _score(summary: dict, t: str, e: str, size: str = "train") -> str:
    row = summary["tasks"][t]["encoders"].get(e)
    if row is None:
        return ""
    metric = summary["tasks"][t]["metric"]
    return _fmt(row[metric].get(size), 1, 4) if metric == "mse" else _fmt(row[metric].get(size))


def _recommended_section(summary: dict, tasks: List[str], big: List[str]) -> List[str]:
    """The setting the README recommends for each task family against the best PyG encoder."""
    rows = [t for t in tasks if summary["tasks"][t]["comparison"].get(RECOMMENDED.get(summary["tasks"][t]["family"]))]
    if not rows:
        return []
    lines = ["", "The recommended setting of each task family (" +
             ", ".join(f"{f}: `{e}`" for f, e in RECOMMENDED.items()) + ") against the best PyG encoder at the "
             "training sizes (accuracy %, or test MSE for real-valued tasks), the difference in points (MSE), a "
             "paired t-test over the seeds, and both at the larger sizes.", "",
             "| task | family | recommended | score | best PyG | score | difference | p | seeds | rank | " +
             " | ".join(f"N={n}: recommended / best PyG at N={n}" for n in big) + " |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(big)]
    for t in rows:
        entry = summary["tasks"][t]
        ours, c = RECOMMENDED[entry["family"]], entry["comparison"]
        best = c["best_baseline"]
        at_size = []
        for n in big:
            top = next(iter(_ranked(entry, [e for e in BASELINES if e in entry["encoders"]], n)), None)
            at_size.append(f"{_score(summary, t, ours, n)} / {_score(summary, t, top, n) if top else 'n/a'}"
                           + (f" ({top})" if top else ""))
        co = c[ours]
        lines.append(f"| {t} | {entry['family']} | {ours} | {_score(summary, t, ours)} | {best} | "
                     f"{_score(summary, t, best)} | {_difference(summary, t, co)} | {fmt_p(co['paired']['p'])} | "
                     f"{co['seeds']} | {co['rank']} | " + " | ".join(at_size) + " |")
    return lines


def _comparison_section(summary: dict, tasks: List[str]) -> List[str]:
    compared = [o for o in OURS if any(o in summary["tasks"][t]["comparison"] for t in tasks)]
    real = [t for t in tasks if summary["tasks"][t]["metric"] == "mse"]
    real_note = (" Real-valued tasks (marked MSE): the best PyG encoder has the lowest test MSE, the difference "
                 "is in MSE (answer units; negative = ours better), the t-test uses MSE." if real else "")
    lines = ["", "Each of our encoders against the best PyG encoder at the training sizes: difference in accuracy "
             "points (mean over seeds) and the p-value of a paired t-test over seeds; the rank among all "
             "encoders (1 = best) is in summary.json." + real_note, "",
             "| task | best PyG | " + " | ".join(compared) + " |", "|---|---|" + "---|" * len(compared)]
    for t in tasks:
        c = summary["tasks"][t]["comparison"]
        if not c.get("best_baseline"):
            continue
        cols = [f"{_difference(summary, t, c[o])} (p {fmt_p(c[o]['paired']['p'])})" if o in c else "" for o in compared]
        lines.append(f"| {t}{' (MSE)' if t in real else ''} | {c['best_baseline']} | " + " | ".join(cols) + " |")
    return lines


def _size_section(summary: dict, tasks: List[str], encoders: List[str], big: List[str]) -> List[str]:
    if not big or not tasks:            # (real-valued tasks only: their sizes are in the MSE table)
        return []
    return ["", "Size generalisation: test accuracy (%) at N = " + ", ".join(big) +
            " after training at the training sizes (n/a: PO-LA has a fixed number of positions).", ""] + _encoder_table(
        summary, encoders, [(t, n) for t in tasks for n in big], lambda t, n: f"{t} N={n}",
        lambda row, n: _fmt(row["accuracy"].get(n)), _prior_accuracy)


def _count_section(summary: dict, tasks: List[str], encoders: List[str], big: List[str]) -> List[str]:
    counts = [t for t in tasks if summary["tasks"][t]["output"] == "count"]
    if not counts:
        return []
    sizes = ["train"] + big
    return ["", "Count tasks: mean absolute error of the prediction (answer units) at the training sizes and at "
            "N = " + ", ".join(big) + "; `prior`: the MAE of the test sets' median answer.", ""] + _encoder_table(
        summary, encoders, [(t, n) for t in counts for n in sizes],
        lambda t, n: f"{t} {'train' if n == 'train' else 'N=' + n}",
        lambda row, n: _fmt(row["mae"].get(n), 1, 2),
        lambda prior, n: f"{prior[n]['mae']:.2f}" if n in prior else "")


def _regression_section(summary: dict, tasks: List[str], encoders: List[str], big: List[str]) -> List[str]:
    if not tasks:
        return []
    sizes = ["train"] + big
    return ["", "Regression on real-valued sets: test MSE (answer units, lower is better), mean ± std over seeds, "
            "at the training sizes" + (" and at N = " + ", ".join(big) if big else "") +
            "; `prior`: the MSE of the best constant (the test sets' mean answer).", ""] + _encoder_table(
        summary, encoders, [(t, n) for t in tasks for n in sizes],
        lambda t, n: f"{t} {'train' if n == 'train' else 'N=' + n}",
        lambda row, n: _fmt(row["mse"].get(n), 1, 4),
        lambda prior, n: f"{prior[n]['mse']:.4f}" if n in prior else "")


def _cost_section(summary: dict, tasks: List[str], encoders: List[str]) -> List[str]:
    total = sum(sum(r["cell_seconds"]["values"]) for t in tasks for r in summary["tasks"][t]["encoders"].values())
    cells = sum(len(r["cell_seconds"]["values"]) for t in tasks for r in summary["tasks"][t]["encoders"].values())
    lines = ["", "Cost: time per training step (ms, median over steps, mean over tasks and seeds), wall time per "
             f"cell (s, training and evaluation, mean), parameters (whole model, range over tasks; deviation from "
             f"PO-U), step time relative to the Set Transformer's. All cells together: {total:.0f} s of cell time "
             f"over {cells} cells.", "",
             "| encoder | step ms | vs set-transformer | s / cell | parameters | deviation |", "|---|---|---|---|---|---|"]
    ref_rows = [summary["tasks"][t]["encoders"][REFERENCE_COST] for t in tasks
                if REFERENCE_COST in summary["tasks"][t]["encoders"]]
    ref_ms = float(np.mean([r["step_ms"]["mean"] for r in ref_rows])) if ref_rows else None
    for e in encoders:
        rows = [summary["tasks"][t]["encoders"][e] for t in tasks if e in summary["tasks"][t]["encoders"]]
        ms = np.mean([r["step_ms"]["mean"] for r in rows])
        params = [r["parameters"] for r in rows]
        refs = [summary["tasks"][t]["encoders"][OURS_MAIN]["parameters"] for t in tasks
                if e in summary["tasks"][t]["encoders"] and OURS_MAIN in summary["tasks"][t]["encoders"]]
        dev = (f"{100 * min(p / r - 1 for p, r in zip(params, refs)):+.1f} to {100 * max(p / r - 1 for p, r in zip(params, refs)):+.1f} %"
               if len(refs) == len(params) and refs else "n/a")
        secs = [v for r in rows for v in r["cell_seconds"]["values"]]
        sec = f"{np.mean(secs):.1f}" if secs else "n/a"
        ratio = f"{ms / ref_ms:.2f}x" if ref_ms else "n/a"
        lines.append(f"| {e} | {ms:.1f} | {ratio} | {sec} | {min(params)}–{max(params)} | {dev} |")
    return lines


def _step_budget_section(summary: dict, tasks: List[str], encoders: List[str]) -> List[str]:
    return ["", "Step budget: the step of the checkpoint with the lowest validation loss (checked every "
            "`eval_every` steps), mean over seeds; the last step means the model was still improving when "
            "training stopped.", ""] + _encoder_table(
        summary, encoders, [(t, None) for t in tasks], lambda t, _: t, lambda row, _: f"{row['best_step']['mean']:.0f}")


def _diagnostics_section(summary: dict, tasks: List[str], big: List[str]) -> List[str]:
    diag_rows = [(t, e, r) for t in tasks for e, r in summary["tasks"][t]["encoders"].items() if "diagnostics" in r]
    if not diag_rows:
        return []
    lines = ["", "PO diagnostics on the test sets at the training sizes: learned eta, row entropy of P divided "
             "by log n (0 = hard permutation, 1 = uniform), |Spearman| between the Hungarian position and the "
             "sort key (digit / class, x for the position tasks, the value itself for real elements). lstm-only "
             "reads the input order (entropy 0): its |Spearman| is the chance level of an unrelated order.", "",
             "| task | encoder | eta | entropy / log n | " + " | ".join(f"entropy N={n}" for n in big) +
             " | abs Spearman | " + " | ".join(f"abs Spearman N={n}" for n in big) + " |",
             "|---|---|---|---|" + "---|" * (2 * len(big) + 1)]
    for t, e, r in diag_rows:
        d = r["diagnostics"]
        lines.append(f"| {t} | {e} | {_fmt(r.get('eta'), 1, 2)} | {_fmt(d['entropy_rel']['train'], 1, 2)} | " +
                     " | ".join(_fmt(d["entropy_rel"].get(n), 1, 2) for n in big) +
                     f" | {_fmt(d['spearman_abs']['train'], 1, 2)} | " +
                     " | ".join(_fmt(d["spearman_abs"].get(n), 1, 2) for n in big) + " |")
    return lines


def markdown(summary: dict, command: Union[str, Sequence[str]] = "") -> str:
    """Tables: accuracy at the training sizes, size generalisation, count MAE, real-task MSE, cost, PO
    diagnostics. ``command``: the command that wrote the cells, or the commands, in order, of a folder filled
    in stages."""
    tasks = list(summary["tasks"])
    real = [t for t in tasks if summary["tasks"][t]["metric"] == "mse"]
    scored = [t for t in tasks if t not in real]          # the tasks that have an accuracy
    encoders = [e for e in ENCODERS if any(e in summary["tasks"][t]["encoders"] for t in tasks)]
    big = sorted({k for t in tasks for k in summary["tasks"][t]["sizes"] if k != "train"}, key=int)
    commands = [command] if isinstance(command, str) else list(command)
    commands = [c for c in commands if c]
    if len(commands) > 1:
        lines = ["Commands (the folder was filled in stages; its cells are what these wrote together): "
                 + ", then ".join(f"`{c}`" for c in commands), ""]
    else:
        lines = [f"Command: `{c}`" for c in commands] + ([""] if commands else [])
    lines += (_accuracy_section(summary, scored, encoders) + _recommended_section(summary, tasks, big)
              + _comparison_section(summary, tasks)
              + _size_section(summary, scored, encoders, big) + _count_section(summary, tasks, encoders, big)
              + _regression_section(summary, real, encoders, big) + _cost_section(summary, tasks, encoders)
              + _step_budget_section(summary, tasks, encoders)
              + _diagnostics_section(summary, tasks, big))
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """One panel per task: a bar per encoder (mean test accuracy at the training sizes, error bar =
    std over seeds, dots = seeds), and lighter bars for the larger test sizes; dashed line = prior.
    A real task's panel shows the test MSE instead (lower is better, said in its title)."""
    plt = pyplot()

    tasks = list(summary["tasks"])
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        entry = summary["tasks"][t]
        metric = entry["metric"]
        encs = list(entry["encoders"])
        sizes = entry["sizes"]
        width = 0.8 / len(sizes)
        for j, k in enumerate(sizes):
            xs = np.arange(len(encs)) + (j - (len(sizes) - 1) / 2) * width
            means = [entry["encoders"][e][metric][k]["mean"] for e in encs]
            stds = [entry["encoders"][e][metric][k]["std"] for e in encs]
            ax.bar(xs, [np.nan if m is None else m for m in means], width,
                   yerr=[0 if s is None else s for s in stds], alpha=1.0 - 0.3 * j, capsize=2,
                   color=[("C3" if e.startswith("po") else "C0") for e in encs],
                   label="train sizes" if k == "train" else f"N={k}")
            for x, e in zip(xs, encs):
                vals = entry["encoders"][e][metric][k]["values"]
                ax.plot([x] * len(vals), vals, "k.", ms=3)
        ax.axhline(entry["prior"]["train"][metric], ls="--", c="gray", lw=1)
        ax.set_xticks(np.arange(len(encs)))
        ax.set_xticklabels(encs, rotation=60, ha="right", fontsize=7)
        if metric == "mse":         # no upper bound: from 0 up to what the bars need
            ax.set_ylim(bottom=0)
            ax.set_title(f"{t} ({entry['family']}): test MSE, lower is better", fontsize=9)
            ax.set_ylabel("test MSE", fontsize=8)
        else:
            ax.set_ylim(0, 1)
            ax.set_title(f"{t} ({entry['family']})", fontsize=9)
            ax.set_ylabel("test accuracy", fontsize=8)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    write_png(fig, path, dpi=110)


def write_report(out: Path, command: str = "") -> dict:
    """Read ``<out>/cells`` and write ``<out>/results/{summary.json, table.md, set_tasks.png}``.

    The tables cite the command of the run (from ``config.json`` when present, else ``command``): every command
    that filled the folder where ``--resume`` added cells in stages."""
    cells = load_cells(out)
    if not cells:
        raise CommandError(f"--out {out}: no finished cell files under {Path(out) / 'cells'}")
    config = Path(out) / "config.json"
    commands = [command] if command else []
    if config.exists():
        stored = json.loads(config.read_text(encoding="utf-8"))
        commands = stored.get("commands") or ([stored["command"]] if stored.get("command") else commands)
    summary = summarize(cells)
    differ = {t: e["differing_sets"] for t, e in summary["tasks"].items() if e["differing_sets"]}
    if differ:
        raise CommandError(f"--out {out}: cells of one task were scored on different sets (fingerprints differ: "
                           + "; ".join(f"{t} {', '.join(k)}" for t, k in differ.items())
                           + "); their comparison would not be paired: rerun those cells (another torch or --data-seed?)")
    summary["command"] = commands[-1] if commands else ""
    if len(commands) > 1:
        summary["commands"] = commands
    res = Path(out) / "results"
    write_json(res / "summary.json", summary, sort_keys=False)
    (res / "table.md").write_text(markdown(summary, commands), encoding="utf-8")
    plot(summary, res / "set_tasks.png")
    return summary
