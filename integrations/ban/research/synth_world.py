"""Scenes, questions and true answers of the synthetic VQA task (no files, no features: pure logic).

A scene is a set of boxes, each with a class, a colour and an axis-aligned box ``x1, y1, x2, y2`` in
[0, 1] (normalised by the image size, like the official spatial features). Questions are asked about
the *asked* classes only; *clutter* boxes are distractors. Every question belongs to one family:

==============  ==========================================================  =====================
family          text                                                        needs
==============  ==========================================================  =====================
``exists``      is there a <c>?                                             (yes / no, balanced)
``colour``      what colour is the <c>?                                     exactly one <c>
``leftmost``    what colour is the leftmost <c>?                            >= 2 <c>
``rightmost``   what colour is the rightmost <c>?                           >= 2 <c>
``kth_left``    what colour is the second / third <c> from the left?        >= k <c>
``largest``     what colour is the largest <c>?                             >= 2 <c>
``smallest``    what colour is the smallest <c>?                            >= 2 <c>
``count``       how many <c>s are there?                                    (0 ... max_per_class)
``count_left``  how many <c>s are left of the <d>?                          >= 1 <c>, exactly one <d>
==============  ==========================================================  =====================

"Left of" and the left-to-right order compare box x-centres; "largest" / "smallest" compare box
areas. ``exists`` and ``colour`` are order-free (the sanity families); the others need the box
geometry, which the generator keeps out of the features.

Unambiguity guarantees of :func:`sample_scene` (checked by :func:`check_unambiguous`):

* the x-centres of ALL asked-class boxes are pairwise at least ``min_dx`` apart (so "leftmost",
  "k-th from the left" and "left of the <d>" have one answer with a margin);
* boxes of one asked class have areas at least ``min_area_ratio`` apart (largest / smallest) and
  pairwise IoU at most ``max_iou`` (distinct objects, not duplicate detections: BAN's counter merges
  overlapping proposals);
* boxes of one asked class have pairwise different colours (so an order question cannot be
  answered by the class's colour alone, and the colour answers of a scene are distinct).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import numpy as np

ASKED_CLASSES = ("ball", "cube", "cup", "dog", "car", "hat", "book", "lamp", "vase", "shoe", "bird", "fork")
COLOURS = ("red", "green", "blue", "yellow", "white", "black")
FAMILIES = ("exists", "colour", "leftmost", "rightmost", "kth_left", "largest", "smallest", "count", "count_left")
SANITY_FAMILIES = ("exists", "colour")
ORDINALS = {2: "second", 3: "third"}
YES_NO = ("no", "yes")

TEMPLATES = {
    "exists": "is there a {c}?",
    "colour": "what colour is the {c}?",
    "leftmost": "what colour is the leftmost {c}?",
    "rightmost": "what colour is the rightmost {c}?",
    "kth_left": "what colour is the {k} {c} from the left?",
    "largest": "what colour is the largest {c}?",
    "smallest": "what colour is the smallest {c}?",
    "count": "how many {c}s are there?",
    "count_left": "how many {c}s are left of the {d}?",
}


def clutter_names(n: int) -> tuple:
    """Names of ``n`` clutter classes (never used in a question, so they need not be words)."""
    return tuple(f"clutter{i:02d}" for i in range(n))


def answer_vocabulary(max_per_class: int) -> list:
    """Every answer the generator can give: yes / no, the colours, the numbers 0 ... max_per_class."""
    return list(YES_NO) + list(COLOURS) + [str(n) for n in range(max_per_class + 1)]


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn (see the module docstring for the guarantees).

    ``classes`` asked classes (the first ones of ``ASKED_CLASSES``), ``clutter`` clutter classes,
    0 ... ``max_per_class`` boxes of each asked class, ``min_boxes`` ... ``max_boxes`` boxes per image
    (at least the number of asked boxes), box areas in [``min_area``, ``max_area``] (fractions of the
    image), x-centres of asked boxes in [``margin``, 1 - ``margin``].
    """

    classes: int = 6
    clutter: int = 4
    max_per_class: int = 4
    min_boxes: int = 10
    max_boxes: int = 24
    min_dx: float = 0.03
    min_area_ratio: float = 1.25
    max_iou: float = 0.3
    min_area: float = 0.004
    max_area: float = 0.05
    margin: float = 0.06

    def __post_init__(self):
        if not 1 <= self.classes <= len(ASKED_CLASSES):
            raise ValueError(f"classes: need 1 ... {len(ASKED_CLASSES)}, got {self.classes}")
        if self.clutter < 0:
            raise ValueError(f"clutter: need >= 0 clutter classes, got {self.clutter}")
        if not 1 <= self.max_per_class <= len(COLOURS):
            raise ValueError(f"max_per_class: need 1 ... {len(COLOURS)} (distinct colours per class), "
                             f"got {self.max_per_class}")
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ValueError(f"min_boxes/max_boxes: need 1 <= min_boxes <= max_boxes, got {self.min_boxes}, "
                             f"{self.max_boxes}")
        if self.clutter == 0 and self.max_boxes > self.classes * self.max_per_class:
            raise ValueError(f"clutter: 0 clutter classes cannot fill up to max_boxes = {self.max_boxes} boxes")
        usable = 1 - 2 * self.margin
        if self.min_dx * (self.max_asked - 1) > usable:
            raise ValueError(f"min_dx: {self.min_dx} x {self.max_asked - 1} gaps do not fit in the usable "
                             f"width {usable:.3f}; lower min_dx, classes or max_per_class")
        span = np.log(self.max_area / self.min_area)
        if not 0 < self.min_area < self.max_area or np.log(self.min_area_ratio) * (self.max_per_class - 1) > span:
            raise ValueError(f"min_area/max_area/min_area_ratio: {self.max_per_class} areas with ratio "
                             f">= {self.min_area_ratio} do not fit in [{self.min_area}, {self.max_area}]")

    @property
    def asked(self) -> tuple:
        return ASKED_CLASSES[: self.classes]

    @property
    def clutter_classes(self) -> tuple:
        return clutter_names(self.clutter)

    @property
    def max_asked(self) -> int:
        """Most asked boxes in one scene (all classes at max_per_class, capped by max_boxes)."""
        return min(self.classes * self.max_per_class, self.max_boxes)


