"""``python -m integrations.sorting {train,eval,table,demo}``: flags mirror the paper's hyperparameters (F.1)."""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from integrations.common import (CommandError, refuse_po_u_without_steps, with_help_formatter, add_kernel_argument, add_run_arguments, add_threads_argument, device_name, non_negative_int, positive_float,
                                 positive_int, resolve_device, run_folder, set_threads, ensure_new, write_json,
                                 write_new_json)

from integrations.common.lifecycle import CONFIG

from .data import PAPER_INTERVALS
from .model import PERMUTATIONS

PROG = "python -m integrations.sorting"
DEMO_OUT = "runs/sorting-demo"


# ---------------------------------------------------------------- argument types (argparse errors, exit 2)
def set_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"set size must be an integer, got {text!r}") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"set size must be >= 2 (nothing to sort otherwise), got {n}")
    return n


def interval(text: str):
    """``LOW,HIGH`` (or ``LOW:HIGH``) with finite LOW < HIGH."""
    parts = text.replace(":", ",").split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"interval must be LOW,HIGH (e.g. 0,1), got {text!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise argparse.ArgumentTypeError(f"interval bounds must be finite, got {text!r}")
    if not low < high:
        raise argparse.ArgumentTypeError(f"empty interval {text!r}: need LOW < HIGH")
    return (low, high)


