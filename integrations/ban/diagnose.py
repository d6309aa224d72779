"""``python -m integrations.ban diagnose``: where BAN's glimpses look, and which order BAN + PO learns.

    python -m integrations.ban diagnose --run runs/ban/compare/runs/po-u-s0      # -> <run>/diagnose_val.json
    python -m integrations.ban diagnose --sweep runs/ban/compare                 # -> <sweep>/results/diagnose.{json,md}

For a trained run on the synthetic dataset (``synth.py``) and every val question:

* **attention mass on the asked class**, per glimpse g: BAN's bilinear attention map of glimpse g is a
  softmax over all (box, word) pairs (BAN paper eq. 9), so ``sum_{i in asked, j} att[g, i, j]`` is the
  share of the glimpse's attention on the boxes of the class the question names (``<c>``; for
  ``count_left`` the counted class, not the landmark). Questions whose image has no box of that class
  (``exists`` / ``count`` with answer no / 0) are left out of it. ``chance`` is the share of the image's
  boxes that are of the asked class: the mass of attention spread uniformly over the boxes.
* **order of P** (BAN + PO only; each glimpse's box set has its own P, appendix F.4): the hard order of
  ``setperm.functional.hungarian(P)``, its Spearman rank correlation with the boxes' x-centres and areas (the
  geometry that "leftmost ..." / "largest ..." compare) over all real boxes and over the asked class's
  boxes only; sets with fewer than 3 boxes are skipped. Both signs are a valid order (right-to-left
  reads as well as left-to-right), so the mean of ``|rho|`` is reported next to the signed mean.
  ``input_order`` is the same statistic for the order of the feature file, which the generator draws at
  random (``synth._box_rows``): the chance level of ``|rho|`` for the same box counts.
* **sharpness of P**: the mean row entropy over real boxes (nats; 0 for a hard permutation), also
  divided by ``log n`` (1 for the uniform doubly-stochastic matrix; sets with n < 2 skipped).
* **eta** (appendix G): the learned step size in the checkpoint, and its per-epoch history from the
  run's ``summary.json``.

Which boxes are of the asked class comes from the files alone, as the oracle reads them
(``synth_oracle.decode_scenes``: each box decoded as the nearest class code; the question text parsed
by ``synth_world.parse_question``), never from the generator's hidden labels. The family of a question
is its ``synth_meta.json`` ``question_type``.

The statistics are functions of tensors (:func:`attention_mass`, :func:`hard_positions`,
:func:`set_rank_correlation`, :func:`relative_entropy`); :func:`diagnose_run` and
:func:`diagnose_sweep` apply them to checkpoints. Intermediate tensors are read from the public forward
(``(logits, att)``, the official signature) and a forward hook on the set encoder's permutation
optimiser; the model code is not changed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from integrations.common.stats import fmt_mean_std
from setperm.functional import hungarian, permutation_entropy

__all__ = ["attention_mass", "hard_positions", "set_rank_correlation", "relative_entropy", "diagnose_run",
           "diagnose_sweep", "run_markdown", "sweep_markdown", "add_diagnose_arguments", "cmd_diagnose"]

MIN_CORRELATION_BOXES = 3   # a rank correlation of 2 points is always +-1
_CELL = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")
_ORDER_STATS = ("spearman_x", "spearman_area", "spearman_x_asked", "spearman_area_asked")

# What each statistic of a diagnosis means (stored with it; a stored diagnosis is reused only with these)
DEFINITIONS = {
    "attention_mass": "share of a glimpse's (box, word) softmax attention on the boxes of the asked class, summed "
                      "over words; questions without such a box are left out",
    "chance": "share of the image's boxes that are of the asked class",
    "relevance": "mean weight sigmoid(relevance logit) the set encoder applies to the boxes of the asked class and "
                 "to the other boxes (BAN + LSTM / PO only)",
    "spearman": "Spearman rho of the Hungarian order of P with the box x-centre / area over all real boxes (or the "
                "asked class's boxes: *_asked); sets with < 3 boxes skipped; abs_mean = mean |rho|",
    "input_order": "the same rho for the feature file's box order (random in the synthetic set)",
    "entropy": "mean row entropy of P over real boxes (nats); relative = divided by log n"}


# ---------------------------------------------------------------------------------------------
# statistics (pure functions of tensors)
# ---------------------------------------------------------------------------------------------

def attention_mass(att: Tensor, target: Tensor) -> Tensor:
    """Share of each glimpse's attention on the ``target`` boxes, summed over words.

    Args:
        att: (B, G, K, T) attention maps, each glimpse a distribution over the K x T (box, word) pairs.
        target: (B, K) bool, True = a box of the asked class.

    Returns:
        (B, G): ``sum_{i: target[b, i]} sum_j att[b, g, i, j]``, in [0, 1].
    """
    if not isinstance(att, Tensor) or att.dim() != 4:
        raise ValueError(f"att must be a tensor (B, G, K, T), got {_describe(att)}")
    if not isinstance(target, Tensor) or target.dtype != torch.bool or target.shape != (att.shape[0], att.shape[2]):
        raise ValueError(f"target must be a bool tensor (B, K) = {(att.shape[0], att.shape[2])}, "
                         f"got {_describe(target)}")
    return (att * target[:, None, :, None].to(att.dtype)).sum(dim=(2, 3))


def hard_positions(P: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Position of every element in the Hungarian order of ``P``.

    Args:
        P: (B, N, N) soft permutation, ``P[b, i, k]`` = weight of element i at position k.
        mask: (B, N) bool, True = real element (None: all real).

    Returns:
        (B, N) long: ``pos[b, i]`` = the position of element i in ``hungarian(P, mask)`` (real elements
        take positions 0 ... n - 1).
    """
    idx = hungarian(P, mask=mask)                       # idx[b, k] = element at position k
    pos = torch.empty_like(idx)
    pos.scatter_(1, idx, torch.arange(idx.shape[1], device=idx.device).expand_as(idx))
    return pos


