"""The README's example runs as written (on the real Fashion-MNIST files when present)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed"
)
def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.splitlines()
    assert float(out[0]) < 1e-5  # widen + deepen preserved the function
    assert [line.split()[2] for line in out[1:]] == ["widen", "deepen", "sparsify"]
    assert (tmp_path / "ckpt" / "arch.json").is_file()
