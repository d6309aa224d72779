"""The synthetic VQA generator: official layout, determinism, true answers on hand-built scenes for
every family, the unambiguity guarantees, balanced families and yes / no, and the oracle decoder
recovering every stored answer from the files alone."""
import json
import sys
from collections import Counter

import h5py
import numpy as np
import pytest
import torch

from integrations.ban.data import VQAFeatureDataset, collate_vqa
from integrations.ban.research import synth, synth_oracle
from integrations.ban.research.synth_features import FeatureCodes, FeatureConfig
from integrations.ban.research.synth_world import (COLOURS, FAMILIES, ORDINALS, Question, Scene, SceneConfig, SlotDeck,
                                                   answer, box_iou, check_unambiguous, draw_image, family_slots,
                                                   feasible, parse_family_mix, parse_question, question_text,
                                                   sample_scene, spaced_uniform)

SMALL = dict(images=40, val_images=12, questions=4, v_dim=128)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("synth") / "data", seed=5, fixed=True, **SMALL)


# ------------------------------------------------------------------ layout

def test_layout_is_read_by_the_official_reader(root):
    meta = json.loads((root / "synth_meta.json").read_text(encoding="utf-8"))
    for split, n_img in (("train", 40), ("val", 12)):
        ds = VQAFeatureDataset(root, split)
        assert len(ds) == n_img * 4 and ds.v_dim == 128
        assert ds.num_ans_candidates == len(meta["answers"])
        batch = collate_vqa([ds[i] for i in range(len(ds))])
        assert batch.v.shape[2] == 128 and batch.b.shape[2] == 6
        assert torch.equal(batch.v.abs().sum(2) != 0, batch.mask)  # no real box looks like padding
        # every question has a family, and the trainer's per-type map covers the split
        assert all(str(qid) in meta["question_type"] for qid in batch.question_id.tolist())
    counts = [VQAFeatureDataset(root, "train").num_boxes(i) for i in range(0, 160, 4)]
    assert min(counts) >= 10 and max(counts) <= 36
    fixed = VQAFeatureDataset(root, "val", adaptive=False)
    assert fixed[0].v.shape == (36, 128)


def test_first_images_have_the_extreme_box_counts(tmp_path):
    out = synth.generate(tmp_path / "d", images=3, val_images=2, questions=2, v_dim=8, min_boxes=12, max_boxes=30)
    meta = json.loads((out / "synth_meta.json").read_text(encoding="utf-8"))
    for split in ("train", "val"):
        assert meta["splits"][split]["min_boxes"] == 12 and meta["splits"][split]["max_boxes"] == 30


def test_generator_is_deterministic_per_seed(root, tmp_path):
    again = synth.generate(tmp_path / "again", seed=5, fixed=True, **SMALL)
    other = synth.generate(tmp_path / "other", seed=6, fixed=True, **SMALL)
    for name in ("v2_OpenEnded_mscoco_train2014_questions.json", "cache/val_target.pkl", "synth_meta.json"):
        assert (again / name).read_bytes() == (root / name).read_bytes()
        assert (other / name).read_bytes() != (root / name).read_bytes()
    with h5py.File(again / "train.hdf5", "r") as a, h5py.File(root / "train.hdf5", "r") as b:
        for key in ("image_features", "spatial_features", "pos_boxes"):
            np.testing.assert_array_equal(a[key][:], b[key][:])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown generator setting"):
        synth.make_config(noize=1.0)
    with pytest.raises(ValueError, match="families"):
        synth.make_config(families="exists,leftmostt")
    with pytest.raises(ValueError, match="min_dx"):
        SceneConfig(classes=12, max_per_class=6, min_dx=0.05)
    with pytest.raises(ValueError, match="min_boxes"):
        SceneConfig(min_boxes=20, max_boxes=10)


# ------------------------------------------------------------------ true answers

def _scene():
    # three dogs: x-centres 0.1 (red, small), 0.45 (green, large), 0.8 (blue, medium);
    # one cup at x = 0.6; a clutter box at x = 0.05
    boxes = [[0.05, 0.1, 0.15, 0.2], [0.35, 0.5, 0.55, 0.9], [0.75, 0.1, 0.85, 0.3],
             [0.55, 0.6, 0.65, 0.7], [0.0, 0.0, 0.1, 0.5]]
    return Scene(["dog", "dog", "dog", "cup", "clutter00"], ["red", "green", "blue", "white", "red"], boxes)