def set_rank_correlation(positions: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Spearman rank correlation, per set, of the elements' positions with a per-element value.

    Args:
        positions: (B, N) position of each element in an order (e.g. :func:`hard_positions`).
        values: (B, N) float, e.g. the box x-centres.
        mask: (B, N) bool, the elements to correlate over (real boxes, or the asked class's boxes).

    Returns:
        (B,) float64 in [-1, 1]: the Pearson correlation of the ranks among the selected elements (average
        ranks for ties); nan for a set with fewer than 3 selected elements or constant values.
    """
    from scipy.stats import rankdata

    if positions.dim() != 2 or values.shape != positions.shape or mask.shape != positions.shape:
        raise ValueError(f"positions, values, mask must all be (B, N); got {tuple(positions.shape)}, "
                         f"{tuple(values.shape)}, {tuple(mask.shape)}")
    sel = mask.detach().cpu().numpy().astype(bool)
    if sel.size == 0:
        return torch.full((positions.shape[0],), math.nan, dtype=torch.float64)
    # unselected elements become nan, which rankdata leaves out of the ranking (one call for all sets)
    ranks = [rankdata(np.where(sel, t.detach().cpu().double().numpy(), np.nan), axis=1, nan_policy="omit")
             for t in (positions, values)]
    n = sel.sum(1)
    centred = [np.where(sel, r - (n[:, None] + 1) / 2, 0.0) for r in ranks]
    cov = (centred[0] * centred[1]).sum(1)
    denom = np.sqrt((centred[0] ** 2).sum(1) * (centred[1] ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where((n >= MIN_CORRELATION_BOXES) & (denom > 0), cov / np.where(denom > 0, denom, 1.0), np.nan)
    return torch.from_numpy(np.clip(rho, -1.0, 1.0))


def relative_entropy(P: Tensor, mask: Tensor) -> Tensor:
    """Mean row entropy of ``P`` (B, N, N) over real elements divided by ``log n`` (n real elements):
    0 for a hard permutation, 1 for the uniform one. (B,) float64, nan for n < 2."""
    n = mask.sum(1).double()
    ent = permutation_entropy(P.detach().double(), mask)
    return torch.where(n >= 2, ent / n.clamp_min(2).log(), torch.full_like(ent, math.nan))


def _describe(t) -> str:
    return f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------

class _RelevanceRecorder:
    """Forward hook on the set encoder: keeps the relevance logits (``weights``) of its last call."""

    def __init__(self, model):
        encoder = getattr(model, "set_encoder", None)
        self.weights: Optional[Tensor] = None
        self._handle = (encoder.register_forward_hook(self._record, with_kwargs=True)
                        if encoder is not None else None)

    def _record(self, module, args, kwargs, output) -> None:
        w = kwargs.get("weights", args[3] if len(args) > 3 else None)
        self.weights = None if w is None else w.detach()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()


class _PermutationRecorder:
    """Forward hook on the set encoder's permutation module (PO): keeps the last P it produced."""

    def __init__(self, model):
        encoder = getattr(model, "set_encoder", None)
        self.module = getattr(encoder, "po", None)
        self.P: Optional[Tensor] = None
        self._handle = self.module.register_forward_hook(self._record) if self.module is not None else None

    def _record(self, module, args, output) -> None:
        self.P = (output[-1] if isinstance(output, list) else output).detach()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()


def _question_index(root, split: str) -> dict:
    """question_id -> (image_id, parsed question), from the question file."""
    from .data import QUESTION_FILES
    from .synth_world import parse_question

    questions = json.loads((Path(root) / QUESTION_FILES[split]).read_text())["questions"]
    return {int(q["question_id"]): (q["image_id"], parse_question(q["question"])) for q in questions}


def _class_masks(scenes: dict, index: dict, qids: Sequence[int], mask: Tensor, boxes: Tensor) -> Tensor:
    """(B, K) bool: the boxes of each question's asked class, from the decoded scenes (``boxes`` (B, K, 4)
    the batch's x1, y1, x2, y2, to check that scene box i is row i of the batch)."""
    B, K = mask.shape
    out = torch.zeros(B, K, dtype=torch.bool)
    for i, qid in enumerate(qids):
        image_id, question = index[qid]
        scene = scenes[image_id]
        classes = scene.classes
        n = int(mask[i].sum())
        # collate_vqa keeps the file's box order and pads at the end: box i of the scene is row i of v
        assert len(classes) == n and bool(mask[i, :n].all()), (qid, len(classes), n)
        assert np.allclose(scene.boxes, boxes[i, :n].numpy(), atol=1e-5), qid
        out[i, :n] = torch.tensor([c == question.cls for c in classes], dtype=torch.bool)
    return out


class _Accumulator:
    """Per-question values per family; :meth:`summary` turns them into the report's numbers."""

    def __init__(self, glimpses: int, with_permutation: bool):
        self.G, self.with_permutation = glimpses, with_permutation
        self.values: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))

    def add(self, family: str, key: str, value) -> None:
        for fam in (family, "all"):
            self.values[fam][key].append(value)

    def summary(self) -> dict:
        fams = sorted(self.values, key=lambda f: (f == "all", f))
        return {fam: self._family(self.values[fam]) for fam in fams}

    def _family(self, v: Dict[str, list]) -> dict:
        mass = np.asarray(v["mass"], dtype=np.float64).reshape(-1, self.G)
        out = {"n": len(v["n_boxes"]),
               "attention": {"n": int(mass.shape[0]), "mass": _mean(mass), "mass_per_glimpse": _mean(mass, axis=0),
                             "chance": _mean(v["chance"])},
               "input_order": {k: _corr(np.asarray(v["input_" + k], dtype=np.float64)[:, None])
                               for k in ("spearman_x", "spearman_area")},
               "permutation": None}
        if v.get("relevance_asked"):
            asked = np.asarray(v["relevance_asked"], dtype=np.float64).reshape(-1, self.G)
            other = np.asarray(v["relevance_other"], dtype=np.float64).reshape(-1, self.G)
            out["relevance"] = {"asked": _mean(asked), "other": _mean(other),
                                "asked_per_glimpse": _mean(asked, axis=0), "other_per_glimpse": _mean(other, axis=0)}
        if self.with_permutation:
            perm = {k: _corr(np.asarray(v[k], dtype=np.float64).reshape(-1, self.G)) for k in _ORDER_STATS}
            ent = np.asarray(v["entropy"], dtype=np.float64).reshape(-1, self.G)
            rel = np.asarray(v["entropy_relative"], dtype=np.float64).reshape(-1, self.G)
            perm["entropy"] = {"mean": _mean(ent), "per_glimpse": _mean(ent, axis=0), "relative": _mean(rel),
                               "relative_per_glimpse": _mean(rel, axis=0), "n_sets": int(ent.size)}
            out["permutation"] = perm
        return out