@dataclass
class Scene:
    """One image: ``classes[i]``, ``colours[i]`` and ``boxes[i] = (x1, y1, x2, y2)`` of box i."""

    classes: list
    colours: list
    boxes: np.ndarray  # (n, 4) float64 in [0, 1]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        if not len(self.classes) == len(self.colours) == len(self.boxes):
            raise ValueError(f"classes/colours/boxes: lengths differ ({len(self.classes)}, {len(self.colours)}, "
                             f"{len(self.boxes)})")

    def indices(self, cls: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.classes, dtype=object) == cls)

    def count(self, cls: str) -> int:
        return int(len(self.indices(cls)))

    @property
    def x_centres(self) -> np.ndarray:
        return (self.boxes[:, 0] + self.boxes[:, 2]) / 2

    @property
    def areas(self) -> np.ndarray:
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])


class Question(NamedTuple):
    """``family``, asked class ``cls``, ``k`` (kth_left only), ``landmark`` (count_left only)."""

    family: str
    cls: str
    k: Optional[int] = None
    landmark: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# text <-> question
# ---------------------------------------------------------------------------------------------

def question_text(q: Question) -> str:
    if q.family not in TEMPLATES:
        raise ValueError(f"q.family: expected one of {FAMILIES}, got {q.family!r}")
    return TEMPLATES[q.family].format(c=q.cls, k=ORDINALS.get(q.k, ""), d=q.landmark)


def _pattern(family: str) -> re.Pattern:
    text = re.escape(TEMPLATES[family])
    for key, group in (("c", r"(?P<c>[a-z0-9]+?)"), ("k", r"(?P<k>[a-z]+)"), ("d", r"(?P<d>[a-z0-9]+?)")):
        text = text.replace(re.escape("{" + key + "}"), group)
    return re.compile(text + "$")


_PATTERNS = {f: _pattern(f) for f in FAMILIES}
_ORDINAL_VALUES = {word: k for k, word in ORDINALS.items()}


def parse_question(text: str) -> Question:
    """The inverse of :func:`question_text` (what the oracle decoder reads). ValueError if no template fits."""
    for family, pat in _PATTERNS.items():
        m = pat.match(text)
        if m is None:
            continue
        g = m.groupdict()
        if "k" in g and g["k"] not in _ORDINAL_VALUES:
            continue
        return Question(family, g["c"], _ORDINAL_VALUES.get(g.get("k")), g.get("d"))
    raise ValueError(f"text: no question template matches {text!r}")