@pytest.mark.parametrize("q, expected", [
    (Question("exists", "dog"), "yes"),
    (Question("exists", "ball"), "no"),
    (Question("colour", "cup"), "white"),
    (Question("leftmost", "dog"), "red"),
    (Question("rightmost", "dog"), "blue"),
    (Question("kth_left", "dog", 2), "green"),
    (Question("kth_left", "dog", 3), "blue"),
    (Question("largest", "dog"), "green"),
    (Question("smallest", "dog"), "red"),
    (Question("count", "dog"), "3"),
    (Question("count", "ball"), "0"),
    (Question("count_left", "dog", None, "cup"), "2"),
])
def test_answers_on_a_hand_built_scene(q, expected):
    scene = _scene()
    assert answer(scene, q) == expected
    assert parse_question(question_text(q)) == q


@pytest.mark.parametrize("q", [Question("colour", "dog"), Question("leftmost", "cup"), Question("kth_left", "cup", 2),
                               Question("count_left", "cup", None, "dog"), Question("count_left", "dog", None, "ball")])
def test_questions_without_one_answer_are_refused(q):
    assert not feasible(_scene(), q)
    with pytest.raises(ValueError, match="does not apply"):
        answer(_scene(), q)


def test_every_template_round_trips():
    for f in FAMILIES:
        for k in (ORDINALS if f == "kth_left" else [None]):
            q = Question(f, "vase", k, "hat" if f == "count_left" else None)
            text = question_text(q)
            assert parse_question(text) == q and len(text.split()) <= 14
    with pytest.raises(ValueError, match="no question template"):
        parse_question("what is the meaning of life?")


# ------------------------------------------------------------------ guarantees

def test_spaced_uniform_keeps_its_gap():
    rng = np.random.default_rng(0)
    for n in (1, 2, 10, 24):
        v = spaced_uniform(rng, n, 0.06, 0.94, 0.03)
        assert len(v) == n and v.min() >= 0.06 and v.max() <= 0.94
        if n > 1:
            assert np.diff(np.sort(v)).min() >= 0.03 - 1e-12
    with pytest.raises(ValueError, match="do not fit"):
        spaced_uniform(rng, 40, 0.0, 1.0, 0.03)


def test_sampled_scenes_satisfy_the_guarantees():
    cfg = SceneConfig(classes=8, max_per_class=4, max_boxes=40, min_dx=0.025)
    rng = np.random.default_rng(1)
    deck = SlotDeck(FAMILIES, rng)
    for _ in range(300):
        scene, questions = draw_image(rng, cfg, deck, 4)
        assert check_unambiguous(scene, cfg) == []
        assert cfg.min_boxes <= scene.meta["num_boxes"] <= cfg.max_boxes
        assert all(feasible(scene, q) for q in questions)
        assert len({q.cls for q in questions}) == len(questions)  # one question per asked class


def test_guarantee_checker_flags_violations():
    cfg = SceneConfig()
    close = Scene(["dog", "cup"], ["red", "red"], [[0.1, 0, 0.2, 0.1], [0.11, 0.5, 0.21, 0.6]])
    assert any("min_dx" in p for p in check_unambiguous(close, cfg))
    same_area = Scene(["dog", "dog"], ["red", "blue"], [[0.1, 0, 0.2, 0.1], [0.5, 0, 0.6, 0.1]])
    assert any("area" in p for p in check_unambiguous(same_area, cfg))
    overlap = Scene(["dog", "dog"], ["red", "blue"], [[0.1, 0, 0.3, 0.2], [0.14, 0, 0.34, 0.3]])
    assert any("IoU" in p for p in check_unambiguous(overlap, cfg))
    same_colour = Scene(["dog", "dog"], ["red", "red"], [[0.1, 0, 0.2, 0.1], [0.5, 0, 0.7, 0.3]])
    assert any("colour" in p for p in check_unambiguous(same_colour, cfg))


def test_box_iou():
    a = np.array([[0, 0, 1, 1], [0, 0, 0.5, 1]])
    np.testing.assert_allclose(box_iou(a, a), [[1, 0.5], [0.5, 1]], atol=1e-12)


def test_families_and_yes_no_are_balanced(root):
    # every deck holds each family twice (exists as yes + no): the counts differ by a partial deck at most
    meta = json.loads((root / "synth_meta.json").read_text(encoding="utf-8"))
    for split in ("train", "val"):
        fams = meta["splits"][split]["families"]
        assert set(fams) == set(FAMILIES) and max(fams.values()) - min(fams.values()) <= 2, fams
    # a larger sanity split: yes / no differ by at most one deck
    rng = np.random.default_rng(3)
    deck = SlotDeck(["exists", "colour"], rng)
    ans = Counter()
    for _ in range(500):
        scene, qs = draw_image(rng, SceneConfig(), deck, 4)
        ans.update(answer(scene, q) for q in qs if q.family == "exists")
    assert abs(ans["yes"] - ans["no"]) <= 1 and ans["yes"] + ans["no"] == 1000


