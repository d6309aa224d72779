"""integrations.mosaic.collect: the README's tables from the run folders' summaries."""
import json

from integrations.common import run_command
from integrations.mosaic.collect import main

PROG = "python -m integrations.mosaic.collect"


def test_tables_take_each_runs_final_metrics_and_mark_missing_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "mnist-3-po-la").mkdir(parents=True)                  # a run that has not finished: no summary
    (runs / "mnist-3-po-u").mkdir()
    final = {"mse": 0.01234, "acc_perm": 0.5, "acc_pixel": 0.25, "train_seconds": 12.5}
    (runs / "mnist-3-po-u" / "summary.json").write_text(
        json.dumps({"final": final, "n_train": 100, "n_test": 50, "config": {"epochs": 2}}), encoding="utf-8")
    assert run_command(main, PROG, [str(runs)]) == 0
    out = capsys.readouterr().out
    assert "| model | MNIST 3x3 |" in out
    assert "| PO-U | 0.012 |" in out and "| PO-U | 50.0 |" in out and "| PO-U | 25.0 |" in out
    assert "| PO-LA | – |" in out and "| LinAssign | – |" in out
    assert "| mnist-3-po-u | 100 | 2 | 50 | 12.5 |" in out
    assert f"(no classification runs in {runs})" in out                    # Tables 2 and 5


def test_a_missing_runs_folder_is_one_line(tmp_path, capsys):
    assert run_command(main, PROG, [str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such folder" in err[0]