# ---------------------------------------------------------------------------------------------
# answers
# ---------------------------------------------------------------------------------------------

def feasible(scene: Scene, q: Question) -> bool:
    """Whether ``q`` has exactly one true answer in ``scene`` by the rules of its family."""
    n = scene.count(q.cls)
    if q.family in ("exists", "count"):
        return True
    if q.family == "colour":
        return n == 1
    if q.family in ("leftmost", "rightmost", "largest", "smallest"):
        return n >= 2
    if q.family == "kth_left":
        return q.k is not None and n >= q.k
    if q.family == "count_left":
        return q.landmark is not None and q.landmark != q.cls and n >= 1 and scene.count(q.landmark) == 1
    raise ValueError(f"q.family: expected one of {FAMILIES}, got {q.family!r}")


def answer(scene: Scene, q: Question) -> str:
    """The true answer of ``q`` in ``scene``; ValueError when the question does not apply."""
    if not feasible(scene, q):
        raise ValueError(f"q: {question_text(q)!r} does not apply to this scene "
                         f"({scene.count(q.cls)} x {q.cls!r})")
    idx = scene.indices(q.cls)
    if q.family == "exists":
        return YES_NO[int(len(idx) > 0)]
    if q.family == "count":
        return str(len(idx))
    cx = scene.x_centres[idx]
    if q.family == "count_left":
        landmark_x = scene.x_centres[scene.indices(q.landmark)[0]]
        return str(int((cx < landmark_x).sum()))
    pick = {
        "colour": lambda: 0,
        "leftmost": lambda: np.argmin(cx),
        "rightmost": lambda: np.argmax(cx),
        "kth_left": lambda: np.argsort(cx)[q.k - 1],
        "largest": lambda: np.argmax(scene.areas[idx]),
        "smallest": lambda: np.argmin(scene.areas[idx]),
    }[q.family]()
    return str(scene.colours[idx[pick]])


def parse_family_mix(text: str) -> tuple:
    """``"exists:3,colour:4,leftmost"`` -> (('exists', 'colour', 'leftmost'), (3, 4, 1)): family names
    with optional integer weights (default 1)."""
    names, weights = [], []
    for item in text.split(","):
        name, colon, w = item.strip().partition(":")
        if colon and not w.strip().isdigit():
            raise ValueError(f"families: weight of {name!r} must be a positive integer, got {w!r}")
        names.append(name)
        weights.append(int(w) if colon else 1)
    return tuple(names), tuple(weights)


def family_slots(families: Sequence[str], weights: Optional[Sequence[int]] = None) -> list:
    """The question slots of ``families``: family f gets ``2 weights[f]`` slots (all weights 1 by
    default); ``exists`` is split into ``exists:yes`` and ``exists:no`` so that its answers are balanced."""
    bad = [f for f in families if f not in FAMILIES]
    if not families or bad or len(set(families)) < len(families):
        raise ValueError(f"families: expected distinct names from {FAMILIES}, got {list(families)}")
    weights = (1,) * len(families) if weights is None else tuple(weights)
    if len(weights) != len(families) or any(not isinstance(w, int) or w < 1 for w in weights):
        raise ValueError(f"weights: expected one positive int per family ({len(families)}), got {list(weights)}")
    out = []
    for f, w in zip(families, weights):
        out += (["exists:yes", "exists:no"] if f == "exists" else [f, f]) * w
    return out


class SlotDeck:
    """The sequence of question slots of a split: random permutations of :func:`family_slots`, one
    after the other, so every family gets its share exactly (up to the last, partial permutation).
    ``take()`` returns the next slot; ``put_back(slot)`` returns one that an image could not use."""

    def __init__(self, families: Sequence[str], rng: np.random.Generator, weights: Optional[Sequence[int]] = None):
        self.slots = family_slots(families, weights)
        self.rng = rng
        self.queue: list = []

    def take(self) -> str:
        if not self.queue:
            self.queue = [self.slots[i] for i in self.rng.permutation(len(self.slots))]
        return self.queue.pop(0)

    def put_back(self, slot: str) -> None:
        self.queue.insert(0, slot)


def count_range(slot: str, k: Optional[int], cfg: SceneConfig) -> tuple:
    """(low, high) number of boxes of the asked class that a question of ``slot`` needs."""
    family, _, want = slot.partition(":")
    m = cfg.max_per_class
    return {"exists": (1, m) if want == "yes" else (0, 0), "colour": (1, 1), "count": (0, m),
            "count_left": (1, m), "kth_left": (k or 2, m)}.get(family, (2, m))