# ---------------------------------------------------------------- parser
def _add_train_flags(p: argparse.ArgumentParser, *, set_size_default: Optional[int], out_default: Optional[str],
                     stop_at: bool = True) -> None:
    g = p.add_argument_group("model and training (paper F.1 defaults)")
    g.add_argument("--set-size", "-N", type=set_size, default=set_size_default, required=set_size_default is None,
                   help="number of elements per set (paper: 5, 10, 15, 80, 100, 120, 512, 1024)")
    g.add_argument("--permutation", choices=PERMUTATIONS, default="po-u",
                   help="po-u: permutation optimisation from a uniform init; linassign: Mena et al. 2018 baseline")
    g.add_argument("--steps", "-T", type=non_negative_int, default=6, help="inner gradient steps T (paper: 6)")
    g.add_argument("--lr", type=positive_float, default=0.1, help="Adam learning rate (paper: 0.1)")
    g.add_argument("--batch-size", type=positive_int, default=512, help="sets per Adam step (paper: 512)")
    sz = g.add_mutually_exclusive_group()
    sz.add_argument("--train-sets", type=positive_int, default=None,
                    help="training sets in total, fresh U[0,1) draws (paper: 2**18 -> 512 Adam steps)")
    sz.add_argument("--size-pow", type=non_negative_int, default=None, help="train on 2**SIZE_POW sets (paper: 18)")
    g.add_argument("--micro-batch", type=positive_int, default=None,
                   help="sets per forward/backward inside one Adam step (gradient accumulation; same "
                        "update as the full batch). Default: chunks of at most 4 MiB per (mb, N, N) tensor")
    g.add_argument("--cost-hidden", type=positive_int, default=16, help="hidden units of f (paper: 16)")
    add_kernel_argument(g)
    g.add_argument("--eta-init", type=positive_float, default=1.0, help="initial inner step size eta (paper: 1.0)")
    g.add_argument("--sinkhorn-iters", type=positive_int, default=4, help="Sinkhorn iterations L (paper: 4)")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="Sinkhorn temperature (paper: 1)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of the weights and of the training sets")
    g.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda[:i] or mps")
    add_threads_argument(g)
    add_run_arguments(g, out_help="run folder (default: runs/sorting/<permutation>-n<N>-s<seed>)" if out_default is None
                      else f"run folder (default: {out_default})")
    g.add_argument("--checkpoint-every", type=positive_int, default=64, help="Adam steps between checkpoints")
    if stop_at:        # the demo trains to the end, then evaluates: it has no partial run to stop at
        g.add_argument("--stop-at", type=positive_int, default=None,
                       help="stop after this many Adam steps (as an interruption would; continue with --resume)")


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (float64, paper F.1)")
    g.add_argument("--intervals", type=interval, nargs="+", default=list(PAPER_INTERVALS), metavar="LOW,HIGH",
                   help="evaluation intervals (default: the paper's seven)")
    g.add_argument("--test-sets", type=positive_int, default=512, help="test sets per (size, interval) (paper: 512)")
    g.add_argument("--eval-batch", type=positive_int, default=32, help="sets per evaluation batch")
    g.add_argument("--eval-seed", type=non_negative_int, default=12345, help="seed of the test sets")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,table,demo}")

    t = sub.add_parser("train", help="train PO-U or LinAssign on U[0,1) sets of one size",
                       description="Train PO-U or LinAssign on fresh U[0,1) sets of one size (paper F.1).")
    _add_train_flags(t, set_size_default=None, out_default=None)

    e = sub.add_parser("eval", help="evaluate a trained run on intervals and set sizes (float64)",
                       description="Evaluate a trained run (its newest intact checkpoint) in float64.")
    e.add_argument("--run", required=True, help="training run directory (or a checkpoint .pt)")
    e.add_argument("--set-sizes", type=set_size, nargs="+", default=None, metavar="N",
                   help="test set sizes (default: the training size)")
    _add_eval_flags(e)
    e.add_argument("--device", type=device_name, default="cpu", help="auto, cpu, cuda[:i] or mps")
    add_threads_argument(e)
    e.add_argument("--out", default=None, help="JSON file (default: <run>/eval_n<sizes>.json; <run>/eval.json without --set-sizes)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never done otherwise)")

    tb = sub.add_parser("table", help="Markdown + JSON tables from eval files, and the heat map of F",
                        description="Markdown + JSON tables from eval files, and the heat map of F (figure 2).")
    tb.add_argument("--evals", nargs="+", required=True, help="eval JSON files (globs allowed); later ones win")
    tb.add_argument("--out", default="runs/sorting/table", help="folder for results.md / results.json")
    tb.add_argument("--heatmap-run", default=None, help="a PO-U run whose learned F is drawn (paper figure 2)")
    tb.add_argument("--heatmap", default=None, help="PNG path (default: <out>/comparison.png)")

    d = sub.add_parser("demo", help="train PO-U at a small N, evaluate on the seven intervals, print the table",
                       description="Train PO-U (or --permutation linassign) at a small N with the paper's protocol, "
                                   "evaluate it on the seven intervals and further sizes, print the tables. A "
                                   "finished demo is reused.")
    _add_train_flags(d, set_size_default=10, out_default=DEMO_OUT, stop_at=False)
    _add_eval_flags(d)
    d.add_argument("--eval-sizes", type=set_size, nargs="*", default=[5, 15, 30],
                   help="further test sizes for the size-generalisation table")
    d.set_defaults(out=DEMO_OUT)
    return with_help_formatter(p)


def _resolved_train_config(args: argparse.Namespace) -> dict:
    if args.size_pow is not None:
        train_sets = 2 ** args.size_pow
    else:
        train_sets = args.train_sets if args.train_sets is not None else 2 ** 18
    out = args.out or f"runs/sorting/{args.permutation}-n{args.set_size}-s{args.seed}"
    keys = ("set_size", "permutation", "steps", "lr", "batch_size", "cost_hidden", "eta_init", "sinkhorn_iters",
            "temperature", "seed", "device", "resume", "overwrite", "checkpoint_every", "stop_at", "threads",
            "micro_batch", "kernel")
    cfg = {k: getattr(args, k, None) for k in keys}
    cfg.update(train_sets=train_sets, out=str(out))
    return cfg


# ---------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from .train import train

    cfg = _resolved_train_config(args)
    set_threads(args.threads)
    s = train(cfg)
    print(json.dumps(s, indent=2))
    print(f"results: {Path(cfg['out']) / 'summary.json'}")
    return 0


