"""The Python API: what the CLI calls, for users' own code (a notebook, an eval harness, a generate loop).

Every function takes a model spec (hub id, directory, .gguf file, shipped alias) or a model already
loaded with `load_model`, returns values (dataclasses, `Profile`), raises `HeadprofError` subclasses
with one-line messages, reports long work through a `progress` callback, and never prints.

Names load on first use (PEP 562): reading a profile (`summarise`, `heatmap`, `compare_profiles`, import and
export) imports neither torch nor transformers (0.3 s here), and `headprof show` never imports transformers.
"""

from __future__ import annotations

import importlib

_OWNERS = {
    "headprof.api.artefacts": ["compare_profiles", "export_files", "export_profile", "heatmap", "import_profile",
                               "summarise"],
    "headprof.api.common": ["check_writable", "describe_model", "load_model", "main_process", "method_names",
                            "model_path", "partial_path", "read_prompt", "read_prompts", "write_output"],
    "headprof.api.evaluation": ["DEFAULT_EVAL_METHODS", "EvalReport", "eval_profiles", "evaluate"],
    "headprof.api.generation": ["GenerationReport", "generate", "generate_many", "kept", "kept_span"],
    "headprof.api.scoring": ["CPU_LENGTH", "CheckResult", "check", "default_profile_path", "preset_probe_set",
                             "probe_set", "score"],
    "headprof.artefacts.profile": ["Profile"],
    "headprof.errors": ["HeadprofError"],
}
_OWNER = {name: module for module, names in _OWNERS.items() for name in names}
__all__ = sorted(_OWNER)


def __getattr__(name: str):
    if name not in _OWNER:
        raise AttributeError(f"module 'headprof.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(_OWNER[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