def _mean(x, axis=None):
    """nan-skipping mean as JSON (None where nothing is defined); ``axis=0`` of a (rows, G) array gives
    the G column means."""
    x = np.asarray(x, dtype=np.float64)
    if axis is not None:
        return [_mean(x[:, g]) for g in range(x.shape[1])]
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else None


def _corr(rho: np.ndarray) -> dict:
    """Signed and absolute mean of (questions, glimpses) correlations (nan = skipped set)."""
    return {"mean": _mean(rho), "abs_mean": _mean(np.abs(rho)), "abs_mean_per_glimpse": _mean(np.abs(rho), axis=0),
            "n_sets": int((~np.isnan(rho)).sum())}


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


def _eta(run_dir: Path, model) -> dict:
    """eta in the checkpoint and its per-epoch history in ``summary.json`` (absent for runs without one)."""
    from setperm import PermutationMonitor

    with PermutationMonitor(model) as monitor:
        final = {f"eta/{name}": eta for name, eta in monitor.step_sizes().items()}
    summary = run_dir / "summary.json"
    history = json.loads(summary.read_text()).get("history", []) if summary.is_file() else []
    keys = sorted({k for h in history for k in h if k.startswith("eta/")})
    return {"checkpoint": final, "epochs": [h.get("epoch") for h in history],
            "history": {k: [h.get(k) for h in history] for k in keys}}