def _eval_settings(sizes, intervals, test_sets, eval_seed) -> dict:
    from .evaluate import SET_BLOCK

    # set_block fixes how the test sets are drawn: an evaluation written without it drew other sets
    return dict(set_sizes=[int(n) for n in sizes], intervals=[[float(a), float(b)] for a, b in intervals],
                test_sets=int(test_sets), eval_seed=int(eval_seed), set_block=SET_BLOCK)


def _run_eval(run: str, set_sizes, intervals, test_sets, eval_batch, eval_seed, dev, out: Path, *,
              overwrite: bool = False) -> List[dict]:
    from .evaluate import evaluate
    from .train import load_checkpoint

    model, cfg, which = load_checkpoint(run)
    if not which["finished"]:
        print(f"warning: {which['checkpoint']} is step {which['step']} of {which['total_train_steps']}: the run is "
              f"not finished (continue it with train --resume); evaluating it as it is", file=sys.stderr, flush=True)
    sizes = set_sizes or [cfg["set_size"]]
    ensure_new(Path(out), overwrite=overwrite)       # refuse before spending the evaluation time
    t0 = time.perf_counter()

    def log(r):
        if r["status"] == "ok":
            print(f"{r['permutation']} train N={r['train_size']} test N={r['test_size']} [{r['low']:g}, {r['high']:g}]: "
                  f"exact {r['exact_hungarian']:.3f} elem {r['element_hungarian']:.4f} (Hungarian) | "
                  f"exact {r['exact_soft']:.3f} elem {r['element_soft']:.4f} (soft argmax)  {r['seconds']:.1f}s",
                  flush=True)
        else:
            print(f"{r['permutation']} train N={r['train_size']} test N={r['test_size']}: {r['status']} ({r['reason']})")

    records = evaluate(model, cfg, sizes, intervals, num_sets=test_sets, batch_size=eval_batch, seed=eval_seed,
                       device=resolve_device(dev), log=log)
    payload = dict(run=str(run), **which, config=cfg, **_eval_settings(sizes, intervals, test_sets, eval_seed),
                   torch_threads=torch.get_num_threads(), seconds=time.perf_counter() - t0, records=records)
    write_new_json(Path(out), payload, overwrite=overwrite)
    print(f"wrote {out}")
    return records


def cmd_eval(args) -> int:
    set_threads(args.threads)
    sizes = args.set_sizes
    default_name = "eval_n" + "-".join(map(str, sizes)) + ".json" if sizes else "eval.json"
    out = Path(args.out) if args.out else run_folder(args.run) / default_name
    _run_eval(args.run, sizes, args.intervals, args.test_sets, args.eval_batch, args.eval_seed, args.device, out,
              overwrite=args.overwrite)
    return 0


# what every record of an ``eval`` file holds, and what a scored one ("status": "ok") holds besides
_RECORD_KEYS = ("permutation", "train_size", "test_size", "low", "high", "status")
_SCORE_KEYS = ("num_sets", "exact_hungarian", "element_hungarian", "exact_soft", "element_soft", "mse_soft")


