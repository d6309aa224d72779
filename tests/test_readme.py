"""The README's usage example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([4, 128])" in out


def test_readme_states_install_and_test_commands():
    text = README.read_text()
    assert 'pip install "torch==2.13.0" -e ".[test]" && python -m pytest -q' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in ci and '"torch==2.13.0" -e ".[test]"' in ci