@torch.no_grad()
def _first_questions(loader, max_questions: Optional[int]):
    """``(batch, how many of its questions to use)`` up to ``max_questions`` questions in all (None: every one)."""
    seen = 0
    for batch in loader:
        if max_questions is not None and seen >= max_questions:
            return
        take = len(batch.q) if max_questions is None else min(len(batch.q), max_questions - seen)
        seen += take
        yield batch, take


def _add_batch(acc: "_Accumulator", families: List[str], att: Tensor, boxes: Tensor, mask: Tensor, asked: Tensor,
               weights: Optional[Tensor], P: Optional[Tensor]) -> None:
    """Add one batch's per-question statistics to ``acc``: box count, the input order's correlations, the
    attention mass on the asked class and its chance level, the relevance weights on the asked class and on
    the other boxes (``weights`` (B, G, K), or None), the order statistics of ``P`` (with a permutation)."""
    G = acc.G
    mass = attention_mass(att, asked)                                     # (B, G)
    x_centre = (boxes[..., 0] + boxes[..., 2]) / 2
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    file_order = torch.arange(mask.shape[1]).expand_as(mask)
    input_x = set_rank_correlation(file_order, x_centre, mask)
    input_area = set_rank_correlation(file_order, area, mask)
    order = _order_statistics(P, mask, asked, x_centre, area, G) if acc.with_permutation else None
    for i, fam in enumerate(families):
        n, n_asked = int(mask[i].sum()), int(asked[i].sum())
        acc.add(fam, "n_boxes", n)
        acc.add(fam, "input_spearman_x", float(input_x[i]))
        acc.add(fam, "input_spearman_area", float(input_area[i]))
        if n_asked:
            acc.add(fam, "mass", mass[i].tolist())
            acc.add(fam, "chance", n_asked / n)
            if weights is not None:
                others = mask[i] & ~asked[i]
                acc.add(fam, "relevance_asked", weights[i][:, asked[i]].mean(1).tolist())
                acc.add(fam, "relevance_other", (weights[i][:, others].mean(1) if others.any()
                                                 else torch.full((G,), float("nan"))).tolist())
        if order is not None:
            for key, val in order.items():
                acc.add(fam, key, val[i].tolist())


