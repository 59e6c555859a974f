"""The README's Python example runs as written."""

import re
from pathlib import Path

import numpy as np

from tests.conftest import to_numpy

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


def test_readme_downstream_example_runs(monkeypatch, tmp_path):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (downstream,) = [b for b in blocks if b.startswith("# Continues the quickstart")]
    monkeypatch.chdir(ROOT)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    exec(compile(downstream.replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), namespace)
    assert tuple(namespace["pooled"].shape) == (2, 64)
    assert namespace["fx"].shape == (128, 16, 64)
    assert (tmp_path / "adapters.lora.h5").exists()
    plain = namespace["plain"]
    images = namespace["images"]
    np.testing.assert_allclose(
        to_numpy(plain(images)), to_numpy(namespace["backbone"](images)), atol=1e-5
    )
