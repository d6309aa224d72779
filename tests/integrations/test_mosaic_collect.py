"""integrations.mosaic.collect: the README's tables from the run folders' summaries."""
import json

import pytest

from integrations.common import run_command
from integrations.mosaic.collect import main

PROG = "python -m integrations.mosaic.collect"


def _run(folder, *, task="mosaic", dataset="mnist", tiles=3, permutation="po-u", final=None, epochs=2):
    """A run folder as ``integrations.mosaic train`` leaves it: config.json, and summary.json once finished."""
    cfg = {"task": task, "dataset": dataset, "tiles": tiles, "permutation": permutation, "epochs": epochs}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    if final is not None:
        (folder / "summary.json").write_text(
            json.dumps({"final": final, "n_train": 100, "n_test": 50, "finished": True, "config": cfg}),
            encoding="utf-8")


def test_tables_take_each_runs_final_metrics_and_mark_missing_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(runs / "mnist-3-po-la", permutation="po-la")                 # a run that has not finished: no summary
    _run(runs / "mnist-3-po-u", final={"mse": 0.01234, "acc_perm": 0.5, "acc_pixel": 0.25, "train_seconds": 12.5})
    assert run_command(main, PROG, [str(runs)]) == 0
    out = capsys.readouterr().out
    assert "| model | MNIST 3x3 |" in out
    assert "| PO-U | 0.012 |" in out and "| PO-U | 50.0 |" in out and "| PO-U | 25.0 |" in out
    assert "| PO-LA | – |" in out and "| LinAssign | – |" in out
    assert "| mnist-3-po-u | 100 | 2 | 50 | 12.5 |" in out
    assert f"(no classification runs in {runs})" in out                    # Tables 2 and 5


def test_runs_are_recognised_by_their_config_whatever_the_folder_name(tmp_path, capsys):
    # the default --out names of `train` (runs/mosaic/<dataset>-<n>x<n>-<task>-<permutation>) and any other
    runs = tmp_path / "runs"
    _run(runs / "mnist-3x3-mosaic-po-la", permutation="po-la", final={"mse": 0.002, "acc_perm": 0.7})
    _run(runs / "my classifier run", task="classify", dataset="cifar10", tiles=2, permutation="linassign",
         final={"acc": 0.367, "acc_max": 0.464, "acc_min": 0.292, "mse_soft": 0.567, "mse_min": 1.12})
    _run(runs / "mnist-3x3-pretrain-resnet", task="pretrain", permutation="po-u", final={"acc": 0.9})
    (runs / "logs").mkdir()                                                 # not a run: no config.json
    assert run_command(main, PROG, [str(runs)]) == 0
    out = capsys.readouterr().out
    assert "no mosaic runs" not in out and "no classification runs" not in out
    assert "| PO-LA | 0.002 |" in out and "| PO-LA | 70.0 |" in out
    assert "| model | CIFAR-10 subset 2x2 |" in out
    assert "| max | 46.4 |" in out and "| min | 29.2 |" in out and "| LinAssign | 36.7 |" in out
    assert "| max | 0.000 |" in out and "| min | 1.120 |" in out and "| LinAssign | 0.567 |" in out
    assert "| mnist-3x3-pretrain-resnet | 100 | 2 | 50 | None |" in out


def test_several_runs_of_one_cell_show_the_first_and_name_the_others(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(runs / "a", final={"mse": 0.1})
    _run(runs / "b", final={"mse": 0.2}, epochs=20)
    assert run_command(main, PROG, [str(runs)]) == 0
    out = capsys.readouterr().out
    assert "| PO-U | 0.100 |" in out and "shown: a (left out: b)" in out


def test_a_missing_runs_folder_is_one_line(tmp_path, capsys):
    assert run_command(main, PROG, [str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such folder" in err[0]


def test_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {PROG} [-h] [runs]")
