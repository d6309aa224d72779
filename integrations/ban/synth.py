"""A small synthetic VQA dataset in the official BAN layout, with questions where object ORDER matters.

    python -m integrations.ban.synth --out /work/runs/ban_synth [--images 800 --questions 4 --seed 0]

Each image is a scene of 10-100 boxes (the first image of each split has exactly 10, the second
exactly 100). Six "asked" classes (ball, cube, cup, dog, car, hat) appear 0-5 times each, the rest
of the boxes are clutter classes that questions never mention. A box's 2048-d feature encodes its
class, colour and size through fixed random codes plus noise (non-negative, like pooled ReLU
features), but NOT its position: where a box is lies only in the spatial features
(x1, y1, x2, y2, w, h in [0, 1]), and boxes are stored in random order (bottom-up detections are
ordered by confidence, not by position).

Questions (answers in brackets):
    what colour is the leftmost / rightmost / largest <class>?            [colour]
    what colour is the second <class> from the left?                     [colour]
    what is the leftmost <class>'s colour?                                [colour]  (exercises "'s")
    how many <class>s are there?                                          [0 .. 5]
Leftmost / largest are made unambiguous (x-centres at least 0.04 apart, areas at least 15% apart).
Ten simulated annotators give each answer, each correct with probability 0.9, and targets are the
official soft scores (0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / >= 4 matching annotators).

So the plain BAN sees positions only through its counting module (which uses the boxes), while
BAN + LSTM and BAN + PO-U get the box coordinates in their per-box 13-vectors: the comparison
between those two is the paper's ablation (does ordering the boxes help the LSTM?).
The word vectors in glove6b_init_300d.npy are random (fixed seed), not GloVe.
``synth_meta.json`` stores the generator settings and each question's type for per-type scores.
"""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np

from .data import QUESTION_FILES, Dictionary, split_words

ASKED = ["ball", "cube", "cup", "dog", "car", "hat"]
CLUTTER = ["rock", "leaf", "stick", "bush"]
COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
MAX_PER_CLASS = 5
V_DIM = 2048  # bottom-up features; --v-dim makes a cheaper CPU variant
QTYPES = {
    "leftmost": "what colour is the leftmost {c}?",
    "rightmost": "what colour is the rightmost {c}?",
    "largest": "what colour is the largest {c}?",
    "second_left": "what colour is the second {c} from the left?",
    "leftmost_poss": "what is the leftmost {c}'s colour?",
    "count": "how many {c}s are there?",
}
ANSWERS = COLOURS + [str(n) for n in range(MAX_PER_CLASS + 1)]
IMAGE_SIZES = [(640, 480), (480, 640), (500, 375), (640, 427)]


def official_score(count: int) -> float:
    """VQA soft score of an answer given by ``count`` of 10 annotators (official compute_softscore)."""
    return [0.0, 0.3, 0.6, 0.9][count] if count < 4 else 1.0


class Codes:
    """Fixed random feature codes, shared by train and val (drawn from the dataset seed)."""

    def __init__(self, rng: np.random.Generator, v_dim: int = V_DIM):
        classes = ASKED + CLUTTER
        self.cls = {c: rng.normal(0, 1, v_dim).astype(np.float32) for c in classes}
        self.col = {c: rng.normal(0, 1, v_dim).astype(np.float32) for c in COLOURS}
        self.size = rng.normal(0, 1, v_dim).astype(np.float32)
        self.v_dim = v_dim

    def features(self, cls, col, area, rng, noise):
        # area in ~[0.002, 0.09]; map log-area to about [-1, 1] so size is as visible as colour
        s = (np.log(np.asarray(area)) + 4.0) / 1.5
        f = np.stack([self.cls[c] for c in cls]) + 0.8 * np.stack([self.col[c] for c in col])
        f = f + s[:, None] * self.size[None] + noise * rng.normal(0, 1, f.shape)
        return np.maximum(f + 0.5, 0.0).astype(np.float32)


def _place(rng, n, min_dx=0.04, min_rel_area=1.15, tries=200):
    """n boxes (x1, y1, w, h) with x-centres >= min_dx apart and areas >= min_rel_area apart."""
    for _ in range(tries):
        w = rng.uniform(0.04, 0.3, n)
        h = rng.uniform(0.04, 0.3, n)
        x1 = rng.uniform(0, 1 - w)
        y1 = rng.uniform(0, 1 - h)
        cx = np.sort(x1 + w / 2)
        area = np.sort(w * h)
        if n < 2 or (np.diff(cx).min() >= min_dx and (area[1:] / area[:-1]).min() >= min_rel_area):
            return x1, y1, w, h
    raise RuntimeError(f"could not place {n} separable boxes")


