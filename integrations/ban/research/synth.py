"""A synthetic VQA dataset in the official BAN data layout, built so that plain BAN learns the
order-free questions and the order / number questions need the box geometry.

    python -m integrations.ban.research.synth --out DIR [--families exists,colour] [--images 4000 ...]

Scenes, question families and the unambiguity guarantees: ``synth_world.py``. Features (class and
colour codes + noise, no geometry): ``synth_features.py``. Recovering every answer from the files
alone: ``synth_oracle.py``. This module draws the scenes and questions of a split, simulates the ten
annotators and writes the files ``integrations.ban.data`` reads (``dictionary.pkl``,
``glove6b_init_300d.npy`` (random vectors, not GloVe), ``cache/trainval_ans2label.pkl``,
``cache/trainval_label2ans.pkl``, ``cache/{split}_target.pkl``, the question json files,
``{split}_imgid2idx.pkl``, ``{split}.hdf5`` with image_features / spatial_features / image_bb /
pos_boxes, and with ``--fixed`` the fixed-36 ``{split}36.hdf5`` files), plus ``synth_meta.json``:
the generator settings, the vocabulary, the answers and ``question_type`` {question_id: family},
which the trainer uses to report accuracy per family.

Boxes are stored in random order (detections are ordered by confidence, not position); the first
image of each split has ``min_boxes`` boxes and the second ``max_boxes``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from integrations.common import CommandError, run_command, with_help_formatter

from ..data import FIXED_BOXES, QUESTION_FILES, Dictionary, split_words
from .synth_features import FeatureCodes, FeatureConfig
from .synth_world import (COLOURS, FAMILIES, YES_NO, SceneConfig, SlotDeck, answer, answer_vocabulary,
                          draw_image, family_slots, parse_family_mix, question_text)

IMAGE_SIZES = [(640, 480), (480, 640), (500, 375), (640, 427)]
ANNOTATORS = 10
ID_BASE = {"train": 100_000, "val": 500_000}
QUESTION_ID_STRIDE = 1000  # question id = image id x 1000 + j, as in VQA v2


def official_score(count: int) -> float:
    """VQA soft score of an answer given by ``count`` of 10 annotators (official compute_softscore)."""
    return [0.0, 0.3, 0.6, 0.9][count] if count < 4 else 1.0


def annotate(rng: np.random.Generator, truth: str, max_per_class: int, accuracy: float = 0.9) -> tuple:
    """Ten simulated annotators, each right with probability ``accuracy``; a wrong one says the other
    yes / no, another colour, or a number off by one. Returns (answers given, {answer: soft score})."""
    if truth in YES_NO:
        wrong = [a for a in YES_NO if a != truth]
    elif truth in COLOURS:
        wrong = [a for a in COLOURS if a != truth]
    else:
        k = int(truth)
        wrong = [str(n) for n in (k - 1, k + 1) if 0 <= n <= max_per_class]
    given = [truth if rng.random() < accuracy else wrong[rng.integers(len(wrong))] for _ in range(ANNOTATORS)]
    ans, cnt = np.unique(given, return_counts=True)
    return given, {str(a): official_score(int(n)) for a, n in zip(ans, cnt)}


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Everything that defines a dataset: sizes, question mix, annotators, scenes and features."""

    images: int = 4000
    val_images: int = 1250
    questions: int = 4
    seed: int = 0
    families: tuple = FAMILIES
    family_weights: tuple = (1,) * len(FAMILIES)
    annotator_accuracy: float = 0.9
    fixed: bool = False
    scene: SceneConfig = SceneConfig()
    features: FeatureConfig = FeatureConfig()

    def __post_init__(self):
        if self.images < 2 or self.val_images < 2:
            raise ValueError(f"images/val_images: need >= 2 each (both box-count extremes), got {self.images}, "
                             f"{self.val_images}")
        if not 1 <= self.questions < QUESTION_ID_STRIDE:
            raise ValueError(f"questions: need 1 ... {QUESTION_ID_STRIDE - 1} per image, got {self.questions}")
        family_slots(self.families, self.family_weights)  # checks names and weights
        if not 0 <= self.annotator_accuracy <= 1:
            raise ValueError(f"annotator_accuracy: need a probability, got {self.annotator_accuracy}")
        if self.fixed and self.scene.max_asked > FIXED_BOXES:
            raise ValueError(f"fixed: up to {self.scene.max_asked} asked boxes do not fit in {FIXED_BOXES}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["families"], d["family_weights"] = list(self.families), list(self.family_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SynthConfig":
        d = dict(d)
        d["families"], d["family_weights"] = tuple(d["families"]), tuple(d["family_weights"])
        d["scene"] = SceneConfig(**d["scene"])
        d["features"] = FeatureConfig(**d["features"])
        return cls(**d)


def make_config(images: int = 4000, val_images=None, questions: int = 4, seed: int = 0,
                families=FAMILIES, annotator_accuracy: float = 0.9, fixed: bool = False,
                **knobs) -> SynthConfig:
    """A :class:`SynthConfig`; ``knobs`` are fields of :class:`SceneConfig` (classes, clutter,
    max_per_class, min_boxes, max_boxes, min_dx, ...) or :class:`FeatureConfig` (v_dim, noise,
    class_scale, colour_scale, bias). ``families``: names, or a string such as
    ``"exists:3,colour:4,leftmost"`` (optional integer weights, default 1). ``val_images`` defaults
    to images // 4 (at least 2)."""
    scene_keys = {f.name for f in dataclasses.fields(SceneConfig)}
    feature_keys = {f.name for f in dataclasses.fields(FeatureConfig)}
    unknown = set(knobs) - scene_keys - feature_keys
    if unknown:
        raise ValueError(f"unknown generator setting(s) {sorted(unknown)}; known: "
                         f"{sorted(scene_keys | feature_keys)}")
    scene = SceneConfig(**{k: v for k, v in knobs.items() if k in scene_keys})
    feats = FeatureConfig(**{k: v for k, v in knobs.items() if k in feature_keys})
    if isinstance(families, str):
        families, weights = parse_family_mix(families)
    else:
        families, weights = tuple(families), (1,) * len(families)
    return SynthConfig(images, val_images if val_images is not None else max(2, images // 4), questions, seed,
                       families, weights, annotator_accuracy, fixed, scene, feats)


def _box_rows(scene, keep: np.ndarray, rng, codes: FeatureCodes, image_size) -> tuple:
    """Features, spatial features and pixel boxes of the scene's boxes ``keep``, in random order."""
    idx = rng.permutation(keep)
    box = scene.boxes[idx]
    w, h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    spatial = np.concatenate([box, w[:, None], h[:, None]], 1).astype(np.float32)
    W, H = image_size
    bb = (box * np.array([W, H, W, H])).astype(np.float32)
    feat = codes.encode([scene.classes[i] for i in idx], [scene.colours[i] for i in idx], rng)
    return feat, spatial, bb


def _kept_boxes(scene, cfg: SceneConfig, total: int) -> np.ndarray:
    """Indices of the asked boxes and the first clutter boxes, ``total`` in all."""
    asked = [i for i, c in enumerate(scene.classes) if c in cfg.asked]
    clutter = [i for i, c in enumerate(scene.classes) if c not in cfg.asked]
    return np.array(asked + clutter[: total - len(asked)], dtype=np.int64)


def _draw_images(n_images: int, cfg: SynthConfig, rng: np.random.Generator) -> tuple:
    """``(scenes, questions per image, image sizes)`` of a split; the first two images have the fewest and
    the most boxes."""
    sc = cfg.scene
    scenes, image_questions, sizes = [], [], []
    deck = SlotDeck(cfg.families, rng, cfg.family_weights)
    for i in range(n_images):
        forced = sc.min_boxes if i == 0 else sc.max_boxes if i == 1 else None
        scene, qs = draw_image(rng, sc, deck, cfg.questions, forced, extra_clutter=FIXED_BOXES if cfg.fixed else 0)
        scenes.append(scene)
        image_questions.append(qs)
        sizes.append(IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))])
    return scenes, image_questions, sizes


