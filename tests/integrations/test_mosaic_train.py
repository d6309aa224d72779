"""Models, training, resume, eval and figures of integrations.mosaic (short CPU runs on real MNIST slices)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import setperm
from integrations.common import run_command
from integrations.mosaic.__main__ import PROG, main
from integrations.common.datasets import DataFormatError
from integrations.mosaic.model import ClassifyNet, MosaicNet
from integrations.mosaic.resnet import ResNet18
from integrations.mosaic.tiles import random_permutations, shuffle_tiles, target_index

DATA = Path(os.environ.get("SETPERM_DATA_ROOT", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))


@pytest.fixture(scope="module")
def data_root() -> str:
    if not (DATA / "mnist").exists():
        pytest.skip(f"shared data folder {DATA / 'mnist'} is absent (set SETPERM_DATA_ROOT)")
    return str(DATA)


def _metrics(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))["final"]


@pytest.mark.parametrize("permutation", ["linassign", "po-u", "po-la"])
def test_mosaic_net_shapes_and_convention(permutation):
    torch.manual_seed(0)
    n = 3
    net = MosaicNet(n, 1, 10, permutation, conv_channels=4, cost_hidden=8)
    tiles = torch.randn(5, n * n, 1, 10, 10)
    recon, P = net(tiles)
    assert recon.shape == tiles.shape and P.shape == (5, 9, 9)
    torch.testing.assert_close(P.sum(1), torch.ones(5, 9), rtol=0, atol=1e-3)  # every position filled once
    torch.testing.assert_close(recon, setperm.functional.apply_permutation(tiles, P), rtol=0, atol=0)
    steps = net.permutation(tiles, return_steps=True)
    assert len(steps) == (1 if permutation == "linassign" else 5)  # S(P~(0)), ..., S(P~(T)), T = 4
    torch.testing.assert_close(steps[-1], P, rtol=0, atol=1e-6)
    if permutation == "po-u":  # PO-U starts from the uniform assignment (paper figures 12-19, top row)
        torch.testing.assert_close(steps[0], torch.full_like(P, 1 / 9), rtol=0, atol=1e-6)


def test_target_permutation_is_recovered_by_hungarian():
    g = torch.Generator().manual_seed(3)
    tiles = torch.randn(4, 9, 1, 5, 5)
    perm = random_permutations(4, 9, g)
    shuffled = shuffle_tiles(tiles, perm)
    P = torch.zeros(4, 9, 9).scatter_(2, perm.unsqueeze(2), 1.0)  # element i belongs at position perm[i]
    noisy = 0.8 * P + 0.2 * torch.rand(4, 9, 9, generator=g) / 9
    assert torch.equal(setperm.functional.hungarian(noisy), target_index(perm))
    torch.testing.assert_close(setperm.functional.apply_permutation(shuffled, P), tiles, rtol=0, atol=1e-6)


def test_resnet18_stems():
    small = ResNet18(1, 10, small_input=True, width=8)
    assert small(torch.randn(2, 1, 30, 30)).shape == (2, 10)
    big = ResNet18(3, 200, small_input=False, width=8)
    assert big(torch.randn(2, 3, 66, 66)).shape == (2, 200)
    assert big.stem[0].stride == (2, 2) and small.stem[0].stride == (1, 1) and small.stem[0].kernel_size == (3, 3)


def test_mnist_2x2_becomes_solvable(tmp_path, data_root):
    """A few hundred MNIST images, 3 short epochs: PO-LA places every tile correctly far above chance (1/24)."""
    out = tmp_path / "po-la"
    main(["train", "--dataset", "mnist", "--tiles", "2", "--permutation", "po-la", "--epochs", "3", "--subset", "384",
          "--test-subset", "300", "--data-root", data_root, "--out", str(out), "--seed", "0"])
    m = _metrics(out)
    assert m["acc_perm"] > 0.5, m
    assert m["acc_pixel"] >= m["acc_perm"]  # a correct permutation always reconstructs the image exactly
    assert m["mse"] < 0.5, m                 # a random assignment gives about 1.6 on normalised MNIST
    assert (out / "config.json").is_file() and any((out / "tb").iterdir())


def test_resume_is_exact(tmp_path, data_root):
    common = ["--dataset", "mnist", "--tiles", "3", "--permutation", "po-u", "--subset", "96", "--test-subset", "50",
              "--data-root", data_root, "--checkpoint-every", "0", "--log-every", "1"]
    main(["train", *common, "--epochs", "2", "--out", str(tmp_path / "a")])
    main(["train", *common, "--epochs", "1", "--out", str(tmp_path / "b")])
    main(["train", *common, "--epochs", "2", "--out", str(tmp_path / "b"), "--resume"])
    a = torch.load(sorted((tmp_path / "a" / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    b = torch.load(sorted((tmp_path / "b" / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert _metrics(tmp_path / "a")["mse"] == _metrics(tmp_path / "b")["mse"]
    # eval and figures rebuild the model from the resolved config saved with the checkpoint
    main(["eval", "--run", str(tmp_path / "a"), "--test-subset", "50"])       # data settings from the run
    evaluated = json.loads((tmp_path / "a" / "eval.json").read_text(encoding="utf-8"))
    assert evaluated["mse"] == pytest.approx(_metrics(tmp_path / "a")["mse"])
    png = tmp_path / "fig.png"
    main(["figures", "--run", str(tmp_path / "a"), "--num-examples", "3", "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classify_trains_only_the_permutation(tmp_path, data_root, capsys):
    pre = tmp_path / "pre"
    main(["train", "--task", "pretrain", "--dataset", "mnist", "--tiles", "2", "--resnet-width", "4", "--epochs", "1",
          "--subset", "64", "--test-subset", "32", "--data-root", data_root, "--out", str(pre),
          "--checkpoint-every", "1"])
    assert {"acc", "acc_min"} <= set(_metrics(pre))
    cls = tmp_path / "cls"
    main(["train", "--task", "classify", "--classifier", str(pre), "--permutation", "po-la", "--dataset", "mnist",
          "--tiles", "2", "--epochs", "1", "--subset", "64", "--test-subset", "32", "--data-root", data_root,
          "--out", str(cls)])
    m = _metrics(cls)
    assert {"acc", "acc_max", "acc_min", "mse_soft", "acc_perm"} <= set(m)
    before = torch.load(sorted((pre / "checkpoints").glob("*.pt"))[-1], weights_only=True)["model"]
    after = torch.load(sorted((cls / "checkpoints").glob("*.pt"))[-1], weights_only=True)["model"]
    for k, v in before.items():  # frozen ResNet: weights and batch-norm statistics unchanged
        torch.testing.assert_close(after[f"classifier.{k}"], v, rtol=0, atol=0, msg=k)
    changed = [k for k in after if k.startswith("mosaic.") and k.endswith("weight")]
    assert changed
    # the width recorded is the one built: the classifier's, not the flag's default
    assert json.loads((cls / "config.json").read_text(encoding="utf-8"))["resnet_width"] == 4
    assert "warning" not in capsys.readouterr().err                  # a finished pretrain run
    with pytest.raises(ValueError, match="--resnet-width 8: the --classifier ResNet-18 .* has width 4"):
        main(["train", "--task", "classify", "--classifier", str(pre), "--resnet-width", "8", "--dataset", "mnist",
              "--tiles", "2", "--subset", "8", "--data-root", data_root, "--out", str(tmp_path / "bad"), "--epochs", "1"])
    # a checkpoint from the middle of the pretrain run (batch 1 of its only epoch) is used, with a warning
    mid = pre / "checkpoints" / "step_00000001.pt"
    assert mid.is_file()
    main(["train", "--task", "classify", "--classifier", str(mid), "--resnet-width", "4", "--dataset", "mnist",
          "--tiles", "2", "--epochs", "1", "--subset", "8", "--test-subset", "8", "--data-root", data_root,
          "--out", str(tmp_path / "early")])
    warn = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "epoch 0 (batch 1) of 1" in warn[0] and "not finished" in warn[0], warn
    with pytest.raises(ValueError, match="--classifier"):
        main(["train", "--task", "classify", "--classifier", str(cls), "--dataset", "mnist", "--tiles", "2",
              "--subset", "8", "--data-root", data_root, "--out", str(tmp_path / "bad"), "--epochs", "1"])
    with pytest.raises(ValueError, match="tiles=2, this run has 3"):
        main(["train", "--task", "classify", "--classifier", str(pre), "--dataset", "mnist", "--tiles", "3",
              "--subset", "8", "--data-root", data_root, "--out", str(tmp_path / "bad"), "--epochs", "1"])
    assert not (tmp_path / "bad").exists()          # a start that fails leaves no run folder behind


def test_a_failed_start_is_one_line_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code = run_command(main, PROG, ["train", "--dataset", "mnist", "--data-root", str(tmp_path / "typo"),
                                    "--out", str(out)], errors=(DataFormatError,))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "typo/mnist: data folder for mnist not found" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("task", ["mosaic", "classify"])
def test_po_u_without_inner_steps_is_refused_before_the_run_starts(tmp_path, data_root, capsys, task):
    """PO-U with T = 0 is the uniform P whatever its weights, so no parameter reaches the loss (a
    backward traceback otherwise): an argparse error naming --steps, exit 2, nothing written."""
    out = tmp_path / "run"
    argv = ["train", "--task", task, "--permutation", "po-u", "--steps", "0", "--data-root", data_root,
            "--subset", "32", "--test-subset", "8", "--epochs", "1", "--out", str(out)] + (["--classifier", str(tmp_path / "pre")] if task == "classify" else [])
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert "argument --steps: PO-U needs T >= 1" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("clip, says", [("5", "PO-U starts from zero logits"), ("nan", "must be a finite number")])
def test_a_logit_clip_that_would_not_apply_is_refused(tmp_path, data_root, capsys, clip, says):
    """PO-U has no linear-assignment logits to clip, and NaN is no clip value: argparse errors naming
    --logit-clip (both were taken as 'no clip' before, the PO-U one recorded in the config)."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        main(["train", "--permutation", "po-u", "--logit-clip", clip, "--data-root", data_root,
              "--subset", "32", "--test-subset", "8", "--epochs", "1", "--out", str(out)])
    assert err.value.code == 2
    assert f"argument --logit-clip: {says}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("task, flag, says", [
    ("pretrain", ["--classifier", "pre"], "--classifier: only the classify task reads a classifier"),
    ("mosaic", ["--resnet-width", "16"], "--resnet-width: the mosaic task has no ResNet-18")])
