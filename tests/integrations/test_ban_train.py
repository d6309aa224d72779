"""BAN training script: the official recipe's pieces, loss decrease for every mode, exact resume,
2-process gloo DDP with equal replicas, and (when a checkout is given) the official model."""
import importlib
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from integrations.ban.data import QUESTION_FILES, VQAFeatureDataset, collate_vqa
from integrations.ban.cli import parse_args
from integrations.ban.research import synth
from integrations.ban.train import (build_model, epoch_batches, epoch_indices, official_lr, run, soft_scores,
                                    train_step, vqa_bce_loss)
from integrations.common import CommandError, RunError, run_command



SMALL = ["--num-hid", "16", "--gamma", "2", "--batch-size", "4", "--workers", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # 6 train images x 3 questions = 18 questions; 32-d features keep every step cheap
    return synth.generate(tmp_path_factory.mktemp("bansynth") / "data", images=6, val_images=2, questions=3,
                          seed=1, v_dim=32, fixed=False)


def _args(root, out, *extra):
    return parse_args(["--data-root", str(root), "--out", str(out), *SMALL, *extra])


def test_official_lr_schedule():
    base = 1e-3
    lrs = [official_lr(e, base) for e in range(13)]
    # warm-up 0.5, 1, 1.5, 2 x base; 2 x base until epoch 9; x0.25 at epochs 10 and 12
    expect = [0.5, 1.0, 1.5, 2.0] + [2.0] * 6 + [0.5, 0.5, 0.125]
    np.testing.assert_allclose(lrs, [m * base for m in expect], rtol=1e-12)


def test_loss_is_bce_summed_over_answers_and_metric_is_soft_score():
    torch.manual_seed(0)
    logits, target = torch.randn(5, 7), torch.rand(5, 7)
    manual = -(target * torch.log(torch.sigmoid(logits)) + (1 - target) * torch.log(1 - torch.sigmoid(logits)))
    torch.testing.assert_close(vqa_bce_loss(logits, target), manual.sum(1).mean(), rtol=1e-5, atol=1e-6)
    s = soft_scores(logits, target)
    torch.testing.assert_close(s, target[torch.arange(5), logits.argmax(1)], rtol=0, atol=0)


def test_bucketed_batches_cover_the_epoch_once():
    counts = np.random.default_rng(0).integers(10, 101, 103)
    idx = np.random.default_rng(1).permutation(103).tolist()
    plain = epoch_batches(idx, 8)
    bucketed = epoch_batches(idx, 8, counts, pool=4, seed=3)
    for batches in (plain, bucketed):
        assert sorted(i for b in batches for i in b) == list(range(103))
        assert all(len(b) <= 8 for b in batches)
    # bucketing pads less: the summed per-batch max box count does not grow
    pad = lambda bs: sum(max(counts[i] for i in b) for b in bs)
    assert pad(bucketed) <= pad(plain)


@pytest.mark.parametrize("permutation", ["off", "none", "po-u"])
def test_a_few_steps_lower_the_loss(root, tmp_path, permutation):
    args = _args(root, tmp_path, "--permutation", permutation)
    ds = VQAFeatureDataset(root, "train")
    torch.manual_seed(0)
    model = build_model(args, ds.dictionary.ntoken, ds.num_ans_candidates, ds.v_dim)
    opt = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batch = collate_vqa([ds[i] for i in range(8)])
    model.eval()  # dropout off: compare the loss of the same function before and after
    with torch.no_grad():
        before = vqa_bce_loss(model(batch.v, batch.b, batch.q, None)[0], batch.target)
    model.train()
    for _ in range(12):
        train_step(model, opt, batch, torch.device("cpu"), grad_clip=0.25)
    model.eval()
    with torch.no_grad():
        after = vqa_bce_loss(model(batch.v, batch.b, batch.q, None)[0], batch.target)
    assert torch.isfinite(after) and after < 0.8 * before, (permutation, float(before), float(after))


def test_po_la_run_gets_one_position_per_box_of_the_largest_image(root, tmp_path):
    """PO-LA's linear start needs a fixed number of positions: a run takes the most boxes of an image in
    train / val (stored in its config, so eval and diagnose rebuild the same model)."""
    import json

    from integrations.ban.train import box_counts, evaluate_run

    out = tmp_path / "pola"
    run(_args(root, out, "--permutation", "po-la", "--epochs", "1"))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    most = max(int(box_counts(VQAFeatureDataset(root, s)).max()) for s in ("train", "val"))
    assert config["num_positions"] == most
    assert 0 <= evaluate_run(out)["soft_acc"] <= 1
    # other variants do not record the setting (configs of runs made before it stay comparable)
    run(_args(root, tmp_path / "po-u", "--permutation", "po-u", "--max-steps", "1"))
    assert "num_positions" not in json.loads((tmp_path / "po-u" / "config.json").read_text(encoding="utf-8"))


def test_resume_continues_exactly(root, tmp_path):
    # 18 questions / batch 4 = 5 steps per epoch: stop mid-epoch 0, resume across the epoch end
    common = ["--permutation", "po-u", "--epochs", "2", "--bucket"]
    straight = run(_args(root, tmp_path / "a", *common, "--max-steps", "7"))
    run(_args(root, tmp_path / "b", *common, "--max-steps", "3"))
    resumed = run(_args(root, tmp_path / "b", *common, "--max-steps", "7", "--resume"))
    assert resumed["step"] == straight["step"] == 7
    sa, sb = straight["model"].state_dict(), resumed["model"].state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-7, msg=k)
    assert len(straight["history"]) == len(resumed["history"]) == 1
    for key in ("train_loss", "train_soft_acc", "val_soft_acc"):
        assert resumed["history"][0][key] == pytest.approx(straight["history"][0][key], rel=1e-6, abs=1e-9)
    assert (tmp_path / "b" / "config.json").is_file() and (tmp_path / "b" / "tb").is_dir()


