"""VQA v2 reader (official layout) and the synthetic generator: shapes, laziness, padding + mask,
tokenisation, targets, and errors that name the file and key."""
import json
import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from integrations.ban.data import (QUESTION_FILES, Dictionary, VQADataError, VQAFeatureDataset, collate_vqa,
                                   load_glove_init, tfidf_word_embedding)
from integrations.ban.research import synth

# official-sized features and box range (2048-d, 10-100 boxes), with the fixed-36 files
SYNTH = dict(images=8, val_images=3, questions=2, seed=3, v_dim=2048, min_boxes=10, max_boxes=100, fixed=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("synth") / "data", **SYNTH)


@pytest.fixture
def broken(root, tmp_path):
    """A private copy of the dataset to damage."""
    return shutil.copytree(root, tmp_path / "data")


def test_items_have_documented_shapes_and_box_range(root):
    ds = VQAFeatureDataset(root, "train")
    assert len(ds) == 8 * 2 and ds.v_dim == SYNTH["v_dim"]
    ks = []
    for i in range(len(ds)):
        it = ds[i]
        k = it.v.shape[0]
        ks.append(k)
        assert it.v.shape == (k, 2048) and it.v.dtype == torch.float32
        assert it.b.shape == (k, 6)
        assert it.q.shape == (14,) and it.q.dtype == torch.long
        assert it.target.shape == (ds.num_ans_candidates,)
        assert (it.b >= 0).all() and (it.b <= 1).all()
        # x2 = x1 + w, y2 = y1 + h (official spatial feature layout)
        torch.testing.assert_close(it.b[:, 2] - it.b[:, 0], it.b[:, 4], atol=1e-6, rtol=0)
        assert (it.v >= 0).all() and (it.v.abs().sum(1) > 0).all()  # no real box looks like padding
    assert min(ks) == 10 and max(ks) == 100  # both extremes present


