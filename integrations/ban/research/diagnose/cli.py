"""The ``diagnose`` subcommand's flags and its command: one run (``--run``) or every run of a sweep
(``--sweep``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .report import run_markdown, sweep_markdown
from .run import diagnose_run
from .sweep import diagnose_sweep


def add_diagnose_arguments(p: argparse.ArgumentParser) -> None:
    from integrations.common import add_threads_argument, device_name, positive_int

    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="run folder (or checkpoint .pt) to diagnose")
    which.add_argument("--sweep", help="compare sweep folder: diagnose every finished <sweep>/runs/<variant>-s<seed>")
    p.add_argument("--split", default="val", help="split to read (default val)")
    p.add_argument("--data-root", default=None, help="synthetic dataset (default: the one stored in the run's config)")
    p.add_argument("--ban-root", default=None,
                   help="official-model runs: the jnhwkim/ban-vqa checkout, holding the code the runs were trained "
                        "with (default: the path stored in each run's config)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the run's batch size")
    p.add_argument("--max-questions", type=positive_int, default=None,
                   help="only the first N questions of the split (default: all)")
    p.add_argument("--device", type=device_name, default="cpu", help="auto, cpu, cuda[:i] or mps")
    add_threads_argument(p)
    p.add_argument("--out", default=None, help="JSON file (default: <run>/diagnose_<split>.json, or "
                                               "<sweep>/results/diagnose.json with the .md next to it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never done otherwise)")


def cmd_diagnose(args) -> int:
    """The ``diagnose`` subcommand: writes the JSON (and, for a sweep, the Markdown) and prints the table."""
    from integrations.common import ensure_new, run_folder, write_new_json

    kwargs = dict(split=args.split, data_root=args.data_root, device=args.device, batch_size=args.batch_size,
                  max_questions=args.max_questions, ban_root=args.ban_root)
    if args.sweep:
        results = diagnose_sweep(args.sweep, out=Path(args.out) if args.out else None, overwrite=args.overwrite,
                                 log=lambda s: print(s, flush=True), **kwargs)
        path = Path(args.out) if args.out else Path(args.sweep) / "results" / "diagnose.json"
        print(sweep_markdown(results))
        print(f"results: {path} and {path.with_suffix('.md')}")
        return 0
    run_dir = run_folder(args.run)
    out = ensure_new(Path(args.out) if args.out else run_dir / f"diagnose_{args.split}.json", overwrite=args.overwrite)
    res = diagnose_run(args.run, **kwargs)
    write_new_json(out, res, overwrite=args.overwrite)
    print(run_markdown(res))
    print(f"results: {out}")
    return 0