@pytest.mark.parametrize("official", [False, True], ids=["model.py", "official"])
def test_resume_of_a_checkpoint_written_while_the_unused_counter_functions_were_trainable(root, tmp_path,
                                                                                         monkeypatch, official):
    """The plain official BAN froze the counter's unused f[8:] only later: a run stopped before then holds an
    Adamax group over every parameter. It resumes (those functions never had a gradient, so no Adamax state)
    and continues as the uninterrupted run of the current code does."""
    import integrations.ban.counting as counting

    if official and not os.environ.get("SETPERM_BAN_ROOT"):
        pytest.skip("SETPERM_BAN_ROOT (a jnhwkim/ban-vqa checkout) not set")
    common = ["--permutation", "off", "--epochs", "2"]
    if official:
        common += ["--ban-root", os.environ["SETPERM_BAN_ROOT"]]
    straight = run(_args(root, tmp_path / "a", *common, "--max-steps", "4"))
    with monkeypatch.context() as before_the_freeze:
        before_the_freeze.setattr(counting, "freeze_unused_functions", lambda counter: None)
        old = run(_args(root, tmp_path / "b", *common, "--max-steps", "2"))
    assert all(p.requires_grad for p in old["model"].parameters())
    resumed = run(_args(root, tmp_path / "b", *common, "--max-steps", "4", "--resume"))
    assert resumed["step"] == straight["step"] == 4
    sa, sb = straight["model"].state_dict(), resumed["model"].state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-7, msg=k)


def test_resume_refuses_changed_settings(root, tmp_path):
    run(_args(root, tmp_path, "--permutation", "off", "--max-steps", "1"))
    with pytest.raises(RunError, match="permutation \"off\" -> \"none\""):
        run(_args(root, tmp_path, "--permutation", "none", "--max-steps", "2", "--resume"))
    with pytest.raises(RunError, match="--resume"):       # a run folder is never mixed with another run
        run(_args(root, tmp_path, "--permutation", "off", "--max-steps", "2"))


