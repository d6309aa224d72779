"""A ``compare`` sweep's diagnosis: :func:`diagnose_run` on every finished run (reusing a run's stored
diagnosis when it is current), the numbers summarised over seeds with paired tests, and the report files
(:func:`diagnose_sweep`)."""
from __future__ import annotations

import itertools
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .report import sweep_markdown
from .run import diagnose_run
from .statistics import DEFINITIONS, ORDER_STATS

_CELL = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")


def sweep_runs(sweep_out) -> List[tuple]:
    """``[(variant, seed, run folder)]`` of a ``compare`` sweep's ``<out>/runs/<variant>-s<seed>``."""
    from ..compare import LABELS

    runs_dir = Path(sweep_out) / "runs"
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir}: not a compare sweep (no runs/ folder)")
    found = []
    for d in sorted(runs_dir.iterdir()):
        m = _CELL.match(d.name)
        if d.is_dir() and m and m["variant"] in LABELS:
            found.append((m["variant"], int(m["seed"]), d))
    return sorted(found, key=lambda r: (list(LABELS).index(r[0]), r[1]))


def _finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and bool(json.loads(summary.read_text(encoding="utf-8")).get("finished"))


def _sweep_values(res: dict, fam: str) -> Dict[str, object]:
    """The per-run numbers the sweep summarises over seeds, for one family."""
    f = res["families"].get(fam)
    if f is None:
        return {}
    att, perm = f["attention"], f["permutation"]
    out = {"mass": att["mass"], "chance": att["chance"],
           "input_abs_spearman_x": f["input_order"]["spearman_x"]["abs_mean"],
           "input_abs_spearman_area": f["input_order"]["spearman_area"]["abs_mean"]}
    out.update({f"mass_g{g}": m for g, m in enumerate(att["mass_per_glimpse"])})
    if f.get("relevance"):
        out["relevance_asked"], out["relevance_other"] = f["relevance"]["asked"], f["relevance"]["other"]
    if perm is not None:
        for k in ORDER_STATS:
            out[f"abs_{k}"] = perm[k]["abs_mean"]
            out[k] = perm[k]["mean"]
        out["entropy"] = perm["entropy"]["mean"]
        out["entropy_relative"] = perm["entropy"]["relative"]
    return out


def summarize_sweep(per_run: Dict[str, dict], variants: Sequence[str], seeds: Dict[str, List[int]]) -> dict:
    """Per variant and family: mean ± std over seeds of every per-run number; final eta per variant; paired
    t-tests (by seed) of the attention mass between variants and of each PO variant's |rho with x| against the
    input order's."""
    from integrations.common.stats import paired_test, summarize

    from ..compare import cell_name

    families = sorted({f for r in per_run.values() for f in r["families"]}, key=lambda f: (f != "all", f))
    table: Dict[str, Dict[str, dict]] = {}
    tests: Dict[str, Dict[str, dict]] = {}
    for fam in families:
        table[fam], tests[fam] = {}, {}
        vals = {v: [_sweep_values(per_run[cell_name(v, s)], fam) for s in seeds[v]] for v in variants}
        for v in variants:
            keys = sorted({k for row in vals[v] for k in row})
            table[fam][v] = {k: summarize([row[k] for row in vals[v]]) for k in keys
                             if all(row.get(k) is not None for row in vals[v])}
        for a, b in itertools.combinations(variants, 2):
            common = sorted(set(seeds[a]) & set(seeds[b]))
            xa = [_sweep_values(per_run[cell_name(a, s)], fam).get("mass") for s in common]
            xb = [_sweep_values(per_run[cell_name(b, s)], fam).get("mass") for s in common]
            if common and None not in xa and None not in xb:
                tests[fam][f"mass: {a} vs {b}"] = paired_test(xa, xb)
        for v in variants:
            rows = vals[v]
            if rows and all(r.get("abs_spearman_x") is not None and r.get("input_abs_spearman_x") is not None
                            for r in rows):
                tests[fam][f"abs rho x: {v} vs input order"] = paired_test([r["abs_spearman_x"] for r in rows],
                                                                         [r["input_abs_spearman_x"] for r in rows])
    eta = {}
    for v in variants:
        finals = [per_run[cell_name(v, s)]["eta"]["checkpoint"] for s in seeds[v]]
        names = sorted({k for f in finals for k in f})
        eta[v] = {k: summarize([f[k] for f in finals]) for k in names if all(k in f for f in finals)}
    return {"families": families, "summary": table, "tests": tests, "eta": eta}


