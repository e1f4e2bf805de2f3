"""Third-party output (warnings, transformers' logs and progress bars, the GGUF conversion's tqdm bar) kept
away from users: the CLI calls `third_party()` unless --verbose, and so do the benchmarks, whose figures are
the only thing they print (set HEADPROF_VERBOSE=1 to see everything)."""

from __future__ import annotations

import functools
import os
import sys
import warnings


def third_party() -> None:
    """Silence third-party warnings, logs and progress bars for this process (and the children it starts)."""
    if os.environ.get("HEADPROF_VERBOSE"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    import tqdm.std  # transformers' GGUF conversion draws a tqdm bar of its own

    if not getattr(tqdm.std.tqdm.__init__, "_headprof_quiet", False):
        quiet_init = functools.partialmethod(tqdm.std.tqdm.__init__, disable=True)
        quiet_init._headprof_quiet = True  # type: ignore[attr-defined]
        tqdm.std.tqdm.__init__ = quiet_init
    if "transformers" not in sys.modules and "huggingface_hub" not in sys.modules:
        # read when they are imported: a command that never loads a model (show, compare) never imports them
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
