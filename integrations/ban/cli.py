"""``python -m integrations.ban {synth,train,eval,predict,compare,diagnose,knobs}``: BAN, BAN + LSTM and BAN + PO on VQA v2 features.

    python -m integrations.ban synth --out runs/ban/synth                     # a synthetic dataset
    python -m integrations.ban train --data-root DATA --permutation po-u      # paper appendix F.4
    python -m integrations.ban train --data-root DATA --permutation off --ban-root ~/ban-vqa   # official BAN
    torchrun --nproc_per_node 4 -m integrations.ban train --data-root DATA    # DDP
    python -m integrations.ban eval --run runs/ban/po-u-seed1204              # val accuracy of a run
    python -m integrations.ban predict --run runs/ban/po-u-seed1204           # test-dev answers (server format)
    python -m integrations.ban compare --data-root DATA --seeds 0 1 2 3 4     # BAN vs + LSTM vs + PO-U
    python -m integrations.ban diagnose --sweep runs/ban/compare              # attention, order of P, eta
    python -m integrations.ban knobs --num-hid 128 --gamma 2 --epochs 4       # plain BAN per generator setting

The training step time of BAN + PO against BAN is measured by ``python -m benchmarks.ban_step_time``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from integrations.common import (add_kernel_argument, add_run_arguments, add_threads_argument, device_name, ensure_new,
                                 launched_rank, non_negative_int, with_help_formatter, positive_float, positive_int, run_command, set_threads,
                                 write_new_json)

from setperm.encoder import READS

from .data import QUESTION_FILES, TFIDF_WEIGHTINGS, VQADataError

PROG = "python -m integrations.ban"
VARIANTS = ("po-u", "po-la", "none", "off")
DATA_ENV = "SETPERM_VQA_ROOT"
# every split of the official layout is offered, so that a test split gets the reason it cannot be scored
EVAL_SPLITS = tuple(QUESTION_FILES)


def add_train_arguments(p: argparse.ArgumentParser, *, single_run: bool = True, with_data: bool = True) -> None:
    """The ``train`` flags: the official recipe's defaults (ban-vqa main.py / train.py). Without
    ``single_run`` (the ``compare`` / ``knobs`` sweeps) the variant and the seed are left to the sweep's own
    flags; without ``with_data`` (``knobs``, which writes its datasets) there is no ``--data-root``."""
    if with_data:
        p.add_argument("--data-root", default=None,
                       help=f"folder with the official data/ layout, or a synthetic dataset (default: ${DATA_ENV})")
    p.add_argument("--ban-root", default=None,
                   help="checkout of jnhwkim/ban-vqa: build the OFFICIAL model (via integrations.ban.official)")
    if single_run:
        p.add_argument("--permutation", choices=VARIANTS, default="po-u",
                       help="po-u / po-la: BAN + PO (paper F.4); none: BAN + LSTM (the set encoder reads the boxes "
                            "in their input order); off: plain BAN, no set encoder")
        p.add_argument("--order-by", choices=("all", "geometry"), default="all",
                       help="what PO optimises the permutation on: all = the 13-vector of each box (paper F.4), "
                            "geometry = the box coordinates only (the LSTM still reads the 13-vectors)")
        p.add_argument("--num-positions", type=positive_int, default=None,
                       help="po-la: number of learned position vectors (default: the most boxes of an image in "
                            "train / val)")
        p.add_argument("--straight-through", action="store_true",
                       help="po-u / po-la: the LSTM reads the boxes in the hard (Hungarian) order of P, gradients "
                            "through the soft P (setperm's straight_through=True; not in the paper)")
        p.add_argument("--oracle-relevance", action="store_true",
                       help="ablation (synthetic data only): feed the set encoder the ground-truth relevance of the "
                            "boxes the question is about instead of BAN's attention logits")
    add_kernel_argument(p)
    p.add_argument("--read", choices=READS, default="auto",
                   help="how the set encoder's LSTM reads the padded glimpse sets (setperm's read=): auto (default), "
                        "packed, grouped, padded or fused (on CUDA, the LSTM's recurrence as Triton kernels for up to "
                        "128 units; elsewhere as auto). Same results")
    p.add_argument("--num-hid", type=positive_int, default=1280, help="BAN hidden size H")
    p.add_argument("--gamma", type=positive_int, default=8, help="number of glimpses G")
    p.add_argument("--op", default="c", help="word embedding: 'c' = GloVe + tf-idf GloVe (600-d), '' = GloVe")
    p.add_argument("--no-tfidf", dest="tfidf", action="store_false",
                   help="initialise the second embedding table with plain GloVe (official --tfidf switch)")
    p.add_argument("--tfidf-weighting", choices=TFIDF_WEIGHTINGS, default="idf",
                   help="the tf-idf table's weights: idf (1 / document frequency, what the official code "
                        "describes) or official (what its tfidf_from_questions computes, for reproducing the "
                        "official and the paper's runs: mostly unweighted)")
    p.add_argument("--epochs", type=positive_int, default=13, help="training epochs (official)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="global batch (split over DDP processes)")
    p.add_argument("--lr", type=positive_float, default=None, help="base lr (official: 1e-3, 7e-4 with --use-both)")
    p.add_argument("--warmup", type=positive_float, nargs="*", default=[0.5, 1.0, 1.5, 2.0],
                   help="lr multipliers of the first epochs")
    p.add_argument("--lr-decay-start", type=non_negative_int, default=10,
                   help="first epoch (0-based) whose lr is multiplied by --lr-decay-rate (official)")
    p.add_argument("--lr-decay-every", type=positive_int, default=2,
                   help="from there, the lr is multiplied again every this many epochs (official)")
    p.add_argument("--lr-decay-rate", type=positive_float, default=0.25, help="lr multiplier of each decay (official)")
    p.add_argument("--grad-clip", type=positive_float, default=0.25, help="max total grad norm")
    p.add_argument("--use-both", action="store_true", help="train on train + val, no evaluation (official)")
    p.add_argument("--bucket", action="store_true",
                   help="batch images of similar box counts together (less padding; not in the official recipe)")
    p.add_argument("--fixed36", action="store_true", help="use the fixed-36 {split}36.hdf5 features")
    # the sweeps (compare, knobs) train every run for --epochs and refuse --max-steps with a line of their
    # own (main), so there the flag is accepted but left out of --help
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimiser steps (continue with --resume)" if single_run
                   else argparse.SUPPRESS)
    if single_run:
        p.add_argument("--seed", type=non_negative_int, default=1204, help="official main.py default")
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--amp", action="store_true",
                   help="forward under bfloat16 autocast on the training device (CPU or CUDA; loss, gradients and "
                        "update stay float32). Changes results slightly; its speed-up on a GPU is not measured")
    add_threads_argument(p)
    p.add_argument("--workers", type=non_negative_int, default=1, help="DataLoader workers per process (official: 1)")
    add_run_arguments(p, out_help="run folder (default runs/ban/<permutation>-seed<seed>)" if single_run
                      else "sweep folder (default runs/ban/compare)")
    p.add_argument("--log-every", type=positive_int, default=1, help="TensorBoard scalars every N steps")


def _data_root(value: Optional[str], p: argparse.ArgumentParser) -> str:
    import os

    root = value or os.environ.get(DATA_ENV)
    if not root:
        p.error(f"argument --data-root: required (or set ${DATA_ENV})")
    return root


def resolve_train_args(a: argparse.Namespace, p: argparse.ArgumentParser) -> argparse.Namespace:
    # a parser without --data-root (knobs: one generated dataset per setting, set per run) has none
    a.data_root = _data_root(a.data_root, p) if hasattr(a, "data_root") else None
    permutation = getattr(a, "permutation", None)
    if getattr(a, "order_by", "all") != "all" and permutation not in ("po-u", "po-la"):
        p.error(f"argument --order-by: {a.order_by} needs --permutation po-u or po-la, got {permutation}")
    if getattr(a, "straight_through", False) and permutation not in ("po-u", "po-la"):
        p.error(f"argument --straight-through: needs --permutation po-u or po-la, got {permutation}")
    if getattr(a, "oracle_relevance", False) and permutation == "off":
        p.error("argument --oracle-relevance: needs a set encoder (--permutation po-u, po-la or none), got off")
    if a.ban_root:
        from integrations.common import CommandError

        from .train import ban_root_path

        try:
            a.ban_root = ban_root_path(a.ban_root)
        except CommandError as e:
            p.error(f"argument {e}")
    if a.lr is None:
        a.lr = 7e-4 if a.use_both else 1e-3
    if a.out is None:
        a.out = (f"runs/ban/{a.permutation}-seed{a.seed}" if hasattr(a, "permutation")
                 else f"runs/ban/{getattr(a, 'command', None) or 'compare'}")
    return a


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The ``train`` flags parsed and resolved (for scripts and tests)."""
    p = argparse.ArgumentParser(prog=f"{PROG} train")
    add_train_arguments(p)
    return resolve_train_args(p.parse_args(argv), p)