def make_scene(rng, num_boxes):
    """Objects of one image: dict of arrays (cls, col, x1, y1, w, h); asked objects first."""
    counts = rng.integers(0, MAX_PER_CLASS + 1, len(ASKED))
    while counts.sum() > num_boxes:
        counts[rng.choice(np.flatnonzero(counts))] -= 1
    cls, col, geo = [], [], []
    for c, n in zip(ASKED, counts):
        if n == 0:
            continue
        geo.append(np.stack(_place(rng, n), 1))
        cls += [c] * n
        col += list(rng.choice(COLOURS, n))
    n_clutter = max(num_boxes, 36) - int(counts.sum())  # pool also large enough for the fixed-36 file
    w = rng.uniform(0.04, 0.3, n_clutter)
    h = rng.uniform(0.04, 0.3, n_clutter)
    geo.append(np.stack([rng.uniform(0, 1 - w), rng.uniform(0, 1 - h), w, h], 1))
    cls += list(rng.choice(CLUTTER, n_clutter))
    col += list(rng.choice(COLOURS, n_clutter))
    return {"cls": np.array(cls), "col": np.array(col), "geo": np.concatenate(geo), "n_asked": int(counts.sum()),
            "counts": dict(zip(ASKED, counts.tolist()))}


def answer(scene, qtype, c):
    idx = np.flatnonzero(scene["cls"] == c)
    if qtype == "count":
        return str(len(idx))
    x1, _, w, h = scene["geo"][idx].T
    cx = x1 + w / 2
    pick = {"leftmost": np.argmin(cx), "leftmost_poss": np.argmin(cx), "rightmost": np.argmax(cx),
            "largest": np.argmax(w * h), "second_left": np.argsort(cx)[1] if len(idx) > 1 else None}[qtype]
    return str(scene["col"][idx[pick]])


def annotate(rng, truth, qtype, p_correct=0.9, annotators=10):
    """Ten noisy human answers -> official (labels, scores)."""
    if qtype == "count":
        k = int(truth)
        wrong = [str(n) for n in (k - 1, k + 1) if 0 <= n <= MAX_PER_CLASS]
    else:
        wrong = [c for c in COLOURS if c != truth]
    given = [truth if rng.random() < p_correct else str(rng.choice(wrong)) for _ in range(annotators)]
    ans, cnt = np.unique(given, return_counts=True)
    labels = [ANSWERS.index(a) for a in ans]
    scores = [official_score(int(n)) for n in cnt]
    return labels, scores


def scene_rows(scene, keep, rng, codes, noise, image_size):
    """Features, spatial features and pixel boxes of the first ``keep`` objects, in random order."""
    order = rng.permutation(keep)
    x1, y1, w, h = scene["geo"][:keep][order].T
    spatial = np.stack([x1, y1, x1 + w, y1 + h, w, h], 1).astype(np.float32)
    W, H = image_size
    bb = (spatial[:, :4] * np.array([W, H, W, H], dtype=np.float32)).astype(np.float32)
    feat = codes.features(scene["cls"][:keep][order], scene["col"][:keep][order], w * h, rng, noise)
    return feat, spatial, bb


def box_counts(rng, n_images, lo, hi):
    """10-100 boxes, skewed to small scenes like bottom-up detections; both extremes present."""
    k = lo + np.floor((hi - lo + 1) * rng.random(n_images) ** 3).astype(int)
    k[:2] = [lo, hi]
    return np.minimum(k, hi)


def write_split(out: Path, split: str, n_images: int, args, codes: Codes, rng: np.random.Generator, meta: dict):
    import h5py

    id_base = {"train": 100_000, "val": 500_000}[split]
    image_ids = [id_base + 7 * i for i in range(n_images)]
    rows = rng.permutation(n_images)  # image id -> row, deliberately not the identity
    ks = box_counts(rng, n_images, args.min_boxes, args.max_boxes)
    total = int(ks.sum())
    questions, targets = [], []
    with h5py.File(out / f"{split}.hdf5", "w") as fa:
        fa.create_dataset("image_features", (total, codes.v_dim), "f4")
        fa.create_dataset("spatial_features", (total, 6), "f4")
        fa.create_dataset("image_bb", (total, 4), "f4")
        pos = np.zeros((n_images, 2), dtype=np.int32)
        fixed = h5py.File(out / f"{split}36.hdf5", "w") if args.fixed else None
        if fixed is not None:
            fixed.create_dataset("image_features", (n_images, 36, codes.v_dim), "f4")
            fixed.create_dataset("spatial_features", (n_images, 36, 6), "f4")
            fixed.create_dataset("image_bb", (n_images, 36, 4), "f4")
        # write images in row order so that hdf5 rows follow pos_boxes (like the converter)
        order = np.argsort(rows)
        offset = 0
        for i in order:
            scene = make_scene(rng, int(ks[i]))
            size = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
            f, s, bb = scene_rows(scene, int(ks[i]), rng, codes, args.noise, size)
            r, k = int(rows[i]), int(ks[i])
            fa["image_features"][offset:offset + k] = f
            fa["spatial_features"][offset:offset + k] = s
            fa["image_bb"][offset:offset + k] = bb
            pos[r] = [offset, offset + k]
            offset += k
            if fixed is not None:
                f, s, bb = scene_rows(scene, 36, rng, codes, args.noise, size)
                fixed["image_features"][r], fixed["spatial_features"][r], fixed["image_bb"][r] = f, s, bb
            for j in range(args.questions):
                qtype, c = _pick_question(rng, scene)
                truth = answer(scene, qtype, c)
                labels, scores = annotate(rng, truth, qtype)
                qid = image_ids[i] * 10 + j
                questions.append({"image_id": image_ids[i], "question": QTYPES[qtype].format(c=c),
                                  "question_id": qid})
                targets.append({"question_id": qid, "image_id": image_ids[i], "labels": labels, "scores": scores})
                meta["question_type"][str(qid)] = qtype
        fa.create_dataset("pos_boxes", data=pos)
        if fixed is not None:
            fixed.close()
    idx = {image_ids[i]: int(rows[i]) for i in range(n_images)}
    for name in (f"{split}_imgid2idx.pkl", f"{split}36_imgid2idx.pkl"):
        with open(out / name, "wb") as fh:
            pickle.dump(idx, fh)
    with open(out / QUESTION_FILES[split], "w") as fh:
        json.dump({"questions": questions, "data_subtype": f"{split}2014", "task_type": "OpenEnded"}, fh)
    with open(out / "cache" / f"{split}_target.pkl", "wb") as fh:
        pickle.dump(targets, fh)
    meta["splits"][split] = {"images": n_images, "questions": len(questions), "boxes": total,
                             "min_boxes": int(ks.min()), "max_boxes": int(ks.max())}
    return questions