def test_a_flag_the_task_does_not_read_is_refused(tmp_path, data_root, capsys, task, flag, says):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        main(["train", "--task", task, *flag, "--data-root", data_root, "--subset", "32", "--test-subset", "8",
              "--epochs", "1", "--out", str(out)])
    assert err.value.code == 2 and f"argument {says}" in capsys.readouterr().err
    assert not out.exists()


def test_classify_net_freezes_classifier():
    net = ClassifyNet(MosaicNet(2, 1, 4, "po-u", conv_channels=2, cost_hidden=4), ResNet18(1, 10, width=4))
    net.train()
    assert not net.classifier.training and net.mosaic.training
    assert all(not p.requires_grad for p in net.classifier.parameters())


def test_a_non_finite_loss_stops_the_run_before_the_update(tmp_path, data_root, monkeypatch, capsys):
    import integrations.mosaic.train as mosaic_train
    from integrations.common import load_latest, run_command
    from integrations.mosaic.__main__ import PROG

    common = ["train", "--dataset", "mnist", "--tiles", "2", "--permutation", "po-u", "--subset", "32",
              "--test-subset", "16", "--batch-size", "8", "--data-root", data_root, "--checkpoint-every", "2",
              "--out", str(tmp_path / "run")]
    assert run_command(main, PROG, [*common, "--epochs", "1"]) == 0                     # 4 steps
    real = mosaic_train._loss
    monkeypatch.setattr(mosaic_train, "_loss", lambda *a: (real(*a)[0] * float("nan"), {}))
    assert run_command(main, PROG, [*common, "--epochs", "2", "--resume"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the loss is nan at step 5" in last and "epoch 1, batch 0" in last and "Traceback" not in last
    kept = load_latest(tmp_path / "run")
    assert kept["step"] == 4 and all(torch.isfinite(v).all() for v in kept["model"].values())


def test_train_eval_and_figures_run_on_every_device(tmp_path, data_root, device):
    """A mosaic run (PO-U on a lattice) and a pretrain run trained on the device; eval on the device,
    figures from the same checkpoint."""
    out = tmp_path / "po-u"
    common = ["--dataset", "mnist", "--tiles", "2", "--subset", "64", "--test-subset", "32", "--data-root", data_root,
              "--epochs", "1", "--device", str(device)]
    main(["train", *common, "--permutation", "po-u", "--out", str(out)])
    assert {"mse", "acc_perm"} <= set(_metrics(out))
    main(["eval", "--run", str(out), "--device", str(device)])
    evaluated = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert evaluated["mse"] == pytest.approx(_metrics(out)["mse"], rel=1e-4)
    main(["figures", "--run", str(out), "--num-examples", "2", "--out", str(tmp_path / "fig.png")])
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(["train", *common, "--task", "pretrain", "--resnet-width", "4", "--out", str(tmp_path / "pre")])
    assert {"acc", "acc_min"} <= set(_metrics(tmp_path / "pre"))


def test_eval_and_figures_of_a_classify_run_need_only_its_own_checkpoint(tmp_path, data_root, monkeypatch):
    """The classify checkpoint holds the frozen ResNet-18: eval and figures work from another working
    directory and after the --classifier run has moved (its stored path is relative and now stale)."""
    monkeypatch.chdir(tmp_path)
    common = ["--dataset", "mnist", "--tiles", "2", "--epochs", "1", "--subset", "32", "--test-subset", "16",
              "--data-root", data_root]
    main(["train", "--task", "pretrain", "--resnet-width", "4", *common, "--out", "pre"])
    main(["train", "--task", "classify", "--classifier", "pre", "--permutation", "po-la", *common, "--out", "cls"])
    (tmp_path / "pre").rename(tmp_path / "pre-moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = str(tmp_path / "cls")
    main(["eval", "--run", run])
    evaluated = json.loads((tmp_path / "cls" / "eval.json").read_text(encoding="utf-8"))
    final = _metrics(tmp_path / "cls")
    for k in ("acc", "acc_max", "acc_min", "mse_soft"):
        assert evaluated[k] == pytest.approx(final[k], rel=1e-6, abs=1e-9), k
    main(["figures", "--run", run, "--num-examples", "2", "--out", "fig.png"])
    assert (elsewhere / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_of_a_checkpoint_of_another_integration_is_one_line(tmp_path, capsys):
    from integrations.sorting.train import train as train_sorting

    sort_run = tmp_path / "sort"
    train_sorting(dict(set_size=4, permutation="po-u", steps=2, lr=0.1, batch_size=8, cost_hidden=4, eta_init=1.0,
                       sinkhorn_iters=2, temperature=1.0, seed=0, device="cpu", resume=False, overwrite=False,
                       checkpoint_every=1, stop_at=None, threads=None, micro_batch=None, train_sets=8,
                       out=str(sort_run)), log=lambda s: None)
    capsys.readouterr()
    for cmd in ("eval", "figures"):
        code = run_command(main, PROG, [cmd, "--run", str(sort_run), "--out", str(tmp_path / f"x-{cmd}")],
                           errors=(DataFormatError,))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1, err
        assert f"--run {sort_run}" in err[0] and "not a checkpoint of a mosaic run" in err[0], err


def test_a_mosaic_run_that_recorded_another_resnet_width_resumes(tmp_path, data_root):
    """The mosaic task has no ResNet-18, so --resnet-width is refused there; a run started before that
    recorded the width it was given, which must not keep it from resuming without the flag."""
    out = tmp_path / "run"
    common = ["train", "--task", "mosaic", "--permutation", "po-u", "--data-root", data_root, "--subset", "32",
              "--test-subset", "8", "--batch-size", "16", "--conv-channels", "2", "--cost-hidden", "4", "--steps", "1",
              "--out", str(out)]
    main([*common, "--epochs", "1"])
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["resnet_width"] == 64
    config["resnet_width"] = 16                     # as recorded by a run started with --resnet-width 16
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    main([*common, "--epochs", "2", "--resume"])
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["config"]["epochs"] == 2