def _feature_files(out: Path, split: str, n_images: int, total: int, D: int, fixed: bool) -> tuple:
    """The open ``{split}.hdf5`` (all boxes, ``total`` rows) and ``{split}36.hdf5`` (None unless ``fixed``),
    with their datasets created."""
    import h5py

    fa = h5py.File(out / f"{split}.hdf5", "w")
    fa.create_dataset("image_features", (total, D), "f4")
    fa.create_dataset("spatial_features", (total, 6), "f4")
    fa.create_dataset("image_bb", (total, 4), "f4")
    if not fixed:
        return fa, None
    f36 = h5py.File(out / f"{split}36.hdf5", "w")
    f36.create_dataset("image_features", (n_images, FIXED_BOXES, D), "f4")
    f36.create_dataset("spatial_features", (n_images, FIXED_BOXES, 6), "f4")
    f36.create_dataset("image_bb", (n_images, FIXED_BOXES, 4), "f4")
    return fa, f36


def _write_index_files(out: Path, split: str, questions: list, targets: list, index: dict, fixed: bool) -> None:
    """The image-id -> row pickles, the questions JSON and the answer targets, as the official converter names them."""
    for name in [f"{split}_imgid2idx.pkl"] + ([f"{split}36_imgid2idx.pkl"] if fixed else []):
        with open(out / name, "wb") as fh:
            pickle.dump(index, fh)
    with open(out / QUESTION_FILES[split], "w", encoding="utf-8") as fh:
        json.dump({"questions": questions, "data_subtype": f"{split}2014", "task_type": "OpenEnded"}, fh)
    with open(out / "cache" / f"{split}_target.pkl", "wb") as fh:
        pickle.dump(targets, fh)


