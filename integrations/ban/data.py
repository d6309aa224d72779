"""VQA v2 reader for the official BAN data layout, with lazy hdf5 features and per-batch padding.

Layout (all paths relative to ``--data-root``, identical to ``data/`` of jnhwkim/ban-vqa)::

    dictionary.pkl                       [word2idx dict, idx2word list]; padding index = ntoken
    glove6b_init_300d.npy                float32 (ntoken, 300)
    cache/trainval_ans2label.pkl         dict answer -> label
    cache/trainval_label2ans.pkl         list label -> answer
    cache/{split}_target.pkl             list of {question_id, image_id, labels, scores}
    v2_OpenEnded_mscoco_{split}2014_questions.json   {"questions": [{image_id, question, question_id}]}
    {split}_imgid2idx.pkl                image id -> image row (adaptive); {split}36_imgid2idx.pkl (fixed)
    {split}.hdf5                         adaptive 10-100 boxes: image_features (N_boxes, 2048),
                                         spatial_features (N_boxes, 6), pos_boxes (n_img, 2) [start, end)
    {split}36.hdf5                       fixed 36 boxes: image_features (n_img, 36, 2048),
                                         spatial_features (n_img, 36, 6)

The test splits have questions only (``v2_OpenEnded_mscoco_test{-dev,}2015_questions.json``); both
read the features of ``test2015`` (``test2015.hdf5``, ``test2015_imgid2idx.pkl``): the test-dev images
are a subset of the test images, and the official converters write no test-dev feature file.

Differences from the official ``VQAFeatureDataset`` (on purpose):

* features are read **lazily**, one image per ``__getitem__``, from an hdf5 handle opened once per
  process (DataLoader workers each open their own; h5py handles must not cross a fork). The
  official loader copies every feature into RAM (~21.6 GB for the adaptive train split);
* every file is validated when the dataset is built (keys of every question and target, shapes,
  dtypes, ids), and a problem raises :class:`VQADataError` naming the file and the key instead of a
  late ``KeyError``; the features of an image are checked for NaN / inf as they are read (the file,
  split and rows are named), so such data never trains silently;
* :func:`collate_vqa` returns the box mask (B, K) explicitly (True = real box) next to the
  zero-padded features, so models need not infer padding from all-zero rows.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from integrations.common import UnsafePickleError, restricted_load

MAX_QUESTION_LENGTH = 14  # official BAN: questions truncated / padded to 14 tokens
SPATIAL_DIM = 6           # x1, y1, x2, y2, w, h, each divided by the image width / height
FIXED_BOXES = 36          # the {split}36.hdf5 files

QUESTION_FILES = {
    "train": "v2_OpenEnded_mscoco_train2014_questions.json",
    "val": "v2_OpenEnded_mscoco_val2014_questions.json",
    "test-dev2015": "v2_OpenEnded_mscoco_test-dev2015_questions.json",
    "test2015": "v2_OpenEnded_mscoco_test2015_questions.json",
}


class VQADataError(ValueError):
    """A data file is missing or malformed. ``path`` and ``key`` name the culprit."""

    def __init__(self, path, key=None, problem: Optional[str] = None):
        if problem is None:
            # rebuilt in the main process from a DataLoader worker's report ("Caught VQADataError in
            # DataLoader worker ...", then the worker's traceback): keep the worker's one-line message
            self.path, self.key = None, None
            last = str(path).strip().splitlines()[-1] if str(path).strip() else ""
            super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])
            return
        self.path = str(path)
        self.key = key
        super().__init__(f"{self.path}: {problem}" if key is None else f"{self.path}: key {key!r}: {problem}")


# ---------------------------------------------------------------------------------------------
# small checked loaders
# ---------------------------------------------------------------------------------------------

def _require(path: Path, key: str = "<file>") -> Path:
    if not path.is_file():
        missing = path.parent
        while not missing.parent.is_dir() and missing.parent != missing:
            missing = missing.parent
        if not missing.is_dir():           # name the folder that is missing, not a file inside it
            raise VQADataError(missing, None, "folder not found (check --data-root)")
        raise VQADataError(path, key, "file not found")
    return path


def _load_pickle(path: Path):
    """The official pickle files hold only builtin containers and scalars (numpy scalars in some
    versions of the official preprocessing): anything else is refused before it runs."""
    _require(path)
    try:
        return restricted_load(path, allow_numpy=True)
    except UnsafePickleError as e:
        raise VQADataError(path, "<file>", f"unsafe pickle, not loaded ({e})") from None
    except Exception as e:  # truncated / not a pickle
        raise VQADataError(path, "<file>", f"cannot unpickle ({type(e).__name__}: {e})") from None


def _require_keys(path: Path, name: str, entries: list, keys: Sequence[str]) -> None:
    """Every entry of ``entries`` (the list ``name`` of ``path``) is a dict with ``keys``; else VQADataError
    naming the first entry and key that are not."""
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise VQADataError(path, f"{name}[{i}]", f"expected a dict, got {type(entry).__name__}")
        for k in keys:
            if k not in entry:
                raise VQADataError(path, f"{name}[{i}].{k}", "missing key")


def _load_json(path: Path):
    _require(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except Exception as e:
        raise VQADataError(path, "<file>", f"cannot parse JSON ({type(e).__name__}: {e})") from None


class Dictionary:
    """Word <-> index map of the official ``dictionary.pkl``; index ``ntoken`` is the padding token."""

    def __init__(self, word2idx: dict, idx2word: list):
        self.word2idx = word2idx
        self.idx2word = idx2word

    @property
    def ntoken(self) -> int:
        return len(self.word2idx)

    @property
    def padding_idx(self) -> int:
        return len(self.word2idx)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Dictionary":
        path = Path(path)
        obj = _load_pickle(path)
        if not (isinstance(obj, (list, tuple)) and len(obj) == 2):
            raise VQADataError(path, "<root>", f"expected [word2idx dict, idx2word list], got {type(obj).__name__}")
        word2idx, idx2word = obj
        if not isinstance(word2idx, dict):
            raise VQADataError(path, "[0] word2idx", f"expected dict, got {type(word2idx).__name__}")
        if not isinstance(idx2word, list):
            raise VQADataError(path, "[1] idx2word", f"expected list, got {type(idx2word).__name__}")
        return cls(word2idx, idx2word)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "wb") as f:
            pickle.dump([self.word2idx, self.idx2word], f)

    def tokenize(self, sentence: str, max_length: Optional[int] = MAX_QUESTION_LENGTH) -> list[int]:
        """Official question tokenisation.

        Lower-case, drop ',' and '?', split "'s" off as its own token, split on whitespace;
        unknown words map to ``ntoken - 1`` (the official code's UNK choice: the last, least
        frequent word). With ``max_length`` the result is truncated and padded **at the end** with
        ``padding_idx`` to exactly that length.
        """
        words = split_words(sentence)
        unk = self.ntoken - 1
        tokens = [self.word2idx.get(w, unk) for w in words]
        if max_length is not None:
            tokens = tokens[:max_length]
            tokens = tokens + [self.padding_idx] * (max_length - len(tokens))
        return tokens


def split_words(sentence: str) -> list[str]:
    """The official normalisation of a question before the dictionary look-up."""
    s = sentence.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return s.split()


def load_glove_init(root: str | os.PathLike, ntoken: int, dim: int = 300) -> np.ndarray:
    """``glove6b_init_300d.npy`` as float32 (ntoken, dim), checked against the dictionary size."""
    path = Path(root) / f"glove6b_init_{dim}d.npy"
    _require(path)
    try:
        w = np.load(path)
    except Exception as e:
        raise VQADataError(path, "<file>", f"cannot load .npy ({type(e).__name__}: {e})") from None
    if w.shape != (ntoken, dim):
        raise VQADataError(path, "<array>", f"expected shape ({ntoken}, {dim}) from dictionary.pkl, got {w.shape}")
    return w.astype(np.float32, copy=False)


def load_answers(root: str | os.PathLike) -> tuple[dict, list]:
    """(ans2label, label2ans) from ``cache/trainval_*.pkl``, checked to be inverse maps."""
    root = Path(root)
    p_a2l = root / "cache" / "trainval_ans2label.pkl"
    p_l2a = root / "cache" / "trainval_label2ans.pkl"
    ans2label, label2ans = _load_pickle(p_a2l), _load_pickle(p_l2a)
    if not isinstance(ans2label, dict):
        raise VQADataError(p_a2l, "<root>", f"expected dict answer -> label, got {type(ans2label).__name__}")
    if not isinstance(label2ans, list):
        raise VQADataError(p_l2a, "<root>", f"expected list label -> answer, got {type(label2ans).__name__}")
    if len(ans2label) != len(label2ans):
        raise VQADataError(p_l2a, "<root>", f"{len(label2ans)} answers but {p_a2l.name} has {len(ans2label)}")
    for ans, lab in ans2label.items():
        if not (0 <= lab < len(label2ans)) or label2ans[lab] != ans:
            raise VQADataError(p_a2l, ans, f"label {lab} does not map back to this answer in {p_l2a.name}")
    return ans2label, label2ans


TFIDF_WEIGHTINGS = ("idf", "official")


def tfidf_word_embedding(questions: Sequence[str], dictionary: Dictionary, glove: np.ndarray,
                         weighting: str = "idf") -> np.ndarray:
    """The tf-idf weighted GloVe init of BAN's second embedding table (``op='c'``), (ntoken, dim).

    Every ordered pair of distinct token positions in a question adds an edge row -> col, rows are
    normalised to sum 1, and the init is that row-stochastic matrix times GloVe. Words without any
    co-occurrence keep a zero row (as officially). ``weighting``:

    * ``"idf"``: each edge weighs 1 / df(col) (df = number of occurrences of col), the weighting the
      official ``tfidf_from_questions`` describes;
    * ``"official"``: what that function computes. Its loop ``vals[col] /= df[col]`` indexes the list
      of edge values by the word id instead of the edge, so the edge at list position j (edges listed
      question by question, each pair as (a, b) then (b, a)) is divided by df(j) once per edge whose
      col is j, for j < ntoken, and every later edge keeps weight 1: up to those first edges, the plain
      co-occurrence average without idf (what the paper's BAN runs started from).

    Both use dictionary words only: the official code also appends words missing from the dictionary
    (none, for a dictionary built from the same questions) with vectors from glove.6B.300d.txt.
    """
    if weighting not in TFIDF_WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {TFIDF_WEIGHTINGS}, got {weighting!r}")
    n = dictionary.ntoken
    df = np.zeros(n, dtype=np.float64)
    rows, cols = [], []
    for q in questions:
        toks = [t for t in dictionary.tokenize(q, max_length=None) if t < n]
        for t in toks:
            df[t] += 1
        m = len(toks)
        if m < 2:
            continue
        ii, jj = np.triu_indices(m, k=1)           # itertools.combinations' order
        a, b = np.asarray(toks)[ii], np.asarray(toks)[jj]
        rows.append(np.stack([a, b], 1).reshape(-1))  # (a, b), (b, a) for each pair, in the official order
        cols.append(np.stack([b, a], 1).reshape(-1))
    if not rows:
        return np.zeros_like(glove)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    if weighting == "idf":
        vals = 1.0 / df[cols]
    else:
        vals = np.ones(len(cols))
        j = np.arange(min(n, len(cols)))
        times = np.bincount(cols, minlength=n)[j]   # how often the loop divides the value at position j
        with np.errstate(under="ignore"):
            vals[j] = np.where(times > 0, df[j] ** -times.astype(np.float64), 1.0)
    z = np.bincount(rows, weights=vals, minlength=n)[rows]
    # (a row whose every value the official loop divided down to 0 stays 0; the official code would
    # stop there with a ZeroDivisionError)
    vals = np.divide(vals, z, out=np.zeros_like(vals), where=z > 0)
    # sparse: the real vocabulary has ~20k words (a dense matrix would be 3 GB)
    from scipy.sparse import coo_matrix

    mat = coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()  # duplicates are summed
    return np.asarray(mat @ glove.astype(np.float64), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------

class VQAItem(NamedTuple):
    v: torch.Tensor          # (K, 2048) float32 box features
    b: torch.Tensor          # (K, 6) float32 spatial features in [0, 1]
    q: torch.Tensor          # (14,) long tokens, padded at the end with padding_idx
    target: Optional[torch.Tensor]  # (A,) float32 soft scores; None for test splits
    question_id: int


class VQABatch(NamedTuple):
    v: torch.Tensor          # (B, K, 2048), K = largest box count in the batch; padded rows are 0
    b: torch.Tensor          # (B, K, 6)
    q: torch.Tensor          # (B, 14) long
    target: Optional[torch.Tensor]  # (B, A) or None
    mask: torch.Tensor       # (B, K) bool, True = real box
    question_id: torch.Tensor  # (B,) long


class VQAFeatureDataset(Dataset):
    """One VQA v2 split in the official layout; features are read lazily from hdf5.

    Args:
        root: the data folder (the official repo's ``data/``).
        split: 'train', 'val', 'test-dev2015' or 'test2015' (test splits have no targets).
        dictionary: a :class:`Dictionary`; loaded from ``root/dictionary.pkl`` when None.
        adaptive: True reads ``{split}.hdf5`` (10-100 boxes, ``pos_boxes``), False the fixed
            ``{split}36.hdf5``.
        max_length: question length after truncation / padding (14 as officially).

    Every file is validated here without reading a single feature row. ``__getitem__`` returns a
    :class:`VQAItem`; batch with :func:`collate_vqa`.
    """

    def __init__(self, root: str | os.PathLike, split: str, dictionary: Optional[Dictionary] = None,
                 adaptive: bool = True, max_length: int = MAX_QUESTION_LENGTH):
        if split not in QUESTION_FILES:
            raise ValueError(f"split: expected one of {sorted(QUESTION_FILES)}, got {split!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise VQADataError(self.root, "<folder>", "data root not found")
        self.split = split
        self.adaptive = adaptive
        self.max_length = max_length
        self.dictionary = dictionary if dictionary is not None else Dictionary.load(self.root / "dictionary.pkl")
        self.ans2label, self.label2ans = load_answers(self.root)
        self.num_ans_candidates = len(self.ans2label)

        h5_name = split_h5_name(split, adaptive)
        self.h5_path = _require(self.root / h5_name)
        self.img_id2idx, self.imgid_path = self._load_imgid2idx()
        self._check_h5()
        self.entries = self._load_entries()
        self._file = None  # opened lazily, once per process
        self._pid = None

    # -- validation ---------------------------------------------------------------------------
    def _load_imgid2idx(self):
        base = feature_split(self.split) + ("" if self.adaptive else "36")
        # the fixed-36 file has its own index ({split}36_imgid2idx.pkl, official detection_features_converter):
        # its rows follow the order of another TSV file than the adaptive ones, so {split}_imgid2idx.pkl
        # would pair questions with other images' features
        path = self.root / f"{base}_imgid2idx.pkl"
        obj = _load_pickle(path)
        if not isinstance(obj, dict):
            raise VQADataError(path, "<root>", f"expected dict image id -> row, got {type(obj).__name__}")
        return obj, path

    def _check_h5(self):
        import h5py

        path = self.h5_path
        rows = np.fromiter(self.img_id2idx.values(), dtype=np.int64, count=len(self.img_id2idx))
        try:
            f = h5py.File(path, "r")
        except Exception as e:
            raise VQADataError(path, "<file>", f"cannot open as hdf5 ({type(e).__name__}: {e})") from None
        with f:
            for key in ("image_features", "spatial_features") + (("pos_boxes",) if self.adaptive else ()):
                if key not in f:
                    raise VQADataError(path, key, f"missing dataset (found {sorted(f.keys())})")
            feat, spat = f["image_features"], f["spatial_features"]
            if self.adaptive:
                pos = f["pos_boxes"]
                if feat.ndim != 2:
                    raise VQADataError(path, "image_features", f"expected (N_boxes, D), got shape {feat.shape}")
                if spat.shape != (feat.shape[0], SPATIAL_DIM):
                    raise VQADataError(path, "spatial_features",
                                       f"expected shape ({feat.shape[0]}, {SPATIAL_DIM}), got {spat.shape}")
                if pos.ndim != 2 or pos.shape[1] != 2:
                    raise VQADataError(path, "pos_boxes", f"expected (n_img, 2), got shape {pos.shape}")
                p = np.asarray(pos)
                # only the rows of indexed images: the official converter leaves the rows of image ids it
                # did not find in the TSV files at [0, 0] (it warns) and indexes no image there
                used = np.zeros(len(p), dtype=bool)
                used[rows[(rows >= 0) & (rows < len(p))]] = True
                bad = used & ((p[:, 0] < 0) | (p[:, 1] <= p[:, 0]) | (p[:, 1] > feat.shape[0]))
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise VQADataError(path, "pos_boxes",
                                       f"row {i} = {p[i].tolist()} is not a non-empty range in [0, {feat.shape[0]}]")
                self.pos_boxes = p.astype(np.int64)
                n_img = p.shape[0]
            else:
                if feat.ndim != 3:
                    raise VQADataError(path, "image_features", f"expected (n_img, 36, D), got shape {feat.shape}")
                if spat.shape != feat.shape[:2] + (SPATIAL_DIM,):
                    raise VQADataError(path, "spatial_features",
                                       f"expected shape {feat.shape[:2] + (SPATIAL_DIM,)}, got {spat.shape}")
                self.pos_boxes = None
                n_img = feat.shape[0]
            self.v_dim = int(feat.shape[-1])
            self.s_dim = SPATIAL_DIM
        if rows.size and (rows.min() < 0 or rows.max() >= n_img):
            bad_id = next(k for k, r in self.img_id2idx.items() if not 0 <= r < n_img)
            raise VQADataError(self.imgid_path, bad_id,
                               f"row {self.img_id2idx[bad_id]} outside the {n_img} images of {path.name}")

    def _load_entries(self):
        qpath = self.root / QUESTION_FILES[self.split]
        qjson = _load_json(qpath)
        if not isinstance(qjson, dict) or "questions" not in qjson:
            raise VQADataError(qpath, "questions", "missing top-level key")
        questions = qjson["questions"]
        if not isinstance(questions, list):
            raise VQADataError(qpath, "questions", f"expected a list, got {type(questions).__name__}")
        _require_keys(qpath, "questions", questions, ("image_id", "question", "question_id"))
        questions = sorted(questions, key=lambda x: x["question_id"])

        targets = None
        if not self.split.startswith("test"):
            tpath = self.root / "cache" / f"{self.split}_target.pkl"
            targets = _load_pickle(tpath)
            if not isinstance(targets, list):
                raise VQADataError(tpath, "<root>", f"expected list of dicts, got {type(targets).__name__}")
            _require_keys(tpath, "", targets, ("question_id", "image_id", "labels", "scores"))
            targets = sorted(targets, key=lambda x: x["question_id"])
            if len(targets) != len(questions):
                raise VQADataError(tpath, "question_id",
                                   f"{len(targets)} targets but {qpath.name} has {len(questions)} questions")

        entries = []
        A = self.num_ans_candidates
        for i, q in enumerate(questions):
            img = q["image_id"]
            if img not in self.img_id2idx:
                raise VQADataError(self.imgid_path, img, f"image of question {q['question_id']} not indexed")
            labels = scores = None
            if targets is not None:
                t = targets[i]
                if t["question_id"] != q["question_id"] or t["image_id"] != img:
                    raise VQADataError(tpath, "question_id",
                                       f"entry {i} is question {t['question_id']} (image {t['image_id']}), "
                                       f"{qpath.name} has question {q['question_id']} (image {img})")
                labels = np.asarray(t["labels"], dtype=np.int64)
                scores = np.asarray(t["scores"], dtype=np.float32)
                if labels.shape != scores.shape or labels.ndim != 1:
                    raise VQADataError(tpath, f"question {t['question_id']}.labels",
                                       f"labels {labels.shape} and scores {scores.shape} must be equal 1-d")
                if labels.size and (labels.min() < 0 or labels.max() >= A):
                    raise VQADataError(tpath, f"question {t['question_id']}.labels",
                                       f"label outside [0, {A}) (trainval_ans2label.pkl)")
            tokens = np.asarray(self.dictionary.tokenize(q["question"], self.max_length), dtype=np.int64)
            entries.append((self.img_id2idx[img], tokens, labels, scores, int(q["question_id"])))
        return entries

    # -- lazy feature access ------------------------------------------------------------------
    def _h5(self):
        # h5py handles are not fork-safe: reopen in every new process (DataLoader worker, DDP rank)
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.h5_path, "r")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def num_boxes(self, index: int) -> int:
        row = self.entries[index][0]
        if self.pos_boxes is None:
            return FIXED_BOXES
        s, e = self.pos_boxes[row]
        return int(e - s)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> VQAItem:
        row, tokens, labels, scores, qid = self.entries[index]
        f = self._h5()
        if self.pos_boxes is None:
            v = f["image_features"][row]
            b = f["spatial_features"][row]
        else:
            s, e = self.pos_boxes[row]
            v = f["image_features"][s:e]
            b = f["spatial_features"][s:e]
        v, b = np.asarray(v, dtype=np.float32), np.asarray(b, dtype=np.float32)
        for key, x in (("image_features", v), ("spatial_features", b)):
            # cheap next to the read, and a NaN here would train silently (or fail deep in the model)
            if not np.isfinite(x).all():
                where = f"image row {row}" + ("" if self.pos_boxes is None else f", box rows {s}:{e}")
                raise VQADataError(self.h5_path, key, f"split {self.split}, {where} (question {qid}): "
                                                     "non-finite values (NaN or inf); the data cannot train")
        target = None
        if labels is not None:
            target = torch.zeros(self.num_ans_candidates)
            if labels.size:
                target[torch.from_numpy(labels)] = torch.from_numpy(scores)
        return VQAItem(torch.from_numpy(v), torch.from_numpy(b), torch.from_numpy(tokens), target, qid)


def feature_split(split: str) -> str:
    """The split whose feature files hold ``split``'s images: test-dev2015's are among test2015's."""
    return "test2015" if split == "test-dev2015" else split


def split_h5_name(split: str, adaptive: bool) -> str:
    base = feature_split(split)
    return f"{base}.hdf5" if adaptive else f"{base}36.hdf5"


def collate_vqa(items: Sequence[VQAItem], min_boxes: int = 0) -> VQABatch:
    """Stack items, zero-padding boxes to the largest count K in the batch (at least ``min_boxes``).

    Padded rows are exactly zero in ``v`` and ``b`` (official BAN detects padding as
    ``v.abs().sum(2) == 0``) and ``mask`` (B, K) is True for real boxes.
    """
    if len(items) == 0:
        raise ValueError("items: empty batch")
    B = len(items)
    K = max(max(it.v.shape[0] for it in items), min_boxes)
    D, S = items[0].v.shape[1], items[0].b.shape[1]
    v = items[0].v.new_zeros(B, K, D)
    b = items[0].b.new_zeros(B, K, S)
    mask = torch.zeros(B, K, dtype=torch.bool)
    for i, it in enumerate(items):
        n = it.v.shape[0]
        v[i, :n] = it.v
        b[i, :n] = it.b
        mask[i, :n] = True
    q = torch.stack([it.q for it in items])
    target = None if items[0].target is None else torch.stack([it.target for it in items])
    qid = torch.tensor([it.question_id for it in items], dtype=torch.long)
    return VQABatch(v, b, q, target, mask, qid)
