"""``python -m integrations.ban compare``: BAN vs BAN + LSTM vs BAN + PO, trained identically over seeds.

Every (variant, seed) is one ordinary training run (the ``train`` command's lifecycle) in
``<out>/runs/<variant>-s<seed>``; the sweep folder itself follows the same rule (a finished sweep
with the same settings prints its report and changes nothing; ``--resume`` continues the runs that
are not finished; ``--overwrite`` starts again). When all runs are finished the sweep writes

* ``results/compare.json``: per run the last epoch's val accuracy overall and per question family,
  the eta / permutation-entropy history; per family mean ± std over seeds for every variant and a
  paired t-test (by seed) of every variant against every other; the same for the row
  ``"order families (pooled)"`` (:data:`POOLED`, synthetic data): per run the mean accuracy of the
  order and position families (:data:`ORDER_FAMILIES`), its mean ± std and paired t-tests by seed;
* ``results/compare.md``: the same as Markdown tables;
* ``results/compare.png``: per-family accuracy with the seed spread, and eta and entropy over training.

Runs with the same seed share the data order and BAN's initial weights (the set encoder's
parameters are created after BAN's), so the tests pair runs by seed.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import traceback
from pathlib import Path
from typing import Dict, List, Sequence

from integrations.common import CheckpointError, CommandError, RunError, RunInterrupted, open_run, positive_int, write_json
from integrations.common.atomic import os_error_in
from integrations.common.cli import describe_os_error
from integrations.common.figures import pyplot, write_png
from integrations.common.lifecycle import CONFIG, NonFiniteError
from integrations.common.pool import run_units
from integrations.common.stats import fmt_mean_std, fmt_p, paired_test, summarize

# Every variant a sweep can train: its label and the train settings it sets. The first four are the
# model choices of the paper (--permutation); the others are the diagnosis's ablations and levers: the
# ordering cost on the box coordinates only (--order-by geometry), the LSTM reading the hard order of P
# (--straight-through) and the ground-truth relevance of the boxes instead of BAN's attention
# (--oracle-relevance, synthetic data).
VARIANTS = {
    "off": ("BAN", {"permutation": "off"}),
    "none": ("BAN + LSTM", {"permutation": "none"}),
    "po-u": ("BAN + PO-U", {"permutation": "po-u"}),
    "po-la": ("BAN + PO-LA", {"permutation": "po-la"}),
    "po-u-geometry": ("BAN + PO-U (geometry cost)", {"permutation": "po-u", "order_by": "geometry"}),
    "po-u-geometry-st": ("BAN + PO-U (geometry cost, hard order)",
                         {"permutation": "po-u", "order_by": "geometry", "straight_through": True}),
    "po-u-oracle": ("BAN + PO-U (oracle relevance)", {"permutation": "po-u", "oracle_relevance": True}),
    "none-oracle": ("BAN + LSTM (oracle relevance)", {"permutation": "none", "oracle_relevance": True}),
}
LABELS = {name: label for name, (label, _) in VARIANTS.items()}

# The order and position families of the synthetic dataset (integrations/ban/research/synth_world.py)
# and the row that pools them: per run the unweighted mean of their accuracies, then summarised and
# tested by seed like a family. Written where at least two of them were evaluated.
ORDER_FAMILIES = ("leftmost", "rightmost", "kth_left", "largest", "smallest")
POOLED = "order families (pooled)"


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", nargs="+", default=["off", "none", "po-u"], choices=tuple(LABELS),
                   help="off: BAN; none: BAN + LSTM; po-u / po-la: BAN + PO (default: off none po-u); ablations: "
                        "po-u-geometry (the ordering cost sees the box coordinates only), po-u-geometry-st (and the "
                        "LSTM reads the hard Hungarian order of P), po-u-oracle / none-oracle "
                        "(the set encoder gets the ground-truth relevance of the boxes; synthetic data)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="one run per variant and seed")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="runs trained side by side, each in its own process with --threads threads (a machine "
                        "with C cores: jobs x threads <= C); the results do not depend on it")


def cell_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def run_args(sweep_args: argparse.Namespace, out: Path, seed: int, settings: dict,
             sweep_only: Sequence[str] = ()) -> argparse.Namespace:
    """The ``train`` args of one run of a sweep: the sweep's flags with the run's ``seed``, ``out`` and
    ``settings``, without the sweep's own flags (``jobs``, ``command`` and ``sweep_only``). Each run
    continues (or reuses) itself where its folder holds it already, and starts where it does not (without
    the ``--resume`` the user did not give, and its message)."""
    cell = copy.copy(sweep_args)
    cell.seed, cell.out = seed, str(out)
    for key, value in settings.items():
        setattr(cell, key, value)
    cell.resume, cell.overwrite = (Path(out) / CONFIG).is_file(), False
    for key in ("jobs", "command", *sweep_only):
        if hasattr(cell, key):
            delattr(cell, key)
    return cell


def _cell_args(args: argparse.Namespace, variant: str, seed: int) -> argparse.Namespace:
    return run_args(args, Path(args.out) / "runs" / cell_name(variant, seed), seed, VARIANTS[variant][1],
                    sweep_only=("variants", "seeds"))


def train_runs(sweep, cells, jobs: int, train) -> None:
    """Train ``cells`` [(name shown in the log, train args)] one after the other (``jobs`` = 1) or in
    ``jobs`` processes (:func:`_train_in_parallel`). An interrupt names the sweep's folder, whose command
    (with --resume) continues it."""
    if jobs > 1 and len(cells) > 1:
        _train_in_parallel(sweep, cells, jobs, train)
        return
    for i, (name, cell) in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {name}", flush=True)
        try:
            train(cell)
        except RunInterrupted as stop:
            # the run wrote its checkpoint; the way to continue is the sweep's command, not the run's
            raise RunInterrupted(stop.signum, i - 1, stop.checkpoint, sweep.path,
                                 where=f"in run {Path(cell.out).name} (checkpoint {stop.checkpoint})") from None


def sweep_config(args: argparse.Namespace) -> dict:
    # jobs is how the sweep is executed, not what it computes: a resumed sweep may change it
    return {k: v for k, v in vars(args).items()
            if k not in ("permutation", "seed", "command", "jobs") and not callable(v)}


def run_sweep(args: argparse.Namespace, *, train=None) -> dict:
    """Train every (variant, seed) not finished yet, then write the report; returns the results."""
    from ..train import run as train_run

    train = train or train_run
    # --variants and --seeds only extend a sweep (more runs, none of the finished ones changes), so
    # --resume accepts longer lists, e.g. --seeds 0 1 2 3 4 after a first look at 0 1
    sweep = open_run(args.out, sweep_config(args), resume=args.resume, overwrite=args.overwrite,
                     may_change=("variants", "seeds"), checkpoints=False)
    if sweep.finished:
        print(f"{sweep.path} holds this finished comparison; nothing to do")
        print((sweep.path / "results" / "compare.md").read_text(encoding="utf-8"))
        return sweep.summary
    # seed-major: an interrupted sweep already holds every variant of its first seeds (paired by seed)
    cells = [(variant, seed) for seed in args.seeds for variant in args.variants]
    jobs = getattr(args, "jobs", 1) or 1
    if jobs < 1:
        raise CommandError(f"--jobs must be a positive int, got {jobs}")
    train_runs(sweep, [(f"{LABELS[v]}, seed {s}", _cell_args(args, v, s)) for v, s in cells], jobs, train)
    results = collect(Path(args.out), args.variants, args.seeds)
    write_report(Path(args.out) / "results", results)
    sweep.finish({"results": str(Path(args.out) / "results" / "compare.json")})
    print((Path(args.out) / "results" / "compare.md").read_text(encoding="utf-8"))
    return results


def _train_cell(train, cell_args: argparse.Namespace):
    """Worker: one run. Exceptions come back as text (a RunInterrupted does not survive pickling): one line
    for what the command line reports in one line (a refused run, bad data, a non-finite loss, an OS
    failure), a traceback for anything else."""
    from ..data import VQADataError

    try:
        train(cell_args)
        return "done", ""
    except RunInterrupted as e:
        return "interrupted", str(e)
    except (RunError, CheckpointError, NonFiniteError, VQADataError) as e:
        return "error", str(e)
    except BaseException as e:
        err = os_error_in(e) if isinstance(e, Exception) else None
        if err is not None:
            return "error", describe_os_error(err)
        return "failed", traceback.format_exc()


def _train_in_parallel(sweep, cells, jobs: int, train) -> None:
    """Train ``cells`` [(name shown in the log, train args)] in ``jobs`` processes (:func:`~integrations.common.pool.run_units`).
    On SIGINT / SIGTERM no further run starts, every running run gets one SIGINT (it finishes its step and writes a
    checkpoint), and RunInterrupted is raised once they have exited; a failed run stops the scheduling and is
    re-raised once the running runs have finished."""
    total, started, finished = len(cells), 0, 0
    failures: List[tuple] = []        # (status, run name, text)

    def start(i: int) -> None:
        nonlocal started
        started += 1
        print(f"[{started}/{total}] {cells[i][0]}: started", flush=True)

    def done(i: int, result) -> None:
        nonlocal finished
        status, text = result
        finished += 1
        name = cells[i][0]
        print(f"[{finished}/{total} finished] {name}: {status}"
              + (f" ({text})" if status in ("interrupted", "error") else ""), flush=True)
        if status in ("failed", "error"):
            failures.append((status, name, text))

    with sweep.interruptible(finishing="the running runs, starting no new one"):
        run_units(_train_cell, [(train, cell_args) for _, cell_args in cells], jobs, sweep.stop_signal, done,
                  on_start=start, more=lambda: not failures)
    signum = sweep.stop_signal()
    if signum is not None:
        raise RunInterrupted(signum, finished, None, sweep.path,
                             where="(the running runs wrote a checkpoint, no new one started)")
    if failures:
        status, name, text = failures[0]
        if status == "error":
            raise RunError(f"run {name} of the sweep stopped: {text}; the finished runs are kept (--resume continues)")
        raise RuntimeError(f"a run of the sweep failed; the finished runs are kept (--resume continues):\n"
                           f"{name}:\n{text}")


# ------------------------------------------------------------------------------------- collecting
def _final(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    if not summary.get("finished"):
        raise RuntimeError(f"{run_dir} is not finished")
    return summary


def collect(out: Path, variants: Sequence[str], seeds: Sequence[int]) -> dict:
    """Per run: the last epoch's val metrics and the monitor history; per family and variant: mean ± std;
    per family and pair of variants: the paired test over seeds (:func:`tabulate`)."""
    runs: Dict[str, dict] = {}
    for variant, seed in itertools.product(variants, seeds):
        summary = _final(out / "runs" / cell_name(variant, seed))
        last = summary["history"][-1]
        acc = {k[len("val_soft_acc/"):]: v for k, v in last.items() if k.startswith("val_soft_acc/")}
        acc["all"] = last["val_soft_acc"]
        curves = {k: [h.get(k) for h in summary["history"]] for k in last
                  if k.startswith("eta/") or k.startswith("permutation_entropy/")}
        runs[cell_name(variant, seed)] = {"variant": variant, "seed": seed, "val": acc, "val_n": last.get("val_n"),
                                          "train_soft_acc": last["train_soft_acc"], "curves": curves,
                                          "epochs": [h["epoch"] for h in summary["history"]]}
    return tabulate(runs, variants, seeds)


def pooled_value(val: Dict[str, float], families: Sequence[str]) -> float | None:
    """A run's :data:`POOLED` accuracy: the unweighted mean of its accuracies on ``families``."""
    values = [val.get(f) for f in families]
    return None if None in values else sum(values) / len(values)


