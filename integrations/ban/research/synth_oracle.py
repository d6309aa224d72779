"""The oracle decoder of the synthetic VQA task: every answer recovered from the FILES alone.

    python -m integrations.ban.research.synth_oracle --data-root DIR [--split val] [--fixed36]

It reads what a model reads (the box features and spatial features of ``{split}.hdf5``, the question
text) plus the generator's public settings in ``synth_meta.json`` (seed, feature scales, class
names), never the targets or the question types: each box's class and colour are decoded as the
nearest expected feature (``FeatureCodes.decode``), the question text is parsed back into a
question (``synth_world.parse_question``), and the answer is computed by the same rules as the
generator's, on the decoded scene. Comparing with the best answer of the ten simulated
annotators (``cache/{split}_target.pkl``) checks that every family is answerable; what disagrees
is the feature noise's doing (a box decoded as the wrong class or colour), reported per family.

The same module gives the reference accuracies a trained model is read against: the oracle's soft
accuracy, the upper bound (best answer's soft score), the answer prior (most frequent train answer
per family, and per question text) and the geometry-free bound (the best a model can do without the
box geometry, i.e. what plain BAN can reach on each family).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ...common import HelpFormatter, RunError, restricted_load, run_command
from ..data import QUESTION_FILES, split_h5_name
from .synth_features import FeatureCodes, FeatureConfig
from .synth_world import ASKED_CLASSES, Scene, SceneConfig, answer, feasible, parse_question


def load_meta(root) -> dict:
    path = Path(root) / "synth_meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a synthetic dataset (no synth_meta.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def codes_from_meta(meta: dict) -> tuple:
    """(FeatureCodes, SceneConfig, class names to decode against) from ``synth_meta.json``."""
    gen = meta["generator"]
    scene = SceneConfig(**gen["scene"])
    codes = FeatureCodes(gen["seed"], FeatureConfig(**gen["features"]), scene.clutter_classes)
    # decode against every class the generator can draw (asked and clutter)
    return codes, scene, list(ASKED_CLASSES[: scene.classes]) + list(scene.clutter_classes)


def decode_scenes(root, split: str = "val", adaptive: bool = True) -> dict:
    """{image_id: Scene decoded from the feature file}; boxes from spatial_features (x1, y1, x2, y2)."""
    import h5py

    root = Path(root)
    codes, _, names = codes_from_meta(load_meta(root))
    base = split if adaptive else split + "36"
    index = restricted_load(root / f"{base}_imgid2idx.pkl", allow_numpy=True)
    scenes = {}
    with h5py.File(root / split_h5_name(split, adaptive), "r") as f:
        feats, spatial = f["image_features"][:], f["spatial_features"][:]
        pos = f["pos_boxes"][:] if adaptive else None
    for image_id, row in index.items():
        if adaptive:
            s, e = pos[row]
            v, b = feats[s:e], spatial[s:e]
        else:
            v, b = feats[row], spatial[row]
        classes, colours = codes.decode(v, names)
        scenes[image_id] = Scene(classes, colours, b[:, :4].astype(np.float64))
    return scenes


def decoded_questions(root, split: str = "val", adaptive: bool = True):
    """``(question_id, parsed question, decoded scene of its image)`` for every question of ``split``,
    from the files alone."""
    root = Path(root)
    scenes = decode_scenes(root, split, adaptive)
    for q in json.loads((root / QUESTION_FILES[split]).read_text(encoding="utf-8"))["questions"]:
        yield q["question_id"], parse_question(q["question"]), scenes[q["image_id"]]


def oracle_answers(root, split: str = "val", adaptive: bool = True) -> dict:
    """{question_id: (family, answer)} from the files; answer None where the decoded scene does not
    admit the question (a decoding error)."""
    return {qid: (parsed.family, answer(scene, parsed) if feasible(scene, parsed) else None)
            for qid, parsed, scene in decoded_questions(root, split, adaptive)}


def relevant_boxes(root, split: str = "val", adaptive: bool = True) -> dict:
    """{question_id: (n_boxes,) bool}: the boxes a question is about, decoded from the files as the oracle
    does: the boxes of the asked class, and for ``count_left`` also the landmark's box. Row i is box i of
    the image in the feature file (the order ``collate_vqa`` keeps)."""
    out = {}
    for qid, parsed, scene in decoded_questions(root, split, adaptive):
        wanted = {parsed.cls} | ({parsed.landmark} if parsed.landmark is not None else set())
        out[int(qid)] = np.array([c in wanted for c in scene.classes], dtype=bool)
    return out


class RelevanceOracle:
    """The ground-truth relevance of the boxes, for the oracle ablation of BAN + PO (``train
    --oracle-relevance``): logits ``+logit`` at the boxes the question is about, ``-logit`` elsewhere
    (sigmoid(4) = 0.98, the weight a trained BAN + PO-U's attention gives such boxes on the synthetic set).

    ``oracle(question_ids (B,), K) -> (B, K) float32``; padded slots (beyond a question's boxes) are -logit
    (the encoder masks them anyway). Needs a synthetic dataset (its ``synth_meta.json``).
    """

    def __init__(self, root, splits=("train", "val"), adaptive: bool = True, logit: float = 4.0):
        self.logit = float(logit)
        self.boxes: dict = {}
        for split in splits:
            if (Path(root) / QUESTION_FILES[split]).is_file():
                self.boxes.update(relevant_boxes(root, split, adaptive))

    def __call__(self, question_ids, K: int):
        import torch

        out = torch.full((len(question_ids), K), -self.logit)
        for i, qid in enumerate(question_ids.tolist() if hasattr(question_ids, "tolist") else question_ids):
            rel = self.boxes[int(qid)]
            out[i, : len(rel)] = torch.where(torch.from_numpy(rel), self.logit, -self.logit)
        return out


def load_targets(root, split: str) -> dict:
    """{question_id: {answer: soft score}} from ``cache/{split}_target.pkl``."""
    root = Path(root)
    label2ans = restricted_load(root / "cache" / "trainval_label2ans.pkl", allow_numpy=True)
    targets = restricted_load(root / "cache" / f"{split}_target.pkl", allow_numpy=True)
    return {t["question_id"]: {label2ans[l]: float(s) for l, s in zip(t["labels"], t["scores"])} for t in targets}


def best_answers(scores: dict) -> set:
    """The annotators' answers of largest soft score. Usually one (the majority); two when both were
    given by >= 4 of the 10 annotators (soft score 1 each: the files cannot tell them apart)."""
    top = max(scores.values())
    return {a for a, s in scores.items() if s == top}


def evaluate_oracle(root, split: str = "val", adaptive: bool = True) -> dict:
    """Per family (and 'all'): n, agreement (the oracle's answer is a best answer of the annotators,
    :func:`best_answers`), the oracle's soft accuracy and the upper bound (soft score of the best
    answer), as fractions."""
    answers = oracle_answers(root, split, adaptive)
    targets = load_targets(root, split)
    acc = defaultdict(lambda: np.zeros(4))  # n, agree, oracle score, best score
    for qid, (family, ans) in answers.items():
        t = targets[qid]
        row = np.array([1, float(ans in best_answers(t)), t.get(ans, 0.0), max(t.values())])
        acc[family] += row
        acc["all"] += row
    return {f: {"n": int(v[0]), "agreement": v[1] / v[0], "soft_acc": v[2] / v[0], "upper_bound": v[3] / v[0]}
            for f, v in sorted(acc.items())}


GEOMETRY_FREE = ("exists", "colour", "count")


def geometry_free_bound(root, split: str = "val") -> dict:
    """Soft accuracy per family (and 'all') of the best answers that ignore the box geometry, as plain
    BAN must (its features carry no position or size; only its counter sees the boxes).

    From the decoded scene: exists / colour / count are answered exactly; an order family
    (leftmost ... smallest) scores the mean soft score of the colours of the asked class's boxes (a
    uniform guess among them: any geometry-free rule does no better on average, since positions and
    sizes are drawn independently of colour); count_left gets the most frequent train answer for the
    same number of boxes of the asked class (largest summed train soft score, as the prior).
    """
    root = Path(root)
    by_count = defaultdict(Counter)
    train_scenes = decode_scenes(root, "train")
    train_targets = load_targets(root, "train")
    for q in json.loads((root / QUESTION_FILES["train"]).read_text(encoding="utf-8"))["questions"]:
        parsed = parse_question(q["question"])
        if parsed.family == "count_left":
            by_count[train_scenes[q["image_id"]].count(parsed.cls)].update(train_targets[q["question_id"]])
    scenes = train_scenes if split == "train" else decode_scenes(root, split)
    targets = load_targets(root, split)
    out = defaultdict(lambda: np.zeros(2))
    for q in json.loads((root / QUESTION_FILES[split]).read_text(encoding="utf-8"))["questions"]:
        parsed, scene, t = parse_question(q["question"]), scenes[q["image_id"]], targets[q["question_id"]]
        if parsed.family in GEOMETRY_FREE:
            score = t.get(answer(scene, parsed), 0.0) if feasible(scene, parsed) else 0.0
        elif parsed.family == "count_left":
            seen = by_count.get(scene.count(parsed.cls))
            score = t.get(seen.most_common(1)[0][0], 0.0) if seen else 0.0
        else:
            cols = [scene.colours[i] for i in scene.indices(parsed.cls)]
            score = float(np.mean([t.get(c, 0.0) for c in cols])) if cols else 0.0
        out[parsed.family] += [1, score]
        out["all"] += [1, score]
    return {f: {"n": int(v[0]), "soft_acc": v[1] / v[0]} for f, v in sorted(out.items())}


def answer_prior(root, split: str = "val") -> dict:
    """Soft accuracy (per family and 'all') of answering each ``split`` question with the train answer of
    largest summed soft score among train questions of the same family ('family') or the same text ('text')."""
    root = Path(root)
    meta = load_meta(root)
    qtype = {int(k): v for k, v in meta["question_type"].items()}
    by_family, by_text = defaultdict(Counter), defaultdict(Counter)
    train_q = json.loads((root / QUESTION_FILES["train"]).read_text(encoding="utf-8"))["questions"]
    train_t = load_targets(root, "train")
    for q in train_q:
        for a, s in train_t[q["question_id"]].items():
            by_family[qtype[q["question_id"]]][a] += s
            by_text[q["question"]][a] += s
    out = defaultdict(lambda: np.zeros(3))
    targets = load_targets(root, split)
    for q in json.loads((root / QUESTION_FILES[split]).read_text(encoding="utf-8"))["questions"]:
        f, t = qtype[q["question_id"]], targets[q["question_id"]]
        guess_f = by_family[f].most_common(1)[0][0] if by_family[f] else None
        guess_t = by_text[q["question"]].most_common(1)[0][0] if by_text[q["question"]] else guess_f
        row = np.array([1, t.get(guess_f, 0.0), t.get(guess_t, 0.0)])
        out[f] += row
        out["all"] += row
    return {f: {"n": int(v[0]), "family": v[1] / v[0], "text": v[2] / v[0]} for f, v in sorted(out.items())}


PROG = "python -m integrations.ban.research.synth_oracle"


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, formatter_class=HelpFormatter,
                                description="Oracle decoder of the synthetic VQA set: answers from the files alone.")
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--fixed36", action="store_true", help="decode the fixed-36 file instead of the adaptive one")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if a.fixed36:
        missing = [name for name in (f"{a.split}36_imgid2idx.pkl", split_h5_name(a.split, False))
                   if not (Path(a.data_root) / name).is_file()]
        if missing:
            raise RunError(f"--fixed36: {a.data_root} has no fixed-36 files ({', '.join(missing)}); generate "
                           f"the data with `python -m integrations.ban synth --fixed` (--overwrite to replace this "
                           f"dataset), or leave out --fixed36")
    res = {"oracle": evaluate_oracle(a.data_root, a.split, not a.fixed36), "prior": answer_prior(a.data_root, a.split),
           "geometry_free": geometry_free_bound(a.data_root, a.split)}
    print(f"{'family':<11} {'n':>6} {'oracle=best':>12} {'oracle soft':>11} {'bound':>7} "
          f"{'prior/family':>12} {'prior/text':>10} {'geometry-free':>13}")
    for f, r in res["oracle"].items():
        pr, gf = res["prior"][f], res["geometry_free"][f]
        print(f"{f:<11} {r['n']:>6} {100 * r['agreement']:>11.2f}% {100 * r['soft_acc']:>10.2f}% "
              f"{100 * r['upper_bound']:>6.2f}% {100 * pr['family']:>11.2f}% {100 * pr['text']:>9.2f}% "
              f"{100 * gf['soft_acc']:>12.2f}%")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(run_command(main, PROG))