def _pick_question(rng, scene):
    """A question type and a class it can be asked about (count questions may have answer 0)."""
    while True:
        qtype = "count" if rng.random() < 0.25 else str(rng.choice([t for t in QTYPES if t != "count"]))
        c = str(rng.choice(ASKED))
        n = scene["counts"][c]
        if qtype == "count" or n >= (2 if qtype == "second_left" else 1):
            return qtype, c


def generate(out, images=800, val_images=None, questions=4, seed=0, min_boxes=10, max_boxes=100,
             noise=1.0, fixed=True, v_dim=V_DIM) -> Path:
    """Write the dataset to ``out`` (see the module docstring); returns ``out`` as a Path."""
    if not 10 <= min_boxes <= max_boxes:
        raise ValueError(f"min_boxes/max_boxes: need 10 <= min_boxes <= max_boxes, got {min_boxes}, {max_boxes}")
    if images < 2:
        raise ValueError(f"images: need at least 2 (both box-count extremes), got {images}")
    args = argparse.Namespace(images=images, val_images=val_images or max(2, images // 4), questions=questions,
                              seed=seed, min_boxes=min_boxes, max_boxes=max_boxes, noise=noise, fixed=fixed,
                              v_dim=v_dim)
    out = Path(out)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    codes = Codes(np.random.default_rng([seed, 1]), v_dim)
    meta = {"generator": vars(args), "answers": ANSWERS, "question_type": {}, "splits": {}}
    qs = []
    for i, (split, n) in enumerate((("train", args.images), ("val", args.val_images))):
        qs += write_split(out, split, n, args, codes, np.random.default_rng([seed, 10 + i]), meta)
    # dictionary over train + val questions (the official create_dictionary also reads test)
    word2idx, idx2word = {}, []
    for q in qs:
        for w in split_words(q["question"]):
            if w not in word2idx:
                word2idx[w] = len(idx2word)
                idx2word.append(w)
    Dictionary(word2idx, idx2word).save(out / "dictionary.pkl")
    glove = np.random.default_rng([seed, 2]).normal(0, 0.3, (len(idx2word), 300)).astype(np.float32)
    np.save(out / "glove6b_init_300d.npy", glove)
    with open(out / "cache" / "trainval_ans2label.pkl", "wb") as fh:
        pickle.dump({a: i for i, a in enumerate(ANSWERS)}, fh)
    with open(out / "cache" / "trainval_label2ans.pkl", "wb") as fh:
        pickle.dump(list(ANSWERS), fh)
    (out / "synth_meta.json").write_text(json.dumps(meta, indent=1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (the official repo's data/)")
    p.add_argument("--images", type=int, default=800, help="train images")
    p.add_argument("--val-images", type=int, default=None, help="val images (default images // 4)")
    p.add_argument("--questions", type=int, default=4, help="questions per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-boxes", type=int, default=10)
    p.add_argument("--max-boxes", type=int, default=100)
    p.add_argument("--noise", type=float, default=1.0, help="std of the per-dimension feature noise")
    p.add_argument("--v-dim", type=int, default=V_DIM,
                   help="feature size (2048 like bottom-up features; smaller for quick CPU experiments)")
    p.add_argument("--fixed", action=argparse.BooleanOptionalAction, default=True,
                   help="also write the fixed-36 {split}36.hdf5 files")
    a = p.parse_args(argv)
    out = generate(a.out, a.images, a.val_images, a.questions, a.seed, a.min_boxes, a.max_boxes, a.noise, a.fixed,
                   a.v_dim)
    meta = json.loads((out / "synth_meta.json").read_text())
    for split, m in meta["splits"].items():
        print(f"{split}: {m['images']} images, {m['questions']} questions, {m['boxes']} boxes "
              f"({m['min_boxes']}-{m['max_boxes']} per image)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