def tabulate(runs: Dict[str, dict], variants: Sequence[str], seeds: Sequence[int]) -> dict:
    """The results of :func:`collect` from the per-run entries ``runs`` (``compare.json``'s ``"runs"``):
    per family and variant mean ± std over ``seeds``, per family and pair of variants the paired test by
    seed, and the same for :data:`POOLED` over the order families the runs were evaluated on
    (``"pooled"``: the row's name and its families)."""
    families = sorted({f for r in runs.values() for f in r["val"]}, key=lambda f: (f != "all", f))
    order = [f for f in ORDER_FAMILIES if f in families]
    rows = {fam: (lambda val, fam=fam: val.get(fam)) for fam in families}
    if len(order) >= 2:
        rows[POOLED] = lambda val: pooled_value(val, order)
    table: Dict[str, Dict[str, dict]] = {}
    tests: Dict[str, Dict[str, dict]] = {}
    for row, value in rows.items():
        per = {v: [value(runs[cell_name(v, s)]["val"]) for s in seeds] for v in variants}
        table[row] = {v: summarize(x) for v, x in per.items() if None not in x}
        tests[row] = {f"{a} vs {b}": paired_test(per[a], per[b]) for a, b in itertools.combinations(variants, 2)
                      if None not in per[a] and None not in per[b]}
    return {"variants": list(variants), "seeds": list(seeds), "families": families, "runs": runs,
            "summary": table, "tests": tests, "pooled": {POOLED: order} if len(order) >= 2 else {}}


