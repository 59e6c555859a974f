"""The README's Python example runs as written."""

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs(monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(ROOT)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 10)
    assert tuple(namespace["tokens"].shape) == (2, 16, 64)
    assert len(namespace["blocks"]) == 2
    assert np.isfinite(namespace["logits"]).all()