def _read_eval(f: str) -> dict:
    """The payload of an ``eval`` file, or a CommandError naming the file (a glob such as
    ``runs/sorting/*/*.json`` also matches each run's config.json and summary.json)."""
    def refuse(why: str) -> CommandError:
        return CommandError(f"--evals: {f} is not an evaluation file of '{PROG} eval' ({why})")

    try:
        payload = json.loads(Path(f).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise refuse(f"not JSON: {e}") from None
    records = payload.get("records") if isinstance(payload, dict) else None
    if not isinstance(records, list) or not isinstance(payload.get("run"), str):
        raise refuse("no 'records' list and 'run'")
    for k, r in enumerate(records):
        keys = _RECORD_KEYS + (_SCORE_KEYS if isinstance(r, dict) and r.get("status") == "ok" else ())
        missing = [key for key in keys if not isinstance(r, dict) or key not in r]
        if missing:
            raise refuse(f"record {k} lacks {', '.join(missing)}")
    return payload


def _load_evals(patterns: Sequence[str]):
    files = []
    for pat in patterns:
        hits = sorted(glob.glob(pat))
        if not hits:
            raise CommandError(f"--evals {pat!r} matches no file")
        files += hits
    merged, summaries = {}, {}
    for f in files:
        payload = _read_eval(f)
        for r in payload["records"]:
            merged[(r["permutation"], r["train_size"], r["test_size"], r["low"], r["high"])] = r
        summary = Path(payload["run"]) / "summary.json"
        if summary.is_file():
            summaries[str(summary.resolve())] = json.loads(summary.read_text(encoding="utf-8"))
    return list(merged.values()), list(summaries.values())


def _write_tables(records, summaries, out: Path, title: str) -> str:
    from .report import markdown_report

    out.mkdir(parents=True, exist_ok=True)
    md = markdown_report(records, summaries, title=title)
    write_json(out / "results.json", dict(records=records, training=summaries))
    (out / "results.md").write_text(md + "\n", encoding="utf-8")
    return md


def _heatmap(run: str, path: Path) -> Path:
    from .report import draw_heatmap
    from .train import load_trained

    model, cfg = load_trained(run, flag="--heatmap-run")
    if model.cost is None:
        raise SystemExit(f"heat map: run {run} ({cfg['permutation']}) has no learned comparison F")
    return draw_heatmap(model.cost, path)


def cmd_table(args) -> int:
    records, summaries = _load_evals(args.evals)
    out = Path(args.out)
    md = _write_tables(records, summaries, out, "Sorting numbers: results")
    print(md)
    if args.heatmap_run:
        print(f"wrote {_heatmap(args.heatmap_run, Path(args.heatmap or out / 'comparison.png'))}")
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


def cmd_demo(args) -> int:
    """Train PO-U at a small N with the paper's protocol, evaluate on the seven intervals, print tables.

    A finished demo with the same settings is reused as it is: nothing on disk changes."""
    from .train import train

    cfg = _resolved_train_config(args)
    out = Path(cfg["out"])
    # re-running the demo continues (or reuses) its own run; a first run simply starts
    cfg["resume"] = not cfg["overwrite"] and (out / CONFIG).is_file()
    set_threads(args.threads)
    s = train(cfg)
    loss = s.get("final_loss")
    print(f"trained {s['permutation']} N={s['set_size']}: {s['steps_done']} Adam steps, {s['train_seconds']:.1f} s, "
          f"final MSE {'n/a' if loss is None else f'{loss:.3g}'}, eta {s['eta']}")
    sizes = [cfg["set_size"]] + [n for n in args.eval_sizes if n != cfg["set_size"]]
    eval_file = out / "eval.json"
    settings = _eval_settings(sizes, args.intervals, args.test_sets, args.eval_seed)
    previous = json.loads(eval_file.read_text(encoding="utf-8")) if eval_file.is_file() else None
    # the stored evaluation must also be of the model trained now: a --resume with more --train-sets
    # continues the same run (same run_id) to a later step, whose scores the old file does not hold
    run_id = json.loads((out / CONFIG).read_text(encoding="utf-8")).get("run_id")
    same_model = (previous is not None and previous.get("step") == s["steps_done"]
                  and (previous.get("config") or {}).get("run_id") == run_id)
    if same_model and all(previous.get(k) == v for k, v in settings.items()):
        records = previous["records"]                      # this very evaluation is already on disk
    else:
        records = _run_eval(str(out), sizes, args.intervals, args.test_sets, args.eval_batch, args.eval_seed,
                            cfg["device"], eval_file, overwrite=True)
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        name = {"po-u": "PO-U", "linassign": "LinAssign"}.get(cfg["permutation"], cfg["permutation"])
        _write_tables(records, [summary], out, f"Sorting demo: {name} trained at N={cfg['set_size']}")
        if cfg["permutation"] == "po-u":
            print(f"wrote {_heatmap(str(out), out / 'comparison.png')}")
    print()
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"results: {out / 'results.md'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("train", "demo") and args.permutation == "po-u" and args.steps == 0:
        refuse_po_u_without_steps(parser, "--steps/-T")
    return {"train": cmd_train, "eval": cmd_eval, "table": cmd_table, "demo": cmd_demo}[args.command](args)