def write_split(out: Path, split: str, n_images: int, cfg: SynthConfig, codes: FeatureCodes,
                rng: np.random.Generator, meta: dict) -> list:
    """Draw and write one split; returns its question dicts (for the dictionary)."""
    sc = cfg.scene
    image_ids = [ID_BASE[split] + 7 * i for i in range(n_images)]
    rows = rng.permutation(n_images)  # image id -> row, deliberately not the identity
    scenes, image_questions, sizes = _draw_images(n_images, cfg, rng)
    ks = np.array([s.meta["num_boxes"] for s in scenes])
    total = int(ks.sum())
    questions, targets = [], []
    fa, fixed = _feature_files(out, split, n_images, total, codes.cfg.v_dim, cfg.fixed)
    with fa:
        pos = np.zeros((n_images, 2), dtype=np.int32)
        offset = 0
        for i in np.argsort(rows):  # rows in file order, as the official converter writes them
            scene, k, r = scenes[i], int(ks[i]), int(rows[i])
            f, s, bb = _box_rows(scene, _kept_boxes(scene, sc, k), rng, codes, sizes[i])
            fa["image_features"][offset:offset + k] = f
            fa["spatial_features"][offset:offset + k] = s
            fa["image_bb"][offset:offset + k] = bb
            pos[r] = [offset, offset + k]
            offset += k
            if fixed is not None:
                f, s, bb = _box_rows(scene, _kept_boxes(scene, sc, FIXED_BOXES), rng, codes, sizes[i])
                fixed["image_features"][r], fixed["spatial_features"][r], fixed["image_bb"][r] = f, s, bb
            for j, q in enumerate(image_questions[i]):
                truth = answer(scene, q)
                _, scores = annotate(rng, truth, sc.max_per_class, cfg.annotator_accuracy)
                qid = image_ids[i] * QUESTION_ID_STRIDE + j
                questions.append({"image_id": image_ids[i], "question": question_text(q), "question_id": qid})
                labels = [meta["answers"].index(a) for a in scores]
                targets.append({"question_id": qid, "image_id": image_ids[i], "labels": labels,
                                "scores": list(scores.values())})
                meta["question_type"][str(qid)] = q.family
        fa.create_dataset("pos_boxes", data=pos)
        if fixed is not None:
            fixed.close()
    _write_index_files(out, split, questions, targets, {image_ids[i]: int(rows[i]) for i in range(n_images)}, cfg.fixed)
    per_family = {}
    for q in questions:
        f = meta["question_type"][str(q["question_id"])]
        per_family[f] = per_family.get(f, 0) + 1
    meta["splits"][split] = {"images": n_images, "questions": len(questions), "boxes": total,
                             "min_boxes": int(ks.min()), "max_boxes": int(ks.max()),
                             "families": dict(sorted(per_family.items()))}
    return questions