# ------------------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    variants, fams = results["variants"], results["families"]
    n_seeds = len(results["seeds"])
    val_n = {r["val_n"] for r in results["runs"].values()}
    lines = [f"Val soft accuracy (%), last epoch, mean ± std over {n_seeds} seeds "
             f"({', '.join(map(str, sorted(val_n)))} val questions).", "",
             "| family | " + " | ".join(LABELS[v] for v in variants) + " |",
             "|---|" + "---|" * len(variants)]
    pooled = results.get("pooled", {})            # absent from reports written before the pooled rows
    rows = [*fams, *pooled]
    for fam in rows:
        cells = [fmt_mean_std(results["summary"][fam].get(v)) for v in variants]
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    for name, members in pooled.items():
        lines += ["", f"{name}: per run the mean accuracy of {', '.join(members)}; then as a family."]
    pairs = list(itertools.combinations(variants, 2))
    if not pairs:                      # one variant: nothing to test
        return "\n".join(lines)
    lines += ["", "Paired t-test over seeds: mean difference in points (first minus second), p-value.", "",
              "| family | " + " | ".join(f"{LABELS[a]} − {LABELS[b]}" for a, b in pairs) + " |",
              "|---|" + "---|" * len(pairs)]
    for fam in rows:
        cells = []
        for a, b in pairs:
            t = results["tests"][fam].get(f"{a} vs {b}")
            cells.append("-" if t is None or t["diff_mean"] is None else f"{100 * t['diff_mean']:+.1f} (p {fmt_p(t['p'])})")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    plt = pyplot()
    import numpy as np

    variants, fams = results["variants"], results["families"]
    curve_keys = sorted({k for r in results["runs"].values() for k in r["curves"]})
    fig, axes = plt.subplots(1, 1 + len(curve_keys), figsize=(max(8.0, 0.9 * len(fams) * len(variants)) +
                                                              4.0 * len(curve_keys), 4.2), squeeze=False)
    ax = axes[0, 0]
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        xs = np.arange(len(fams)) + (j - (len(variants) - 1) / 2) * width
        means = [100 * results["summary"][f][v]["mean"] if v in results["summary"][f] else np.nan for f in fams]
        stds = [100 * results["summary"][f][v]["std"] if v in results["summary"][f] else 0 for f in fams]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=LABELS[v], alpha=0.75)
        for k, f in enumerate(fams):
            pts = [100 * results["runs"][cell_name(v, s)]["val"].get(f, np.nan) for s in results["seeds"]]
            ax.scatter(np.full(len(pts), xs[k]), pts, s=6, color="k", zorder=3)
    ax.set_xticks(np.arange(len(fams)))
    ax.set_xticklabels(fams, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("val soft accuracy (%)")
    ax.set_title("per family: mean ± std over seeds (dots: seeds)", fontsize=9)
    ax.legend(fontsize=8)
    for c, key in enumerate(curve_keys, 1):
        ax = axes[0, c]
        for name, r in results["runs"].items():
            if key in r["curves"]:
                ax.plot(r["epochs"], r["curves"][key], marker=".", lw=1, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(key.split("/")[0].replace("_", " "), fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return write_png(fig, path, dpi=90)


def write_report(folder: Path, results: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "compare.json", results)
    (folder / "compare.md").write_text(markdown(results) + "\n", encoding="utf-8")
    plot(results, folder / "compare.png")