def draw_image(rng: np.random.Generator, cfg: SceneConfig, deck: SlotDeck, n_questions: int,
               num_boxes: Optional[int] = None, extra_clutter: int = 0) -> tuple:
    """A scene and ``n_questions`` questions about it, question first: the image's slots are taken from
    ``deck``, each gets its own asked class (count_left also its own landmark class) with a count
    in the range its family needs (:func:`count_range`, uniform), the other asked classes get 0 ...
    ``max_per_class`` boxes (uniform), and then the scene is drawn (:func:`sample_scene`). Slots for
    which no unused class is left go back to the deck. Returns ``(scene, questions)``.
    """
    if cfg.max_per_class < 2 and any(s.partition(":")[0] not in ("exists", "colour", "count") for s in deck.slots):
        raise ValueError(f"max_per_class: order families need >= 2 boxes per class, got {cfg.max_per_class}")
    free = list(rng.permutation(cfg.classes))
    low = np.zeros(cfg.classes, dtype=int)
    high = np.full(cfg.classes, cfg.max_per_class)
    questions = []
    while len(questions) < n_questions:
        slot = deck.take()
        family = slot.partition(":")[0]
        need = 2 if family == "count_left" else 1
        k = int(rng.integers(2, min(max(ORDINALS), cfg.max_per_class) + 1)) if family == "kth_left" else None
        if len(free) < need:  # every asked class already has a question: the next image takes it
            deck.put_back(slot)
            break
        c = free.pop()
        low[c], high[c] = count_range(slot, k, cfg)
        landmark = None
        if family == "count_left":
            d = free.pop()
            low[d] = high[d] = 1
            landmark = cfg.asked[d]
        questions.append(Question(family, cfg.asked[c], k, landmark))
    counts = np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high)])
    scene = sample_scene(rng, cfg, num_boxes, extra_clutter, counts=counts, min_counts=low)
    assert all(feasible(scene, q) for q in questions)
    return scene, questions


# ---------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------

