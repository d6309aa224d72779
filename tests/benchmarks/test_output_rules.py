"""The benchmarks follow the commands' output rules: an earlier result is kept unless --overwrite,
and a request that cannot run is refused in one line before anything is measured."""
import json

from benchmarks import layer
from integrations.common import run_command

TINY = ["--tiny", "--no-memory", "--no-compiled", "--repeats", "1", "--warmup", "0"]


def _layer(capsys, *argv):
    code = run_command(layer.main, "python -m benchmarks.layer", [*TINY, *argv])
    return code, capsys.readouterr().err.strip().splitlines()


def test_an_earlier_result_is_kept_unless_overwrite(tmp_path, capsys):
    assert _layer(capsys, "--out", str(tmp_path))[0] == 0
    result = tmp_path / "layer_tiny.json"
    first = result.read_bytes()
    code, err = _layer(capsys, "--out", str(tmp_path))
    assert code == 1 and "already exists" in err[-1] and "--overwrite" in err[-1]
    assert result.read_bytes() == first
    assert _layer(capsys, "--out", str(tmp_path), "--overwrite")[0] == 0
    assert json.loads(result.read_text(encoding="utf-8"))["rows"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temporary file left


def test_requests_that_cannot_run_are_one_line(tmp_path, capsys):
    code, err = _layer(capsys, "--out", str(tmp_path), "--only", "no such configuration")
    assert code == 1 and len(err) == 1 and "matches no configuration" in err[0] and "'tiny vqa'" in err[0]
    a_file = tmp_path / "file"
    a_file.write_text("", encoding="utf-8")
    code, err = _layer(capsys, "--out", str(a_file))
    assert code == 1 and len(err) == 1 and "is a file, not a folder" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_busy_core_reports_a_slowdown_per_call(tmp_path, capsys):
    assert _layer(capsys, "--out", str(tmp_path), "--only", "tiny sort", "--busy-core")[0] == 0
    data = json.loads((tmp_path / "layer_tiny.json").read_text(encoding="utf-8"))
    row = data["rows"][0]
    assert row["fb_busy_ms"] > 0 and abs(row["fb_busy_slowdown"] - row["fb_busy_ms"] / row["fb_ms"]) < 1e-9
    assert "| fwd+bwd ms, one core busy | fwd+bwd slowdown, one core busy |" in data["table"].splitlines()[0]