def diagnose_run(run_dir, *, split: str = "val", data_root: Optional[str] = None, device="cpu",
                 batch_size: Optional[int] = None, max_questions: Optional[int] = None) -> dict:
    """Attention mass on the asked class, order and sharpness of P and eta of a run's newest checkpoint.

    Args:
        run_dir: a run folder of ``train`` / ``compare`` (or one of its ``checkpoints/step_*.pt``); the
            model and data settings come from the checkpoint's stored config.
        split: the split to read (its questions and the decoded scenes of its images).
        data_root: the synthetic dataset (default: the run's ``--data-root``). Real VQA data has no
            decodable classes: ``FileNotFoundError`` (no ``synth_meta.json``).
        device: where to run the model ("cpu", "cuda", "auto", ...).
        batch_size: questions per forward (default: the run's batch size).
        max_questions: diagnose only the first N questions of the split (in file order).

    Returns:
        A JSON-able dict: ``variant``, ``checkpoint``, ``step``, ``split``, ``n_questions``, ``glimpses``,
        ``families`` ({family and "all": ``n``, ``attention`` {``n``, ``mass``, ``mass_per_glimpse``,
        ``chance``}, ``input_order`` {``spearman_x``, ``spearman_area``}, ``permutation`` (None without a
        permutation optimiser, i.e. for ``off`` and ``none``) {``spearman_x``, ``spearman_area``,
        ``spearman_x_asked``, ``spearman_area_asked`` each {``mean``, ``abs_mean``,
        ``abs_mean_per_glimpse``, ``n_sets``}, ``entropy`` {``mean``, ``per_glimpse``, ``relative``,
        ``relative_per_glimpse``, ``n_sets``}}}), ``eta`` and ``definitions``. Means are over questions
        (and glimpses); None where nothing is defined. See the module docstring for the definitions.
    """
    from integrations.common import resolve_device, run_folder

    from .synth_oracle import decode_scenes
    from .train import load_question_types, load_run, make_loader, model_inputs, relevance_oracle

    if max_questions is not None and max_questions < 1:
        raise ValueError(f"max_questions must be a positive int or None, got {max_questions!r}")
    path = Path(run_dir)
    folder = run_folder(path)
    dev = resolve_device(device)
    model, ds, saved, state = load_run(path, split, data_root, dev)
    qtypes = load_question_types(saved.data_root)
    if qtypes is None:
        raise FileNotFoundError(f"{saved.data_root}: not a synthetic dataset (no synth_meta.json); diagnose "
                                "needs the decodable classes of the synthetic set")
    scenes = decode_scenes(saved.data_root, split, adaptive=not saved.fixed36)
    index = _question_index(saved.data_root, split)
    G = int(model.glimpse)
    oracle = relevance_oracle(saved)          # an --oracle-relevance run is diagnosed as it was trained
    recorder = _PermutationRecorder(model)
    relevance = _RelevanceRecorder(model)
    acc = _Accumulator(G, with_permutation=recorder.module is not None)
    loader = make_loader(ds, batch_size or saved.batch_size, shuffle=False, epoch=0, seed=saved.seed, rank=0,
                         world=1, workers=0)
    seen = 0
    try:
        for batch, take in _first_questions(loader, max_questions):
            v, b, q = batch.v[:take].to(dev), batch.b[:take].to(dev), batch.q[:take].to(dev)
            qids = batch.question_id[:take].tolist()
            seen += take
            recorder.P = None
            _, att = model(v, b, q, None, **model_inputs(oracle, qids, v.shape[1], dev))
            mask = batch.mask[:take]                                      # (B, K), True = real box
            boxes = b[:, :, :4].double().cpu()
            weights = None
            if relevance.weights is not None:        # (B * G, K) logits -> (B, G, K) weights the LSTM applies
                weights = torch.sigmoid(relevance.weights.double().cpu()).view(take, G, -1)
            _add_batch(acc, [qtypes.get(qid, index[qid][1].family) for qid in qids], att.double().cpu(), boxes,
                       mask, _class_masks(scenes, index, qids, mask, boxes), weights, recorder.P)
    finally:
        recorder.remove()
        relevance.remove()
    return {"run": str(folder), "variant": getattr(saved, "permutation", None), "seed": getattr(saved, "seed", None),
            "checkpoint": state["path"], "step": int(state["step"]), "split": split, "n_questions": seen,
            "glimpses": G, "families": acc.summary(), "eta": _eta(folder, model),
            "definitions": dict(DEFINITIONS)}


