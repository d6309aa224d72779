"""benchmarks/ban_step_time.py: the whole-step comparison and the per-part breakdown run on a tiny
BAN, report every part, and the replay behind the breakdown is the model's forward (no timing
assertions: only that the times exist and add up sensibly)."""
import json

import pytest
import torch
from torch.testing import assert_close

from benchmarks import ban_step_time as bst
from integrations.ban.cli import parse_args
from integrations.ban.data import Dictionary, VQAFeatureDataset, collate_vqa
from integrations.ban.research import synth
from integrations.ban.train import build_model

TINY = ["--num-hid", "16", "--gamma", "2", "--batch-size", "4", "--steps", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("bansteps") / "data", images=6, val_images=2, questions=3,
                          seed=1, v_dim=32, fixed=False)


def _model_and_batch(root, permutation):
    args = parse_args(["--data-root", str(root), "--permutation", permutation, "--num-hid", "16", "--gamma", "2"])
    dictionary = Dictionary.load(root / "dictionary.pkl")
    ds = VQAFeatureDataset(root, "train", dictionary)
    torch.manual_seed(0)
    model = build_model(args, dictionary.ntoken, ds.num_ans_candidates, ds.v_dim)
    # items of different box counts, so the batch has padded boxes
    counts = [ds.num_boxes(i) for i in range(len(ds))]
    order = sorted(range(len(ds)), key=counts.__getitem__)
    batch = collate_vqa([ds[i] for i in (order[0], order[-1], order[len(ds) // 2])])
    assert batch.mask.sum(1).min() < batch.v.shape[1]
    return model, batch


def test_main_writes_every_part_with_positive_times(root, tmp_path):
    out = tmp_path / "steps.json"
    bst.main(["--data-root", str(root), "--permutation", "po-u", *TINY, "--out", str(out)])
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["variant"] == "po-u" and data["steps"] == 2
    for key in ("median_s", "cpu_median_s"):
        assert data[key]["off"] > 0 and data[key]["po-u"] > 0
    assert data["ratio"] == pytest.approx(data["median_s"]["po-u"] / data["median_s"]["off"])
    assert len(data["step_s"]["off"]) == len(data["step_s"]["po-u"]) == 2

    bd = data["breakdown"]
    rows = {r["part"]: r for r in bd["rows"]}
    expected = set(bst.BAN_PARTS) | set(bst.ENCODER_PARTS) | {bst.OPTIMISER_PART, bst.ENCODER_WHOLE}
    assert set(rows) == expected
    assert bd["step_s"]["median"] > 0 and bd["step_cpu_s"]["median"] > 0
    for r in rows.values():
        assert r["wall_s"]["median"] > 0 and r["cpu_s"]["median"] > 0, r["part"]
        assert r["share"] == pytest.approx(r["wall_s"]["median"] / bd["step_s"]["median"])
    counted = [r for r in rows.values() if r["group"] != "check"]
    assert bd["rest_s"] == pytest.approx(bd["step_s"]["median"] - sum(r["wall_s"]["median"] for r in counted))
    # sanity of the split (not a speed claim): the encoder's four pieces, each timed alone, add up
    # to about the whole encoder (each piece pays its own autograd call, hence the slack)
    pieces = sum(rows[p]["cpu_s"]["median"] for p in bst.ENCODER_PIECES)
    assert pieces <= 1.5 * rows[bst.ENCODER_WHOLE]["cpu_s"]["median"]
    assert bd["encoder_pieces_over_whole_cpu"] == pytest.approx(pieces / rows[bst.ENCODER_WHOLE]["cpu_s"]["median"])
    assert bd["batch"]["sets"] == 2 * bd["batch"]["B"]   # one set per glimpse and sample


def test_permutation_off_is_refused(root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bst.main(["--data-root", str(root), "--permutation", "off", *TINY, "--out", str(tmp_path / "x.json")])
    assert "baseline" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("permutation", ["po-u", "none"])
def test_replay_is_the_model_forward(root, permutation):
    model, batch = _model_and_batch(root, permutation)
    model.eval()                                   # no dropout: the two forwards must agree
    with torch.no_grad():
        expected, _ = model(batch.v, batch.b, batch.q)
    got, inp = bst.staged_forward(model, batch.v, batch.b, batch.q)
    assert_close(got, expected, rtol=1e-5, atol=1e-6)
    B, K = batch.v.shape[:2]
    sets, real = 2 * B, int(batch.mask.sum())
    assert inp["x"].shape == (sets, K, 13)
    assert inp["seq"].shape == (sets, K, 13)
    # the LSTM reads the real boxes first: padding rows of the sequence are exactly zero
    n = inp["set_mask"].sum(1)
    assert int(n.sum()) == 2 * real
    tail = torch.arange(K)[None, :] >= n[:, None]
    assert torch.equal(inp["seq"][tail], torch.zeros_like(inp["seq"][tail]))
    if permutation == "po-u":
        assert inp["C"].shape == (sets, 1, K, K) and inp["P"].shape == (sets, K, K)
    else:
        assert "C" not in inp and "P" not in inp


@pytest.mark.parametrize("permutation", ["po-u", "none"])
def test_every_part_backpropagates_into_its_own_modules(root, permutation):
    model, batch = _model_and_batch(root, permutation)
    model.train()
    _, inp = bst.staged_forward(model, batch.v, batch.b, batch.q)
    parts = bst.part_functions(model, inp, batch.target)
    ban, enc = model.ban, model.set_encoder
    owners = {"word embedding": [ban.w_emb], "question GRU": [ban.q_emb], "bilinear attention": [ban.v_att],
              "b_net + q_prj (glimpse loop)": [ban.b_net, ban.q_prj], "counter": [ban.counter],
              "c_prj": [ban.c_prj], "classifier + loss": [ban.classifier],
              "set construction (box_proj + glimpse_sets)": [model.box_proj],
              "LSTM over K boxes": [enc.lstm], "p_prj": [model.p_prj], bst.ENCODER_WHOLE: [enc]}
    if permutation == "po-u":
        owners["pairwise cost"] = [enc.po.cost]
        owners["inner steps (descent + Sinkhorn)"] = [enc.po]   # eta
    expected = set(bst.BAN_PARTS) | set(bst.ENCODER_PARTS) | {bst.ENCODER_WHOLE}
    if permutation == "none":
        expected -= {"pairwise cost", "inner steps (descent + Sinkhorn)"}
    assert set(parts) == expected
    for name, fn in parts.items():
        model.zero_grad(set_to_none=True)
        bst._forward_backward(fn)
        for owner in owners.get(name, []):
            grads = [p.grad for p in owner.parameters() if p.requires_grad]
            assert any(g is not None for g in grads), name
            assert all(torch.isfinite(g).all() for g in grads if g is not None), name
        # and into nothing else: each part times its own modules only
        own = {id(p) for o in owners.get(name, []) for p in o.parameters()}
        others = [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in own]
        assert not others, (name, others)


def test_staged_forward_rejects_a_plain_ban(root):
    model, batch = _model_and_batch(root, "po-u")
    with pytest.raises(ValueError, match="PatchedBan"):
        bst.staged_forward(model.ban, batch.v, batch.b, batch.q)
