"""``python -m integrations.set_tasks {run,report,step-time}``.

``run`` trains every (task, encoder, seed) cell that is not finished yet and then writes the report;
``report`` rewrites ``<out>/results`` from the cell files alone; ``step-time`` times one training
step of every encoder side by side.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from integrations.common import (with_help_formatter, CommandError, add_data_root_argument, add_run_arguments, add_threads_argument, data_root,
                                 positive_float, positive_int)

from .encoders import DEFAULT_ENCODERS, ENCODERS
from .report import write_report
from .runner import plan_cells, run_suite
from .tasks import TASKS
from .train import TrainConfig

DEFAULT_OUT = "runs/set_tasks"
PROG = "python -m integrations.set_tasks"


def _names(choices: Sequence[str], what: str):
    def parse(text: str) -> List[str]:
        names = list(choices) if text == "all" else [n for n in text.split(",") if n]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{what}: unknown {bad or text!r}; choose from {', '.join(choices)} or 'all'")
        return names
    return parse


# A sweep keeps no checkpoints: a cell is either finished (its file is written) or run again from its start.
RESUME_HELP = ("continue the sweep in --out: its finished cells are kept and skipped, the others run from their "
               "start (the protocol must match; --tasks, --encoders and --seeds may grow)")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train all unfinished cells, then write the report")
    add_run_arguments(run, out_help=f"run folder: cells/, embedding/, results/ (default: {DEFAULT_OUT})")
    next(a for a in run._actions if a.dest == "resume").help = RESUME_HELP
    add_data_root_argument(run, what="MNIST IDX files (mnist/)")
    run.add_argument("--tasks", type=_names(list(TASKS), "--tasks"), default=list(TASKS),
                     help="comma-separated tasks or 'all'")
    run.add_argument("--encoders", type=_names(ENCODERS, "--encoders"), default=list(DEFAULT_ENCODERS),
                     help="comma-separated encoders or 'all'")
    run.add_argument("--seeds", type=positive_int, default=5, help="seeds 0..S-1 per task and encoder")
    g = run.add_argument_group("protocol (the same for every encoder)")
    g.add_argument("--steps", type=positive_int, default=d.steps, help="training steps")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="sets per training step")
    g.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate")
    g.add_argument("--grad-clip", type=positive_float, default=d.grad_clip, help="gradient norm clip (off: none)")
    g.add_argument("--min-size", type=positive_int, default=d.min_size, help="smallest training set")
    g.add_argument("--max-size", type=positive_int, default=d.max_size, help="largest training set")
    g.add_argument("--test-sizes", type=positive_int, nargs="*", default=list(d.test_sizes),
                   help="larger set sizes to test size generalisation at")
    g.add_argument("--val-sets", type=positive_int, default=d.val_sets, help="validation sets (model selection)")
    g.add_argument("--test-sets", type=positive_int, default=d.test_sets, help="test sets per size")
    g.add_argument("--eval-every", type=positive_int, default=d.eval_every, help="validation interval (steps)")
    g.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the validation and test sets")
    m = run.add_argument_group("models")
    m.add_argument("--dim", type=positive_int, default=d.dim, help="element embedding width D")
    m.add_argument("--width", type=positive_int, default=64,
                   help="PO-U's LSTM size; every other encoder's width is matched to PO-U's parameter count")
    m.add_argument("--cost-hidden", type=positive_int, default=d.cost_hidden, help="PO's pairwise-MLP width")
    m.add_argument("--po-steps", type=positive_int, default=d.po_steps, help="PO's inner steps T")
    m.add_argument("--cnn-epochs", type=positive_int, default=2, help="epochs of the frozen MNIST CNN")
    m.add_argument("--cnn-train-images", type=positive_int, default=None, help="limit the CNN's training images")
    x = run.add_argument_group("execution")
    x.add_argument("--jobs", type=positive_int, default=2, help="cells run side by side (processes)")
    add_threads_argument(x)
    x.add_argument("--no-diagnose", action="store_true", help="skip the entropy / Spearman diagnostics of P")
    x.add_argument("--no-report", action="store_true", help="do not write results/ at the end")
    rep = sub.add_parser("report", help="write results/ from the cell files of --out")
    rep.add_argument("--out", default=DEFAULT_OUT, help="run folder holding cells/")
    st = sub.add_parser("step-time", help="time one training step of every encoder side by side (one process)")
    st.add_argument("--task", choices=list(TASKS), default="median", help="sets the element width and output")
    st.add_argument("--encoders", type=_names(ENCODERS, "--encoders"), default=list(DEFAULT_ENCODERS),
                    help="comma-separated encoders or 'all'")
    st.add_argument("--repeats", type=positive_int, default=50, help="timed rounds (after 5 warm-up rounds)")
    st.add_argument("--width", type=positive_int, default=64, help="PO-U's LSTM size; the others are matched")
    st.add_argument("--json", default=None, help="also write the times to this JSON file")
    add_threads_argument(st)
    return with_help_formatter(p)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command; errors and interrupts are turned into one line and an exit code by :func:`run_command`
    (``__main__``): a refused folder or bad data gives 1, SIGINT / SIGTERM 130 / 143 once the running
    cells are written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = "python -m integrations.set_tasks " + " ".join(shlex.quote(a) for a in argv)
    if args.command == "step-time":
        import torch

        from .step_time import markdown, step_times
        torch.set_num_threads(args.threads)
        cfg = TrainConfig()
        result = step_times(args.task, args.encoders, cfg, args.width, args.repeats)
        print(f"Training step of the {args.task} model (batch {cfg.batch_size}, N = "
              f"{cfg.min_size}..{cfg.max_size}), {args.threads} thread(s), median of "
              f"{args.repeats} interleaved rounds:\n")
        print(markdown(result), end="")
        if args.json:
            from integrations.common import write_json
            write_json(Path(args.json), {"command": command, "task": args.task, "threads": args.threads,
                                         "repeats": args.repeats, "encoders": result}, sort_keys=False)
        return 0
    out = Path(args.out or DEFAULT_OUT)
    if args.command == "report":
        write_report(out, command=command)
        print(f"set_tasks: wrote {out / 'results'}", file=sys.stderr)
        return 0
    if args.min_size > args.max_size:
        raise CommandError(f"--min-size {args.min_size} is larger than --max-size {args.max_size}")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_size=args.min_size,
                      max_size=args.max_size, test_sizes=tuple(args.test_sizes), dim=args.dim,
                      val_sets=args.val_sets, test_sets=args.test_sets, eval_every=args.eval_every,
                      data_seed=args.data_seed, cost_hidden=args.cost_hidden, po_steps=args.po_steps,
                      grad_clip=args.grad_clip, diagnose=not args.no_diagnose)
    t0 = time.perf_counter()
    run, done = run_suite(out, args.tasks, args.encoders, list(range(args.seeds)), cfg, args.width,
                          data_root(args.data_root), jobs=args.jobs, threads=args.threads, resume=args.resume,
                          overwrite=args.overwrite, cnn_epochs=args.cnn_epochs,
                          cnn_train_images=args.cnn_train_images, command=command)
    table = out / "results" / "table.md"
    if run.finished:
        # the same settings as a finished sweep: nothing to do, nothing written; show its report
        print(f"set_tasks: {out} holds a finished sweep with these settings; nothing to do "
              f"(--overwrite starts it again)", file=sys.stderr)
        if table.is_file():
            print(table.read_text(encoding="utf-8"), end="")
        return 0
    if not args.no_report:
        write_report(out, command=command)
        print(f"set_tasks: wrote {out / 'results'}", file=sys.stderr)
    run.finish({"cells": len(plan_cells(run.config["tasks"], run.config["encoders"], run.config["seeds"])),
                "cells_run_now": len(done),
                "seconds_now": time.perf_counter() - t0,
                "results": None if args.no_report else "results/"})
    return 0