def test_weighted_family_mix():
    assert parse_family_mix("exists:3,colour:4,leftmost") == (("exists", "colour", "leftmost"), (3, 4, 1))
    slots = Counter(family_slots(("exists", "colour", "leftmost"), (3, 4, 1)))
    assert slots == {"exists:yes": 3, "exists:no": 3, "colour": 8, "leftmost": 2}
    with pytest.raises(ValueError, match="weight"):
        parse_family_mix("exists:x")
    with pytest.raises(ValueError, match="distinct"):
        family_slots(("exists", "exists"))
    cfg = synth.make_config(families="exists:3,colour:4,count", images=2)
    assert cfg.families == ("exists", "colour", "count") and cfg.family_weights == (3, 4, 1)


def test_scene_box_count_keeps_the_counts_questions_need():
    rng = np.random.default_rng(0)
    cfg = SceneConfig()
    counts = np.array([4, 4, 4, 4, 4, 4])
    need = np.array([1, 0, 3, 0, 0, 0])
    for _ in range(20):
        scene = sample_scene(rng, cfg, num_boxes=10, counts=counts.copy(), min_counts=need)
        got = [scene.count(c) for c in cfg.asked]
        assert sum(got) == 10 == scene.meta["num_boxes"] and all(g >= n for g, n in zip(got, need))
        assert check_unambiguous(scene, cfg) == []


def test_annotators_give_official_soft_scores():
    rng = np.random.default_rng(0)
    given, scores = synth.annotate(rng, "3", max_per_class=4, accuracy=0.7)
    assert len(given) == 10 and set(given) <= {"2", "3", "4"}
    for a, s in scores.items():
        assert s == synth.official_score(given.count(a))
    assert synth.annotate(rng, "yes", 4, accuracy=1.0)[1] == {"yes": 1.0}


# ------------------------------------------------------------------ features and the oracle

def test_features_decode_to_class_and_colour():
    cfg = FeatureConfig(v_dim=64, noise=1.0)
    names = ["dog", "cup", "clutter00"]
    codes = FeatureCodes(0, cfg, ["clutter00"])
    rng = np.random.default_rng(0)
    cls = [names[i] for i in rng.integers(3, size=500)]
    col = [COLOURS[i] for i in rng.integers(6, size=500)]
    f = codes.encode(cls, col, rng)
    assert f.dtype == np.float32 and (f >= 0).all() and (f.sum(1) > 0).all()
    dec_cls, dec_col = codes.decode(f, names)
    assert dec_cls == cls and dec_col == col
    # the codes of the asked classes do not depend on how many clutter classes there are
    np.testing.assert_array_equal(FeatureCodes(0, cfg, []).class_codes["dog"], codes.class_codes["dog"])


@pytest.mark.parametrize("adaptive", [True, False])
def test_oracle_recovers_every_answer_from_the_files(root, adaptive):
    for split in ("train", "val"):
        res = synth_oracle.evaluate_oracle(root, split, adaptive)
        assert set(res) == set(FAMILIES) | {"all"}
        for family, r in res.items():
            assert r["agreement"] == 1.0 and r["soft_acc"] == r["upper_bound"], (split, family, r)