def spaced_uniform(rng: np.random.Generator, n: int, low: float, high: float, gap: float) -> np.ndarray:
    """``n`` values in [low, high] with consecutive sorted values at least ``gap`` apart, returned in
    random order: uniform over that set (draw n sorted values in [low, high - (n - 1) gap] and shift the
    i-th by i gap)."""
    if n == 0:
        return np.zeros(0)
    room = high - low - (n - 1) * gap
    if room < 0:
        raise ValueError(f"n/gap: {n} values {gap} apart do not fit in [{low}, {high}]")
    v = np.sort(rng.uniform(0, room, n)) + low + gap * np.arange(n)
    return rng.permutation(v)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4), boxes as x1, y1, x2, y2 -> (n, m)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).prod(1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _box_at(rng, cx: float, area: float, aspect_range=(0.5, 2.0)) -> tuple:
    """Width and height of a box of ``area`` centred at x = ``cx`` that stays inside the image."""
    aspect = np.exp(rng.uniform(*np.log(aspect_range)))  # w / h
    w = np.sqrt(area * aspect)
    w = min(w, 2 * min(cx, 1 - cx))  # keep x1 >= 0 and x2 <= 1
    h = area / w
    if h > 1:
        raise AssertionError("margin too small for max_area")  # excluded by SceneConfig's checks
    return w, h


def sample_scene(rng: np.random.Generator, cfg: SceneConfig, num_boxes: Optional[int] = None,
                 extra_clutter: int = 0, counts: Optional[np.ndarray] = None,
                 min_counts: Optional[np.ndarray] = None, tries: int = 100) -> Scene:
    """A random scene satisfying the unambiguity guarantees; asked boxes first, then clutter.

    ``counts[i]`` boxes of asked class i (default: uniform 0 ... ``max_per_class``). ``num_boxes``
    (default: uniform in [max(min_boxes, asked boxes), max_boxes]) is the box count of the image;
    when the asked boxes do not fit in it (or in ``max_asked``), boxes of random classes above
    ``min_counts`` are removed, and when even ``min_counts`` does not fit, the image gets more boxes.
    ``extra_clutter`` more clutter boxes are appended (the pool from which a fixed-36 file draws).
    ``scene.meta['num_boxes']`` is the box count of the image.
    """
    counts = rng.integers(0, cfg.max_per_class + 1, cfg.classes) if counts is None else np.array(counts)
    floor = np.zeros(cfg.classes, dtype=int) if min_counts is None else np.asarray(min_counts)
    if floor.sum() > cfg.max_asked:
        raise ValueError(f"min_counts: {int(floor.sum())} asked boxes do not fit in max_asked = {cfg.max_asked}")
    limit = cfg.max_asked if num_boxes is None else min(max(num_boxes, int(floor.sum())), cfg.max_asked)
    while counts.sum() > limit:
        counts[rng.choice(np.flatnonzero(counts > floor))] -= 1
    n_asked = int(counts.sum())
    if num_boxes is None:
        num_boxes = int(rng.integers(max(cfg.min_boxes, n_asked), cfg.max_boxes + 1))
    num_boxes = max(num_boxes, n_asked)
    for _ in range(tries):
        scene = _try_scene(rng, cfg, counts, num_boxes - n_asked + extra_clutter)
        if scene is not None:
            scene.meta["num_boxes"] = num_boxes
            return scene
    raise RuntimeError(f"could not place a scene with counts {counts.tolist()} in {tries} tries")


def _try_scene(rng, cfg: SceneConfig, counts, n_clutter: int) -> Optional[Scene]:
    classes, colours, boxes = [], [], []
    cxs = spaced_uniform(rng, int(counts.sum()), cfg.margin, 1 - cfg.margin, cfg.min_dx)
    used = 0
    lo, hi = np.log(cfg.min_area), np.log(cfg.max_area)
    for c, n in zip(cfg.asked, counts):
        n = int(n)
        if n == 0:
            continue
        areas = np.exp(spaced_uniform(rng, n, lo, hi, np.log(cfg.min_area_ratio)))
        own = []
        for cx, area in zip(cxs[used:used + n], areas):
            w, h = _box_at(rng, cx, area)
            for _ in range(50):  # vertical position: keep same-class boxes apart (IoU <= max_iou)
                y1 = rng.uniform(0, 1 - h)
                box = np.array([cx - w / 2, y1, cx + w / 2, y1 + h])
                if not own or box_iou(box[None], np.array(own)).max() <= cfg.max_iou:
                    break
            else:
                return None
            own.append(box)
        used += n
        boxes += own
        classes += [c] * n
        colours += list(rng.choice(COLOURS, n, replace=False))
    names = cfg.clutter_classes
    for _ in range(n_clutter):
        area = np.exp(rng.uniform(lo, hi))
        cx = rng.uniform(cfg.margin, 1 - cfg.margin)
        w, h = _box_at(rng, cx, area)
        y1 = rng.uniform(0, 1 - h)
        boxes.append(np.array([cx - w / 2, y1, cx + w / 2, y1 + h]))
        classes.append(names[rng.integers(len(names))])
        colours.append(COLOURS[rng.integers(len(COLOURS))])
    return Scene(classes, [str(c) for c in colours], np.array(boxes).reshape(-1, 4))


def check_unambiguous(scene: Scene, cfg: SceneConfig) -> list:
    """The guarantees of the module docstring that ``scene`` violates (empty list: none)."""
    problems = []
    asked = [i for i, c in enumerate(scene.classes) if c in cfg.asked]
    cx = np.sort(scene.x_centres[asked])
    if len(cx) > 1 and np.diff(cx).min() < cfg.min_dx - 1e-12:
        problems.append(f"asked x-centres {np.diff(cx).min():.4f} apart (< min_dx {cfg.min_dx})")
    for c in cfg.asked:
        idx = scene.indices(c)
        if len(idx) < 2:
            continue
        a = np.sort(scene.areas[idx])
        if (a[1:] / a[:-1]).min() < cfg.min_area_ratio - 1e-9:
            problems.append(f"{c}: areas {(a[1:] / a[:-1]).min():.3f} apart (< min_area_ratio)")
        iou = box_iou(scene.boxes[idx], scene.boxes[idx])
        np.fill_diagonal(iou, 0)
        if iou.max() > cfg.max_iou + 1e-9:
            problems.append(f"{c}: IoU {iou.max():.3f} (> max_iou {cfg.max_iou})")
        if len(set(scene.colours[i] for i in idx)) < len(idx):
            problems.append(f"{c}: repeated colour")
    if (scene.boxes < -1e-12).any() or (scene.boxes > 1 + 1e-12).any():
        problems.append("box outside the image")
    return problems