def _order_statistics(P: Optional[Tensor], mask: Tensor, asked: Tensor, x_centre: Tensor, area: Tensor,
                      G: int) -> Dict[str, Tensor]:
    """(B, G) rank correlations and entropies of the G glimpses' permutations ``P`` (B * G, K, K),
    set ``b * G + g`` being glimpse g of question b (``plugin.glimpse_sets``)."""
    B, K = mask.shape
    if P is None or P.shape != (B * G, K, K):
        raise RuntimeError(f"expected the set encoder's permutations (B * G, K, K) = {(B * G, K, K)}, got "
                           f"{None if P is None else tuple(P.shape)}")
    P = P.cpu()
    rep = lambda t: t.repeat_interleave(G, dim=0)                 # (B, K) -> (B * G, K), sets in b * G + g order
    m, a = rep(mask), rep(asked) & rep(mask)
    pos = hard_positions(P, m)
    out = {"spearman_x": set_rank_correlation(pos, rep(x_centre), m),
           "spearman_area": set_rank_correlation(pos, rep(area), m),
           "spearman_x_asked": set_rank_correlation(pos, rep(x_centre), a),
           "spearman_area_asked": set_rank_correlation(pos, rep(area), a),
           "entropy": permutation_entropy(P.double(), m),
           "entropy_relative": relative_entropy(P, m)}
    return {k: val.view(B, G) for k, val in out.items()}


# ---------------------------------------------------------------------------------------------
# a compare sweep
# ---------------------------------------------------------------------------------------------

def sweep_runs(sweep_out) -> List[tuple]:
    """``[(variant, seed, run folder)]`` of a ``compare`` sweep's ``<out>/runs/<variant>-s<seed>``."""
    from .compare import LABELS

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
    return summary.is_file() and bool(json.loads(summary.read_text()).get("finished"))


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
        for k in _ORDER_STATS:
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

    from .compare import cell_name

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


def _stored_diagnosis(run_dir: Path, split: str, data_root: Optional[str], max_questions: Optional[int]):
    """A run's ``diagnose_<split>.json`` (from ``diagnose --run``) when it describes the run's newest checkpoint
    with these settings and this version's statistics, else None (the run is diagnosed again)."""
    from integrations.common import CheckpointError, load_latest

    path = run_dir / f"diagnose_{split}.json"
    if not path.is_file() or data_root is not None or max_questions is not None:
        return None
    try:
        res = json.loads(path.read_text())
        newest = load_latest(run_dir)
    except (ValueError, OSError, CheckpointError):
        return None
    same = (res.get("split") == split and res.get("checkpoint") is not None
            and Path(res["checkpoint"]).resolve() == Path(newest["path"]).resolve()
            and res.get("step") == int(newest["step"]) and res.get("definitions") == DEFINITIONS)
    return res if same else None