def generate(out, images: int = 4000, val_images=None, questions: int = 4, seed: int = 0, **settings) -> Path:
    """Write the dataset to ``out``; returns ``out`` as a Path. ``settings``: see :func:`make_config`."""
    cfg = make_config(images, val_images, questions, seed, **settings)
    return write_dataset(out, cfg)


def write_dataset(out, cfg: SynthConfig) -> Path:
    """Write the dataset of ``cfg`` to ``out`` (created if needed); returns ``out`` as a Path."""
    out = Path(out)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    codes = FeatureCodes(cfg.seed, cfg.features, cfg.scene.clutter_classes)
    answers = answer_vocabulary(cfg.scene.max_per_class)
    meta = {"generator": cfg.to_dict(),
            "vocabulary": {"asked": list(cfg.scene.asked), "clutter": list(cfg.scene.clutter_classes),
                           "colours": list(COLOURS)},
            "answers": answers, "question_type": {}, "splits": {}}
    qs = []
    for i, (split, n) in enumerate((("train", cfg.images), ("val", cfg.val_images))):
        qs += write_split(out, split, n, cfg, codes, np.random.default_rng([cfg.seed, 10 + i]), meta)
    # dictionary over train + val questions (the official create_dictionary also reads test)
    word2idx, idx2word = {}, []
    for q in qs:
        for w in split_words(q["question"]):
            if w not in word2idx:
                word2idx[w] = len(idx2word)
                idx2word.append(w)
    Dictionary(word2idx, idx2word).save(out / "dictionary.pkl")
    glove = np.random.default_rng([cfg.seed, 2]).normal(0, 0.3, (len(idx2word), 300)).astype(np.float32)
    np.save(out / "glove6b_init_300d.npy", glove)
    with open(out / "cache" / "trainval_ans2label.pkl", "wb") as fh:
        pickle.dump({a: i for i, a in enumerate(answers)}, fh)
    with open(out / "cache" / "trainval_label2ans.pkl", "wb") as fh:
        pickle.dump(list(answers), fh)
    (out / "synth_meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return out


# The default mix: the order-free families get larger shares, so that plain BAN learns them within the
# CPU budget (with equal shares of all nine, plain BAN at H = 128 and 2 glimpses stayed near the answer
# prior on colour for 8 epochs).
DEFAULT_FAMILIES = "exists:3,colour:4,leftmost,rightmost,kth_left,largest,smallest,count,count_left"


# The help of each generator setting; the flags themselves come from the dataclasses (generator_settings).
SETTING_HELP = {
    "classes": "asked classes",
    "clutter": "clutter (never asked) classes",
    "max_per_class": "boxes of one asked class: 0 ... this",
    "min_boxes": "boxes per image, at least",
    "max_boxes": "boxes per image, at most (official: 100)",
    "min_dx": "least gap of asked boxes' x-centres",
    "min_area_ratio": "least area ratio of two boxes of one asked class",
    "max_iou": "largest IoU of two boxes of one asked class",
    "min_area": "least box area (fraction of the image)",
    "max_area": "largest box area (fraction of the image)",
    "margin": "x-centres of asked boxes in [margin, 1 - margin]",
    "v_dim": "feature size (bottom-up features: 2048)",
    "noise": "std of the per-dimension feature noise",
    "class_scale": "weight of the class code",
    "colour_scale": "weight of the colour code",
    "bias": "constant added before the ReLU",
}


def generator_settings() -> Dict[type, List[dataclasses.Field]]:
    """The numeric fields of :class:`SceneConfig` and :class:`FeatureConfig`, per class: the generator
    settings that the command line and ``knobs`` offer."""
    def numeric(f):
        return isinstance(f.default, (int, float)) and not isinstance(f.default, bool)

    return {cls: [f for f in dataclasses.fields(cls) if numeric(f)] for cls in (SceneConfig, FeatureConfig)}


def build_parser(prog=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--out", required=True, help="output folder (the official repo's data/): new, empty, or holding "
                                                "a synthetic dataset to replace with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the synthetic dataset that --out holds")
    p.add_argument("--images", type=int, default=4000, help="train images")
    p.add_argument("--val-images", type=int, default=1250, help="val images (1,250 x 4 = 5,000 val questions)")
    p.add_argument("--questions", type=int, default=4, help="questions per image")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes, questions and features")
    p.add_argument("--families", default=DEFAULT_FAMILIES,
                   help=f"comma-separated question families of {','.join(FAMILIES)}, each with an optional "
                        f"integer weight (its share of the questions), e.g. 'exists,colour' for the sanity families")
    p.add_argument("--annotator-accuracy", type=float, default=0.9,
                   help="probability that each of the 10 simulated annotators gives the true answer")
    p.add_argument("--fixed", action=argparse.BooleanOptionalAction, default=False,
                   help="also write the fixed-36 {split}36.hdf5 files")
    titles = {SceneConfig: "scenes (synth_world.SceneConfig)", FeatureConfig: "features (synth_features.FeatureConfig)"}
    for cls, fields in generator_settings().items():
        g = p.add_argument_group(titles[cls])
        for f in fields:
            g.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           help=SETTING_HELP.get(f.name))
    return with_help_formatter(p)


def _check_out(out: Path, overwrite: bool) -> Optional[str]:
    """Why ``out`` cannot take the dataset (None when it can): only a new or empty folder, or one
    holding a synthetic dataset (``synth_meta.json``) with ``--overwrite``, is written into."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not (out / "synth_meta.json").is_file():
        return f"--out {out} is not empty and holds no synthetic dataset; choose a new or empty folder"
    if not overwrite:
        return f"--out {out} already holds a synthetic dataset; pass --overwrite to replace it, or choose another folder"
    return None


def main(argv=None, prog=None):
    p = build_parser(prog)
    a = p.parse_args(argv)
    knobs = {f.name: getattr(a, f.name) for fields in generator_settings().values() for f in fields}
    try:             # every setting is checked before anything is written
        cfg = make_config(a.images, a.val_images, a.questions, a.seed, families=a.families,
                          annotator_accuracy=a.annotator_accuracy, fixed=a.fixed, **knobs)
    except ValueError as e:
        p.error(str(e))
    refusal = _check_out(Path(a.out), a.overwrite)
    if refusal:
        raise CommandError(refusal)
    out = write_dataset(a.out, cfg)
    meta = json.loads((out / "synth_meta.json").read_text(encoding="utf-8"))
    for split, m in meta["splits"].items():
        print(f"{split}: {m['images']} images, {m['questions']} questions, {m['boxes']} boxes "
              f"({m['min_boxes']}-{m['max_boxes']} per image)")
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(run_command(main, "python -m integrations.ban.research.synth"))
