"""The registry is the one list of methods: the CLI, run, eval and the docs follow it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import loaded

from headprof import evaluate, generation, methods
from headprof.allocate import BudgetError

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_registered_method_is_documented_and_listed_in_errors():
    table = (DOCS / "run.md").read_text()
    for name in methods.names():
        assert f"| `{name}` |" in table, name
    with pytest.raises(BudgetError) as e:
        methods.get("magic")
    assert all(n in str(e.value) for n in methods.names())
    assert methods.names()[0] == "full"


def test_a_new_method_is_one_class_and_runs_everywhere():
    @methods.register
    class Oldest(methods.Method):
        name = "oldest"
        summary = "the first b tokens"

        def choose(self, plan, layer, probs):
            return [torch.arange(int(b)) for b in plan.budgets[layer]]

    try:
        lm = loaded("llama")
        ids = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(0)).tolist()
        r = generation.generate(lm, ids, "oldest", 20, window=8, max_new_tokens=3)
        assert r.budgets == [[12, 12]] * 3 and r.kv_bytes <= 1.05 * r.kv_bytes_ideal
        assert evaluate.parse_methods("full,oldest", {}) == ["full", "oldest"]
        assert methods.parse_spec("headkv-r2")[1] == "r2" and methods.parse_spec("oldest")[1] is None
    finally:
        methods.REGISTRY.pop("oldest")


def test_adaptive_budgets_are_reported_without_mutating_the_plan():
    lm = loaded("llama")
    ids = torch.randint(0, 96, (80,), generator=torch.Generator().manual_seed(1)).tolist()
    r = generation.generate(lm, ids, "adakv", 24, window=8, max_new_tokens=3)
    kept = np.array(r.budgets)
    assert kept.sum() == 3 * 2 * 16  # each layer's pool (b x heads) is spent exactly
    assert r.kv_entries == r.kv_entries_ideal