def test_epoch_indices_cover_the_epoch_on_every_rank_count():
    for n, world in [(10, 1), (10, 3), (7, 2)]:
        shards = [epoch_indices(n, seed=3, epoch=1, rank=r, world=world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        assert set().union(*shards) == set(range(n))
    assert epoch_indices(10, seed=3, epoch=1) != epoch_indices(10, seed=3, epoch=2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, root, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = run(_args(root, out, "--permutation", "po-u", "--max-steps", "3", "--batch-size", "8"))
    torch.save(result["model"].state_dict(), os.path.join(out, f"rank{rank}.state"))


@pytest.mark.skipif(torch.__version__ < "2.8", reason="older torch can deadlock when a Gloo process group is freed "
                    "(its destructor holds the GIL while joining a worker that needs it; released since PyTorch 2.8)")
def test_two_process_gloo_ddp_keeps_replicas_equal(root, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.state", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.state", weights_only=True)
    init = build_model(_args(root, tmp_path, "--permutation", "po-u"), *_sizes(root))
    moved = False
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=0, atol=0, msg=k)
        moved |= not torch.equal(s0[k], init.state_dict()[k])
    assert moved  # the replicas trained (3 steps), and stayed identical
    assert (tmp_path / "checkpoints").is_dir() and any((tmp_path / "checkpoints").iterdir())


def _ddp_resume_worker(rank, world, port, root, out, steps, resume):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    extra = ["--resume"] if resume else []
    result = run(_args(root, out, "--permutation", "po-u", "--epochs", "2", "--batch-size", "8",
                       "--max-steps", str(steps), *extra))
    torch.save(result["model"].state_dict(), os.path.join(out, f"rank{rank}.state"))


@pytest.mark.skipif(torch.__version__ < "2.8", reason="older torch can deadlock when a Gloo process group is freed "
                    "(its destructor holds the GIL while joining a worker that needs it; released since PyTorch 2.8)")
def test_two_process_gloo_ddp_resume_continues_exactly(root, tmp_path):
    """Each rank draws its own dropout masks (its batches' box counts differ), so each rank must resume from
    its own RNG states, not rank 0's: stop + resume under DDP equals the uninterrupted DDP run."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out, steps, resume in [(straight, 5, False), (split, 2, False), (split, 5, True)]:
        mp.spawn(_ddp_resume_worker, args=(2, _free_port(), str(root), str(out), steps, resume), nprocs=2, join=True)
    sa = torch.load(straight / "rank0.state", weights_only=True)
    sb = torch.load(split / "rank0.state", weights_only=True)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-7, msg=k)


def _sizes(root):
    ds = VQAFeatureDataset(root, "train")
    return ds.dictionary.ntoken, ds.num_ans_candidates, ds.v_dim


@pytest.mark.parametrize("variant", ["po-u", "none"])
def test_the_read_flag_reaches_the_set_encoder_and_is_recorded_only_when_set(root, tmp_path, variant):
    from integrations.ban.train import run_config

    args = _args(root, tmp_path, "--permutation", variant, "--read", "fused")
    assert build_model(args, *_sizes(root)).set_encoder.read == "fused"
    assert run_config(args, world_size=1, ntoken=1, num_answers=1, v_dim=1)["read"] == "fused"
    default = _args(root, tmp_path, "--permutation", variant)
    assert build_model(default, *_sizes(root)).set_encoder.read == "auto"
    # (a run recorded before the flag existed resumes unchanged)
    assert "read" not in run_config(default, world_size=1, ntoken=1, num_answers=1, v_dim=1)


@pytest.mark.skipif(not os.environ.get("SETPERM_BAN_ROOT"), reason="SETPERM_BAN_ROOT (a jnhwkim/ban-vqa checkout) not set")
@pytest.mark.parametrize("amp", [[], ["--amp"]], ids=["float32", "bf16-autocast"])
def test_official_model_trains(root, tmp_path, amp):
    result = run(_args(root, tmp_path, "--permutation", "po-u", "--ban-root", os.environ["SETPERM_BAN_ROOT"],
                       "--max-steps", "2", *amp))
    assert result["step"] == 2
    assert all(torch.isfinite(p).all() for p in result["model"].parameters())


@pytest.mark.parametrize("max_steps", [3, 5])        # 18 questions / batch 4: 5 steps per epoch
def test_max_steps_says_where_it_stopped_mid_epoch_and_at_an_epoch_end(root, tmp_path, capsys, max_steps):
    result = run(_args(root, tmp_path, "--permutation", "off", "--max-steps", str(max_steps), "--epochs", "2"))
    out = capsys.readouterr().out
    assert not result["finished"] and result["step"] == max_steps
    assert f"stopped by --max-steps at step {max_steps} (epoch {max_steps // 5}, batch {max_steps % 5}/5)" in out


def _ban_command(capsys, *argv) -> tuple:
    from integrations.ban.cli import PROG, main
    from integrations.ban.data import VQADataError
    from integrations.common import run_command

    code = run_command(main, PROG, ["train", *argv], errors=(VQADataError,))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("permutation", ["off", "po-u"])
def test_non_finite_features_stop_the_run_with_one_line(root, tmp_path, capsys, permutation):
    import shutil

    import h5py
    from integrations.common import load_latest

    data = shutil.copytree(root, tmp_path / "data")
    out = tmp_path / "run"
    argv = ["--data-root", str(data), "--out", str(out), *SMALL, "--permutation", permutation, "--epochs", "2"]
    assert _ban_command(capsys, *argv, "--max-steps", "2")[0] == 0
    before = load_latest(out)
    with h5py.File(data / "train.hdf5", "a") as f:          # one value of one box of one image
        f["image_features"][3, 5] = np.nan
    code, err = _ban_command(capsys, *argv, "--resume")
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err, err
    assert "train.hdf5" in lines[-1] and "image_features" in lines[-1] and "split train" in lines[-1]
    assert "non-finite" in lines[-1] and "row" in lines[-1]
    after = load_latest(out)                                 # the earlier checkpoint is intact and still newest
    assert after["step"] == before["step"] == 2
    for k in before["model"]:
        torch.testing.assert_close(after["model"][k], before["model"][k], rtol=0, atol=0)


def test_non_finite_loss_stops_before_the_update(root, tmp_path, capsys, monkeypatch):
    import integrations.ban.train as ban_train
    from integrations.common import load_latest

    out = tmp_path / "run"
    argv = ["--data-root", str(root), "--out", str(out), *SMALL, "--permutation", "off", "--epochs", "1"]
    assert _ban_command(capsys, *argv, "--max-steps", "2")[0] == 0
    before = load_latest(out)
    monkeypatch.setattr(ban_train, "vqa_bce_loss", lambda logits, target: (logits * float("nan")).sum())
    code, err = _ban_command(capsys, *argv, "--resume")
    assert code == 1 and "Traceback" not in err
    assert "loss is nan at step 3" in err.strip().splitlines()[-1]
    assert load_latest(out)["step"] == before["step"] == 2


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16-autocast"])
def test_one_training_step_on_every_device(root, tmp_path, device, amp):
    """One official step of BAN + PO-U on the device (``--amp``: bfloat16 autocast): finite loss, every
    trained parameter moves and stays float32 on the device."""
    args = _args(root, tmp_path, "--permutation", "po-u", *(["--amp"] if amp else []))
    assert args.amp is amp
    ds = VQAFeatureDataset(root, "train")
    torch.manual_seed(0)
    model = build_model(args, ds.dictionary.ntoken, ds.num_ans_candidates, ds.v_dim).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adamax(params, lr=2e-3)
    batch = collate_vqa([ds[i] for i in range(4)])
    loss, score, norm = train_step(model, opt, batch, device, grad_clip=0.25, amp=amp)
    assert loss.device.type == device.type and bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
    assert all(p.dtype == torch.float32 and p.device.type == device.type for p in params)
    moved = [not torch.equal(p.detach(), b) for p, b in zip(params, before)]
    assert sum(moved) >= 0.9 * len(moved)
    if amp:
        # the same step with and without autocast: close, not equal (bfloat16 has 8 significant bits).
        # Without dropout: its masks alone move this first loss by +-20 %, and on CUDA they differ
        # between the two (the random offsets advance by a vector width that depends on the dtype)
        losses = []
        for use_amp in (True, False):
            torch.manual_seed(0)
            m = build_model(args, ds.dictionary.ntoken, ds.num_ans_candidates, ds.v_dim).to(device).eval()
            opt = torch.optim.Adamax([p for p in m.parameters() if p.requires_grad], lr=2e-3)
            losses.append(float(train_step(m, opt, batch, device, grad_clip=0.25, amp=use_amp)[0]))
        amp_loss, ref_loss = losses
        assert amp_loss != ref_loss                                 # autocast did take effect
        assert abs(amp_loss - ref_loss) < 0.05 * abs(ref_loss)


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16-autocast"])
def test_a_training_step_on_the_path_cuda_takes_waits_only_for_the_loss_check(root, tmp_path, device_path, amp):
    """A whole official step of BAN + PO-U (forward, loss, backward, clip, Adamax) on the path CUDA takes:
    the host waits for the device only where the step reads the loss to stop before a non-finite update,
    and on torch 2.0 in torch's own gradient clipping (conftest's ``HostWaits``; the batch as the loader
    gives it and the optimiser's step counts are host tensors, as on CUDA)."""
    args = _args(root, tmp_path, "--permutation", "po-u", *(["--amp"] if amp else []))
    ds = VQAFeatureDataset(root, "train")
    torch.manual_seed(0)
    model = build_model(args, ds.dictionary.ntoken, ds.num_ans_candidates, ds.v_dim)
    opt = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batch = collate_vqa([ds[i] for i in range(4)])
    train_step(model, opt, batch, torch.device("cpu"), grad_clip=0.25, amp=amp)      # the optimiser's state
    steps = tuple(state["step"] for state in opt.state.values() if isinstance(state.get("step"), torch.Tensor))
    host = tuple(t for t in batch if isinstance(t, torch.Tensor)) + steps
    exempt, expected = [(importlib.import_module("integrations.ban.train"), "finite_loss")], {"finite_loss": 1}
    if not hasattr(torch.ops.aten._foreach_mul_, "Tensor"):
        # torch 2.0: clip_grad_norm_ scales the gradients by a Python number read from the device (torch's wait)
        exempt.append((torch.nn.utils, "clip_grad_norm_"))
        expected["clip_grad_norm_"] = 1
    with device_path(host=host, exempt=exempt) as waits:
        loss, _, _ = train_step(model, opt, batch, torch.device("cpu"), grad_clip=0.25, amp=amp)
    assert waits.calls == expected and bool(torch.isfinite(loss))


def test_amp_run_records_the_setting_and_resume_refuses_a_change(root, tmp_path):
    import json

    out = tmp_path / "amp"
    run(_args(root, out, "--permutation", "po-u", "--amp", "--max-steps", "1"))
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["amp"] is True
    with pytest.raises(RunError, match="amp"):
        run(_args(root, out, "--permutation", "po-u", "--max-steps", "2", "--resume"))
    # runs without --amp record nothing (configs written before the flag existed stay comparable)
    run(_args(root, tmp_path / "plain", "--permutation", "off", "--max-steps", "1"))
    assert "amp" not in json.loads((tmp_path / "plain" / "config.json").read_text(encoding="utf-8"))


def test_tfidf_weighting_sets_the_second_embedding_table_and_is_recorded(root, tmp_path):
    from integrations.ban.data import Dictionary, load_glove_init, tfidf_word_embedding

    d = Dictionary.load(root / "dictionary.pkl")
    qs = [q["question"] for split in ("train", "val")
          for q in json.loads((root / QUESTION_FILES[split]).read_text(encoding="utf-8"))["questions"]]
    tables = {}
    for weighting in ("idf", "official"):
        args = _args(root, tmp_path / weighting, "--tfidf-weighting", weighting)
        model = build_model(args, d.ntoken, 5, 32)
        tables[weighting] = getattr(model, "ban", model).w_emb.emb_.weight.detach()[:d.ntoken]
        want = tfidf_word_embedding(qs, d, load_glove_init(root, d.ntoken), weighting=weighting)
        torch.testing.assert_close(tables[weighting], torch.from_numpy(want))
    assert not torch.allclose(tables["idf"], tables["official"])
    run(_args(root, tmp_path / "run", "--permutation", "off", "--tfidf-weighting", "official", "--max-steps", "1"))
    assert json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))["tfidf_weighting"] == "official"
    with pytest.raises(RunError, match="tfidf_weighting"):
        run(_args(root, tmp_path / "run", "--permutation", "off", "--max-steps", "2", "--resume"))