def _json_safe(obj):
    """``obj`` with every non-finite float replaced by None (strict JSON; e.g. the t of a constant paired
    difference is infinite, its p stays 0 or 1)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _stored_diagnosis(run_dir: Path, split: str, data_root: Optional[str], max_questions: Optional[int]):
    """A run's ``diagnose_<split>.json`` (from ``diagnose --run``) when it describes the run's newest checkpoint
    with these settings and this version's statistics, else None (the run is diagnosed again)."""
    from integrations.common import CheckpointError, load_latest

    path = run_dir / f"diagnose_{split}.json"
    if not path.is_file() or data_root is not None or max_questions is not None:
        return None
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
        newest = load_latest(run_dir)
    except (ValueError, OSError, CheckpointError):
        return None
    same = (res.get("split") == split and res.get("checkpoint") is not None
            and Path(res["checkpoint"]).resolve() == Path(newest["path"]).resolve()
            and res.get("step") == int(newest["step"]) and res.get("definitions") == DEFINITIONS)
    return res if same else None


def diagnose_sweep(sweep_out, *, split: str = "val", data_root: Optional[str] = None, device="cpu",
                   batch_size: Optional[int] = None, max_questions: Optional[int] = None,
                   out: Optional[Path] = None, overwrite: bool = False, log=lambda s: None,
                   ban_root: Optional[str] = None) -> dict:
    """:func:`diagnose_run` on every finished run of a ``compare`` sweep (``<sweep_out>/runs/<variant>-s<seed>``);
    writes ``out`` (default ``<sweep_out>/results/diagnose.json``) and the Markdown report next to it
    (``.md``), never replacing either without ``overwrite``. Unfinished runs are skipped and listed under
    ``skipped``. Returns ``{"sweep", "split", "variants", "seeds", "runs" (per run: diagnose_run's result),
    "skipped", "families", "summary", "tests", "eta"}`` (see :func:`summarize_sweep`)."""
    from integrations.common import ensure_new, write_new_json

    from ..compare import cell_name

    json_path = Path(out) if out is not None else Path(sweep_out) / "results" / "diagnose.json"
    md_path = json_path.with_suffix(".md")
    for p in (json_path, md_path):
        ensure_new(p, overwrite=overwrite)
    per_run, skipped, seeds = {}, [], defaultdict(list)
    cells = sweep_runs(sweep_out)
    for variant, seed, run_dir in cells:
        if not _finished(run_dir):
            skipped.append(run_dir.name)
            continue
        stored = _stored_diagnosis(run_dir, split, data_root, max_questions)
        if stored is not None:
            log(f"diagnose {run_dir.name}: {run_dir / f'diagnose_{split}.json'} (same checkpoint and settings)")
            per_run[cell_name(variant, seed)] = stored
        else:
            log(f"diagnose {run_dir.name}")
            per_run[cell_name(variant, seed)] = diagnose_run(run_dir, split=split, data_root=data_root, device=device,
                                                             batch_size=batch_size, max_questions=max_questions,
                                                             ban_root=ban_root)
        seeds[variant].append(seed)
    if not per_run:
        raise FileNotFoundError(f"{Path(sweep_out) / 'runs'}: no finished run to diagnose"
                                + (f" (unfinished: {', '.join(skipped)})" if skipped else ""))
    variants = [v for v in dict.fromkeys(v for v, _, _ in cells) if seeds[v]]
    results = {"sweep": str(sweep_out), "split": split, "variants": variants, "seeds": dict(seeds),
               "runs": per_run, "skipped": skipped, **summarize_sweep(per_run, variants, seeds)}
    results = _json_safe(results)
    write_new_json(json_path, results, overwrite=overwrite)
    md_path.write_text(sweep_markdown(results) + "\n", encoding="utf-8")
    return results