def diagnose_sweep(sweep_out, *, split: str = "val", data_root: Optional[str] = None, device="cpu",
                   batch_size: Optional[int] = None, max_questions: Optional[int] = None,
                   out: Optional[Path] = None, overwrite: bool = False, log=lambda s: None) -> dict:
    """:func:`diagnose_run` on every finished run of a ``compare`` sweep (``<sweep_out>/runs/<variant>-s<seed>``);
    writes ``out`` (default ``<sweep_out>/results/diagnose.json``) and the Markdown report next to it
    (``.md``), never replacing either without ``overwrite``. Unfinished runs are skipped and listed under
    ``skipped``. Returns ``{"sweep", "split", "variants", "seeds", "runs" (per run: diagnose_run's result),
    "skipped", "families", "summary", "tests", "eta"}`` (see :func:`summarize_sweep`)."""
    from integrations.common import ensure_new, write_new_json

    from .compare import cell_name

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
                                                             batch_size=batch_size, max_questions=max_questions)
        seeds[variant].append(seed)
    if not per_run:
        raise FileNotFoundError(f"{Path(sweep_out) / 'runs'}: no finished run to diagnose"
                                + (f" (unfinished: {', '.join(skipped)})" if skipped else ""))
    variants = [v for v in dict.fromkeys(v for v, _, _ in cells) if seeds[v]]
    results = {"sweep": str(sweep_out), "split": split, "variants": variants, "seeds": dict(seeds),
               "runs": per_run, "skipped": skipped, **summarize_sweep(per_run, variants, seeds)}
    results = _json_safe(results)
    write_new_json(json_path, results, overwrite=overwrite)
    md_path.write_text(sweep_markdown(results) + "\n")
    return results


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def run_markdown(res: dict) -> str:
    """One run's diagnosis as a Markdown table (attention in %, rho and entropy as numbers)."""
    lines = [f"{res['variant']} ({res['checkpoint']}), {res['split']}, {res['n_questions']} questions, "
             f"{res['glimpses']} glimpses. Attention mass on the asked class (%; chance = uniform over boxes); "
             "mean |rho| (Spearman) of the Hungarian order of P with x-centre / area (signed mean in brackets; "
             "input order = the "
             "file's random order); entropy of P (nats, / log n).", "",
             "| family | n | mass | chance | mass per glimpse | abs rho x | abs rho area | input abs rho x | entropy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fam, f in res["families"].items():
        att, perm = f["attention"], f["permutation"]
        glimpses = " / ".join(_pct(m) for m in att["mass_per_glimpse"])
        if perm is None:
            rx = ra = ent = "-"
        else:
            rx = f"{_num(perm['spearman_x']['abs_mean'])} ({_num(perm['spearman_x']['mean'])})"
            ra = f"{_num(perm['spearman_area']['abs_mean'])} ({_num(perm['spearman_area']['mean'])})"
            ent = f"{_num(perm['entropy']['mean'])} ({_num(perm['entropy']['relative'])})"
        lines.append(f"| {fam} | {f['n']} | {_pct(att['mass'])} | {_pct(att['chance'])} | {glimpses} | {rx} | {ra} | "
                     f"{_num(f['input_order']['spearman_x']['abs_mean'])} | {ent} |")
    eta = res["eta"]["checkpoint"]
    if eta:
        lines += ["", "eta (checkpoint): " + ", ".join(f"{k} = {v:.4g}" for k, v in eta.items())]
    return "\n".join(lines)


def _ms(s: Optional[dict], scale: float = 1.0, digits: int = 2) -> str:
    return fmt_mean_std(s, scale, digits)


def sweep_markdown(results: dict) -> str:
    """The sweep's diagnosis: attention mass, order and entropy of P, eta, and the paired tests."""
    from integrations.common.stats import fmt_p

    from .compare import LABELS

    variants, fams, summ = results["variants"], results["families"], results["summary"]
    n_seeds = {v: len(s) for v, s in results["seeds"].items()}
    head = "| family | chance | " + " | ".join(LABELS[v] for v in variants) + " |"
    rule = "|---|---|" + "---|" * len(variants)
    counts = ", ".join(f"{LABELS[v]}: {n}" for v, n in n_seeds.items())
    lines = [f"Diagnosis on {results['split']}: mean ± std over seeds ({counts})."
             + (f" Unfinished runs skipped: {', '.join(results['skipped'])}." if results["skipped"] else ""), "",
             "Attention mass on the asked class (%, mean over glimpses; chance = share of the image's boxes of "
             "that class).", "", head, rule]
    for fam in fams:
        chance = next((summ[fam][v].get("chance") for v in variants if "chance" in summ[fam][v]), None)
        lines.append(f"| {fam} | {_ms(chance, 100, 1)} | "
                     + " | ".join(_ms(summ[fam][v].get("mass"), 100, 1) for v in variants) + " |")
    G = max((sum(k.startswith("mass_g") for k in summ["all"][v]) for v in variants), default=0)
    if G:
        lines += ["", "Attention mass on the asked class per glimpse (%, all questions).", "",
                  "| variant | " + " | ".join(f"g{g}" for g in range(G)) + " |", "|---|" + "---|" * G]
        for v in variants:
            lines.append(f"| {LABELS[v]} | " + " | ".join(_ms(summ["all"][v].get(f"mass_g{g}"), 100, 1)
                                                          for g in range(G)) + " |")
    enc = [v for v in variants if any("relevance_asked" in summ[f][v] for f in fams)]
    if enc:
        lines += ["", "Relevance weight sigmoid(logit) the set encoder applies to each box (mean over glimpses): boxes "
                  "of the asked class / other boxes.", "",
                  "| family | " + " | ".join(LABELS[v] for v in enc) + " |", "|---|" + "---|" * len(enc)]
        for fam in fams:
            lines.append(f"| {fam} | " + " | ".join(f"{_ms(summ[fam][v].get('relevance_asked'))} / "
                                                     f"{_ms(summ[fam][v].get('relevance_other'))}" for v in enc) + " |")
    po = [v for v in variants if any("abs_spearman_x" in summ[f][v] for f in fams)]
    if po:
        lines += ["", "Order of P (Hungarian) against the geometry: mean |Spearman rho| over sets (input order = "
                  "the feature file's random order, the chance level); entropy of P in nats and / log n.", "",
                  "| family | input abs rho x | " + " | ".join(f"{LABELS[v]} abs rho x | {LABELS[v]} abs rho area | "
                                                             f"{LABELS[v]} entropy (/ log n)" for v in po) + " |",
                  "|---|---|" + "---|---|---|" * len(po)]
        for fam in fams:
            base = next((summ[fam][v].get("input_abs_spearman_x") for v in variants), None)
            cells = []
            for v in po:
                s = summ[fam][v]
                cells += [_ms(s.get("abs_spearman_x")), _ms(s.get("abs_spearman_area")),
                          f"{_ms(s.get('entropy'))} ({_ms(s.get('entropy_relative'))})"]
            lines.append(f"| {fam} | {_ms(base)} | " + " | ".join(cells) + " |")
    if any(results["eta"].get(v) for v in variants):
        lines += ["", "Final eta (checkpoint), mean ± std over seeds.", "", "| variant | eta |", "|---|---|"]
        for v in variants:
            for k, s in results["eta"].get(v, {}).items():
                lines.append(f"| {LABELS[v]} ({k}) | {_ms(s, 1, 4)} |")
    rows = [(fam, name, t) for fam in fams for name, t in results["tests"][fam].items()]
    if rows:
        lines += ["", "Paired t-tests over seeds (first minus second; mass in points, abs rho as is).", "",
                  "| family | comparison | mean difference | p |", "|---|---|---|---|"]
        for fam, name, t in rows:
            scale = 100 if name.startswith("mass") else 1
            diff = "-" if t["diff_mean"] is None else f"{scale * t['diff_mean']:+.2f}"
            lines.append(f"| {fam} | {name} | {diff} | {fmt_p(t['p'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def add_diagnose_arguments(p: argparse.ArgumentParser) -> None:
    from integrations.common import add_threads_argument, device_name, positive_int

    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="run folder (or checkpoint .pt) to diagnose")
    which.add_argument("--sweep", help="compare sweep folder: diagnose every finished <sweep>/runs/<variant>-s<seed>")
    p.add_argument("--split", default="val", help="split to read (default val)")
    p.add_argument("--data-root", default=None, help="synthetic dataset (default: the one stored in the run's config)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the run's batch size")
    p.add_argument("--max-questions", type=positive_int, default=None,
                   help="only the first N questions of the split (default: all)")
    p.add_argument("--device", type=device_name, default="cpu")
    add_threads_argument(p)
    p.add_argument("--out", default=None, help="JSON file (default: <run>/diagnose_<split>.json, or "
                                               "<sweep>/results/diagnose.json with the .md next to it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never done otherwise)")


def cmd_diagnose(args) -> int:
    """The ``diagnose`` subcommand: writes the JSON (and, for a sweep, the Markdown) and prints the table."""
    from integrations.common import ensure_new, run_folder, write_new_json

    kwargs = dict(split=args.split, data_root=args.data_root, device=args.device, batch_size=args.batch_size,
                  max_questions=args.max_questions)
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