def test_features_follow_imgid2idx_and_pos_boxes(root):
    ds = VQAFeatureDataset(root, "val")
    questions = {q["question_id"]: q for q in json.loads(
        (root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text(encoding="utf-8"))["questions"]}
    with open(root / "val_imgid2idx.pkl", "rb") as f:
        idx = pickle.load(f)
    with h5py.File(root / "val.hdf5", "r") as f:
        pos = f["pos_boxes"][:]
        for i in range(len(ds)):
            it = ds[i]
            s, e = pos[idx[questions[it.question_id]["image_id"]]]
            torch.testing.assert_close(it.v, torch.from_numpy(f["image_features"][s:e]), atol=0, rtol=0)
            torch.testing.assert_close(it.b, torch.from_numpy(f["spatial_features"][s:e]), atol=0, rtol=0)


def test_targets_are_the_official_soft_scores(root):
    ds = VQAFeatureDataset(root, "train")
    with open(root / "cache" / "train_target.pkl", "rb") as f:
        targets = {t["question_id"]: t for t in pickle.load(f)}
    for i in range(len(ds)):
        it = ds[i]
        t = targets[it.question_id]
        expect = torch.zeros(ds.num_ans_candidates)
        expect[t["labels"]] = torch.tensor(t["scores"], dtype=torch.float32)
        torch.testing.assert_close(it.target, expect, atol=0, rtol=0)
        assert set(np.round(t["scores"], 6)) <= {0.3, 0.6, 0.9, 1.0}


def test_tokenisation_is_official():
    words = ["what", "is", "the", "dog", "'s", "colour", "bebe"]
    d = Dictionary({w: i for i, w in enumerate(words)}, list(words))
    n = d.ntoken
    toks = d.tokenize("What is the Dog's colour, zebra?")
    # ',' and '?' dropped, "'s" split off, unknown -> ntoken - 1, padded at the END with ntoken
    assert toks == [0, 1, 2, 3, 4, 5, n - 1] + [n] * 7
    assert d.tokenize("what " * 20) == [0] * 14  # truncated to 14


def test_lazy_loading_keeps_features_on_disk(root):
    ds = VQAFeatureDataset(root, "train")
    assert ds._file is None  # validation closed its handle; nothing is cached in RAM
    feature_bytes = (root / "train.hdf5").stat().st_size
    assert len(pickle.dumps(ds)) < feature_bytes / 20
    ds[0]
    assert ds._file is not None
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert clone._file is None
    torch.testing.assert_close(clone[3].v, ds[3].v, atol=0, rtol=0)


def test_collate_pads_with_zero_rows_and_mask(root):
    ds = VQAFeatureDataset(root, "train")
    items = [ds[i] for i in range(6)]
    batch = collate_vqa(items)
    K = max(it.v.shape[0] for it in items)
    assert batch.v.shape == (6, K, 2048) and batch.b.shape == (6, K, 6) and batch.mask.shape == (6, K)
    assert batch.mask.dtype == torch.bool
    for i, it in enumerate(items):
        k = it.v.shape[0]
        assert batch.mask[i].sum() == k and batch.mask[i, :k].all()
        torch.testing.assert_close(batch.v[i, :k], it.v, atol=0, rtol=0)
        assert (batch.v[i, k:] == 0).all() and (batch.b[i, k:] == 0).all()
    # the official padding test (all-zero feature rows) agrees with the mask
    assert torch.equal(batch.v.abs().sum(2) != 0, batch.mask)


def test_workers_read_the_same_batches(root):
    ds = VQAFeatureDataset(root, "train")
    a = list(DataLoader(ds, batch_size=5, collate_fn=collate_vqa, num_workers=0))
    b = list(DataLoader(ds, batch_size=5, collate_fn=collate_vqa, num_workers=2))
    for x, y in zip(a, b):
        torch.testing.assert_close(x.v, y.v, atol=0, rtol=0)
        assert torch.equal(x.mask, y.mask) and torch.equal(x.q, y.q)


def test_fixed36_files(root):
    ds = VQAFeatureDataset(root, "val", adaptive=False)
    it = ds[0]
    assert it.v.shape == (36, 2048) and it.b.shape == (36, 6)


def test_fixed36_files_need_their_own_index(broken):
    """The official fixed-36 and adaptive converters read different TSV files, so their image rows differ:
    without {split}36_imgid2idx.pkl the reader names that file instead of using the adaptive index."""
    (broken / "val36_imgid2idx.pkl").unlink()
    with pytest.raises(VQADataError, match=_match("val36_imgid2idx.pkl", "<file>")):
        VQAFeatureDataset(broken, "val", adaptive=False)


def test_glove_and_tfidf_init(root):
    d = Dictionary.load(root / "dictionary.pkl")
    glove = load_glove_init(root, d.ntoken)
    assert glove.shape == (d.ntoken, 300) and glove.dtype == np.float32
    qs = ["what colour is the leftmost dog?", "how many dogs are there?"]
    # the tf-idf matrix is row-stochastic: applied to all-ones vectors it gives ones for every
    # word that co-occurs with another one, and zeros for words never seen
    out = tfidf_word_embedding(qs, d, np.ones_like(glove))
    seen = {t for q in qs for t in d.tokenize(q, max_length=None)}
    for t in range(d.ntoken):
        np.testing.assert_allclose(out[t], 1.0 if t in seen else 0.0, atol=1e-6)


def test_tfidf_weights_each_co_occurring_word_by_its_inverse_document_frequency():
    """The weighting the official code describes (1 / df of the co-occurring word, rows summing to 1);
    the official loop's effective weights (all 1 but its first ntoken entries) are a documented deviation."""
    words = ["x", "y", "z", "w", "v"]
    d = Dictionary({w: i for i, w in enumerate(words)}, list(words))
    out = tfidf_word_embedding(["x y z", "y w", "y v"], d, np.eye(5, dtype=np.float32))
    # df(y) = 3, df(z) = 1: x's row weights y and z as 1/3 : 1
    np.testing.assert_allclose(out[0], [0, 0.25, 0.75, 0, 0], atol=1e-6)
    # y co-occurs with x, z, w, v, each of df 1
    np.testing.assert_allclose(out[1], [0.25, 0, 0.25, 0.25, 0.25], atol=1e-6)


def test_tfidf_official_weighting_is_what_the_official_loop_computes():
    """weighting="official": the edge at list position j is divided by df(j) once per edge whose col is j
    (j < ntoken); later edges keep 1. Edges in the official order, (a, b) then (b, a) per pair:
    x y z: 0>1 1>0 0>2 2>0 1>2 2>1, y w: 1>3 3>1, y v: 1>4 4>1 (cols 1 0 2 0 2 1 3 1 4 1; df(y) = 3)."""
    words = ["x", "y", "z", "w", "v"]
    d = Dictionary({w: i for i, w in enumerate(words)}, list(words))
    out = tfidf_word_embedding(["x y z", "y w", "y v"], d, np.eye(5, dtype=np.float32), weighting="official")
    # position 1 (the edge y > x) is divided by df(y) = 3 four times (y is the col of four edges); the
    # others among the first five by a df of 1
    np.testing.assert_allclose(out[0], [0, 0.5, 0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(out[1], np.array([1 / 81, 0, 1, 1, 1]) / (3 + 1 / 81), atol=1e-6)
    with pytest.raises(ValueError, match="weighting: expected one of"):
        tfidf_word_embedding(["x y"], d, np.eye(5, dtype=np.float32), weighting="tfidf")


BAN_ROOT = os.environ.get("SETPERM_BAN_ROOT")


@pytest.mark.skipif(not BAN_ROOT or not (Path(BAN_ROOT) / "dataset.py").is_file(),
                    reason="set SETPERM_BAN_ROOT to a jnhwkim/ban-vqa checkout to test against the official code")
def test_tfidf_official_weighting_equals_the_official_function(root, tmp_path, monkeypatch):
    """The official tfidf_from_questions itself, on the synthetic train and val questions (the names main.py
    passes, VQA questions only, as the perm-optim authors' fork reads them), times the same GloVe."""
    import warnings

    from integrations.ban import load_official

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")               # the 2018 code's deprecated escapes and sparse API
        off = load_official(BAN_ROOT, modules=("dataset",), with_dataset=True)
    data = tmp_path / "data"
    shutil.copytree(root, data)
    (data / QUESTION_FILES["test2015"]).write_text(json.dumps({"questions": []}), encoding="utf-8")
    (data / "glove").mkdir()
    (data / "glove" / "glove.6B.300d.txt").write_text("unused " + " ".join(["0"] * 300) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)                    # the function reads data/glove/... relative to the cwd
    with open(data / "dictionary.pkl", "rb") as fh:
        word2idx, idx2word = pickle.load(fh)
    official_dictionary = off.dataset.Dictionary(word2idx, idx2word)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matrix, extra = off.dataset.tfidf_from_questions(["train", "val", "test2015"], official_dictionary,
                                                         dataroot=str(data), target=["vqa"])
    d = Dictionary.load(data / "dictionary.pkl")
    assert len(extra) == 0                          # no word outside the dictionary
    glove = np.random.default_rng(0).standard_normal((d.ntoken, 7)).astype(np.float32)
    qs = [q["question"] for split in ("train", "val")
          for q in json.loads((data / QUESTION_FILES[split]).read_text(encoding="utf-8"))["questions"]]
    want = matrix.to_dense().double().numpy()[:, :d.ntoken] @ glove.astype(np.float64)
    np.testing.assert_allclose(tfidf_word_embedding(qs, d, glove, weighting="official"), want, atol=1e-5)
    # and the weighting it describes is another table
    assert np.abs(tfidf_word_embedding(qs, d, glove) - want).max() > 1e-2


def test_generator_is_deterministic(root, tmp_path):
    again = synth.generate(tmp_path / "again", **SYNTH)
    for name in ("v2_OpenEnded_mscoco_train2014_questions.json", "dictionary.pkl", "cache/val_target.pkl"):
        assert (again / name).read_bytes() == (root / name).read_bytes()
    with h5py.File(again / "train.hdf5", "r") as a, h5py.File(root / "train.hdf5", "r") as b:
        np.testing.assert_array_equal(a["image_features"][:], b["image_features"][:])


# ------------------------------------------------------------------ errors name file and key

def _match(path_name, key):
    return rf"{path_name}.*{key}"


def test_missing_file_named(broken):
    (broken / "cache" / "val_target.pkl").unlink()
    with pytest.raises(VQADataError, match=_match("val_target.pkl", "file not found")):
        VQAFeatureDataset(broken, "val")


def test_missing_h5_key_named(broken):
    with h5py.File(broken / "val.hdf5", "a") as f:
        del f["pos_boxes"]
    with pytest.raises(VQADataError, match=_match("val.hdf5", "pos_boxes")):
        VQAFeatureDataset(broken, "val")


def test_h5_shape_mismatch_named(broken):
    with h5py.File(broken / "val.hdf5", "a") as f:
        n = f["spatial_features"].shape[0]
        del f["spatial_features"]
        f.create_dataset("spatial_features", (n, 4), "f4")
    with pytest.raises(VQADataError, match=_match("val.hdf5", "spatial_features")):
        VQAFeatureDataset(broken, "val")


def test_pos_boxes_out_of_range_named(broken):
    with h5py.File(broken / "val.hdf5", "a") as f:
        f["pos_boxes"][0] = [0, 10 ** 7]
    with pytest.raises(VQADataError, match=_match("val.hdf5", "pos_boxes")):
        VQAFeatureDataset(broken, "val")


def test_unfilled_pos_boxes_rows_of_images_the_index_does_not_name_are_accepted(broken):
    """The official converter sizes pos_boxes by the image ids it looks for and leaves the rows of ids it
    does not find in the TSV files at [0, 0] (with a warning), without indexing them; the official loader
    reads such a file, and so does this one. An indexed image with an empty range is still refused."""
    with h5py.File(broken / "val.hdf5", "a") as f:
        pos = f["pos_boxes"][:]
        del f["pos_boxes"]
        f.create_dataset("pos_boxes", data=np.concatenate([pos, np.zeros((2, 2), pos.dtype)]))
    ds = VQAFeatureDataset(broken, "val")
    assert len(ds) > 0 and ds[0].v.shape[0] >= 10
    ds.close()
    with h5py.File(broken / "val.hdf5", "a") as f:
        f["pos_boxes"][0] = [0, 0]
    with pytest.raises(VQADataError, match=_match("val.hdf5", "pos_boxes") + ".*row 0"):
        VQAFeatureDataset(broken, "val")


def test_corrupt_h5_named(broken):
    (broken / "val.hdf5").write_bytes(b"not an hdf5 file" * 10)
    with pytest.raises(VQADataError, match=_match("val.hdf5", "cannot open")):
        VQAFeatureDataset(broken, "val")


def test_corrupt_pickle_named(broken):
    (broken / "dictionary.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(VQADataError, match=_match("dictionary.pkl", "unpickle")):
        VQAFeatureDataset(broken, "val")


def test_unindexed_image_named(broken):
    with open(broken / "val_imgid2idx.pkl", "rb") as f:
        idx = pickle.load(f)
    gone = sorted(idx)[0]
    del idx[gone]
    with open(broken / "val_imgid2idx.pkl", "wb") as f:
        pickle.dump(idx, f)
    with pytest.raises(VQADataError, match=_match("val_imgid2idx.pkl", str(gone))):
        VQAFeatureDataset(broken, "val")


def test_bad_label_named(broken):
    p = broken / "cache" / "val_target.pkl"
    with open(p, "rb") as f:
        t = pickle.load(f)
    t[0]["labels"] = [999]
    t[0]["scores"] = [1.0]
    with open(p, "wb") as f:
        pickle.dump(t, f)
    with pytest.raises(VQADataError, match=_match("val_target.pkl", "labels")):
        VQAFeatureDataset(broken, "val")


def test_missing_question_key_named(broken):
    p = broken / "v2_OpenEnded_mscoco_val2014_questions.json"
    p.write_text(json.dumps({"qs": []}), encoding="utf-8")
    with pytest.raises(VQADataError, match=_match("questions.json", "questions")):
        VQAFeatureDataset(broken, "val")


def test_glove_shape_named(broken):
    np.save(broken / "glove6b_init_300d.npy", np.zeros((3, 300), np.float32))
    with pytest.raises(VQADataError, match=_match("glove6b_init_300d.npy", "expected shape")):
        load_glove_init(broken, Dictionary.load(broken / "dictionary.pkl").ntoken)


def test_question_without_image_id_named(broken):
    # any question, not only the first: the reader must not fail later with a raw KeyError
    p = broken / "v2_OpenEnded_mscoco_val2014_questions.json"
    qs = json.loads(p.read_text(encoding="utf-8"))
    del qs["questions"][-1]["image_id"]
    p.write_text(json.dumps(qs), encoding="utf-8")
    n = len(qs["questions"]) - 1
    with pytest.raises(VQADataError, match=_match("questions.json", rf"questions\[{n}\]\.image_id")):
        VQAFeatureDataset(broken, "val")


def test_target_without_key_named(broken):
    p = broken / "cache" / "val_target.pkl"
    with open(p, "rb") as f:
        t = pickle.load(f)
    del t[1]["scores"]
    with open(p, "wb") as f:
        pickle.dump(t, f)
    with pytest.raises(VQADataError, match=_match("val_target.pkl", r"\[1\]\.scores")):
        VQAFeatureDataset(broken, "val")


def _poison(path, box: int, value=np.nan) -> None:
    with h5py.File(path, "a") as f:
        f["image_features"][box, 0] = value


@pytest.mark.parametrize("workers", [0, 1])
def test_non_finite_features_name_file_split_and_row(broken, workers):
    ds = VQAFeatureDataset(broken, "val")
    row = ds.entries[0][0]
    start, end = ds.pos_boxes[row]
    ds.close()
    _poison(broken / "val.hdf5", int(start) + 1, np.inf)
    ds = VQAFeatureDataset(broken, "val")
    # only the batches that hold the poisoned image fail; the error is one line, also from a worker process
    loader = DataLoader(ds, batch_size=len(ds), collate_fn=collate_vqa, num_workers=workers)
    with pytest.raises(VQADataError) as err:
        next(iter(loader))
    msg = str(err.value)
    assert "val.hdf5" in msg and "image_features" in msg and "split val" in msg and f"image row {row}" in msg
    assert f"box rows {start}:{end}" in msg and "\n" not in msg
    clean = [i for i in range(len(ds)) if ds.entries[i][0] != row]
    assert all(torch.isfinite(ds[i].v).all() for i in clean)


def test_a_missing_data_root_is_named_rather_than_a_file_in_it(tmp_path):
    with pytest.raises(VQADataError, match=r"typo: folder not found \(check --data-root\)$"):
        Dictionary.load(tmp_path / "typo" / "dictionary.pkl")
    with pytest.raises(VQADataError, match=r"dictionary.pkl: key '<file>': file not found$"):
        Dictionary.load(tmp_path / "dictionary.pkl")            # the folder exists, the file does not
