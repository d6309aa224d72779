"""``python -m integrations.ban knobs``: what each generator or model setting does to plain BAN's accuracy
on the order-free families of the synthetic set (is there a <c>? / what colour is the <c>?).

The synthetic comparison only means something if plain BAN learns the families that need no geometry
(the target: >= 90 % after a short CPU training). This command measures it: one dataset per
generator setting (the generator's defaults with one setting changed, families ``exists:3,colour:4``),
plain BAN (``--permutation off``) trained on each with the given train flags, and per setting the val
accuracy on ``exists`` and ``colour`` (mean ± std over ``--seeds``) next to the training time.

    python -m integrations.ban knobs --out runs/ban/knobs --num-hid 128 --gamma 2 --batch-size 32 --epochs 4 \\
        --threads 1 --workers 0 --bucket --jobs 2

A setting is ``base`` (the defaults) or ``name=value``: a generator setting (``images``, ``questions`` or a
field of ``synth_world.SceneConfig`` / ``synth_features.FeatureConfig``: ``clutter``, ``noise``,
``v_dim``, ``class_scale``, ``max_boxes``, ...) or a model setting (``num_hid``, ``gamma``). The sweep folder
follows the project's run rule (``--resume`` continues and accepts more settings or seeds; a finished
sweep prints its report). Output: ``<out>/data/<setting>`` (datasets), ``<out>/runs/<setting>-s<seed>``
(ordinary training runs), ``<out>/results/knobs.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from integrations.common import RunInterrupted, open_run, positive_int, write_json
from integrations.common.stats import fmt_mean_std, summarize

SANITY_FAMILIES = "exists:3,colour:4"
DEFAULT_KNOBS = ("base", "clutter=16", "class_scale=1", "noise=1.0", "v_dim=128", "images=1000", "max_boxes=36",
                 "gamma=1", "num_hid=64")
MODEL_KNOBS = {"num_hid": int, "gamma": int}


def generator_knobs() -> Dict[str, type]:
    """Generator settings a knob may change, with their types (from the generator's dataclasses)."""
    from .synth import generator_settings

    types = {"images": int, "questions": int}
    types.update({f.name: type(f.default) for fields in generator_settings().values() for f in fields})
    return types


def parse_knob(text: str) -> Tuple[str, object]:
    """``"base"`` -> ("base", None); ``"noise=0.5"`` / ``"v-dim=128"`` -> (name, typed value). ValueError
    naming the setting and the known ones otherwise."""
    if text == "base":
        return "base", None
    name, sep, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    known = {**generator_knobs(), **MODEL_KNOBS}
    if not sep or name not in known:
        raise ValueError(f"knob {text!r}: expected 'base' or name=value with name one of {sorted(known)}")
    try:
        value = known[name](raw)
    except ValueError:
        raise ValueError(f"knob {text!r}: {raw!r} is not a {known[name].__name__}") from None
    return name, value


def knob_label(text: str) -> str:
    name, value = parse_knob(text)
    return "base" if name == "base" else f"{name}={value}"


def data_key(text: str) -> str:
    """The dataset a knob trains on: its own for a generator setting, the base set for a model setting."""
    name, _ = parse_knob(text)
    return "base" if name == "base" or name in MODEL_KNOBS else knob_label(text)


def make_data(folder: Path, text: str, seed: int) -> Path:
    """Write the dataset of a knob to ``folder`` (atomically: a partial folder from an interrupted call is
    replaced); an existing complete one is kept."""
    from .synth import generate

    if (folder / "synth_meta.json").is_file():
        return folder
    name, value = parse_knob(text)
    settings = {} if name == "base" or name in MODEL_KNOBS else {name: value}
    images = settings.pop("images", 4000)
    questions = settings.pop("questions", 4)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, images=images, val_images=1250, questions=questions, seed=seed, families=SANITY_FAMILIES,
             fixed=False, **settings)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _cell_args(args: argparse.Namespace, text: str, seed: int) -> argparse.Namespace:
    from .compare import run_args

    name, value = parse_knob(text)
    settings = {"permutation": "off", "data_root": str(Path(args.out) / "data" / data_key(text)),
                **({name: value} if name in MODEL_KNOBS else {})}
    return run_args(args, Path(args.out) / "runs" / f"{knob_label(text)}-s{seed}", seed, settings,
                    sweep_only=("knobs", "seeds", "synth_seed"))


