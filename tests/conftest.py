import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# The Triton decode kernel runs on CPU tensors under Triton's interpreter, which must be on before the kernel's module
# is imported (it is imported on first use). Only the tests that name the `triton` backend run it; on CPU every
# default stays `torch`. On a CUDA machine the kernel compiles for real.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist (`-n auto`, as README and CI run the tests) each worker takes one core: torch's own threads
# on top of a worker per core would only contend. Commands the tests start inherit the setting.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    __import__("torch").set_num_threads(1)

# End-to-end tests: each starts the `headprof` command (or torchrun) in a subprocess, or loads a real model from a
# shipped package. `python -m pytest -q -m "not slow"` skips them for a quick check while developing; CI runs all.
SLOW_MODULES = {"test_cli", "test_distributed", "test_real_model", "test_api_docs"}
SLOW_TESTS = {"test_eval_cli_writes_outputs_and_refuses_bad_input", "test_cli_artefact_commands_and_bad_inputs",
              "test_check_passes_on_rescore_and_fails_on_changed_model",
              "test_combine_results_refuses_in_one_line_and_writes_nothing"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
