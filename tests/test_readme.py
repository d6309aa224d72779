"""The README's usage example runs as written."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    ns = {}
    exec(compile(blocks[0], str(README), "exec"), ns)
    out = capsys.readouterr().out
    assert "torch.Size([4, 128])" in out
    # what the example's comments promise: the shapes, y[b, k] = sum_i P[b, i, k] x[b, i], eta starting
    # at 1.0, and idx[b] a permutation of the positions
    x, P, idx = ns["x"], ns["P"], ns["idx"]
    assert ns["h"].shape == (4, 128) and P.shape == (4, 10, 10) and idx.shape == (4, 10)
    torch.testing.assert_close(ns["y"], torch.einsum("bik,bid->bkd", P, x))
    assert out.split()[2] == "1.0"
    assert all(sorted(row.tolist()) == list(range(10)) for row in idx)


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    tomllib = pytest.importorskip("tomllib")
    m = re.search(r'pip install ("torch==[^"]+") -e "\.\[(\w+)\]" && python -m pytest -q',
                  README.read_text(encoding="utf-8"))
    assert m, "README has no install-and-test command"
    pin, extra = m.groups()
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert f'python3 -m pip install -q {pin} -e ".[{extra}]"' in ci and "\npython3 -m pytest -q\n" in ci
    project = tomllib.loads((README.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(dep.startswith("pytest") for dep in project["optional-dependencies"][extra])


def test_readme_states_install_and_test_commands():
    text = README.read_text(encoding="utf-8")
    assert 'pip install "torch==2.13.0" -e ".[test]" && python -m pytest -q' in text
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "python3 -m pytest -q" in ci and '"torch==2.13.0" -e ".[test]"' in ci