def _add_checkpoint_arguments(p: argparse.ArgumentParser, *, split_default: str, out_default: str,
                              split_help: str) -> None:
    """The arguments of the commands that run a trained run's newest checkpoint over a split (eval, predict)."""
    p.add_argument("--run", required=True, help="run folder or checkpoint .pt")
    p.add_argument("--split", choices=EVAL_SPLITS, default=split_default, help=split_help)
    p.add_argument("--data-root", default=None, help="data folder (default: the one stored in the run's config)")
    p.add_argument("--ban-root", default=None,
                   help="official-model runs: the jnhwkim/ban-vqa checkout, holding the code the run was trained "
                        "with (default: the path stored in the run's config)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the run's batch size")
    p.add_argument("--device", type=device_name, default="cpu", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    add_threads_argument(p)
    p.add_argument("--out", default=None, help=f"JSON file (default: {out_default})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never done otherwise)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{synth,train,eval,predict,compare,diagnose,knobs}")
    sub.add_parser("synth", add_help=False, help="write a synthetic dataset in the official layout "
                                                 f"(flags: {PROG} synth --help)")
    t = sub.add_parser("train", help="train BAN / BAN + LSTM / BAN + PO (official recipe)",
                       description="Train BAN, BAN + LSTM or BAN + PO on VQA v2 features in the official layout "
                                   "(or a synthetic dataset). Defaults are the official recipe.")
    add_train_arguments(t)
    e = sub.add_parser("eval", help="soft accuracy of a run's newest checkpoint (overall and per question type)",
                       description="Evaluate a run's newest intact checkpoint; model and data settings come from the "
                                   "run's config.json.")
    _add_checkpoint_arguments(e, split_default="val", out_default="<run>/eval_<split>.json",
                              split_help="split to evaluate (default val; the test splits have no answers to score)")
    r = sub.add_parser("predict", help="a run's answers to every question of a split, for the VQA evaluation server",
                       description="Write the answer of a run's newest intact checkpoint to every question of a "
                                   "split as [{\"question_id\": ..., \"answer\": ...}], the results format of the "
                                   "VQA evaluation server (test-dev2015, test2015) and of the official test.py; model "
                                   "and data settings come from the run's config.json.")
    _add_checkpoint_arguments(r, split_default="test-dev2015", out_default="<run>/answers_<split>.json",
                              split_help="split whose questions are answered (the test splits read the test2015 "
                                         "features)")
    c = sub.add_parser("compare", help="BAN vs BAN + LSTM vs BAN + PO over seeds, per question family",
                       description="Train every variant with every seed identically (one run each, in "
                                   "<out>/runs/), then write results/compare.{json,md,png}: per-family val accuracy, "
                                   "mean ± std over seeds, paired t-tests, eta and permutation entropy over training.")
    add_train_arguments(c, single_run=False)
    from .research.compare import add_compare_arguments

    add_compare_arguments(c)
    from .research.knobs import add_knobs_arguments

    k = sub.add_parser("knobs", help="plain BAN's accuracy on the order-free families per generator / model setting",
                       description="One synthetic dataset (families exists, colour) per generator setting, plain BAN "
                                   "trained on each with the train flags given, and per setting the val accuracy on "
                                   "exists / colour and the training time: results/knobs.{json,md}.")
    add_train_arguments(k, single_run=False, with_data=False)
    add_knobs_arguments(k)
    from .research.diagnose import add_diagnose_arguments

    add_diagnose_arguments(sub.add_parser(
        "diagnose", help="attention mass on the asked class, order and entropy of P, eta (synthetic set)",
        description="Per question family: the share of each glimpse's attention on the asked class's boxes, "
                    "the Spearman correlation of P's Hungarian order with box x-centre and area, P's entropy, "
                    "and eta; of one run (--run) or of every run of a compare sweep (--sweep)."))
    return with_help_formatter(p)


def cmd_train(args) -> int:
    from .train import run

    result = run(args)
    if launched_rank() == 0:
        print(f"results: {Path(result['out']) / 'summary.json'}")
    return 0


def cmd_eval(args) -> int:
    from integrations.common import run_folder

    from .train import evaluate_run

    out = ensure_new(Path(args.out) if args.out else run_folder(args.run) / f"eval_{args.split}.json",
                     overwrite=args.overwrite)
    metrics = evaluate_run(args.run, split=args.split, data_root=args.data_root, device=args.device,
                           batch_size=args.batch_size, workers=args.workers, ban_root=args.ban_root)
    write_new_json(out, metrics, overwrite=args.overwrite)
    print(json.dumps(metrics, indent=1))
    print(f"results: {out}")
    return 0


def cmd_predict(args) -> int:
    from integrations.common import run_folder

    from .train import predict_run

    out = ensure_new(Path(args.out) if args.out else run_folder(args.run) / f"answers_{args.split}.json",
                     overwrite=args.overwrite)
    result = predict_run(args.run, split=args.split, data_root=args.data_root, device=args.device,
                         batch_size=args.batch_size, workers=args.workers, ban_root=args.ban_root)
    write_new_json(out, result["answers"], overwrite=args.overwrite)
    print(f"{len(result['answers'])} answers to the {args.split} questions from {result['checkpoint']} "
          f"(step {result['step']})")
    print(f"results: {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "synth":          # the generator has its own parser
        from .research import synth

        return synth.main(argv[1:], prog=f"{PROG} synth") or 0
    p = build_parser()
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.command == "train":
        return cmd_train(resolve_train_args(args, p))
    if args.command == "compare":
        from .research.compare import run_sweep

        if args.max_steps is not None:
            # a run stopped by --max-steps is unfinished, and the sweep reports only finished runs
            p.error("compare: --max-steps is not available (every run of a sweep trains for --epochs); "
                    "use --epochs, or `train --max-steps` for a smoke run")

        run_sweep(resolve_train_args(args, p))
        print(f"results: {Path(args.out) / 'results' / 'compare.md'}")
        return 0
    if args.command == "knobs":
        from .research.knobs import run_knobs

        if args.max_steps is not None:
            p.error("knobs: --max-steps is not available (every run trains for --epochs)")
        try:
            run_knobs(resolve_train_args(args, p))
        except ValueError as e:
            if str(e).startswith("knob "):
                p.error(f"argument --knobs: {e}")
            raise
        print(f"results: {Path(args.out) / 'results' / 'knobs.md'}")
        return 0
    if args.command == "diagnose":
        from .research.diagnose import cmd_diagnose

        return cmd_diagnose(args)
    if args.command == "predict":
        return cmd_predict(args)
    return cmd_eval(args)


def entry() -> int:
    return run_command(main, PROG, errors=(VQADataError,))