def train_cell(cell_args: argparse.Namespace) -> dict:
    """One knob run (module level: it runs in a worker process); adds this call's seconds to ``time.json``."""
    from ..train import run

    t0 = time.perf_counter()
    trained = False
    try:
        result = run(cell_args)
        trained = result.get("model") is not None    # it trained now (not a finished run shown again)
        return result
    except RunInterrupted:
        trained = True                               # the part trained before the interrupt counts too
        raise
    finally:
        if trained:
            timing = Path(cell_args.out) / "time.json"
            spent = json.loads(timing.read_text(encoding="utf-8"))["seconds"] if timing.is_file() else 0.0
            write_json(timing, {"seconds": spent + time.perf_counter() - t0})


def run_knobs(args: argparse.Namespace) -> dict:
    from .compare import train_runs

    labels = [knob_label(k) for k in args.knobs]          # validates every knob before anything is written
    config = {k: v for k, v in vars(args).items() if k not in ("command", "jobs") and not callable(v)}
    sweep = open_run(args.out, config, resume=args.resume, overwrite=args.overwrite, may_change=("knobs", "seeds"),
                     checkpoints=False)
    if sweep.finished:
        print(f"{sweep.path} holds this finished knob scan; nothing to do")
        print((sweep.path / "results" / "knobs.md").read_text(encoding="utf-8"))
        return sweep.summary
    out = Path(args.out)
    for key in dict.fromkeys(data_key(k) for k in args.knobs):
        print(f"dataset {key}", flush=True)
        make_data(out / "data" / key, key, args.synth_seed)
    cells = [(f"{label}, seed {s}", _cell_args(args, k, s)) for s in args.seeds for k, label in zip(args.knobs, labels)]
    train_runs(sweep, cells, args.jobs, train_cell)
    results = collect(out, labels, args.seeds)
    (out / "results").mkdir(parents=True, exist_ok=True)
    write_json(out / "results" / "knobs.json", results)
    (out / "results" / "knobs.md").write_text(markdown(results) + "\n", encoding="utf-8")
    sweep.finish({"results": str(out / "results" / "knobs.json")})
    print(markdown(results))
    return results


def collect(out: Path, labels: Sequence[str], seeds: Sequence[int]) -> dict:
    rows: List[dict] = []
    for label in labels:
        per_seed = []
        for s in seeds:
            run_dir = out / "runs" / f"{label}-s{s}"
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            last = summary["history"][-1]
            # the first epoch at which both order-free families reach 90 % (the generator's sanity target)
            reached = next((h["step"] for h in summary["history"]
                            if min(h.get("val_soft_acc/exists", 0), h.get("val_soft_acc/colour", 0)) >= 0.9), None)
            timing = run_dir / "time.json"
            seconds = json.loads(timing.read_text(encoding="utf-8"))["seconds"] if timing.is_file() else None
            per_seed.append({"seed": s, "all": last["val_soft_acc"], "exists": last.get("val_soft_acc/exists"),
                             "colour": last.get("val_soft_acc/colour"), "steps": last["step"],
                             "steps_to_90": reached, "seconds": seconds})
        row = {"knob": label, "runs": per_seed}
        for key in ("all", "exists", "colour", "seconds"):
            vals = [r[key] for r in per_seed]
            row[key] = summarize(vals) if None not in vals else None
        row["steps"] = per_seed[0]["steps"]
        row["steps_to_90"] = [r["steps_to_90"] for r in per_seed]
        rows.append(row)
    return {"seeds": list(seeds), "families": SANITY_FAMILIES, "rows": rows}


def markdown(results: dict) -> str:
    n = len(results["seeds"])
    spread = f"mean ± std over {n} seeds" if n > 1 else "one seed"
    lines = [f"Plain BAN on the order-free families ({results['families']}), val soft accuracy (%), {spread}; "
             "minutes of training per run (one process, wall clock, including the evaluations).", "",
             "| setting | exists | colour | all | steps | both >= 90 % at step | minutes |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        # one seed: the value itself (a std of one run says nothing)
        cells = [fmt_mean_std(r[k], std_of_one=False) for k in ("exists", "colour", "all")]
        minutes = "-" if r["seconds"] is None else f"{r['seconds']['mean'] / 60:.1f}"
        to90 = " / ".join("never" if s is None else str(s) for s in r["steps_to_90"])
        lines.append(f"| {r['knob']} | " + " | ".join(cells) + f" | {r['steps']} | {to90} | {minutes} |")
    return "\n".join(lines)


def add_knobs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--knobs", nargs="+", default=list(DEFAULT_KNOBS),
                   help="'base' and name=value settings, one dataset / run each")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per setting and seed")
    p.add_argument("--synth-seed", type=int, default=0, help="seed of the generated datasets")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="runs trained side by side, each in its own process (jobs x threads <= cores)")