def test_oracle_fixed36_on_data_without_the_fixed_files_is_one_line(tmp_path, capsys):
    from integrations.common import run_command

    plain = synth.generate(tmp_path / "plain", images=2, val_images=2, questions=2, v_dim=16, seed=1, fixed=False)
    assert run_command(synth_oracle.main, synth_oracle.PROG, ["--data-root", str(plain), "--fixed36"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{synth_oracle.PROG}: error: --fixed36: {plain} has no fixed-36 files")
    assert "synth --fixed" in err[0] and "Errno" not in err[0]


def test_oracle_reads_the_features(root, tmp_path):
    # with the box features shuffled between boxes, the decoded scenes are wrong: the oracle must fail
    import shutil

    broken = shutil.copytree(root, tmp_path / "broken")
    with h5py.File(broken / "val.hdf5", "a") as f:
        v = f["image_features"][:]
        f["image_features"][:] = v[np.random.default_rng(0).permutation(len(v))]
    assert synth_oracle.evaluate_oracle(broken, "val")["all"]["agreement"] < 0.7


def test_noise_makes_decoding_ambiguous_and_the_oracle_reports_it(tmp_path):
    noisy = synth.generate(tmp_path / "noisy", images=2, val_images=30, questions=4, v_dim=16, noise=3.0, seed=1)
    res = synth_oracle.evaluate_oracle(noisy, "val")
    assert res["all"]["agreement"] < 1.0  # quantified per family, not hidden


def test_answer_prior_is_below_the_oracle(root):
    prior = synth_oracle.answer_prior(root, "val")
    assert 0 < prior["all"]["family"] < 1 and prior["all"]["n"] == 48


def test_relevant_boxes_are_the_asked_class_and_the_landmark(tmp_path):
    """What the oracle ablation feeds BAN + PO: per question the boxes of the asked class (and count_left's
    landmark), decoded from the files; checked against the oracle's answers and the question types."""
    import json

    import torch

    from integrations.ban.research import synth
    from integrations.ban.research.synth_oracle import RelevanceOracle, oracle_answers, relevant_boxes

    root = synth.generate(tmp_path / "d", images=8, val_images=8, questions=4, seed=3, v_dim=32, fixed=False)
    rel = relevant_boxes(root, "val")
    answers = oracle_answers(root, "val")
    qtypes = json.loads((root / "synth_meta.json").read_text(encoding="utf-8"))["question_type"]
    assert set(rel) == set(answers)
    seen = set()
    for qid, mask in rel.items():
        family, ans = answers[qid]
        assert qtypes[str(qid)] == family
        seen.add(family)
        n = int(mask.sum())
        if family == "count":
            assert n == int(ans)
        elif family == "colour":
            assert n == 1
        elif family in ("leftmost", "rightmost", "largest", "smallest"):
            assert n >= 2
        elif family == "count_left":
            assert n >= 2                       # >= 1 counted box and the landmark
        elif family == "exists":
            assert (n > 0) == (ans == "yes")
    assert {"count", "colour", "exists"} <= seen
    oracle = RelevanceOracle(root)
    qids = list(rel)[:3]
    K = max(len(rel[q]) for q in qids) + 2
    logits = oracle(qids, K)
    assert logits.shape == (3, K) and logits.dtype == torch.float32
    for i, q in enumerate(qids):
        m = rel[q]
        assert (logits[i, : len(m)][torch.from_numpy(m)] == 4.0).all()
        assert (logits[i, : len(m)][~torch.from_numpy(m)] == -4.0).all()
        assert (logits[i, len(m):] == -4.0).all()


def _synth_command(capsys, *argv):
    from integrations.ban.cli import PROG, entry

    old, sys.argv = sys.argv, [PROG, "synth", *argv]
    try:
        code = entry()
    except SystemExit as e:                      # argparse's own exit (status 2)
        code = e.code
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def test_command_checks_settings_and_folder_before_writing(tmp_path, capsys):
    out = tmp_path / "data"
    code, err = _synth_command(capsys, "--families", "exists,color", "--images", "4", "--out", str(out))
    assert code == 2 and "Traceback" not in err and "'color'" in err.strip().splitlines()[-1]
    assert not out.exists()
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me\n", encoding="utf-8")
    code, err = _synth_command(capsys, "--images", "4", "--val-images", "2", "--out", str(unrelated))
    assert code == 1 and "holds no synthetic dataset" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in unrelated.iterdir()) == ["notes.txt"]
    small = ["--images", "4", "--val-images", "2", "--questions", "2", "--v-dim", "16", "--out", str(out)]
    assert _synth_command(capsys, *small)[0] == 0
    code, err = _synth_command(capsys, *small)                 # an earlier dataset: only with --overwrite
    assert code == 1 and "--overwrite" in err
    assert _synth_command(capsys, *small, "--overwrite")[0] == 0


def test_the_command_line_offers_every_generator_setting_with_its_default():
    """The flags come from SceneConfig / FeatureConfig, as the knobs' settings do: none is missing."""
    import dataclasses

    from integrations.ban.research.knobs import generator_knobs

    args = vars(synth.build_parser().parse_args(["--out", "x"]))
    defaults = {f.name: f.default for cls in (SceneConfig, FeatureConfig) for f in dataclasses.fields(cls)}
    settings = set(generator_knobs()) - {"images", "questions"}
    assert {"clutter", "noise", "v_dim", "min_area", "margin"} <= settings
    for name in settings:
        assert args[name] == defaults[name] and type(args[name]) is type(defaults[name]), name
    parsed = vars(synth.build_parser().parse_args(["--out", "x", "--min-area", "0.01", "--v-dim", "8"]))
    assert parsed["min_area"] == 0.01 and parsed["v_dim"] == 8
