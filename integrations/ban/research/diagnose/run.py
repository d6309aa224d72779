"""One run's diagnosis: its newest checkpoint on a synthetic split, the statistics of every question
aggregated per question family, and eta (:func:`diagnose_run`)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .recording import PermutationRecorder, RelevanceRecorder
from .statistics import DEFINITIONS, ORDER_STATS, attention_mass, order_statistics, set_rank_correlation


def _question_index(root, split: str) -> dict:
    """question_id -> (image_id, parsed question), from the question file."""
    from ...data import QUESTION_FILES
    from ..synth_world import parse_question

    questions = json.loads((Path(root) / QUESTION_FILES[split]).read_text(encoding="utf-8"))["questions"]
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
            perm = {k: _corr(np.asarray(v[k], dtype=np.float64).reshape(-1, self.G)) for k in ORDER_STATS}
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


def _eta(run_dir: Path, model) -> dict:
    """eta in the checkpoint and its per-epoch history in ``summary.json`` (absent for runs without one)."""
    from setperm import PermutationMonitor

    with PermutationMonitor(model) as monitor:
        final = {f"eta/{name}": eta for name, eta in monitor.step_sizes().items()}
    summary = run_dir / "summary.json"
    history = json.loads(summary.read_text(encoding="utf-8")).get("history", []) if summary.is_file() else []
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
    order = order_statistics(P, mask, asked, x_centre, area, G) if acc.with_permutation else None
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
                 batch_size: Optional[int] = None, max_questions: Optional[int] = None,
                 ban_root: Optional[str] = None) -> dict:
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
        ban_root: for a run of the official model, its checkout (default: the path stored in the run's
            config); it must hold the code the run was trained with.

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

    from ..synth_oracle import decode_scenes
    from ...train import load_question_types, load_run, make_loader, min_boxes, model_inputs, relevance_oracle

    if max_questions is not None and max_questions < 1:
        raise ValueError(f"max_questions must be a positive int or None, got {max_questions!r}")
    path = Path(run_dir)
    folder = run_folder(path)
    dev = resolve_device(device)
    model, ds, saved, state = load_run(path, split, data_root, dev, ban_root)
    qtypes = load_question_types(saved.data_root)
    if qtypes is None:
        raise FileNotFoundError(f"{saved.data_root}: not a synthetic dataset (no synth_meta.json); diagnose "
                                "needs the decodable classes of the synthetic set")
    scenes = decode_scenes(saved.data_root, split, adaptive=not saved.fixed36)
    index = _question_index(saved.data_root, split)
    G = int(model.glimpse)
    oracle = relevance_oracle(saved)          # an --oracle-relevance run is diagnosed as it was trained
    recorder = PermutationRecorder(model)
    relevance = RelevanceRecorder(model)
    acc = _Accumulator(G, with_permutation=recorder.module is not None)
    loader = make_loader(ds, batch_size or saved.batch_size, shuffle=False, epoch=0, seed=saved.seed, rank=0,
                         world=1, workers=0, min_boxes=min_boxes(saved))
    seen = 0
    try:
        for batch, take in _first_questions(loader, max_questions):
            v, b, q = batch.v[:take].to(dev), batch.b[:take].to(dev), batch.q[:take].to(dev)
            qids = batch.question_id[:take].tolist()
            seen += take
            recorder.P = None
            part = batch._replace(**{f: getattr(batch, f)[:take] for f in ("v", "b", "q", "mask", "question_id")})
            _, att = model(v, b, q, None, **model_inputs(model, oracle, part, dev))
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