def test_amp_is_refused_where_autocast_does_not_run_and_its_absence_enters_no_context(root, tmp_path, monkeypatch,
                                                                                    cpu_autocast_lstm_runs):
    """Another device type (``meta`` stands in for one, such as Apple's ``mps``): without ``--amp`` no
    autocast context is entered (``torch.autocast`` refuses such a type even disabled, ``mps`` before
    torch 2.5); with it the run stops at once, naming the flag, as does the evaluation of an --amp run."""
    from integrations.ban import train as train_mod
    from integrations.common import CommandError

    with pytest.raises(RuntimeError):
        torch.autocast("meta", enabled=False)
    with train_mod.autocast(torch.device("meta"), False):
        pass
    out = tmp_path / "amp"
    run(_args(root, out, "--permutation", "none", "--amp", "--max-steps", "1"))
    monkeypatch.setattr(train_mod, "resolve_device", lambda name: torch.device("meta"))
    with pytest.raises(CommandError, match="--amp: bfloat16 autocast runs on the CPU and CUDA, not on 'meta'"):
        run(_args(root, tmp_path / "other", "--permutation", "none", "--amp", "--max-steps", "1"))
    assert not (tmp_path / "other").exists()
    with pytest.raises(CommandError, match="was trained with --amp"):
        train_mod.evaluate_run(out, device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("official", [False, True], ids=["self-contained", "official"])
def test_train_command_runs_on_cuda(root, tmp_path, official):
    """``train --device cuda`` for the self-contained and the official model (pinned batches, asynchronous
    copies, the official attention's non-contiguous logits)."""
    extra = []
    if official:
        if not os.environ.get("SETPERM_BAN_ROOT"):
            pytest.skip("SETPERM_BAN_ROOT (a jnhwkim/ban-vqa checkout) not set")
        extra = ["--ban-root", os.environ["SETPERM_BAN_ROOT"]]
    result = run(_args(root, tmp_path, "--permutation", "po-u", *extra, "--max-steps", "2", "--device", "cuda"))
    assert result["step"] == 2
    assert all(p.is_cuda and torch.isfinite(p).all() for p in result["model"].parameters())


# ---------------------------------------------------------------- --ban-root, few boxes, eval splits

def _fake_checkout(folder, base_model="raise ImportError('no module named missing_dependency')\n"):
    """A folder with every file that marks a ban-vqa checkout, whose base_model.py cannot be imported."""
    from integrations.ban.official import REQUIRED_FILES

    folder.mkdir()
    for name in REQUIRED_FILES:
        (folder / name).write_text("")
    (folder / "base_model.py").write_text(base_model)
    return folder


@pytest.mark.parametrize("kind", ["missing", "not-a-checkout"])
def test_a_bad_ban_root_is_one_line_and_creates_no_run_folder(root, tmp_path, capsys, kind):
    bad = tmp_path / "ban-vqa"
    if kind == "not-a-checkout":
        bad.mkdir()
    with pytest.raises(SystemExit):
        _args(root, tmp_path / "run", "--ban-root", str(bad))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --ban-root:" in err and str(bad) in err
    # run() itself (the sweeps call it with their own arguments) refuses before the folder exists
    args = _args(root, tmp_path / "run")
    args.ban_root = str(bad)
    with pytest.raises(CommandError, match="--ban-root: "):
        run(args)
    assert not (tmp_path / "run").exists()


def test_a_checkout_that_cannot_build_the_model_leaves_no_run_behind(root, tmp_path):
    args = _args(root, tmp_path / "run", "--ban-root", str(_fake_checkout(tmp_path / "ban-vqa")))
    with pytest.raises(CommandError, match="--ban-root: could not import the official module 'base_model'"):
        run(args)
    assert not (tmp_path / "run").exists()


def test_ban_root_is_stored_absolute_and_only_the_code_is_compared_on_resume(root, tmp_path, monkeypatch):
    from integrations.common.lifecycle import changed_settings

    checkout = _fake_checkout(tmp_path / "ban-vqa", base_model="")
    monkeypatch.chdir(tmp_path)
    args = _args(root, tmp_path / "run", "--ban-root", "ban-vqa")
    assert args.ban_root == str(checkout.resolve())
    # where the checkout lies is operational; which code it holds is checked on --resume (_same_model_code),
    # not compared with the settings, so that a finished run recorded before the fingerprint still counts
    assert changed_settings({"ban_root": "/a"}, {"ban_root": "/b"}) == {}
    assert changed_settings({}, {"ban_code": "0" * 64}) == {}
    from integrations.ban.train import _same_model_code, run_config

    config = run_config(args, world_size=1, ntoken=3, num_answers=2, v_dim=4)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in checkout.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    _same_model_code({**config, "ban_root": str(moved)}, config)              # same code elsewhere: resumes
    (moved / "counting.py").write_text("# changed\n")
    other = run_config(_args(root, tmp_path / "run", "--ban-root", str(moved)), world_size=1, ntoken=3,
                       num_answers=2, v_dim=4)
    with pytest.raises(RunError, match="--ban-root: .* holds other code"):
        _same_model_code(other, config)
    plain = run_config(_args(root, tmp_path / "run"), world_size=1, ntoken=3, num_answers=2, v_dim=4)
    assert "ban_code" not in plain
    for new, old in ((plain, config), (config, plain)):
        with pytest.raises(RunError, match="--ban-root: the run in .* was started with the"):
            _same_model_code(new, old)


@pytest.mark.skipif(not os.environ.get("SETPERM_BAN_ROOT"), reason="SETPERM_BAN_ROOT (a jnhwkim/ban-vqa checkout) not set")
def test_eval_of_an_official_run_whose_checkout_moved_takes_ban_root_and_checks_its_code(root, tmp_path, capsys):
    """The run stores the checkout's path and code fingerprint; evaluating it after the checkout moved
    works with eval's own --ban-root (the same code elsewhere), and code other than the run's is refused,
    as on --resume."""
    import shutil

    from integrations.ban.cli import main
    from integrations.ban.train import evaluate_run
    from integrations.common import run_command

    checkout = shutil.copytree(os.environ["SETPERM_BAN_ROOT"], tmp_path / "ban-vqa",
                               ignore=shutil.ignore_patterns("data", ".git", "__pycache__"))
    run(_args(root, tmp_path / "run", "--permutation", "po-u", "--ban-root", str(checkout), "--max-steps", "1"))
    before = evaluate_run(tmp_path / "run")
    moved = checkout.rename(tmp_path / "moved")
    capsys.readouterr()
    assert run_command(main, "ban", ["eval", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "e.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ban-root:" in err[0] and str(checkout) in err[0]
    assert run_command(main, "ban", ["eval", "--run", str(tmp_path / "run"), "--ban-root", str(moved),
                                     "--out", str(tmp_path / "e.json")]) == 0
    import json

    after = json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))
    assert after["soft_acc"] == pytest.approx(before["soft_acc"], abs=1e-9) and after["n"] == before["n"]
    with (moved / "counting.py").open("a") as f:
        f.write("# changed\n")
    with pytest.raises(CommandError, match="--ban-root: .* holds other code"):
        evaluate_run(tmp_path / "run", ban_root=str(moved))
    run(_args(root, tmp_path / "plain", "--permutation", "off", "--max-steps", "1"))
    with pytest.raises(CommandError, match="--ban-root: .* self-contained model"):
        evaluate_run(tmp_path / "plain", ban_root=str(moved))


def test_batches_for_the_official_model_have_at_least_ten_boxes(tmp_path):
    from integrations.ban.train import OFFICIAL_MIN_BOXES, make_loader, min_boxes

    data = synth.generate(tmp_path / "few", images=4, val_images=2, questions=2, seed=0, v_dim=8, fixed=False,
                          min_boxes=3, max_boxes=6, max_per_class=2)
    ds = VQAFeatureDataset(data, "train")
    assert min_boxes(_args(data, tmp_path / "run")) == 0
    official = _args(data, tmp_path / "run", "--ban-root", str(_fake_checkout(tmp_path / "ban-vqa")))
    assert min_boxes(official) == OFFICIAL_MIN_BOXES == 10
    for batch in make_loader(ds, 3, shuffle=True, epoch=0, seed=0, rank=0, world=1, min_boxes=min_boxes(official)):
        assert batch.v.shape[1] == 10 and batch.b.shape[1] == 10
        real = batch.mask.sum(1)
        assert real.max() <= 6
        for i, n in enumerate(real.tolist()):           # the added rows are padding: zero and masked
            assert batch.v[i, n:].abs().sum() == 0 and batch.b[i, n:].abs().sum() == 0
            assert not batch.mask[i, n:].any()


@pytest.mark.skipif(not os.environ.get("SETPERM_BAN_ROOT"), reason="SETPERM_BAN_ROOT (a jnhwkim/ban-vqa checkout) not set")
@pytest.mark.parametrize("permutation", ["off", "po-u"])
def test_official_model_trains_on_images_with_fewer_than_ten_boxes(tmp_path, permutation):
    from integrations.ban.train import model_inputs

    data = synth.generate(tmp_path / "few", images=6, val_images=2, questions=3, seed=1, v_dim=32, fixed=False,
                          min_boxes=3, max_boxes=9, max_per_class=2)
    args = parse_args(["--data-root", str(data), "--out", str(tmp_path / "run"), *SMALL, "--permutation",
                       permutation, "--ban-root", os.environ["SETPERM_BAN_ROOT"], "--epochs", "1"])
    result = run(args)
    assert result["finished"] and np.isfinite(result["history"][-1]["train_loss"])
    # the padding is exact: more zero boxes do not change the official model's outputs
    ds = VQAFeatureDataset(data, "val")
    model = result["model"].eval()
    items = [ds[i] for i in range(len(ds))]
    with torch.no_grad():
        outs = [model(bt.v, bt.b, bt.q, None, **model_inputs(model, None, bt, torch.device("cpu")))[0]
                for bt in (collate_vqa(items, min_boxes=10), collate_vqa(items, min_boxes=14))]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_eval_and_predict_of_a_checkpoint_of_another_integration_are_one_line(root, tmp_path, capsys):
    from integrations.ban.cli import main
    from integrations.sorting.cli import main as sorting_main

    assert sorting_main(["train", "-N", "3", "--train-sets", "128", "--batch-size", "64",
                         "--out", str(tmp_path / "sorting")]) == 0
    capsys.readouterr()
    # the BAN run's own settings are what load_run reads: a fresh run of it has every one of them
    run(_args(root, tmp_path / "ban", "--permutation", "off", "--max-steps", "1"))
    assert main(["eval", "--run", str(tmp_path / "ban")]) == 0
    capsys.readouterr()
    for command in ("eval", "predict"):
        assert run_command(main, "ban", [command, "--run", str(tmp_path / "sorting")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a checkpoint of a BAN run (its config lacks data_root" in err[0], err


def test_eval_refuses_an_unknown_split_and_a_split_without_answers(root, tmp_path, capsys):
    from integrations.ban.cli import main
    from integrations.ban.train import evaluate_run
    from integrations.common import run_command

    run(_args(root, tmp_path / "run", "--permutation", "off", "--max-steps", "1"))
    with pytest.raises(SystemExit):
        main(["eval", "--run", str(tmp_path / "run"), "--split", "bogus"])
    assert "argument --split: invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(CommandError, match="--split test2015: the test splits have no answers"):
        evaluate_run(tmp_path / "run", split="test2015")
    assert run_command(main, "ban", ["eval", "--run", str(tmp_path / "run"), "--split", "test-dev2015"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--split test-dev2015: the test splits have no answers" in err[0]
    assert not (tmp_path / "run" / "eval_test-dev2015.json").exists()


def _test_split_from_val(root, dest):
    """A copy of the data whose test splits are val's images and questions (test-dev2015: every other
    question), laid out as the official converters write them: no test-dev feature files, no targets."""
    import shutil

    shutil.copytree(root, dest)
    shutil.copy(dest / "val.hdf5", dest / "test2015.hdf5")
    shutil.copy(dest / "val_imgid2idx.pkl", dest / "test2015_imgid2idx.pkl")
    questions = json.loads((dest / QUESTION_FILES["val"]).read_text(encoding="utf-8"))["questions"]
    for split, qs in (("test2015", questions), ("test-dev2015", questions[::2])):
        (dest / QUESTION_FILES[split]).write_text(json.dumps({"questions": qs}), encoding="utf-8")
    return dest, sorted(q["question_id"] for q in questions)


def test_predict_writes_the_evaluation_servers_answers_for_every_split(root, tmp_path, capsys):
    from integrations.ban.cli import main
    from integrations.ban.data import load_answers
    from integrations.ban.train import evaluate_run

    data, qids = _test_split_from_val(root, tmp_path / "data")
    run(_args(data, tmp_path / "run", "--permutation", "po-u", "--max-steps", "2"))
    answers = {}
    for split in ("val", "test2015", "test-dev2015"):
        assert main(["predict", "--run", str(tmp_path / "run"), "--split", split, "--batch-size", "3"]) == 0
        assert f"results: {tmp_path / 'run' / f'answers_{split}.json'}" in capsys.readouterr().out
        answers[split] = json.loads((tmp_path / "run" / f"answers_{split}.json").read_text(encoding="utf-8"))
    _, label2ans = load_answers(data)
    for split, want in (("val", qids), ("test2015", qids), ("test-dev2015", sorted(qids[::2]))):
        assert sorted(a["question_id"] for a in answers[split]) == want
        assert all(set(a) == {"question_id", "answer"} and a["answer"] in label2ans for a in answers[split])
    # the same questions on the same images get the same answers, in any split and batch
    val = {a["question_id"]: a["answer"] for a in answers["val"]}
    assert {a["question_id"]: a["answer"] for a in answers["test2015"]} == val
    assert all(val[a["question_id"]] == a["answer"] for a in answers["test-dev2015"])
    # and they are the answers eval scores: their mean soft score is eval's accuracy
    import pickle

    with open(data / "cache" / "val_target.pkl", "rb") as fh:
        targets = {t["question_id"]: dict(zip(t["labels"], t["scores"])) for t in pickle.load(fh)}
    ans2label = {a: i for i, a in enumerate(label2ans)}
    score = sum(targets[q].get(ans2label[a], 0.0) for q, a in val.items()) / len(val)
    assert score == pytest.approx(evaluate_run(tmp_path / "run", split="val")["soft_acc"], abs=1e-6)
    # an existing file is kept without --overwrite
    assert run_command(main, "ban", ["predict", "--run", str(tmp_path / "run"), "--split", "val"]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_the_usage_names_every_command():
    import argparse

    from integrations.ban.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    usage = parser.format_usage()
    assert "predict" in commands
    assert all(name in usage for name in commands), (sorted(commands), usage)
